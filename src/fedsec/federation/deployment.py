"""The deployment engine: fedsec's Flower apps on a real SuperLink and one SuperNode per hospital.

:class:`LocalDeployment` starts, on loopback, the same processes a consortium runs on its
machines (``docker/compose.yaml`` is the containerised version)::

    flower-superlink                      one port (Fleet + Control + Runtime HTTP APIs)
     └─ flower-superexec                  started by the SuperLink: runs the ServerApp
         └─ flwr-serverapp                one process per run (fedsec's server_app:app)
    flower-supernode  (one per hospital)  node config: partition-id, num-partitions[, data-path]
     └─ ClientApp executor, either
        - "warm" (default): ``python -m fedsec.federation.deployment clientapp-worker``,
          one long-lived process per SuperNode (``--isolation process``) that imports
          torch and fedsec once and runs every message of the run in-process, or
        - "subprocess": Flower's own flower-superexec, which starts a new
          ``flwr-clientapp`` process for every message (re-imports torch each time).
    flwr run APP_DIR CONNECTION --run-config FILE --stream    submits the run, streams its log

Every process gets a private ``FLWR_HOME`` (a temporary folder: installed FABs, the CLI's
``config.toml``, test certificates), runtime dependency installation disabled (nothing is
downloaded), free loopback ports, and its output in a log file under ``log_dir``. Every
process also carries the environment variable ``FEDSEC_DEPLOYMENT_ID=<id>``, which Flower's
own children inherit: :meth:`LocalDeployment.stop` finds and ends all of them by that mark
(including the executors Flower starts in sessions of their own), so nothing is left
behind; :func:`find_processes` is what the tests use to check for orphans.

Modes: ``secure=False`` (plain HTTP, loopback only) and ``secure=True`` (TLS with a test CA
from :mod:`fedsec.federation.certs`, SuperNode authentication: every node's public key is
registered with ``flwr supernode register`` before the node starts; an unregistered node is
refused by the SuperLink and exits with Flower exit code 305).

Failures raise :class:`~fedsec.errors.FedsecError` naming the process and its log file: a
SuperLink that does not start or dies, a node that never joins (the missing partition-ids),
a node rejected by the SuperLink, a node or ClientApp worker that exits during the run, a
run that fails (the ServerApp's error) or exceeds its time limit. Nothing waits forever.

:func:`deploy` is what ``fedsec deploy SCENARIO [--secure] [--out DIR]`` calls; it returns
the run's ``summary.json`` as a dict, like :func:`fedsec.run`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from fedsec.errors import FedsecError

MARKER_ENV = "FEDSEC_DEPLOYMENT_ID"
CLIENTAPP_MODES = ("warm", "subprocess")
# Flower's exit code for a SuperNode whose connection was refused (e.g. unregistered key).
EXIT_SUPERNODE_CONNECTION_ERROR = 305
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_NODE_ID = re.compile(r"SuperNode ID: (\d+)")
_FLOWER_EXIT = re.compile(r"Exit Code: (\d+)")
_RUN_ID = re.compile(r"Successfully started run (\d+)")


# --------------------------------------------------------------------------- processes


def find_processes(deployment_id: str) -> list[int]:
    """PIDs of live (non-zombie) processes that carry ``FEDSEC_DEPLOYMENT_ID=<id>``."""
    mark = f"{MARKER_ENV}={deployment_id}".encode() + b"\0"
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                env = fh.read() + b"\0"
            if b"\0" + mark not in b"\0" + env:
                continue
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read()
            state = stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3]
            if state in (b"Z", b"X"):
                continue
        except (FileNotFoundError, ProcessLookupError, PermissionError, OSError):
            continue
        found.append(int(entry))
    return found


def _signal_all(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _read(path: Path) -> str:
    try:
        return _ANSI.sub("", path.read_text(errors="replace"))
    except FileNotFoundError:
        return ""


def _tail(path: Path, n: int = 15) -> str:
    lines = [ln for ln in _read(path).splitlines() if ln.strip()]
    return "\n".join("    " + ln for ln in lines[-n:])


_SETPRIV: list[str] | None = None


def _death_signal_prefix() -> list[str]:
    """``setpriv --pdeathsig TERM --`` where available (util-linux): a process we start gets
    SIGTERM if this Python process dies without cleaning up (even by SIGKILL), and Flower's
    own children follow their parents (``--parent-pid``). Empty elsewhere."""
    global _SETPRIV
    if _SETPRIV is None:
        exe = shutil.which("setpriv") if sys.platform.startswith("linux") else None
        ok = False
        if exe:
            try:
                ok = subprocess.run([exe, "--pdeathsig", "TERM", "--", "true"], capture_output=True,
                                    timeout=10).returncode == 0
            except (OSError, subprocess.SubprocessError):
                ok = False
        _SETPRIV = [exe, "--pdeathsig", "TERM", "--"] if ok else []
    return list(_SETPRIV)


def _bin(name: str) -> str:
    """A Flower executable next to this interpreter (the venv), else on PATH."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if not found:
        raise FedsecError(f"`{name}` not found next to {sys.executable} nor on PATH: install flwr==1.41.0")
    return found


@dataclass
class NodeSpec:
    """One hospital's SuperNode: its partition-id (hospital index), a display name and,
    optionally, the path of the hospital's own data file (node config ``data-path``)."""

    partition_id: int
    name: str = ""
    data_path: str | None = None
    node_config: dict = field(default_factory=dict)  # any further node-config entries

    def __post_init__(self):
        if not self.name:
            self.name = f"hospital-{self.partition_id}"

    @property
    def label(self) -> str:
        return f"{self.name} (partition-id={self.partition_id})"


@dataclass
class _Proc:
    label: str
    role: str  # superlink | supernode | clientapp | cli
    popen: subprocess.Popen
    log: Path
    node: NodeSpec | None = None

    def exited(self) -> int | None:
        return self.popen.poll()

    def flower_exit_code(self) -> int | None:
        codes = _FLOWER_EXIT.findall(_read(self.log))
        return int(codes[-1]) if codes else None


@dataclass
class RunResult:
    run_id: str
    status: str  # Flower's run status, e.g. finished:completed
    details: str
    seconds: float
    log: Path


class LocalDeployment:
    """A SuperLink and one SuperNode per hospital on loopback, as a context manager.

    >>> with LocalDeployment("/work/main", nodes=2, log_dir="out/deployment") as dep:
    ...     dep.run({"scenario": "scenarios/quickstart.yaml", "out": "/abs/out"})

    ``nodes``: a count or :class:`NodeSpec` list. ``clientapp``: ``"warm"`` (one
    long-lived ClientApp process per node, default) or ``"subprocess"`` (Flower's
    default: one process per message). ``unregistered``: partition-ids whose keys are
    deliberately *not* registered in secure mode (to test the rejection). ``start()``
    (called by ``__enter__``) returns once every node has joined or raises.
    """

    def __init__(
        self,
        app_dir: str | os.PathLike,
        nodes: int | Sequence[NodeSpec] = 2,
        *,
        log_dir: str | os.PathLike | None = None,
        secure: bool = False,
        clientapp: str = "warm",
        unregistered: Iterable[int] = (),
        start_timeout: float = 60.0,
        join_timeout: float = 120.0,
        preload: Sequence[str] = ("fedsec.federation.client_app",),
        env: Mapping[str, str] | None = None,
        keep_workdir: bool = False,
        poll_interval: float = 0.25,
    ):
        self.app_dir = Path(app_dir).resolve()
        if not (self.app_dir / "pyproject.toml").exists():
            raise FedsecError(f"{self.app_dir}: not a Flower app folder (no pyproject.toml)")
        if isinstance(nodes, int):
            if nodes < 1:
                raise FedsecError(f"a deployment needs at least one SuperNode, got nodes={nodes}")
            nodes = [NodeSpec(i) for i in range(nodes)]
        self.nodes = list(nodes)
        ids = [n.partition_id for n in self.nodes]
        if len(set(ids)) != len(ids):
            raise FedsecError(f"duplicate partition-ids in {ids}")
        if clientapp not in CLIENTAPP_MODES:
            raise FedsecError(f"clientapp must be one of {CLIENTAPP_MODES}, got {clientapp!r}")
        self.secure, self.clientapp = secure, clientapp
        self.unregistered = set(unregistered)
        if self.unregistered and not secure:
            raise FedsecError("unregistered nodes only make sense with secure=True (node authentication)")
        self.start_timeout, self.join_timeout = start_timeout, join_timeout
        self.preload = list(preload)
        self.extra_env = dict(env or {})
        self.keep_workdir, self.poll = keep_workdir, poll_interval
        self.id = uuid.uuid4().hex
        self.workdir = Path(tempfile.mkdtemp(prefix="fedsec-deploy-"))
        self.log_dir = Path(log_dir).resolve() if log_dir else self.workdir / "logs"
        self.flwr_home = self.workdir / "flwr-home"
        self.connection = "fedsec"
        self.port: int | None = None
        self.certs = None
        self.superlink: _Proc | None = None
        self.supernodes: dict[int, _Proc] = {}
        self.workers: dict[int, _Proc] = {}
        self._cli: list[_Proc] = []
        self.node_ids: dict[int, str] = {}
        self.timings: dict[str, float] = {}
        self._started = self._stopped = False
        self.leftover: list[int] = []

    # ------------------------------------------------------------------ set-up
    def __enter__(self) -> "LocalDeployment":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _env(self) -> dict:
        env = dict(os.environ)
        env.update(
            FLWR_HOME=str(self.flwr_home),
            FLWR_TELEMETRY_ENABLED="0",
            FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
            # SuperExec asks its Runtime API for new tasks every second by default.
            FLWR_SUPEREXEC_TASK_POLL_INTERVAL="0.25",
            PYTHONUNBUFFERED="1",
            RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0",
        )
        # Flower starts flower-superexec / flwr-serverapp / flwr-clientapp by name.
        env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
        env.update(self.extra_env)
        env[MARKER_ENV] = self.id
        return env

    def _spawn(self, label: str, role: str, cmd: list[str], log_name: str, node: NodeSpec | None = None) -> _Proc:
        log = self.log_dir / log_name
        # A fresh file: readiness is read from the log ("SuperNode ID: ..."), so an old
        # log of a re-used results folder must not count.
        with open(log, "wb") as fh:
            fh.write(f"$ {' '.join(cmd)}\n".encode())
            fh.flush()
            popen = subprocess.Popen(
                _death_signal_prefix() + cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self._env(), cwd=self.app_dir, start_new_session=True,
            )
        return _Proc(label, role, popen, log, node)

    def _cli_run(self, args: list[str], timeout: float = 60.0) -> str:
        """Run a ``flwr`` CLI command against this deployment; return its stdout."""
        cmd = [_bin("flwr"), *args]
        try:
            res = subprocess.run(
                cmd, capture_output=True, text=True, env=self._env(), cwd=self.workdir,
                timeout=timeout, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        except subprocess.TimeoutExpired as err:
            raise FedsecError(f"`flwr {' '.join(args)}` did not answer within {timeout:g} s") from err
        with open(self.log_dir / "flwr-cli.log", "a") as fh:
            fh.write(f"$ flwr {' '.join(args)}  (exit {res.returncode})\n{res.stdout}{res.stderr}\n")
        failed = res.returncode != 0
        if not failed and "json" in args:  # flwr 1.41 exits 0 with {"success": false, ...} on errors
            try:
                answer = json.loads(res.stdout)
            except ValueError:  # the callers report an answer they cannot read
                answer = None
            failed = isinstance(answer, dict) and answer.get("success") is False
        if failed:
            raise FedsecError(
                f"`flwr {' '.join(args)}` failed (exit {res.returncode}):\n{_ANSI.sub('', res.stdout + res.stderr)[-2000:]}"
            )
        return res.stdout

    def start(self) -> "LocalDeployment":
        if self._started:
            return self
        self._started = True
        t0 = time.perf_counter()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        (self.log_dir / "flwr-cli.log").unlink(missing_ok=True)
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        if self.secure:
            from fedsec.federation.certs import make_certificates

            self.certs = make_certificates(
                self.workdir / "certs", nodes=[n.name for n in self.nodes], hostnames=()
            )
        self._start_superlink()
        self._write_connection()
        if self.secure:
            self._register_nodes()
        for node in self.nodes:
            self._start_node(node)
        self.wait_for_nodes(self.join_timeout)
        self.timings["startup_s"] = time.perf_counter() - t0
        return self

    def _start_superlink(self) -> None:
        self.port = _free_port()
        cmd = [_bin("flower-superlink"), "--port", str(self.port), "--host", "127.0.0.1",
               "--disable-runtime-dependency-installation"]
        if self.secure:
            c = self.certs
            cmd += ["--ssl-ca-certfile", str(c.ca_cert), "--ssl-certfile", str(c.server_cert),
                    "--ssl-keyfile", str(c.server_key), "--enable-supernode-auth"]
        else:
            cmd += ["--insecure"]
        self.superlink = self._spawn("the SuperLink", "superlink", cmd, "superlink.log")
        deadline = time.monotonic() + self.start_timeout
        while not _port_open(self.port):
            if self.superlink.exited() is not None:
                raise self._died(self.superlink, "while starting")
            if time.monotonic() > deadline:
                raise FedsecError(
                    f"the SuperLink did not open port {self.port} within {self.start_timeout:g} s; "
                    f"see {self.superlink.log}\n{_tail(self.superlink.log)}"
                )
            time.sleep(self.poll)

    def _write_connection(self) -> None:
        lines = ["[superlink]", f'default = "{self.connection}"', "",
                 f"[superlink.{self.connection}]", f'address = "127.0.0.1:{self.port}"']
        if self.secure:
            lines.append(f'root-certificates = "{self.certs.ca_cert}"')
        else:
            lines.append("insecure = true")
        (self.flwr_home / "config.toml").write_text("\n".join(lines) + "\n")

    def _register_nodes(self) -> None:
        for node in self.nodes:
            if node.partition_id in self.unregistered:
                continue
            out = self._cli_run(["supernode", "register", str(self.certs.nodes[node.name].public_key),
                                 self.connection, "--format", "json"])
            try:
                self.node_ids[node.partition_id] = str(json.loads(out)["node-id"])
            except (ValueError, KeyError) as err:
                raise FedsecError(f"could not register {node.label}: unexpected answer {out!r}") from err

    def _node_config(self, node: NodeSpec) -> str:
        cfg = {"partition-id": node.partition_id, "num-partitions": len(self.nodes), **node.node_config}
        if node.data_path:
            cfg["data-path"] = str(node.data_path)
        parts = []
        for k, v in cfg.items():
            parts.append(f"{k}={json.dumps(v) if isinstance(v, str) else v}")
        return " ".join(parts)

    def _superlink_address(self, node: NodeSpec) -> str:
        """The Fleet API address a node dials (tests override it to make a node that never joins)."""
        return f"127.0.0.1:{self.port}"

    def _start_node(self, node: NodeSpec) -> None:
        runtime_port = _free_port()
        cmd = [_bin("flower-supernode"), "--superlink", self._superlink_address(node),
               "--host", "127.0.0.1", "--port", str(runtime_port),
               "--node-config", self._node_config(node),
               "--isolation", "process" if self.clientapp == "warm" else "subprocess"]
        if self.secure:
            cmd += ["--root-certificates", str(self.certs.ca_cert),
                    "--auth-supernode-private-key", str(self.certs.nodes[node.name].private_key)]
        else:
            cmd += ["--insecure"]
        proc = self._spawn(f"SuperNode {node.label}", "supernode", cmd, f"supernode-{node.name}.log", node)
        self.supernodes[node.partition_id] = proc
        if self.clientapp == "warm":
            wcmd = [sys.executable, "-m", "fedsec.federation.deployment", "clientapp-worker",
                    "--runtime-api-address", f"127.0.0.1:{runtime_port}", "--insecure",
                    "--parent-pid", str(proc.popen.pid)]
            for mod in self.preload:
                wcmd += ["--preload", mod]
            self.workers[node.partition_id] = self._spawn(
                f"the ClientApp worker of {node.label}", "clientapp", wcmd, f"clientapp-{node.name}.log", node)

    def wait_for_nodes(self, timeout: float) -> None:
        """Block until every SuperNode has joined the SuperLink; raise naming the missing ones."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive("while the nodes were joining")
            joined = {}
            for pid, proc in self.supernodes.items():
                ids = _NODE_ID.findall(_read(proc.log))
                if ids:
                    joined[pid] = ids[-1]
            self.node_ids.update(joined)
            missing = [n for n in self.nodes if n.partition_id not in joined]
            if not missing:
                return
            if time.monotonic() > deadline:
                raise FedsecError(
                    f"{len(missing)} of {len(self.nodes)} SuperNodes did not join the SuperLink within "
                    f"{timeout:g} s: missing partition-id(s) {[n.partition_id for n in missing]}\n"
                    + "\n".join(f"  {n.label}: see {self.supernodes[n.partition_id].log}\n"
                                f"{_tail(self.supernodes[n.partition_id].log, 5)}" for n in missing)
                )
            time.sleep(self.poll)

    # ------------------------------------------------------------------ health
    def _died(self, proc: _Proc, phase: str) -> FedsecError:
        rc = proc.exited()
        code = proc.flower_exit_code()
        if proc.role == "supernode" and code == EXIT_SUPERNODE_CONNECTION_ERROR:
            reason = "refused by the SuperLink"
            if self.secure:
                key = self.certs.nodes[proc.node.name].public_key if self.certs else "its public key"
                reason += (f" (Flower exit code 305: node authentication failed; its public key {key} "
                           f"is not registered: `flwr supernode register {key} <connection>`)")
            else:
                reason += " (Flower exit code 305: could not connect)"
            return FedsecError(f"{proc.label} was {reason} {phase}; see {proc.log}\n{_tail(proc.log, 8)}")
        what = {"supernode": " (the hospital left the federation)",
                "clientapp": " (the hospital can no longer run its ClientApp)"}.get(proc.role, "")
        flower = f", Flower exit code {code}" if code is not None else ""
        return FedsecError(
            f"{proc.label} exited with code {rc}{flower} {phase}{what}; see {proc.log}\n{_tail(proc.log)}"
        )

    def check_alive(self, phase: str = "during the run") -> None:
        """Raise FedsecError if the SuperLink, a SuperNode or a ClientApp worker has exited."""
        procs = [self.superlink, *self.supernodes.values(), *self.workers.values()]
        for proc in procs:
            if proc is not None and proc.exited() is not None:
                raise self._died(proc, phase)

    # ------------------------------------------------------------------ running
    def run(self, run_config: Mapping[str, object], timeout: float | None = 3600.0,
            log_name: str = "serverapp.log") -> RunResult:
        """Submit the app with ``flwr run`` and wait until the run finishes.

        Returns the run's id and Flower status (``finished:completed``); raises
        FedsecError if the run fails, a process dies or ``timeout`` seconds pass.
        """
        import tomli_w

        if not self._started:
            self.start()
        t0 = time.perf_counter()
        cfg_file = self.workdir / f"run-config-{uuid.uuid4().hex[:8]}.toml"
        cfg_file.write_text(tomli_w.dumps({k: v for k, v in run_config.items()}))
        cmd = [_bin("flwr"), "run", str(self.app_dir), self.connection, "--run-config", str(cfg_file), "--stream"]
        proc = self._spawn("`flwr run`", "cli", cmd, log_name)
        self._cli.append(proc)
        deadline = None if timeout is None else time.monotonic() + timeout
        run_id = None
        try:
            while True:
                self.check_alive("during the run")
                if run_id is None:
                    ids = _RUN_ID.findall(_read(proc.log))
                    run_id = ids[0] if ids else None
                if proc.exited() is not None:
                    break
                if deadline is not None and time.monotonic() > deadline:
                    raise FedsecError(
                        f"run {run_id or '(not started)'} did not finish within {timeout:g} s; "
                        f"see {proc.log}\n{_tail(proc.log)}")
                time.sleep(self.poll)
            # `flwr run` ends when the log stream ends, also when the SuperLink died
            self.check_alive("during the run")
            if run_id is None:
                ids = _RUN_ID.findall(_read(proc.log))
                run_id = ids[0] if ids else None
            if run_id is None:
                raise FedsecError(f"`flwr run` could not start the run (exit {proc.exited()}); "
                                  f"see {proc.log}\n{_tail(proc.log)}")
            # The log stream ends with the run; the status says how it ended.
            status, details = self._status(run_id)
            while not status.startswith("finished"):
                self.check_alive("during the run")
                if deadline is not None and time.monotonic() > deadline:
                    raise FedsecError(f"run {run_id} did not finish within {timeout:g} s (status {status}); "
                                      f"see {proc.log}")
                time.sleep(1.0)
                status, details = self._status(run_id)
        except BaseException:
            if run_id is not None and self.superlink and self.superlink.exited() is None:
                try:
                    self._cli_run(["stop", run_id, self.connection], timeout=20)
                except FedsecError:
                    pass
            raise
        seconds = time.perf_counter() - t0
        self.timings["run_s"] = seconds
        if status != "finished:completed":
            errors = [ln for ln in _read(proc.log).splitlines() if "ERROR" in ln or "Error" in ln]
            hint = "\n".join("    " + ln for ln in errors[-10:]) or _tail(proc.log)
            raise FedsecError(f"run {run_id} ended with status {status} ({details}); the ServerApp's "
                              f"log is {proc.log}\n{hint}")
        return RunResult(run_id, status, details, seconds, proc.log)

    def _status(self, run_id: str) -> tuple[str, str]:
        out = self._cli_run(["list", self.connection, "--run-id", run_id, "--format", "json"], timeout=60)
        try:
            run = json.loads(out)["runs"][0]
        except (ValueError, KeyError, IndexError) as err:
            raise FedsecError(f"`flwr list` gave an unexpected answer for run {run_id}: {out[-500:]!r}") from err
        return str(run.get("status", "")), str(run.get("status-details", ""))

    # ------------------------------------------------------------------ tear-down
    def processes(self) -> list[int]:
        """Live processes of this deployment (started here or by Flower on its behalf)."""
        return find_processes(self.id)

    def stop(self, grace: float = 5.0) -> None:
        """End every process of this deployment: SIGTERM, then SIGKILL after ``grace`` s."""
        if self._stopped:
            return
        self._stopped = True
        started = [p for p in [*self._cli, *self.workers.values(), *self.supernodes.values(), self.superlink] if p]
        # Our own children lead their own process groups; Flower's executors run in
        # sessions of their own, so they are found by the environment mark.
        for proc in started:
            if proc.exited() is None:
                try:
                    os.killpg(proc.popen.pid, signal.SIGTERM)
                except (ProcessLookupError, PermissionError):
                    pass
        _signal_all(self.processes(), signal.SIGTERM)
        deadline = time.monotonic() + grace
        while self.processes() and time.monotonic() < deadline:
            time.sleep(0.1)
        for _ in range(3):
            left = self.processes()
            if not left:
                break
            for proc in started:
                try:
                    os.killpg(proc.popen.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            _signal_all(left, signal.SIGKILL)
            time.sleep(0.3)
        for proc in started:  # reap our direct children (no zombies)
            try:
                proc.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.leftover = self.processes()
        if not self.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


# --------------------------------------------------------------------------- deploy()


def default_app_dir() -> Path:
    """fedsec's own Flower app folder (the repository root holding pyproject.toml)."""
    import fedsec

    root = Path(fedsec.__file__).resolve().parents[2]
    if (root / "pyproject.toml").exists():
        return root
    raise FedsecError(
        f"could not find fedsec's Flower app folder (looked for {root / 'pyproject.toml'}); pass app_dir="
    )


def fab_hash(app_dir: str | os.PathLike) -> str:
    """The hash Flower gives the FAB of ``app_dir`` (sha256 of the FAB bytes; Flower builds
    FABs with a fixed date, so the same files give the same hash on any machine)."""
    import hashlib

    from flwr.cli.build import build_fab_from_disk

    return hashlib.sha256(build_fab_from_disk(Path(app_dir))).hexdigest()


def _hospital_names(scenario) -> list[str]:
    """The hospitals in the order of their partition-ids, as the simulation names them,
    read from the scenario alone: the operator's machine need not hold any patient data
    (the nodes introduce themselves by these names when the run starts)."""
    from fedsec.registry import TASKS

    fed = scenario.federation
    natural = str(dict(fed.partition).get("name", "natural")) == "natural"
    if fed.sites and natural:
        return [str(s) for s in fed.sites]  # a natural split: one hospital per listed site
    spec = TASKS.get(scenario.task.name, key="task.name").spec
    if natural and spec.sites:
        return list(spec.sites)
    if natural:
        raise FedsecError(f"federation.sites: task '{scenario.task.name}' takes its hospitals from the data; a "
                          "deployment needs them listed (federation.sites), in the order of the partition-ids")
    if fed.hospitals is None:
        raise FedsecError("federation.hospitals: a deployment needs the number of hospitals")
    return [f"hospital_{i}" for i in range(int(fed.hospitals))]


def check_deployable(scenario) -> None:
    """Refuse, before any node starts, what needs patient data on the server: a
    deployment's server holds none (``adversary.server_data_needs``)."""
    from fedsec.federation.adversary import server_data_needs

    needs = server_data_needs(scenario)
    if needs:
        raise FedsecError("a deployment's server holds no patient data, but " + "; ".join(needs)
                          + " -- run this scenario in simulation (fedsec run)")


def deploy(
    scenario_path: str | os.PathLike,
    overrides: Sequence[str] | str | None = None,
    out: str | os.PathLike | None = None,
    secure: bool = False,
    *,
    app_dir: str | os.PathLike | None = None,
    clientapp: str = "warm",
    data_paths: Mapping[int, str] | Sequence[str] | None = None,
    join_timeout: float = 120.0,
    run_timeout: float | None = None,
    verbose: bool = False,
) -> dict:
    """Run a scenario on a local SuperLink + one SuperNode per hospital; return its summary.

    The results folder is the same as a simulation's (``out``, or
    ``runs/<scenario>/<UTC time>-<hash>/``) plus ``deployment/`` with every process's
    log and ``deployment.json`` (mode, ports, node ids, timings). The returned dict is
    ``summary.json`` with an extra ``deployment`` entry (the same information).
    ``data_paths``: one data file per hospital (node config ``data-path``).
    """
    from fedsec.results import RunDir
    from fedsec.scenario import load_scenario

    ov = overrides.split() if isinstance(overrides, str) else list(overrides or [])
    path = Path(scenario_path)
    if not path.is_file():
        raise FedsecError(f"{scenario_path}: scenario file not found")
    scenario = load_scenario(str(path), ov or None)  # fail fast on an invalid scenario
    check_deployable(scenario)
    app = Path(app_dir).resolve() if app_dir else default_app_dir()
    names = _hospital_names(scenario)
    if data_paths is not None and not isinstance(data_paths, Mapping):
        data_paths = dict(enumerate(data_paths))
    nodes = [NodeSpec(i, name, (data_paths or {}).get(i)) for i, name in enumerate(names)]
    run_dir = (Path(out) if out else RunDir.for_scenario(scenario, None).path).resolve()
    timeout = run_timeout
    if timeout is None:  # the ServerApp's own per-round limit, plus start-up, for every round
        timeout = 600.0 + float(scenario.federation.rounds) * 2 * float(scenario.federation.timeout_s)
    run_config = {"scenario": str(path.resolve()), "overrides": " ".join(ov), "out": str(run_dir)}
    t0 = time.perf_counter()
    info: dict = {"mode": "secure" if secure else "insecure", "clientapp": clientapp,
                  "app_dir": str(app), "hospitals": names}
    if verbose:
        print(f"[fedsec] starting a SuperLink and {len(nodes)} SuperNode(s) ({info['mode']}); logs in "
              f"{run_dir / 'deployment'}", file=sys.stderr)
    with LocalDeployment(app, nodes, log_dir=run_dir / "deployment", secure=secure, clientapp=clientapp,
                         join_timeout=join_timeout) as dep:
        info.update(port=dep.port, node_ids={n.name: dep.node_ids.get(n.partition_id) for n in nodes})
        if verbose:
            print(f"[fedsec] {len(nodes)} node(s) joined in {dep.timings['startup_s']:.1f} s; running", file=sys.stderr)
        result = dep.run(run_config, timeout=timeout)
        info.update(run_id=result.run_id, status=result.status, **{k: round(v, 2) for k, v in dep.timings.items()})
    info["leftover_processes"] = dep.leftover
    info["total_s"] = round(time.perf_counter() - t0, 2)
    (run_dir / "deployment" / "deployment.json").write_text(json.dumps(info, indent=2) + "\n")
    summary_file = run_dir / "summary.json"
    if not summary_file.exists():
        raise FedsecError(f"the run finished but wrote no {summary_file}; see {result.log}")
    summary = json.loads(summary_file.read_text())
    summary["deployment"] = info
    return summary


# --------------------------------------------------------------------------- warm ClientApp worker


def _gone(pid: int) -> bool:
    """True once ``pid`` has exited (also when it is an unreaped zombie, which
    ``os.kill(pid, 0)`` -- and so Flower's own parent monitor -- still counts as alive)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return True
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] in (b"Z", b"X")


def _exit_with(pid: int, interval: float = 0.5) -> None:
    """End this process (SIGTERM to itself) when ``pid`` -- its SuperNode -- is gone."""
    import threading

    def watch():
        while not _gone(pid):
            time.sleep(interval)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="supernode-monitor", daemon=True).start()


class _TaskCancelled(BaseException):
    """Raised in the worker's main thread when Flower cancels the running task (SIGINT)."""


def serve_clientapps(
    runtime_api_address: str,
    insecure: bool = True,
    root_certificates: str | None = None,
    preload: Sequence[str] = (),
    parent_pid: int | None = None,
    poll_interval: float = 0.25,
    max_tasks: int | None = None,
    pinned_fabs: Sequence[str] = (),
) -> None:
    """A long-lived ClientApp executor for one SuperNode (``--isolation process``).

    ``pinned_fabs``: when given, the hospital runs only an app whose FAB hash (sha256 of the
    FAB Flower ships, see :func:`fab_hash`) is listed; any other app gets an error reply
    naming both hashes and is never installed or imported.

    Flower's own executor (``flower-superexec``) starts a fresh ``flwr-clientapp``
    process per message, which re-imports torch and fedsec and reloads the hospital's
    data each time. This loop does what that process does -- acquire a task from the
    SuperNode's Runtime API, pull the message, context and FAB, run the ClientApp, push
    the reply and the updated context -- but in one process for the whole run, so
    imports and the ClientApp's per-process caches (the task, the data) are paid once,
    like a Ray actor in simulation. A ClientApp that raises gets an error reply, as
    with Flower's executor; the worker goes on with the next message.
    """
    import importlib
    import logging

    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.cli.install import install_from_fab
    from flwr.clientapp.client_app import LoadClientAppError
    from flwr.clientapp.utils import get_load_client_app_fn
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
    from flwr.supercore.constant import TaskType
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

    log = logging.getLogger("fedsec.deployment.worker")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    t0 = time.perf_counter()
    for mod in preload:
        importlib.import_module(mod)
    log.info("preloaded %s in %.1f s", ", ".join(preload) or "nothing", time.perf_counter() - t0)
    if parent_pid is not None:
        _exit_with(parent_pid)

    certs = validate_and_resolve_root_certificates(root_certificates, insecure)

    def client(*interceptors) -> RuntimeHttpClient:
        return RuntimeHttpClient.from_server_address(
            server_address=runtime_api_address, insecure=insecure, root_certificates=certs,
            interceptors=list(interceptors), retry_invoker=make_simple_http_retry_invoker())

    acquirer = client(RuntimeVersionHttpInterceptor(component_name="SuperExec"))
    load_app = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
    installed: set[str] = set()
    in_task = [False]

    def on_sigint(signum, frame):  # Flower's heartbeat raises SIGINT when the task is void
        if in_task[0]:
            raise _TaskCancelled()

    signal.signal(signal.SIGINT, on_sigint)
    done = 0
    while max_tasks is None or done < max_tasks:
        res = acquirer.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
        if not (res.HasField("task") and res.token):
            time.sleep(poll_interval)
            continue
        t_task = time.perf_counter()
        rt = client(RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                    RuntimeTokenHttpInterceptor(res.token))
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(rt))
        message = context = reply = None
        status, details, kind = SubStatus.FAILED, "ClientApp task failed due to unknown reason", "?"
        in_task[0] = True
        try:
            heartbeat.start()
            message, context, run, fab = pull_task_input(rt)
            kind = message.metadata.message_type
            if pinned_fabs and fab.hash_str not in pinned_fabs:
                raise PermissionError(f"this hospital runs only the app with FAB hash {', '.join(pinned_fabs)}; "
                                      f"the operator sent {fab.hash_str} ({run.fab_id} {run.fab_version})")
            if fab.hash_str not in installed:
                log.info("installing app %s %s, FAB hash %s", run.fab_id, run.fab_version, fab.hash_str)
                install_from_fab(fab.content, skip_prompt=True)
                installed.add(fab.hash_str)
            app = load_app(run.fab_id, run.fab_version, fab.hash_str)
            reply = app(message=message, context=context)
            status, details = SubStatus.COMPLETED, ""
        except _TaskCancelled:
            details = "task cancelled by the SuperNode"
            log.warning("task %s cancelled", kind)
        except Exception as ex:  # pylint: disable=broad-except
            code = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
            details = f"{type(ex)}:<'{ex}'>"
            if isinstance(ex, LoadClientAppError):
                code, details = ErrorCode.LOAD_CLIENT_APP_EXCEPTION, "An exception was raised when attempting to load `ClientApp`"
            log.exception("ClientApp raised an exception")
            if message is not None:
                reply = Message(Error(code=code, reason=details), reply_to=message)
        finally:
            try:
                if reply is not None and context is not None:
                    push_message(rt, reply, context)
                push_task_output(client=rt, context=context, sub_status=status, details=details)
            except Exception:  # pylint: disable=broad-except
                log.exception("could not push the reply to the SuperNode")
            in_task[0] = False
            if heartbeat.is_running:
                heartbeat.stop()
            rt.close()
        done += 1
        log.info("%s message done in %.2f s (%s)", kind, time.perf_counter() - t_task, status)


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedsec.federation.deployment")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("deploy", help="run a scenario on a local SuperLink + SuperNodes")
    d.add_argument("scenario")
    d.add_argument("overrides", nargs="*", help="key=value overrides")
    d.add_argument("--secure", action="store_true", help="TLS + SuperNode authentication")
    d.add_argument("--out", default=None)
    d.add_argument("--clientapp", choices=CLIENTAPP_MODES, default="warm")
    w = sub.add_parser("clientapp-worker", help="long-lived ClientApp executor for one SuperNode")
    w.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API, host:port")
    w.add_argument("--insecure", action="store_true")
    w.add_argument("--root-certificates", default=None)
    w.add_argument("--preload", action="append", default=[], help="module to import once at start")
    w.add_argument("--parent-pid", type=int, default=None)
    w.add_argument("--poll-interval", type=float, default=0.25)
    w.add_argument("--pin-fab", action="append", default=[], metavar="SHA256",
                   help="run only the app with this FAB hash (repeatable); see `fab-hash`")
    h = sub.add_parser("fab-hash", help="print the FAB hash of a Flower app folder (what a hospital pins)")
    h.add_argument("app_dir", nargs="?", default=None)
    args = parser.parse_args(argv)
    if args.command == "clientapp-worker":
        serve_clientapps(args.runtime_api_address, args.insecure, args.root_certificates, args.preload,
                         args.parent_pid, args.poll_interval, pinned_fabs=args.pin_fab)
        return 0
    if args.command == "fab-hash":
        print(fab_hash(args.app_dir or default_app_dir()))
        return 0
    try:
        summary = deploy(args.scenario, args.overrides, args.out, args.secure, clientapp=args.clientapp,
                         verbose=True)
    except FedsecError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({k: summary.get(k) for k in ("status", "final", "deployment")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(_main())

"""``fedsec deploy --docker``: a scenario on a SuperLink and one SuperNode per hospital,
each in its own Docker container, with TLS and SuperNode authentication.

What runs (all from the image ``docker/build-images.sh`` builds; no registry)::

    network  fedsec-<id>                     a bridge network of this run only
    fedsec-<id>-superlink                    flower-superlink, TLS (server cert with
                                             SAN "superlink"), --enable-supernode-auth;
                                             runs the ServerApp (fedsec's server_app:app)
                                             in its own process; port 8000 published on
                                             127.0.0.1 only, for the operator's flwr CLI
    fedsec-<id>-<hospital>   (one each)      flower-supernode dialling superlink:8000 with
                                             the CA and its own node key (only its own
                                             files mounted), plus fedsec's warm ClientApp
                                             worker (one process for the whole run);
                                             optionally the hospital's data folder,
                                             read-only at /data

The operator's side (this process) makes a CA, the SuperLink's certificate and one key
pair per hospital for the run, registers the hospitals' public keys with
``flwr supernode register`` (a node whose key is not registered is refused), submits the
run with ``flwr run`` and prints the ServerApp's per-round lines as they come. The results
folder is written inside the SuperLink container and copied out with ``docker cp`` at the
end, also when the run failed. Every container and the network carry the label
``org.fedsec.deployment=<id>`` and are removed at the end -- on success, on failure, on
Ctrl-C (SIGINT) and on SIGTERM.

Failures raise :class:`~fedsec.errors.FedsecError` naming the hospital (its container,
its Flower exit code, the last lines of its log).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from fedsec.errors import FedsecError
from fedsec.federation.deployment import (
    EXIT_SUPERNODE_CONNECTION_ERROR,
    NodeSpec,
    _ANSI,
    _FLOWER_EXIT,
    _NODE_ID,
    _RUN_ID,
    _bin,
    _read,
    _tail,
)

LABEL = "org.fedsec.deployment"
UID = 49999  # the image's user (as in Flower's own images)
_ROUND_LINE = re.compile(r"^\s*round\s+\d+/\d+")
ROOT = Path(__file__).resolve().parents[3]


def docker_bin() -> str:
    """Debian's docker client (has BuildKit built in), else the first ``docker`` on PATH."""
    for cand in ("/usr/bin/docker", shutil.which("docker")):
        if cand and Path(cand).exists():
            return cand
    raise FedsecError("no `docker` client found: apt-get install docker.io (see docker/README.md)")


def docker_available() -> tuple[bool, str]:
    """(True, "") when a Docker engine answers; else (False, why)."""
    try:
        exe = docker_bin()
    except FedsecError as err:
        return False, str(err)
    try:
        res = subprocess.run([exe, "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True,
                             timeout=20)
    except (OSError, subprocess.TimeoutExpired) as err:
        return False, f"`docker info` failed: {err}"
    if res.returncode != 0:
        return False, f"no Docker engine answers (`docker info`: {res.stderr.strip()[-300:]})"
    return True, res.stdout.strip()


def build_image(log: Callable[[str], None] | None = None) -> str:
    """Run ``docker/build-images.sh`` (reuses an image of the same sources); return the tag."""
    script = ROOT / "docker" / "build-images.sh"
    if not script.exists():
        raise FedsecError(f"{script} not found: pass --image with an image built from docker/Dockerfile")
    res = subprocess.run(["bash", str(script)], stdout=subprocess.PIPE, stderr=None if log else subprocess.PIPE,
                         text=True)
    if res.returncode != 0:
        raise FedsecError(f"building the fedsec image failed (exit {res.returncode}): {script}\n"
                          f"{(res.stderr or '')[-2000:]}")
    return res.stdout.strip().splitlines()[-1]


@dataclass
class _Container:
    name: str
    label: str  # what errors call it: "the SuperLink", "hospital cleveland (partition-id=0)"
    role: str
    node: NodeSpec | None = None
    started_at: str | None = None  # docker's State.StartedAt when first seen
    restarted: bool = False


class DockerDeployment:
    """A SuperLink and one SuperNode per hospital in containers, as a context manager.

    ``unregistered``: partition-ids whose keys are not registered (refused by the SuperLink).
    ``wrong_ca``: partition-ids given a CA that did not sign the SuperLink's certificate.
    ``data_dirs``: partition-id -> host folder mounted read-only at /data in that hospital's
    container only (node config ``data-path=/data``).
    """

    def __init__(self, image: str, nodes: Sequence[NodeSpec], *, log_dir: str | os.PathLike,
                 app_dir: str | os.PathLike | None = None, unregistered: Iterable[int] = (),
                 wrong_ca: Iterable[int] = (), data_dirs: Mapping[int, str] | None = None,
                 join_timeout: float = 180.0, echo: Callable[[str], None] | None = None,
                 min_hospitals: int | None = None, pin_fab: bool | str = True):
        self.docker = docker_bin()
        self.image, self.nodes = image, list(nodes)
        self.app_dir = Path(app_dir or ROOT).resolve()
        self.unregistered, self.wrong_ca = set(unregistered), set(wrong_ca)
        self.data_dirs = dict(data_dirs or {})
        self.join_timeout = join_timeout
        # federation.min_hospitals: a hospital may leave mid-run while this many remain (the
        # ServerApp then counts its missing replies against the same limit).
        self.min_hospitals = min_hospitals
        # Each hospital runs only the app it pinned: by default the FAB hash of app_dir (what
        # `flwr run` sends); a string pins that hash instead (a test of the refusal).
        self.pin_fab = pin_fab
        self.fab_hash: str | None = None
        self.lost: dict[int, str] = {}  # partition-id -> why, hospitals that left a run that went on
        self.echo = echo or (lambda s: None)
        self.id = uuid.uuid4().hex[:10]
        self.prefix = f"fedsec-{self.id}"
        self.network = self.prefix
        self.workdir = Path(tempfile.mkdtemp(prefix="fedsec-docker-"))
        self.log_dir = Path(log_dir).resolve()
        self.flwr_home = self.workdir / "flwr-home"
        self.connection = "fedsec-docker"
        self.port: int | None = None
        self.superlink: _Container | None = None
        self.hospitals: dict[int, _Container] = {}
        self.node_ids: dict[int, str] = {}
        self.timings: dict[str, float] = {}
        self.containers_started: list[str] = []
        self._stopped = False

    # ------------------------------------------------------------------ docker helpers
    def _docker(self, *args: str, check: bool = True, timeout: float = 120.0) -> subprocess.CompletedProcess:
        try:
            res = subprocess.run([self.docker, *args], capture_output=True, text=True, timeout=timeout,
                                 stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as err:
            raise FedsecError(f"`docker {' '.join(args[:3])} ...` did not answer within {timeout:g} s") from err
        if check and res.returncode != 0:
            raise FedsecError(f"`docker {' '.join(args)}` failed (exit {res.returncode}): {res.stderr.strip()[-800:]}")
        return res

    def _logs(self, c: _Container) -> str:
        res = self._docker("logs", c.name, check=False, timeout=60)
        return _ANSI.sub("", res.stdout + res.stderr)

    def _state(self, c: _Container) -> tuple[bool, int]:
        res = self._docker("inspect", "--format", "{{.State.Running}} {{.State.ExitCode}} {{.State.StartedAt}}",
                           c.name, check=False)
        if res.returncode != 0:
            return False, -1
        running, code, started = res.stdout.split()
        if c.started_at is None:
            c.started_at = started
        elif started != c.started_at:
            c.restarted = True
        return running == "true", int(code)

    def _save_log(self, c: _Container) -> Path:
        path = self.log_dir / f"{c.name.removeprefix(self.prefix + '-')}.log"
        path.write_text(self._logs(c))
        return path

    def _secrets_dir(self, name: str, files: Mapping[str, Path]) -> Path:
        """A folder holding only ``files`` (renamed), readable by the image's user only."""
        d = self.workdir / "mounts" / name
        d.mkdir(parents=True)
        for target, src in files.items():
            shutil.copyfile(src, d / target)
            os.chmod(d / target, 0o400)
        os.chmod(d, 0o500)
        if os.geteuid() == 0:
            for p in [d, *d.iterdir()]:
                os.chown(p, UID, UID)
        else:  # an unprivileged operator cannot chown: the files stay world-readable in a private tmp dir
            for p in d.iterdir():
                os.chmod(p, 0o444)
            os.chmod(d, 0o555)
        return d

    def _run(self, c: _Container, args: Sequence[str], mounts: Sequence[str] = (), publish: bool = False) -> None:
        cmd = ["run", "-d", "--name", c.name, "--label", f"{LABEL}={self.id}", "--network", self.network,
               "--security-opt", "no-new-privileges", "--cap-drop", "ALL"]
        if c.role == "superlink":
            cmd += ["--network-alias", "superlink"]
        if publish:
            cmd += ["-p", "127.0.0.1::8000"]
        for m in mounts:
            cmd += ["-v", m]
        self._docker(*cmd, self.image, *args)
        self.containers_started.append(c.name)

    # ------------------------------------------------------------------ start
    def __enter__(self) -> "DockerDeployment":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "DockerDeployment":
        from fedsec.federation.certs import make_certificates

        t0 = time.perf_counter()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.flwr_home.mkdir(parents=True)
        self._docker("image", "inspect", self.image)
        if self.pin_fab:
            from fedsec.federation.deployment import fab_hash

            self.fab_hash = self.pin_fab if isinstance(self.pin_fab, str) else fab_hash(self.app_dir)
        certs = self.certs = make_certificates(self.workdir / "certs", nodes=[n.name for n in self.nodes],
                                               hostnames=("superlink",))
        other_ca = make_certificates(self.workdir / "other-ca") if self.wrong_ca else None
        self._docker("network", "create", "--label", f"{LABEL}={self.id}", self.network)
        # -- SuperLink
        self.superlink = _Container(f"{self.prefix}-superlink", "the SuperLink", "superlink")
        sl = self._secrets_dir("superlink", {"ca.crt": certs.ca_cert, "superlink.crt": certs.server_cert,
                                            "superlink.key": certs.server_key})
        self._run(self.superlink, [
            "flower-superlink", "--host", "0.0.0.0", "--port", "8000",
            "--ssl-ca-certfile", "/certs/ca.crt", "--ssl-certfile", "/certs/superlink.crt",
            "--ssl-keyfile", "/certs/superlink.key", "--enable-supernode-auth",
            "--disable-runtime-dependency-installation"], [f"{sl}:/certs:ro"], publish=True)
        port = self._docker("port", self.superlink.name, "8000").stdout.strip().splitlines()[0]
        self.port = int(port.rsplit(":", 1)[1])
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{self.connection}"\n\n[superlink.{self.connection}]\n'
            f'address = "127.0.0.1:{self.port}"\nroot-certificates = "{certs.ca_cert}"\n')
        self._wait_superlink()
        self.echo(f"SuperLink up in container {self.superlink.name} (TLS, node authentication; "
                  f"127.0.0.1:{self.port})")
        # -- node keys: the operator registers each hospital's public key
        for node in self.nodes:
            if node.partition_id in self.unregistered:
                continue
            out = self._cli(["supernode", "register", str(certs.nodes[node.name].public_key), self.connection,
                             "--format", "json"])
            self.node_ids[node.partition_id] = str(json.loads(out)["node-id"])
        # -- one container per hospital
        for node in self.nodes:
            self._start_hospital(node, other_ca)
        self._wait_nodes()
        self.timings["startup_s"] = time.perf_counter() - t0
        return self

    def _cli(self, args: list[str], timeout: float = 60.0, check: bool = True) -> str:
        env = dict(os.environ, FLWR_HOME=str(self.flwr_home), FLWR_TELEMETRY_ENABLED="0")
        try:
            res = subprocess.run([_bin("flwr"), *args], capture_output=True, text=True, env=env, timeout=timeout,
                                 cwd=self.workdir, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as err:
            raise FedsecError(f"`flwr {' '.join(args)}` did not answer within {timeout:g} s") from err
        with open(self.log_dir / "flwr-cli.log", "a") as fh:
            fh.write(f"$ flwr {' '.join(args)}  (exit {res.returncode})\n{res.stdout}{res.stderr}\n")
        failed = res.returncode != 0
        if not failed and "json" in args:
            # flwr 1.41 exits 0 with {"success": false, "error-message": ...} when it cannot
            # reach the SuperLink: read the answer, not only the exit code.
            try:
                answer = json.loads(res.stdout)
            except ValueError:
                answer = None
            failed = not isinstance(answer, dict) or answer.get("success") is False
        if check and failed:
            raise FedsecError(f"`flwr {' '.join(args)}` failed (exit {res.returncode}):\n"
                              f"{_ANSI.sub('', res.stdout + res.stderr)[-1500:]}")
        return res.stdout

    def _wait_superlink(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            running, code = self._state(self.superlink)
            if not running:
                raise FedsecError(f"the SuperLink container exited with code {code} while starting; see "
                                  f"{self._save_log(self.superlink)}")
            try:
                self._cli(["list", self.connection, "--format", "json"], timeout=20)
                return
            except FedsecError:
                if time.monotonic() > deadline:
                    raise FedsecError(f"the SuperLink did not answer within {timeout:g} s; see "
                                      f"{self._save_log(self.superlink)}") from None
                time.sleep(1.0)

    def _start_hospital(self, node: NodeSpec, other_ca) -> None:
        c = _Container(f"{self.prefix}-{node.name}", f"hospital {node.label}", "hospital", node)
        ca = other_ca.ca_cert if node.partition_id in self.wrong_ca else self.certs.ca_cert
        sec = self._secrets_dir(node.name, {"ca.crt": ca, "node.key": self.certs.nodes[node.name].private_key})
        mounts = [f"{sec}:/certs:ro"]
        cfg = {"partition-id": node.partition_id, "num-partitions": len(self.nodes), **node.node_config}
        if node.partition_id in self.data_dirs:
            mounts.append(f"{Path(self.data_dirs[node.partition_id]).resolve()}:/data:ro")
            cfg["data-path"] = "/data"
        node_config = " ".join(f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in cfg.items())
        # The SuperNode and fedsec's warm ClientApp worker (deployment.serve_clientapps) in one
        # container: the worker talks to its SuperNode on the container's loopback only, and the
        # container ends when either ends.
        script = (
            'flower-supernode --superlink superlink:8000 --root-certificates /certs/ca.crt '
            '--auth-supernode-private-key /certs/node.key --isolation process --host 127.0.0.1 --port 9094 '
            '--node-config "$NODE_CONFIG" & sn=$!; '
            'python -m fedsec.federation.deployment clientapp-worker --runtime-api-address 127.0.0.1:9094 '
            '--insecure --parent-pid $sn --preload fedsec.federation.client_app ${FEDSEC_PIN_FAB:+--pin-fab $FEDSEC_PIN_FAB} & '
            'trap "kill -TERM $sn 2>/dev/null" TERM INT; wait -n; rc=$?; wait $sn; rc2=$?; '
            '[ $rc2 -ne 0 ] && exit $rc2; exit $rc')
        self._docker("run", "-d", "--name", c.name, "--label", f"{LABEL}={self.id}", "--network", self.network,
                     "--security-opt", "no-new-privileges", "--cap-drop", "ALL",
                     "-e", f"NODE_CONFIG={node_config}", "-e", "FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.25",
                     "-e", f"FEDSEC_PIN_FAB={self.fab_hash or ''}",
                     *sum((["-v", m] for m in mounts), []), self.image, "bash", "-c", script)
        self.containers_started.append(c.name)
        self.hospitals[node.partition_id] = c

    def _wait_nodes(self) -> None:
        deadline = time.monotonic() + self.join_timeout
        joined: set[int] = set()
        while True:
            self.check_alive("while the hospitals were joining")
            for pid, c in self.hospitals.items():
                if pid not in joined and _NODE_ID.search(self._logs(c)):
                    joined.add(pid)
                    self.echo(f"hospital {c.node.name} joined (container {c.name})")
            missing = [n for n in self.nodes if n.partition_id not in joined]
            if not missing:
                return
            if time.monotonic() > deadline:
                raise FedsecError(
                    f"{len(missing)} of {len(self.nodes)} hospitals did not join within {self.join_timeout:g} s: "
                    + ", ".join(n.label for n in missing)
                    + "".join(f"\n  see {self._save_log(self.hospitals[n.partition_id])}" for n in missing))
            time.sleep(1.0)

    # ------------------------------------------------------------------ health
    def check_alive(self, phase: str) -> None:
        """Raise FedsecError naming the first container that has exited."""
        for c in [self.superlink, *self.hospitals.values()]:
            if c is None or (c.node is not None and c.node.partition_id in self.lost):
                continue
            running, code = self._state(c)
            if not running and c.role == "superlink" and not c.restarted:
                # `docker restart` (or a restart policy) stops the container and starts it again a moment
                # later; seen in between it looks like an exit. Look again briefly so a restart is
                # reported as one (its in-memory state is lost) rather than as a plain exit.
                for _ in range(10):
                    time.sleep(0.5)
                    running, code = self._state(c)
                    if running or c.restarted:
                        break
            if c.restarted and c.role == "superlink":
                raise FedsecError(
                    f"the SuperLink container {c.name} restarted {phase}: its state (the registered node keys "
                    f"and this run) is kept in memory and was lost, so the run cannot continue; the rounds "
                    f"finished before the restart are kept in the results folder; start a new run (with real "
                    f"sites: register the hospitals' keys again first, or give the SuperLink --database); "
                    f"see {self._save_log(c)}")
            if running:
                continue
            log = self._save_log(c)
            text = _read(log)
            flower = _FLOWER_EXIT.findall(text)
            fcode = int(flower[-1]) if flower else None
            if c.role == "hospital" and (fcode == EXIT_SUPERNODE_CONNECTION_ERROR
                                         or "CERTIFICATE_VERIFY_FAILED" in text):
                if "CERTIFICATE_VERIFY_FAILED" in text:
                    why = ("its CA does not verify the SuperLink's certificate (TLS: CERTIFICATE_VERIFY_FAILED); "
                           "give the hospital the consortium's ca.crt")
                else:
                    why = ("node authentication failed (Flower exit code 305): its public key is not registered "
                           "at the SuperLink (`flwr supernode register <hospital>.pub <connection>`)")
                raise FedsecError(f"{c.label} was refused by the SuperLink {phase}: {why}; see {log}\n"
                                  f"{_tail(log, 6)}")
            alive = len(self.hospitals) - len(self.lost) - 1
            if (c.role == "hospital" and phase == "during the run" and self.min_hospitals is not None
                    and alive >= self.min_hospitals):
                self.lost[c.node.partition_id] = f"container exited with code {code}"
                self.echo(f"{c.label} left the run (container {c.name} exited with code {code}); going on with "
                          f"{alive} hospitals (federation.min_hospitals={self.min_hospitals}); see {log}")
                continue
            what = {"hospital": " (the hospital left the federation)",
                    "superlink": " (the SuperLink is gone; finished rounds are in the results folder)"}[c.role]
            extra = f", Flower exit code {fcode}" if fcode is not None else ""
            raise FedsecError(f"{c.label} (container {c.name}) exited with code {code}{extra} {phase}{what}; "
                              f"see {log}\n{_tail(log, 8)}")

    # ------------------------------------------------------------------ run
    def run(self, run_config: Mapping[str, object], timeout: float = 3600.0) -> dict:
        """Submit the app with ``flwr run``, echo per-round progress, wait for the end."""
        import tomli_w

        t0 = time.perf_counter()
        cfg_file = self.workdir / "run-config.toml"
        cfg_file.write_text(tomli_w.dumps(dict(run_config)))
        log = self.log_dir / "serverapp.log"
        env = dict(os.environ, FLWR_HOME=str(self.flwr_home), FLWR_TELEMETRY_ENABLED="0",
                   FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
        with open(log, "wb") as fh:
            proc = subprocess.Popen([_bin("flwr"), "run", str(self.app_dir), self.connection, "--run-config",
                                     str(cfg_file), "--stream"], stdout=fh, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, cwd=self.workdir, start_new_session=True)
        self._cli_proc = proc
        seen, run_id = 0, None
        deadline = time.monotonic() + timeout
        last_check = 0.0
        try:
            while True:
                lines = _read(log).splitlines()
                for ln in lines[seen:]:
                    if _ROUND_LINE.match(ln):
                        self.echo(ln.strip())
                seen = len(lines)
                if run_id is None:
                    ids = _RUN_ID.findall("\n".join(lines))
                    run_id = ids[0] if ids else None
                if proc.poll() is not None:
                    break
                if time.monotonic() - last_check > 3.0:
                    self.check_alive("during the run")
                    last_check = time.monotonic()
                if time.monotonic() > deadline:
                    raise FedsecError(f"run {run_id} did not finish within {timeout:g} s; see {log}")
                time.sleep(0.5)
            for ln in _read(log).splitlines()[seen:]:
                if _ROUND_LINE.match(ln):
                    self.echo(ln.strip())
            self.check_alive("during the run")
            if run_id is None:
                raise FedsecError(f"`flwr run` could not start the run (exit {proc.returncode}); see {log}\n"
                                  f"{_tail(log)}")
            status, details = self._status(run_id)
            while not status.startswith("finished"):
                self.check_alive("during the run")
                if time.monotonic() > deadline:
                    raise FedsecError(f"run {run_id} did not finish within {timeout:g} s (status {status})")
                time.sleep(1.0)
                status, details = self._status(run_id)
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.timings["run_s"] = time.perf_counter() - t0
        if status != "finished:completed":
            ids = [i for i in self.node_ids.values() if i]
            errors = [self.name_nodes(ln) for ln in _read(log).splitlines()
                      if "ERROR" in ln or "Error" in ln or any(f"node {i}" in ln for i in ids)]
            raise FedsecError(f"run {run_id} ended with status {status} ({self.name_nodes(details)}); the "
                              f"ServerApp's log is {log}\n"
                              + ("\n".join("    " + e for e in errors[-12:]) or _tail(log)))
        return {"run_id": run_id, "status": status}

    def name_nodes(self, text: str) -> str:
        """Put the hospital's name next to each numeric node id in ``text`` (Flower's errors
        name nodes by id; the operator registered each id for a hospital)."""
        for pid, node_id in self.node_ids.items():
            if node_id:
                name = next(n.name for n in self.nodes if n.partition_id == pid)
                text = re.sub(rf"\bnode {node_id}\b", f"hospital {name} (node {node_id})", text)
        return text

    def _status(self, run_id: str) -> tuple[str, str]:
        out = self._cli(["list", self.connection, "--run-id", run_id, "--format", "json"])
        run = json.loads(out)["runs"][0]
        return str(run.get("status", "")), str(run.get("status-details", ""))

    def copy_out(self, src: str, dest: Path) -> bool:
        """``docker cp`` a folder out of the SuperLink container (works after it stopped)."""
        if self.superlink is None:
            return False
        dest.mkdir(parents=True, exist_ok=True)
        res = self._docker("cp", f"{self.superlink.name}:{src}/.", str(dest), check=False, timeout=300)
        return res.returncode == 0

    # ------------------------------------------------------------------ tear-down
    def leftovers(self) -> list[str]:
        res = self._docker("ps", "-aq", "--filter", f"label={LABEL}={self.id}", check=False)
        nets = self._docker("network", "ls", "-q", "--filter", f"label={LABEL}={self.id}", check=False)
        return res.stdout.split() + nets.stdout.split()

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        for c in [self.superlink, *self.hospitals.values()]:
            if c is not None:
                try:
                    self._save_log(c)
                except (FedsecError, OSError):
                    pass
        ids = self._docker("ps", "-aq", "--filter", f"label={LABEL}={self.id}", check=False).stdout.split()
        if ids:
            self._docker("rm", "-f", *ids, check=False, timeout=180)
        self._docker("network", "rm", self.network, check=False)
        shutil.rmtree(self.workdir, ignore_errors=True)


# --------------------------------------------------------------------------- deploy_docker()


class _Terminated(BaseException):
    pass


def deploy_docker(scenario_path: str | os.PathLike, overrides: Sequence[str] | str | None = None,
                  out: str | os.PathLike | None = None, *, image: str | None = None,
                  data_dirs: Mapping[int, str] | None = None, verbose: bool = True,
                  run_timeout: float | None = None, pin_fab: bool | str = True,
                  _fault: Callable[[DockerDeployment], None] | None = None) -> dict:
    """Run a scenario in containers; return its ``summary.json`` plus a ``deployment`` entry.

    ``image``: the fedsec image (default: built or reused by docker/build-images.sh).
    ``pin_fab``: every hospital runs only the app whose FAB hash it was given (default: the
    hash of the app this run sends; a string pins another hash, which the hospitals refuse).
    The results folder (``out`` or ``runs/<scenario>/<time>-<hash>/``) is copied out of the
    SuperLink container, with ``deployment/`` holding every container's log.
    """
    from fedsec.federation.deployment import _hospital_names, check_deployable
    from fedsec.results import RunDir
    from fedsec.scenario import load_scenario

    echo = (lambda s: print(f"[fedsec deploy] {s}", file=sys.stderr, flush=True)) if verbose else (lambda s: None)
    ok, why = docker_available()
    if not ok:
        raise FedsecError(f"--docker needs a running Docker engine: {why} (docker/README.md, 'Docker engine')")
    ov = overrides.split() if isinstance(overrides, str) else list(overrides or [])
    path = Path(scenario_path)
    if not path.is_file():
        raise FedsecError(f"{scenario_path}: scenario file not found")
    scenario = load_scenario(str(path), ov or None)
    check_deployable(scenario)
    names = _hospital_names(scenario)
    nodes = [NodeSpec(i, name) for i, name in enumerate(names)]
    run_dir = (Path(out) if out else RunDir.for_scenario(scenario, None).path).resolve()
    t0 = time.perf_counter()
    if image is None:
        echo("building or reusing the fedsec image (docker/build-images.sh)")
        image = build_image(log=echo)
    timings = {"image_s": round(time.perf_counter() - t0, 2)}
    timeout = run_timeout or 600.0 + float(scenario.federation.rounds) * 2 * float(scenario.federation.timeout_s)
    # The scenario travels as text: the SuperLink container has no access to the operator's files.
    run_config = {"scenario": path.read_text(), "overrides": " ".join(ov), "out": "/home/app/results"}
    info: dict = {"mode": "docker", "image": image, "hospitals": names}

    def on_term(signum, frame):
        raise _Terminated()

    old = signal.signal(signal.SIGTERM, on_term) if _main_thread() else None
    dep = DockerDeployment(image, nodes, log_dir=run_dir / "deployment", data_dirs=data_dirs, echo=echo,
                           min_hospitals=scenario.federation.min_hospitals, pin_fab=pin_fab)
    error: BaseException | None = None
    stopped_by: int | None = None  # the signal that stopped the run (exit 128 + it, like `fedsec run`)
    copied = False
    try:
        with dep:
            info["containers"] = list(dep.containers_started)
            echo(f"{len(nodes)} hospital(s) joined in {dep.timings['startup_s']:.1f} s; running "
                 f"{scenario.federation.rounds} rounds")
            try:
                if _fault:
                    _fault(dep)
                info.update(dep.run(run_config, timeout=timeout))
            finally:  # also on failure / Ctrl-C: the finished rounds are kept
                copied = dep.copy_out("/home/app/results", run_dir)
    except _Terminated:
        error, stopped_by = FedsecError("terminated (SIGTERM); every container was removed"), signal.SIGTERM
    except KeyboardInterrupt:
        error, stopped_by = FedsecError("interrupted (Ctrl-C); every container was removed"), signal.SIGINT
    except FedsecError as err:
        error = err
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
    if error is not None and stopped_by is not None:
        from fedsec.federation.engine import Interrupted

        print(f"fedsec: {error}" + (f"; finished rounds copied to {run_dir}" if copied else ""),
              file=sys.stderr, flush=True)
        raise Interrupted(stopped_by)
    if error is not None:
        from fedsec.runner import RunFailed

        done = run_dir / "summary.json"
        partial = json.loads(done.read_text()) if copied and done.exists() else {}
        raise RunFailed(f"the run in containers failed: {error}" + (
            f"\nresults so far (finished rounds) copied to {run_dir}" if copied else ""), partial) from error
    info.update({k: round(v, 2) for k, v in dep.timings.items()}, **timings)
    info["containers"] = dep.containers_started
    info["fab_hash"] = dep.fab_hash
    info["hospitals_lost"] = {names[k]: v for k, v in dep.lost.items()}
    info["leftover"] = dep.leftovers()
    info["total_s"] = round(time.perf_counter() - t0, 2)
    if not copied or not (run_dir / "summary.json").exists():
        raise FedsecError(f"the run finished but its results could not be copied out to {run_dir}")
    (run_dir / "deployment" / "deployment.json").write_text(json.dumps(info, indent=2) + "\n")
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["path"] = str(run_dir)
    summary["deployment"] = info
    return summary


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# --------------------------------------------------------------------------- hospital-side tools


def check_data(scenario_path: str | os.PathLike, data_dir: str | os.PathLike, hospital: str | None = None) -> str:
    """Load the scenario's task from ``data_dir`` as this hospital's ClientApp will (node
    config ``data-path``); return a short description, or raise FedsecError naming the bad
    file or key. Runs on the hospital's own machine; contacts nothing."""
    from fedsec.scenario import load_scenario
    from fedsec.tasks import build_task

    from fedsec.registry import TASKS

    scenario = load_scenario(str(scenario_path))
    scenario.task.path = str(data_dir)
    fed = scenario.federation
    sites = list(fed.sites or TASKS.get(scenario.task.name).spec.sites or [])
    if sites and hospital is not None and str(dict(fed.partition).get("name", "natural")) == "natural":
        # as the ClientApp does (client_app._own_site_only): the hospital reads only its own site's file
        if hospital not in sites:
            raise FedsecError(f"hospital '{hospital}' is not in the scenario's hospitals {sites}")
        fed.sites = [hospital]
    task = build_task(scenario)
    names = list(task.data.hospitals)
    if hospital is not None and hospital not in names and len(names) > 1:
        raise FedsecError(f"hospital '{hospital}' is not in the scenario's hospitals {names}")
    idx = names.index(hospital) if hospital in names else 0
    return (f"{scenario.task.name} data in {data_dir}: OK for hospital {names[idx]} "
            f"({len(task.data.train[idx])} training and {len(task.data.test[idx])} test records); "
            f"the scenario's hospitals are {', '.join(sites or names)}")


def cleanup(deployment_id: str | None = None) -> list[str]:
    """Remove containers and networks left by a deploy that was killed (SIGKILL): those with
    the label ``org.fedsec.deployment`` (of one deployment id, or all)."""
    exe = docker_bin()
    label = LABEL + (f"={deployment_id}" if deployment_id else "")
    ids = subprocess.run([exe, "ps", "-aq", "--filter", f"label={label}"], capture_output=True, text=True).stdout.split()
    if ids:
        subprocess.run([exe, "rm", "-f", *ids], capture_output=True)
    nets = subprocess.run([exe, "network", "ls", "-q", "--filter", f"label={label}"], capture_output=True,
                          text=True).stdout.split()
    if nets:
        subprocess.run([exe, "network", "rm", *nets], capture_output=True)
    return ids + nets


def _main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fedsec.federation.docker_deploy")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check-data", help="check a hospital's data folder against a scenario (hospital side)")
    c.add_argument("scenario")
    c.add_argument("--data", required=True, help="the hospital's data folder or file (node config data-path)")
    c.add_argument("--hospital", default=None, help="this hospital's name in the scenario")
    k = sub.add_parser("cleanup", help="remove containers / networks left by a killed `fedsec deploy --docker`")
    k.add_argument("--id", default=None, help="one deployment's id (default: all fedsec deployments)")
    args = parser.parse_args(argv)
    try:
        if args.command == "check-data":
            print(check_data(args.scenario, args.data, args.hospital))
        else:
            print(f"removed {len(cleanup(args.id))} container(s)/network(s)")
    except FedsecError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main())

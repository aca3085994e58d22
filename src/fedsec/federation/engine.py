"""Engines: Flower's simulation engine on Ray (default), the in-process engine (inline.py) and,
in deployment.py, real nodes.

Ray stays on loopback with its temp dir in a private temp folder (it otherwise binds the
machine's address and writes to /tmp/ray); ``engine.address`` joins an existing cluster
(``ray start --head``) instead, for more than one machine or for a sweep that pays Ray's
start-up once.

Stopping (Ctrl-C, SIGTERM): while a run is on, :func:`stop_on_signals` turns the first
SIGINT/SIGTERM into an orderly stop: the ServerApp's next call to the grid raises, the
local Ray workers are killed so that training in progress ends at once, Flower shuts Ray
down, and the run ends with status ``interrupted`` (exit 130, or 143 for SIGTERM). If it
has not stopped within ``STOP_GRACE_S`` (or on a second signal) the main thread gets a
KeyboardInterrupt.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
import time

from fedsec.errors import FedsecError

QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}


def quiet(verbose: bool) -> None:
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)
    level = logging.INFO if verbose else logging.ERROR
    for name in ("flwr", "ray"):
        logging.getLogger(name).setLevel(level)


ADDRESS_TIMEOUT_S = 20.0  # how long engine.address may take to answer (docs/engines.md)


def check_address(scenario, timeout: float | None = None) -> None:
    """``engine.address`` must answer within ``timeout`` seconds (default ADDRESS_TIMEOUT_S):
    Ray itself would retry for ever. A TCP connection to the Ray head's port is the check
    (``auto`` is left to Ray)."""
    timeout = ADDRESS_TIMEOUT_S if timeout is None else timeout
    addr = scenario.engine.address
    if not addr or addr in ("auto", "local"):
        return
    hostport = str(addr).split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit():
        raise FedsecError(f"engine.address={addr}: expected host:port of a Ray head (e.g. 10.0.0.5:6379, "
                          "or ray://host:10001)")
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            socket.create_connection((host, int(port)), timeout=min(3.0, left)).close()
            return
        except OSError as err:
            last = err
            time.sleep(min(0.5, max(deadline - time.monotonic(), 0)))
    raise FedsecError(f"engine.address={addr}: no Ray cluster answered within {timeout:g} s ({last}); start one "
                      "with `ray start --head` there, or add engine.address=null to start Ray on this machine (a sweep "
                      "cell's scenario.yaml keeps the address of its sweep's own Ray head)")


def check_resources(scenario) -> None:
    """Fail before Ray starts on requests it could never schedule (it would wait forever)."""
    eng = scenario.engine
    if eng.address:
        check_address(scenario)
        return  # the cluster's resources are the cluster's business
    if eng.num_gpus > 0:
        import torch

        if not torch.cuda.is_available():
            raise FedsecError(
                f"engine.num_gpus={eng.num_gpus:g} asks for a GPU share per hospital but this machine has no "
                "CUDA GPU (torch.cuda.is_available() is False); set engine.num_gpus=0 to train on CPU, or "
                "engine.address=<ray cluster> to use a cluster that has GPUs")
        if eng.num_gpus > torch.cuda.device_count():
            raise FedsecError(f"engine.num_gpus={eng.num_gpus:g} per hospital but this machine has "
                              f"{torch.cuda.device_count()} GPU(s)")
    cpus = os.cpu_count() or 1
    if eng.num_cpus > cpus:
        raise FedsecError(f"engine.num_cpus={eng.num_cpus:g} per hospital but this machine has {cpus} CPU(s): "
                          "no hospital could ever be scheduled")


def ray_init_args(scenario, verbose: bool, temp_dir: str | None) -> dict:
    level = logging.INFO if verbose else logging.ERROR
    if scenario.engine.address:
        return {"address": scenario.engine.address, "logging_level": level, "log_to_driver": verbose}
    args = {
        "num_cpus": os.cpu_count() or 1,
        "_node_ip_address": "127.0.0.1",
        "_temp_dir": temp_dir,
        "include_dashboard": False,
        "logging_level": level,
        "log_to_driver": verbose,
    }
    if scenario.engine.num_gpus > 0:
        import torch

        args["num_gpus"] = torch.cuda.device_count()
    return args


_TEMP_PREFIX = "fedsec-ray-"
_OWNER = "fedsec-owner"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def remove_stale_ray_dirs(parent: str | None = None) -> list[str]:
    """Remove the Ray temp dirs of fedsec runs that were killed outright (SIGKILL, the OOM
    killer) before they could clean up. Ray itself fate-shares its head processes with the
    run on Linux, so those die with it; only the dir (session logs, sockets) is left behind.
    A dir is stale when the pid in its owner file is gone. -> the dirs removed."""
    parent = parent or tempfile.gettempdir()
    removed = []
    try:
        names = [n for n in os.listdir(parent) if n.startswith(_TEMP_PREFIX)]
    except OSError:
        return removed
    for name in names:
        path = os.path.join(parent, name)
        try:
            with open(os.path.join(path, _OWNER)) as fh:
                pid = int(fh.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # not ours, or still being set up
        if not _alive(pid):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def make_ray_temp_dir() -> str:
    """A private Ray temp dir for this run, with an owner file naming this process; stale dirs
    of killed runs are removed first."""
    remove_stale_ray_dirs()
    path = tempfile.mkdtemp(prefix=_TEMP_PREFIX)
    with open(os.path.join(path, _OWNER), "w") as fh:
        fh.write(f"{os.getpid()}\n")
    return path


# --------------------------------------------------------------------------------------
# Stopping on SIGINT / SIGTERM
# --------------------------------------------------------------------------------------

STOP_GRACE_S = 15.0  # after the first signal, how long the orderly stop may take


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal; ``exit_code`` is 128 + its number (130 Ctrl-C, 143 SIGTERM)."""

    def __init__(self, signum: int = signal.SIGINT):
        self.signum = int(signum)
        super().__init__(signal.Signals(self.signum).name)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopRequested(Exception):
    """Raised in the ServerApp thread by the grid once a stop was asked for. An Exception (not
    a KeyboardInterrupt) so that Flower's server thread hands it back to the main thread."""


class _StopState:
    def __init__(self):
        self.event = threading.Event()
        self.signum: int | None = None
        self.kill_local_ray = True
        self.timer: threading.Timer | None = None

    def request(self, signum: int) -> None:
        self.signum = signum
        self.event.set()


_STOP: _StopState | None = None


def stop_requested() -> int | None:
    """The signal that asked the current run to stop, or None. Engines poll this."""
    return _STOP.signum if _STOP is not None and _STOP.event.is_set() else None


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for p in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(p))
    return kids


def descendants(pid: int | None = None) -> list[int]:
    kids, out, todo = _children(), [], [pid or os.getpid()]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def kill_ray_workers() -> int:
    """SIGKILL this process's local Flower actors (``ray::ClientAppActor``): the hospitals'
    training in progress ends now instead of at the end of the round. Ray's own processes
    (raylet, its agents: killing one takes the node down noisily) are left to
    ``ray.shutdown``. -> how many were killed."""
    n = 0
    for pid in descendants():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmd = fh.read()
            if cmd.startswith(b"ray::ClientAppActor"):
                os.kill(pid, signal.SIGKILL)
                n += 1
        except OSError:
            pass
    return n


@contextlib.contextmanager
def stop_on_signals(kill_local_ray: bool = True, uses_ray: bool = True):
    """While the block runs, SIGINT and SIGTERM ask the run to stop (see the module doc). A
    SIGINT that is ignored (a shell's background job, a sweep's worker) stays ignored. Only in
    the main thread; elsewhere signals are left alone. ``uses_ray=False`` (the in-process
    engine) leaves Ray alone: not even imported (0.4 s of a CI run's start-up)."""
    global _STOP
    if threading.current_thread() is not threading.main_thread():
        yield None
        return
    state = _StopState()
    state.kill_local_ray = kill_local_ray

    def handler(signum, frame):
        if state.signum is None:
            state.request(signum)
            if state.kill_local_ray:
                kill_ray_workers()
            import _thread

            state.timer = threading.Timer(STOP_GRACE_S, _thread.interrupt_main, args=(signum,))
            state.timer.daemon = True
            state.timer.start()
            return
        raise Interrupted(state.signum)

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        current = signal.getsignal(sig)
        if sig == signal.SIGINT and current is signal.SIG_IGN:
            continue
        previous[sig] = current
        signal.signal(sig, handler)
    # ray.init (which Flower calls inside the run, in this thread) replaces the SIGTERM handler
    # twice: in Python (sys.exit) and in C++ (Ray's core worker aborts the process on SIGTERM,
    # "*** SIGTERM received ***", exit -6): nothing would be written. Put ours back after it.
    ray_mod, ray_init = None, None
    with contextlib.suppress(ImportError):
        if not uses_ray:
            raise ImportError
        import ray as ray_mod

        ray_init = ray_mod.init

        def init_keeping_our_handlers(*args, **kwargs):
            try:
                return ray_init(*args, **kwargs)
            finally:
                if threading.current_thread() is threading.main_thread():
                    for sig in previous:
                        signal.signal(sig, handler)

        ray_mod.init = init_keeping_our_handlers
        # Ray's driver prints "(raylet) A worker died or was killed..." for each worker the stop
        # killed: expected then, so not shown.
        import ray._private.worker as ray_worker

        ray_print = ray_worker.print_to_stdstream

        def print_unless_stopping(data, *args, **kwargs):
            if stop_requested() is not None and data.get("pid") == "raylet":
                return None
            return ray_print(data, *args, **kwargs)

        ray_worker.print_to_stdstream = print_unless_stopping
    _STOP = state
    try:
        yield state
    finally:
        _STOP = None
        if state.timer is not None:
            state.timer.cancel()
        if ray_init is not None:
            ray_mod.init = ray_init
            ray_worker.print_to_stdstream = ray_print
        for sig, h in previous.items():
            signal.signal(sig, h if h is not None else signal.SIG_DFL)


def _guard_grid(grid) -> None:
    """Make the grid raise StopRequested once a stop is asked for: Flower's ServerApp thread
    waits on the grid, so this is where it can be stopped."""
    for name in ("pull_messages", "push_messages", "get_node_ids", "send_and_receive"):
        fn = getattr(grid, name, None)
        if fn is None:
            continue

        def checked(*args, _fn=fn, **kwargs):
            if stop_requested() is not None:
                raise StopRequested("stopped by a signal")
            return _fn(*args, **kwargs)

        setattr(grid, name, checked)


def _quiet_flower_console(verbose: bool):
    """Flower logs every failing ClientApp call's traceback (twice) at ERROR: fedsec reports
    each failure in one line and keeps the tracebacks in failures.log instead."""
    if verbose:
        return contextlib.nullcontext()
    try:
        from flwr.common.logger import console_handler
    except ImportError:
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def raised():
        level = console_handler.level
        console_handler.setLevel(logging.CRITICAL + 1)
        try:
            yield
        finally:
            console_handler.setLevel(level)

    return raised()


def _ray_backend_config(scenario, verbose: bool, temp_dir: str | None) -> dict:
    return {
        "client_resources": {"num_cpus": float(scenario.engine.num_cpus),
                             "num_gpus": float(scenario.engine.num_gpus)},
        "init_args": ray_init_args(scenario, verbose, temp_dir),
        "actor": {"tensorflow": 0},
    }


def run_ray(scenario, serve_fn, num_hospitals: int, verbose: bool = False):
    """Run ``serve_fn(grid)`` as the ServerApp with one virtual SuperNode per hospital, the
    ClientApps in Flower's Ray actor pool (Flower's own ``RayBackend``).

    The messages go straight from the ServerApp's grid to the backend (inline.DirectGrid)
    instead of through Flower's simulation runtime, whose message pump polls every 0.1 s
    (hard-coded in flwr/server/superlink/fleet/vce/vce_api.py): that polling was most of a
    small task's per-round cost. Same ServerApp, ClientApp, actors and messages.
    ``FEDSEC_RAY_RUNTIME=flower`` runs Flower's ``run_simulation`` instead (run_ray_simulation).

    Returns what ``serve_fn`` returned. Exceptions raised in the ServerApp propagate.
    """
    if os.environ.get("FEDSEC_RAY_RUNTIME") == "flower":
        return run_ray_simulation(scenario, serve_fn, num_hospitals, verbose)
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

    from fedsec.federation.inline import run_on_backend

    check_resources(scenario)
    quiet(verbose)
    temp_dir = None if scenario.engine.address else make_ray_temp_dir()
    try:
        try:
            backend = RayBackend(_ray_backend_config(scenario, verbose, temp_dir))  # ray.init
        except BaseException:
            import ray

            ray.shutdown()
            raise
        return run_on_backend(backend, serve_fn, num_hospitals)  # terminate(): actors, ray.shutdown
    finally:
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)


def run_ray_simulation(scenario, serve_fn, num_hospitals: int, verbose: bool = False):
    """Flower's ``run_simulation``: ``serve_fn(grid)`` as the ServerApp with one virtual
    SuperNode per hospital (the Ray engine before fedsec drove Flower's RayBackend directly).

    Returns what ``serve_fn`` returned. Exceptions raised in the ServerApp propagate.
    """
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from fedsec.federation.client_app import app as client_app

    check_resources(scenario)
    quiet(verbose)
    temp_dir = None if scenario.engine.address else make_ray_temp_dir()
    holder: dict = {}
    server_app = ServerApp()

    @server_app.main()
    def _main(grid, context):
        _guard_grid(grid)
        holder["result"] = serve_fn(grid)

    backend_config = {
        "client_resources": {"num_cpus": float(scenario.engine.num_cpus),
                             "num_gpus": float(scenario.engine.num_gpus)},
        "init_args": ray_init_args(scenario, verbose, temp_dir),
    }
    try:
        with _quiet_flower_console(verbose):
            run_simulation(server_app=server_app, client_app=client_app, num_supernodes=num_hospitals,
                           backend_config=backend_config, verbose_logging=False)
    except StopRequested:
        raise Interrupted(stop_requested() or signal.SIGINT) from None
    finally:
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)
    if "result" not in holder and stop_requested() is not None:
        raise Interrupted(stop_requested())
    if "result" not in holder:
        raise FedsecError("the simulation ended before the ServerApp finished (see -v for Flower's log)")
    return holder["result"]


def run_engine(scenario, serve_fn, num_hospitals: int, verbose: bool = False):
    """Run ``serve_fn(grid)`` on the scenario's simulation engine: ``ray`` (Flower's simulation
    engine, the default) or ``inline`` (the same apps in this process, fedsec/federation/inline.py).

    A SIGINT / SIGTERM during the run (``stop_on_signals``) makes the grid's next call raise, so
    the ServerApp stops between messages; it surfaces here as :class:`Interrupted`."""

    def stoppable(grid):
        _guard_grid(grid)
        return serve_fn(grid)

    try:
        if scenario.engine.name == "inline":
            from fedsec.federation.inline import run_inline

            return run_inline(scenario, stoppable, num_hospitals, verbose)
        return run_ray(scenario, stoppable, num_hospitals, verbose)
    except StopRequested:
        raise Interrupted(stop_requested() or signal.SIGINT) from None

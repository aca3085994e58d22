"""Engines: Flower's simulation engine on Ray (default), the in-process engine (inline.py) and,
in deployment.py, real nodes.

Ray stays on loopback with its temp dir in a private temp folder (it otherwise binds the
machine's address and writes to /tmp/ray); ``engine.address`` joins an existing cluster
(``ray start --head``) instead, for more than one machine or for a sweep that pays Ray's
start-up once.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile

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


def check_resources(scenario) -> None:
    """Fail before Ray starts on requests it could never schedule (it would wait forever)."""
    eng = scenario.engine
    if eng.address:
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
        holder["result"] = serve_fn(grid)

    backend_config = {
        "client_resources": {"num_cpus": float(scenario.engine.num_cpus),
                             "num_gpus": float(scenario.engine.num_gpus)},
        "init_args": ray_init_args(scenario, verbose, temp_dir),
    }
    try:
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=num_hospitals,
                       backend_config=backend_config, verbose_logging=False)
    finally:
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)
    if "result" not in holder:
        raise FedsecError("the simulation ended before the ServerApp finished (see -v for Flower's log)")
    return holder["result"]


def run_engine(scenario, serve_fn, num_hospitals: int, verbose: bool = False):
    """Run ``serve_fn(grid)`` on the scenario's simulation engine: ``ray`` (Flower's simulation
    engine, the default) or ``inline`` (the same apps in this process, fedsec/federation/inline.py)."""
    if scenario.engine.name == "inline":
        from fedsec.federation.inline import run_inline

        return run_inline(scenario, serve_fn, num_hospitals, verbose)
    return run_ray(scenario, serve_fn, num_hospitals, verbose)

"""The deployment engine: real flower-superlink / flower-supernode processes on loopback.

- certificates (no processes) and the Docker compose file (YAML level; ``docker compose
  config`` when a compose-capable docker client is on PATH);
- process life cycle and every failure outcome with a tiny Message-API toy app written
  to a temp folder (no torch: a run takes ~15 s, dominated by Flower's 3 s polls);
- fedsec's own apps on quickstart.yaml, insecure and with TLS + node authentication,
  compared with a simulation of the same scenario and seed (always run: this is the most
  fragile code, the warm ClientApp worker on Flower internals).

Every test that starts processes checks that none is left behind, by the deployment's
environment mark and by the SuperLink's port in any command line.
"""

from __future__ import annotations

import json
import functools
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from fedsec.errors import FedsecError
from fedsec.federation import certs as certs_mod
from fedsec.federation.deployment import LocalDeployment, NodeSpec, find_processes

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker" / "compose.yaml"
deployment = pytest.mark.deployment


# --------------------------------------------------------------------------- certificates


def test_certificates_chain_sans_and_permissions(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    out = tmp_path / "pki"
    cs = certs_mod.make_certificates(out, nodes=["hospital-0", "hospital-1"], hostnames=["superlink"],
                                     secrets=["superlink"])
    ca = x509.load_pem_x509_certificate(cs.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(cs.server_cert.read_bytes())
    # signed by the CA, ECDSA P-384
    ca.public_key().verify(server.signature, server.tbs_certificate_bytes, ec.ECDSA(hashes.SHA384()))
    assert ca.public_key().curve.name == "secp384r1"
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "superlink"}
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    # node keys: OpenSSH formats as Flower loads them, a matching P-384 pair
    for name in ("hospital-0", "hospital-1"):
        nk = cs.nodes[name]
        priv = serialization.load_ssh_private_key(nk.private_key.read_bytes(), None)
        pub = serialization.load_ssh_public_key(nk.public_key.read_bytes())
        assert isinstance(priv, ec.EllipticCurvePrivateKey) and priv.curve.name == "secp384r1"
        assert nk.public_key.read_text().startswith("ecdsa-sha2-nistp384 ")
        assert priv.public_key().public_numbers() == pub.public_numbers()
    # permissions: private material owner-only, folders 0700
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    for p in (cs.ca_key, cs.server_key, cs.nodes["hospital-0"].private_key, cs.secrets["superlink"]):
        assert mode(p) == 0o600, p
    for p in (cs.ca_cert, cs.server_cert, cs.nodes["hospital-0"].public_key):
        assert mode(p) == 0o644, p
    for d in (out, out / "nodes", out / "superexec"):
        assert mode(d) == 0o700, d
    assert len(cs.secrets["superlink"].read_bytes()) == 64


def test_certificates_refuse_to_overwrite_and_bad_names(tmp_path):
    certs_mod.make_certificates(tmp_path, nodes=["a"])
    with pytest.raises(FedsecError, match="already exists"):
        certs_mod.make_certificates(tmp_path, nodes=["a"])
    certs_mod.make_certificates(tmp_path, nodes=["a"], overwrite=True)
    with pytest.raises(FedsecError, match="invalid key name"):
        certs_mod.make_node_key(tmp_path, "../evil")


def test_make_certs_script(tmp_path):
    out = tmp_path / "certs"
    res = subprocess.run(["bash", str(REPO / "scripts" / "make-certs.sh"), str(out), "--nodes", "hospital-0",
                          "--hostname", "superlink.example.org"],
                         capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable})
    assert res.returncode == 0, res.stderr
    for f in ("ca.crt", "ca.key", "superlink.crt", "superlink.key", "nodes/hospital-0.key", "nodes/hospital-0.pub"):
        assert (out / f).is_file(), f
    assert "superlink.example.org" in res.stdout


# --------------------------------------------------------------------------- docker compose


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _hospital_services(doc: dict) -> dict[str, dict]:
    return {k: v for k, v in doc["services"].items() if k.startswith("hospital-")}


def _mount_sources(svc: dict) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) of every volume of a service (short or long syntax)."""
    out = []
    for v in svc.get("volumes", []):
        if isinstance(v, str):  # SOURCE:TARGET[:MODE]; SOURCE may hold ${VAR:?message}
            mode = v.rsplit(":", 1)[1] if v.count(":") >= 2 and not v.endswith("}") else ""
            rest = v[: -len(mode) - 1] if mode else v
            source, target = rest.rsplit(":", 1)
            out.append((source, target, "ro" in mode.split(",")))
        else:
            out.append((v["source"], v["target"], bool(v.get("read_only"))))
    return out


def test_compose_each_hospital_mounts_only_its_own_data_read_only():
    doc = _compose()
    hospitals = _hospital_services(doc)
    nodes = {k: v for k, v in hospitals.items() if k.endswith("-node")}
    execs = {k: v for k, v in hospitals.items() if k.endswith("-clientapp")}
    assert len(nodes) in (2, 4) and set(execs) == {k.replace("-node", "-clientapp") for k in nodes}
    data_mounts = {}
    for name, svc in hospitals.items():
        h = name.rsplit("-", 1)[0]  # hospital-0
        for source, target, ro in _mount_sources(svc):
            if "data" in source.lower():
                assert name.endswith("-clientapp"), f"{name}: only the ClientApp executor reads patient data"
                assert ro, f"{name}: data mount {source} must be read-only"
                assert h in source, f"{name} mounts {source}, which is not {h}'s data"
                data_mounts.setdefault(h, []).append(source)
    # every hospital's executor has its data, and no two hospitals share a folder
    assert set(data_mounts) == {n.rsplit("-", 1)[0] for n in nodes}
    flat = [s for v in data_mounts.values() for s in v]
    assert len(flat) == len(set(flat))
    # no other service sees any hospital data
    for name, svc in doc["services"].items():
        if not name.startswith("hospital-"):
            assert not any("data" in s.lower() for s, _, _ in _mount_sources(svc)), name


def test_compose_tls_node_auth_secrets_and_ports():
    doc = _compose()
    services, secrets = doc["services"], doc["secrets"]
    link = services["superlink"]
    cmd = " ".join(link["command"])
    for flag in ("--ssl-certfile", "--ssl-keyfile", "--ssl-ca-certfile", "--enable-supernode-auth",
                 "--isolation process", "--superexec-auth-secret-file"):
        assert flag in cmd, flag
    assert "--insecure" not in cmd
    # only the SuperLink publishes a port to the outside
    published = {n for n, s in services.items() if s.get("ports")}
    assert published == {"superlink"}
    # Flower 1.41: Fleet, Control and the SuperLink's Runtime API share one HTTPS port
    assert [str(p).split(":")[-1] for p in link["ports"]] == ["8000"]
    for name, svc in _hospital_services(doc).items():
        h = name.rsplit("-", 1)[0]
        svc_secrets = {s if isinstance(s, str) else s["source"] for s in svc.get("secrets", [])}
        others = {s for s in secrets if s.startswith("hospital-") and not s.startswith(h + "-")}
        assert not svc_secrets & others, f"{name} receives another hospital's secret"
        c = " ".join(svc["command"])
        assert "--insecure" not in c or name.endswith("-clientapp"), name
        if name.endswith("-node"):
            assert "--auth-supernode-private-key" in c and "--root-certificates" in c
            assert f"{h}-key" in svc_secrets
            assert "partition-id=" in c
    # private keys are secrets, not baked into images
    for s in secrets.values():
        assert "file" in s


@functools.lru_cache(maxsize=None)  # asked once: the skip decision and the test use the same answer
def _compose_cli() -> tuple[str, ...] | None:
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]) and subprocess.run([*cmd, "version"], capture_output=True).returncode == 0:
            return tuple(cmd)
    return None


@pytest.mark.skipif(_compose_cli() is None, reason="no docker compose (v2 plugin or docker-compose) on PATH")
def test_compose_config_is_valid(tmp_path):
    # compose checks that secret files exist: point it at a throw-away PKI
    pki = tmp_path / "pki"
    certs_mod.make_certificates(pki, nodes=[f"hospital-{i}" for i in range(4)], hostnames=["superlink"],
                                secrets=["superlink", *[f"hospital-{i}" for i in range(4)]])
    env = {**os.environ, "FEDSEC_CERTS": str(pki), "FEDSEC_DATA": str(tmp_path / "data"),
           "FEDSEC_RESULTS": str(tmp_path / "results")}
    cli, compose = _compose_cli(), COMPOSE
    if cli == ("docker-compose",):
        # Debian's docker-compose is v1 (1.29): it validates against the Compose 3.9 schema,
        # which needs a `version` key and predates the top-level `name`. Lint a copy without
        # `name` and with `version: "3.9"`; everything else (services, secrets, profiles,
        # networks, interpolation) is checked as written.
        text = COMPOSE.read_text()
        assert "\nname: fedsec\n" in text
        compose = tmp_path / "compose-v1.yaml"
        compose.write_text(text.replace("\nname: fedsec\n", "\n").replace("\nservices:", '\nversion: "3.9"\nservices:', 1))
    res = subprocess.run([*cli, "-f", str(compose), "--project-directory", str(COMPOSE.parent),
                          "--profile", "four-hospitals", "config", "--services"],
                         capture_output=True, text=True, env=env, cwd=COMPOSE.parent)
    assert res.returncode == 0, res.stderr
    services = set(res.stdout.split())
    assert {"superlink", "serverapp"} <= services
    assert {f"hospital-{i}-{kind}" for i in range(4) for kind in ("node", "clientapp")} <= services


# --------------------------------------------------------------------------- toy app

TOY_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "toyapp"
version = "1.0.0"
description = "fedsec deployment test app"
license = "Apache-2.0"
dependencies = ["flwr==1.41.0"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedsec"

[tool.flwr.app.components]
serverapp = "toyapp.server_app:app"
clientapp = "toyapp.client_app:app"

[tool.flwr.app.config]
rounds = 1
out = ""
"""

TOY_CLIENT = """\
import os
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()
CALLS = [0]


@app.train()
def train(msg: Message, context: Context):
    CALLS[0] += 1
    pid = int(context.node_config["partition-id"])
    arrays = [a + (pid + 1) for a in msg.content["arrays"].to_numpy_ndarrays()]
    metrics = MetricRecord({"num-examples": 1, "os-pid": os.getpid(), "calls": CALLS[0]})
    return Message(RecordDict({"arrays": ArrayRecord(arrays), "metrics": metrics}), reply_to=msg)
"""

TOY_SERVER = """\
import json, os
import numpy as np
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    n = len(list(grid.get_node_ids()))
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=n, min_train_nodes=n)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord([np.zeros(2)]),
                            num_rounds=int(context.run_config["rounds"]))
    out = context.run_config["out"]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "summary.json"), "w") as fh:
        json.dump({"status": "completed", "final": result.arrays.to_numpy_ndarrays()[0].tolist(),
                   "train": {str(k): dict(v) for k, v in result.train_metrics_clientapp.items()}}, fh)
"""


@pytest.fixture
def toy_app(tmp_path):
    app = tmp_path / "toy"
    (app / "toyapp").mkdir(parents=True)
    (app / "pyproject.toml").write_text(TOY_PYPROJECT)
    (app / "toyapp" / "__init__.py").write_text("")
    (app / "toyapp" / "client_app.py").write_text(TOY_CLIENT)
    (app / "toyapp" / "server_app.py").write_text(TOY_SERVER)
    return app


def assert_no_orphans(dep: LocalDeployment) -> None:
    assert dep.leftover == []
    assert find_processes(dep.id) == []
    needle = f"127.0.0.1:{dep.port}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        assert needle not in cmdline, f"process {entry} still uses the SuperLink: {cmdline!r}"
    assert not dep.workdir.exists()


def _kill_later(dep: LocalDeployment, get_proc, after: str, log_name: str = "serverapp.log", timeout=120):
    """SIGKILL the process group of ``get_proc()`` once ``after`` appears in a log."""

    def go():
        deadline = time.monotonic() + timeout
        log = dep.log_dir / log_name
        while time.monotonic() < deadline:
            if log.exists() and after in log.read_text(errors="replace"):
                os.killpg(get_proc().popen.pid, signal.SIGKILL)
                return
            time.sleep(0.2)

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t


@deployment
def test_toy_run_warm_clientapp_and_clean_shutdown(toy_app, tmp_path):
    out = tmp_path / "out"
    with LocalDeployment(toy_app, 2, log_dir=tmp_path / "logs", preload=()) as dep:
        assert len(dep.node_ids) == 2 and len(dep.processes()) >= 6  # link+exec, 2x(node+worker)
        result = dep.run({"out": str(out), "rounds": 2}, timeout=180)
    assert result.status == "finished:completed"
    summary = json.loads((out / "summary.json").read_text())
    # FedAvg of (x+1, x+2) per round, equal weights: +1.5 per round
    assert summary["final"] == [3.0, 3.0]
    # the warm worker served both rounds in one process per node
    assert summary["train"]["2"]["calls"] == 2.0
    for name in ("superlink", "supernode-hospital-0", "supernode-hospital-1", "clientapp-hospital-0", "serverapp"):
        assert (tmp_path / "logs" / f"{name}.log").stat().st_size > 0
    assert_no_orphans(dep)


@deployment
def test_node_that_never_joins_times_out_naming_it(toy_app, tmp_path):
    class OneLost(LocalDeployment):
        def _superlink_address(self, node):
            return "127.0.0.1:9" if node.partition_id == 1 else super()._superlink_address(node)

    dep = OneLost(toy_app, [NodeSpec(0, "cleveland"), NodeSpec(1, "hungary")], log_dir=tmp_path / "logs",
                  preload=(), join_timeout=10)
    with pytest.raises(FedsecError) as err:
        with dep:
            pass
    msg = str(err.value)
    assert "missing partition-id(s) [1]" in msg and "hungary" in msg
    assert "supernode-hungary.log" in msg and "cleveland" not in msg
    assert_no_orphans(dep)


@deployment
def test_unregistered_node_is_rejected(toy_app, tmp_path):
    dep = LocalDeployment(toy_app, 2, log_dir=tmp_path / "logs", secure=True, unregistered=[1], preload=(),
                          join_timeout=60)
    with pytest.raises(FedsecError) as err:
        with dep:
            pass
    msg = str(err.value)
    assert "SuperNode hospital-1 (partition-id=1) was refused by the SuperLink" in msg
    assert "exit code 305" in msg and "hospital-1.pub" in msg and "supernode-hospital-1.log" in msg
    assert_no_orphans(dep)


@deployment
def test_node_disconnecting_mid_run_fails_the_run(toy_app, tmp_path):
    dep = LocalDeployment(toy_app, 2, log_dir=tmp_path / "logs", preload=())
    with pytest.raises(FedsecError) as err:
        with dep:
            _kill_later(dep, lambda: dep.supernodes[1], "aggregate_train: Received")
            dep.run({"out": str(tmp_path / "out"), "rounds": 6}, timeout=180)
    msg = str(err.value)
    assert "SuperNode hospital-1 (partition-id=1) exited" in msg and "during the run" in msg
    assert "supernode-hospital-1.log" in msg
    assert_no_orphans(dep)


@deployment
def test_failing_serverapp_fails_the_run_with_its_log(toy_app, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    dep = LocalDeployment(toy_app, 2, log_dir=tmp_path / "logs", preload=())
    with pytest.raises(FedsecError) as err:
        with dep:  # the ServerApp cannot create its results folder under a file
            dep.run({"out": str(blocker / "out"), "rounds": 1}, timeout=180)
    msg = str(err.value)
    assert "ended with status finished:failed" in msg and "serverapp.log" in msg
    assert_no_orphans(dep)


@deployment
def test_superlink_dying_mid_run_fails_the_run(toy_app, tmp_path):
    dep = LocalDeployment(toy_app, 2, log_dir=tmp_path / "logs", preload=(), clientapp="subprocess")
    with pytest.raises(FedsecError) as err:
        with dep:
            _kill_later(dep, lambda: dep.superlink, "aggregate_train: Received")
            dep.run({"out": str(tmp_path / "out"), "rounds": 6}, timeout=180)
    msg = str(err.value)
    assert "the SuperLink exited" in msg and "superlink.log" in msg
    assert_no_orphans(dep)


@deployment
def test_no_orphans_when_the_deploying_process_is_killed(toy_app, tmp_path):
    """SIGKILL of the Python process that owns the deployment: no clean-up code runs, yet the
    SuperLink and SuperNodes get SIGTERM from the kernel (parent-death signal) and Flower's
    executors and fedsec's workers follow their SuperLink / SuperNode."""
    script = (
        "import sys, time\n"
        "from fedsec.federation.deployment import LocalDeployment\n"
        f"dep = LocalDeployment({str(toy_app)!r}, 2, log_dir={str(tmp_path / 'logs')!r}, preload=())\n"
        "dep.start()\n"
        "print(dep.id, dep.workdir, flush=True)\n"
        "time.sleep(600)\n"
    )
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        dep_id, workdir = owner.stdout.readline().split()
        assert len(find_processes(dep_id)) >= 5
    finally:
        owner.kill()
        owner.wait()
    deadline = time.monotonic() + 45
    while find_processes(dep_id) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = find_processes(dep_id)
    shutil.rmtree(workdir, ignore_errors=True)
    assert left == [], [Path(f"/proc/{p}/cmdline").read_bytes()[:120] for p in left]


# --------------------------------------------------------------------------- fedsec's apps

QUICKSTART = REPO / "scenarios" / "quickstart.yaml"
METRICS = ("loss", "accuracy", "auroc", "sensitivity", "specificity")
# Same scenario and seed, the same per-hospital RNG streams, single-threaded torch and
# hospital-ordered aggregation in both engines: the numbers agree bit for bit here
# (measured: difference 0.0). The tolerance only allows for float32 round-off should the
# two engines ever run with different thread counts or BLAS paths.
TOL = 1e-6


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    import fedsec

    out = tmp_path_factory.mktemp("sim")
    t0 = time.perf_counter()
    summary = fedsec.run(str(QUICKSTART), out=str(out))
    summary["_wall_s"] = time.perf_counter() - t0
    summary["_rounds"] = [json.loads(ln) for ln in (out / "rounds.jsonl").read_text().splitlines() if ln.strip()]
    return summary


def _close(got: dict, ref: dict, what: str) -> None:
    for k in METRICS:
        assert got[k] == pytest.approx(ref[k], abs=TOL), (what, k, got[k], ref[k])


def _check_results_folder(summary: dict, out: Path, rounds: int) -> list[dict]:
    assert summary["status"] == "completed"
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["status"] == "completed" and on_disk["rounds"] == rounds
    assert set(summary["final"]) >= set(METRICS)
    for name in ("superlink", "serverapp", "supernode-cleveland", "clientapp-hungary"):
        assert (out / "deployment" / f"{name}.log").stat().st_size > 0, name
    assert summary["deployment"]["leftover_processes"] == []
    return [json.loads(ln) for ln in (out / "rounds.jsonl").read_text().splitlines() if ln.strip()]


@deployment
def test_quickstart_deployment_matches_simulation(simulated, tmp_path):
    from fedsec.federation.deployment import deploy

    out = tmp_path / "run"
    t0 = time.perf_counter()
    summary = deploy(str(QUICKSTART), out=str(out))
    wall = time.perf_counter() - t0
    rounds = _check_results_folder(summary, out, 5)
    _close(summary["final"], simulated["final"], "final")
    for h in ("cleveland", "hungary"):
        _close(summary["per_hospital"][h], simulated["per_hospital"][h], h)
    for got, ref in zip(rounds, simulated["_rounds"], strict=True):
        _close(got["global"], ref["global"], f"round {got['round']}")
    print(f"\nquickstart: deployment {wall:.1f} s, simulation {simulated['_wall_s']:.1f} s")


@deployment
def test_quickstart_secure_deployment_matches_simulation(simulated, tmp_path):
    """TLS + node authentication, 2 rounds (an override through the run config): equal to
    round 2 of the 5-round simulation (nothing in quickstart depends on the round count)."""
    from fedsec.federation.deployment import deploy

    out = tmp_path / "run"
    summary = deploy(str(QUICKSTART), ["federation.rounds=2"], out=str(out), secure=True)
    _check_results_folder(summary, out, 2)
    _close(summary["final"], simulated["_rounds"][1]["global"], "final after 2 rounds")
    assert summary["deployment"]["mode"] == "secure"
    assert (out / "deployment" / "flwr-cli.log").read_text().count("supernode register") == 2
    assert "--enable-supernode-auth" in (out / "deployment" / "superlink.log").read_text()


@deployment
def test_hospitals_holding_only_their_own_file_match_simulation(simulated, tmp_path):
    """Each hospital's node is given a folder with its own UCI file only (node config
    data-path): it reads no other site's records, sends the server only its training
    features' count, mean and M2, and standardises with the pooled statistics the server
    combined from them -- the numbers equal the simulation's, which holds every row."""
    from fedsec.data.heart import FILES_DIR, SITES
    from fedsec.federation.deployment import deploy

    folders = {}
    for i, site in enumerate(("cleveland", "hungary")):
        d = tmp_path / "data" / site
        d.mkdir(parents=True)
        shutil.copyfile(FILES_DIR / SITES[site], d / SITES[site])
        folders[i] = str(d)
    out = tmp_path / "run"
    summary = deploy(str(QUICKSTART), ["federation.rounds=2"], out=str(out), data_paths=folders)
    _check_results_folder(summary, out, 2)
    _close(summary["final"], simulated["_rounds"][1]["global"], "final after 2 rounds")
    for h in ("cleveland", "hungary"):
        _close(summary["per_hospital"][h], simulated["_rounds"][1]["per_hospital"][h], h)
    client_log = (out / "deployment" / "clientapp-hungary.log").read_text()
    assert "processed.cleveland.data" not in client_log  # hungary never looked for cleveland's file

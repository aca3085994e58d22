"""The consortium dry-run in real containers (``fedsec deploy --docker``).

Needs a running Docker engine (`.ci/run` installs Debian's docker.io and starts dockerd;
docker/dockerd.sh does it by hand). Without one, every test here is skipped, saying why.
The image is built from scratch or reused by docker/build-images.sh.

What is checked: a SuperLink and one SuperNode per hospital each in their own container
with TLS and node authentication; each container holds only its own credentials; the final
metrics equal the simulation's for the same seed (quickstart; four heart hospitals with an
attack and a robust rule); the fault cases: an unregistered key and a wrong CA are refused,
a hospital killed mid-run fails the run naming it (or the run goes on under
``federation.min_hospitals``), a SuperLink restart ends the run with a clear message and the
finished rounds kept; nothing is left behind. Timings go to $FEDSEC_DOCKER_REPORT (default
/tmp/fedsec-docker-report.json) and are quoted in docs/deployment.md.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

import fedsec
from fedsec.errors import FedsecError
from fedsec.federation.deployment import NodeSpec
from fedsec.runner import RunFailed

docker_deploy = pytest.importorskip("fedsec.federation.docker_deploy")
OK, WHY = docker_deploy.docker_available()
pytestmark = [pytest.mark.deployment, pytest.mark.skipif(not OK, reason=f"no Docker engine: {WHY}")]

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = str(ROOT / "scenarios" / "quickstart.yaml")
# scenarios/integrity_heart.yaml made short: four hospitals, an EHR backdoor at hospital 3
# (va) in every round, the coordinate-wise median.
HEART_YAML = """\
name: integrity_heart_docker
seed: 0
task: {name: heart_disease, model: logistic}
federation:
  partition: {name: natural}
  rounds: 3
  local: {epochs: 1, batch_size: 4, lr: 0.01}
strategy: median
attacks:
  - {preset: ehr_trigger, hospitals: [3], rounds: [1, 3]}
engine: {name: ray, num_cpus: 1, num_gpus: 0.0}
"""
REPORT: dict = {"tests": {}}


def _record(name: str, **info) -> None:
    REPORT["tests"][name] = info
    path = Path(os.environ.get("FEDSEC_DOCKER_REPORT", "/tmp/fedsec-docker-report.json"))
    path.write_text(json.dumps(REPORT, indent=2) + "\n")


@pytest.fixture(scope="module")
def image():
    t0 = time.perf_counter()
    tag = docker_deploy.build_image()
    REPORT["image"] = {"tag": tag, "build_or_reuse_s": round(time.perf_counter() - t0, 1)}
    return tag


def _docker(*args: str) -> str:
    return subprocess.run([docker_deploy.docker_bin(), *args], capture_output=True, text=True, check=True).stdout


def _no_leftovers(dep_id: str) -> None:
    label = f"label={docker_deploy.LABEL}={dep_id}"
    assert _docker("ps", "-aq", "--filter", label).split() == []
    assert _docker("network", "ls", "-q", "--filter", label).split() == []


def _after_round(dep, n: int, action, timeout: float = 600.0) -> threading.Thread:
    """Run ``action(dep)`` in a thread once the ServerApp has logged round ``n``."""
    log = dep.log_dir / "serverapp.log"

    def watch():
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if log.exists() and f"round {n:>3}/" in log.read_text(errors="replace"):
                action(dep)
                return
            time.sleep(0.5)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


def _rounds(out: Path) -> list[int]:
    path = out / "rounds.jsonl"
    return [json.loads(ln)["round"] for ln in path.read_text().splitlines()] if path.exists() else []


def test_quickstart_in_containers_equals_simulation(image, tmp_path, capfd):
    seen = {}

    def inspect(dep):  # while the run goes: what each container holds
        for c in [dep.superlink, *dep.hospitals.values()]:
            mounts = json.loads(_docker("inspect", "--format", "{{json .Mounts}}", c.name))
            seen[c.name] = {"mounts": sorted(m["Destination"] for m in mounts),
                            "certs": sorted(_docker("exec", c.name, "ls", "/certs").split()),
                            "user": _docker("exec", c.name, "id", "-u").strip()}
        seen["ids"] = dep.id

    t0 = time.perf_counter()
    summary = docker_deploy.deploy_docker(QUICKSTART, out=tmp_path / "docker", image=image, _fault=inspect)
    docker_s = time.perf_counter() - t0
    err = capfd.readouterr().err
    t0 = time.perf_counter()
    sim = fedsec.run(QUICKSTART, out=tmp_path / "sim", progress=False)
    sim_s = time.perf_counter() - t0

    info = summary["deployment"]
    assert info["status"] == "finished:completed" and summary["status"] == "completed"
    names = [f"fedsec-{seen['ids']}-{n}" for n in ("superlink", "cleveland", "hungary")]
    assert info["containers"] == names
    # Credentials: the SuperLink holds the CA and its TLS pair, no node key; each hospital holds
    # the CA and its own node key only; nothing runs as root.
    assert seen[names[0]]["certs"] == ["ca.crt", "superlink.crt", "superlink.key"]
    for n in names[1:]:
        assert seen[n]["certs"] == ["ca.crt", "node.key"] and seen[n]["mounts"] == ["/certs"]
    assert {seen[n]["user"] for n in names} == {"49999"}
    # Progress per round, as in simulation, and the same numbers.
    progress = [ln for ln in err.splitlines() if "[fedsec deploy] round" in ln]
    assert [ln.split("round")[1].split("|")[0].strip() for ln in progress] == [f"{i}/5" for i in range(1, 6)]
    assert summary["final"] == sim["final"]
    assert summary["per_hospital"] == sim["per_hospital"]
    assert _rounds(tmp_path / "docker") == [1, 2, 3, 4, 5]
    assert (tmp_path / "docker" / "deployment" / "cleveland.log").is_file()
    assert info["leftover"] == []
    _no_leftovers(seen["ids"])
    _record("quickstart", containers=names, progress=progress, final=summary["final"], equal_to_simulation=True,
            startup_s=info["startup_s"], run_s=info["run_s"], docker_wall_s=round(docker_s, 1),
            simulation_wall_s=round(sim_s, 1))


def test_heart_four_hospitals_attack_robust_rule_equals_simulation(image, tmp_path, capfd):
    """Each hospital's container mounts a folder holding its own UCI file only; the
    SuperLink's container mounts no data. The numbers (pooled standardisation from the
    hospitals' moments, the backdoor's success from their own test records) equal the
    simulation's, which holds every row."""
    from fedsec.data.heart import FILES_DIR, SITES

    heart = tmp_path / "integrity_heart_docker.yaml"
    heart.write_text(HEART_YAML)
    folders = {}
    for i, site in enumerate(SITES):
        d = tmp_path / "data" / site
        d.mkdir(parents=True)
        shutil.copyfile(FILES_DIR / SITES[site], d / SITES[site])
        folders[i] = str(d)
    mounts = {}

    def inspect(dep):
        for c in [dep.superlink, *dep.hospitals.values()]:
            got = json.loads(_docker("inspect", "--format", "{{json .Mounts}}", c.name))
            mounts[c.role if c.role == "superlink" else c.node.name] = {m["Destination"]: m["Source"] for m in got}

    t0 = time.perf_counter()
    summary = docker_deploy.deploy_docker(heart, out=tmp_path / "docker", image=image, data_dirs=folders,
                                          _fault=inspect)
    docker_s = time.perf_counter() - t0
    assert "/data" not in mounts["superlink"]
    for i, site in enumerate(SITES):
        assert mounts[site]["/data"] == folders[i]
    progress = [ln for ln in capfd.readouterr().err.splitlines() if "[fedsec deploy] round" in ln]
    sim = fedsec.run(str(heart), out=tmp_path / "sim", progress=False)
    info = summary["deployment"]
    assert len(info["containers"]) == 5 and info["hospitals"] == ["cleveland", "hungary", "switzerland", "va"]
    assert summary["final"] == sim["final"]
    assert summary["attack"] == sim["attack"] and summary["attack"]  # the backdoor's success, measured the same
    assert len(progress) == 3
    _record("heart_4_hospitals_ehr_trigger_median", containers=info["containers"], progress=progress,
            final=summary["final"], attack=summary["attack"], equal_to_simulation=True,
            startup_s=info["startup_s"], run_s=info["run_s"], docker_wall_s=round(docker_s, 1))


@pytest.mark.parametrize("fault", ["unregistered", "wrong_ca"])
def test_node_without_registered_key_or_with_wrong_ca_is_refused(image, tmp_path, fault):
    nodes = [NodeSpec(0, "hospital-a"), NodeSpec(1, "hospital-b")]
    kwargs = {"unregistered": {1}} if fault == "unregistered" else {"wrong_ca": {1}}
    t0 = time.perf_counter()
    dep = docker_deploy.DockerDeployment(image, nodes, log_dir=tmp_path / "logs", join_timeout=180, **kwargs)
    with pytest.raises(FedsecError) as err:
        with dep:
            pass
    msg = str(err.value)
    assert "hospital hospital-b (partition-id=1) was refused by the SuperLink" in msg
    assert "hospital-a" not in msg.split("; see")[0]
    if fault == "unregistered":
        assert "not registered" in msg
    else:
        assert "CERTIFICATE_VERIFY_FAILED" in msg
    _no_leftovers(dep.id)
    _record(f"refused_{fault}", outcome=msg.splitlines()[0], wall_s=round(time.perf_counter() - t0, 1))


def test_hospital_killed_mid_run_fails_the_run_naming_it(image, tmp_path):
    out = tmp_path / "run"
    killed = {}

    def kill(dep):
        c = dep.hospitals[1]
        _docker("kill", c.name)
        killed.update(name=c.name, id=dep.id)

    t0 = time.perf_counter()
    with pytest.raises(RunFailed) as err:
        docker_deploy.deploy_docker(QUICKSTART, out=out, image=image, verbose=False,
                                    _fault=lambda dep: _after_round(dep, 1, kill))
    msg = str(err.value)
    assert killed and f"hospital hungary (partition-id=1) (container {killed['name']}) exited with code 137" in msg
    assert "left the federation" in msg
    assert 1 in _rounds(out)  # the finished rounds were copied out
    _no_leftovers(killed["id"])
    _record("hospital_killed", outcome=msg.splitlines()[0], rounds_kept=_rounds(out),
            wall_s=round(time.perf_counter() - t0, 1))


def test_hospital_killed_mid_run_goes_on_under_min_hospitals(image, tmp_path, capfd):
    out = tmp_path / "run"
    ov = ["federation.min_hospitals=1", "federation.timeout_s=30", "federation.rounds=3"]
    t0 = time.perf_counter()
    summary = docker_deploy.deploy_docker(
        QUICKSTART, ov, out=out, image=image,
        _fault=lambda dep: _after_round(dep, 1, lambda d: _docker("kill", d.hospitals[1].name)))
    err = capfd.readouterr().err
    # every round ran, but a hospital failed in some: not plain "completed" (docs/scenarios.md)
    assert summary["status"] == "completed_with_failures" and _rounds(out) == [1, 2, 3]
    assert list(summary["deployment"]["hospitals_lost"]) == ["hungary"]
    assert "going on with 1 hospitals (federation.min_hospitals=1)" in err
    rounds = [json.loads(ln) for ln in (out / "rounds.jsonl").read_text().splitlines()]
    assert set(rounds[0]["train"]) == {"cleveland", "hungary"} and set(rounds[-1]["train"]) == {"cleveland"}
    _record("hospital_killed_min_hospitals", outcome="completed without hungary",
            trained=[sorted(r["train"]) for r in rounds], wall_s=round(time.perf_counter() - t0, 1))


def test_superlink_restart_mid_run_ends_clearly_and_keeps_finished_rounds(image, tmp_path):
    out = tmp_path / "run"
    ids = {}

    def restart(dep):
        ids["id"] = dep.id
        _docker("restart", "-t", "2", dep.superlink.name)

    t0 = time.perf_counter()
    with pytest.raises(RunFailed) as err:
        docker_deploy.deploy_docker(QUICKSTART, out=out, image=image, verbose=False,
                                    _fault=lambda dep: _after_round(dep, 1, restart))
    msg = str(err.value)
    assert "the SuperLink container" in msg and "restarted during the run" in msg
    assert "register the hospitals' keys again" in msg
    kept = _rounds(out)
    assert kept and kept[0] == 1 and kept == list(range(1, len(kept) + 1))
    _no_leftovers(ids["id"])
    _record("superlink_restart", outcome=msg.splitlines()[0], rounds_kept=kept,
            wall_s=round(time.perf_counter() - t0, 1))


def test_hospital_refuses_an_app_other_than_the_pinned_one(image, tmp_path):
    out = tmp_path / "run"
    pinned = "0" * 64
    t0 = time.perf_counter()
    with pytest.raises(RunFailed) as err:
        docker_deploy.deploy_docker(QUICKSTART, ["federation.rounds=2"], out=out, image=image, verbose=False,
                                    pin_fab=pinned, run_timeout=900)
    msg = str(err.value)
    assert "cleveland" in msg and "hungary" in msg  # the failure names the hospitals
    assert f"runs only the app with FAB hash {pinned}" in msg
    assert _rounds(out) == []
    _record("fab_not_pinned", outcome=msg, wall_s=round(time.perf_counter() - t0, 1))


def test_ctrl_c_removes_every_container(image, tmp_path):
    import re
    import signal
    import sys

    fedsec_cli = str(Path(sys.executable).parent / "fedsec")
    t0 = time.perf_counter()
    # a shell's background job (nohup CI) starts with SIGINT ignored, and Python keeps it
    # ignored: give the child Ctrl-C back, as a terminal would
    proc = subprocess.Popen([fedsec_cli, "deploy", "--docker", QUICKSTART, "--image", image, "--out",
                             str(tmp_path / "run")], stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if "joined in" in line:
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    err = "".join(lines) + err
    dep_id = re.search(r"container fedsec-([0-9a-f]+)-superlink", err).group(1)
    assert proc.returncode == 130, err[-2000:]  # the exit-code contract: 130 interrupted (docs/ci.md)
    assert "interrupted (Ctrl-C); every container was removed" in err
    _no_leftovers(dep_id)
    _record("ctrl_c", outcome=f"exit {proc.returncode}: interrupted, no container left",
            wall_s=round(time.perf_counter() - t0, 1))

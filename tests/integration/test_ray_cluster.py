"""A scenario on a real two-node Ray cluster (``engine.address``), on this machine.

Two Ray nodes on loopback: ``ray start --head`` and a second ``ray start --address``, each
with one CPU and a resource of its own, each with its own ports (so nothing clashes with
another Ray session on the machine). The quickstart's two hospitals need one CPU each, so
Flower places one ClientApp actor on each node. The test watches the actors' processes
while the run goes (a Ray worker is a child of its node's raylet) and asserts that on both
nodes an actor ran fedsec's ClientApp (torch loaded), and that the final metrics equal a
single-node run's. The cluster's processes are ended by their pids at the end (never
``ray stop``, which would end every Ray session on the machine).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

import fedsec

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = str(ROOT / "scenarios" / "quickstart.yaml")
RAY = str(Path(sys.executable).parent / "ray")


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _procs() -> dict[int, tuple[int, str]]:
    """pid -> (ppid, cmdline) of every live process."""
    out = {}
    for e in os.listdir("/proc"):
        if not e.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{e}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = Path(f"/proc/{e}/stat").read_bytes()
            ppid = int(stat[stat.rfind(b")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        out[int(e)] = (ppid, cmd)
    return out


def _cluster_pids(temp_dir: str) -> list[int]:
    return [pid for pid, (_, cmd) in _procs().items() if temp_dir in cmd and pid != os.getpid()]


@pytest.fixture
def two_node_cluster():
    temp_dir = tempfile.mkdtemp(prefix="fsray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0")
    gcs, *p = _free_ports(14)
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0", "--disable-usage-stats"]
    head = [RAY, "start", "--head", f"--port={gcs}", f"--temp-dir={temp_dir}", "--include-dashboard=false",
            f"--ray-client-server-port={p[0]}", '--resources={"fedsec_head": 1}', *common]
    worker = [RAY, "start", f"--address=127.0.0.1:{gcs}", '--resources={"fedsec_worker": 1}', *common]
    nodes = {}
    try:
        for name, cmd, ports in (("head", head, p[1:7]), ("worker", worker, p[7:13])):
            cmd = cmd + [f"--node-manager-port={ports[0]}", f"--object-manager-port={ports[1]}",
                         f"--dashboard-agent-listen-port={ports[2]}", f"--dashboard-agent-grpc-port={ports[3]}",
                         f"--metrics-export-port={ports[4]}", f"--runtime-env-agent-port={ports[5]}"]
            res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
            assert res.returncode == 0, f"{name}: {res.stdout[-1500:]}{res.stderr[-1500:]}"
            nodes[name] = ports[0]
        raylets = {}
        for pid, (_, cmd) in _procs().items():
            if "raylet" in cmd.split(" ")[0] and temp_dir in cmd:
                for name, port in nodes.items():
                    if f"--node_manager_port={port}" in cmd:
                        raylets[pid] = name
        assert sorted(raylets.values()) == ["head", "worker"], raylets
        yield {"address": f"127.0.0.1:{gcs}", "raylets": raylets, "temp_dir": temp_dir}
    finally:
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            for pid in _cluster_pids(temp_dir):
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            deadline = time.monotonic() + wait
            while _cluster_pids(temp_dir) and time.monotonic() < deadline:
                time.sleep(0.2)
        subprocess.run(["rm", "-rf", temp_dir], check=False)


def _node_of(pid: int, procs: dict, raylets: dict) -> str | None:
    for _ in range(6):  # a worker is the raylet's child (or a grandchild through a setup process)
        if pid in raylets:
            return raylets[pid]
        if pid not in procs:
            return None
        pid = procs[pid][0]
    return None


def test_quickstart_on_a_two_node_ray_cluster_equals_single_node(two_node_cluster, tmp_path):
    raylets = two_node_cluster["raylets"]
    ran: dict[int, dict] = {}  # actor pid -> {"node": ..., "torch": bool}
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            procs = _procs()
            for pid, (_, cmd) in procs.items():
                if cmd.startswith("ray::ClientAppActor"):
                    node = _node_of(pid, procs, raylets)
                    if node is None:  # an actor of another Ray session on this machine
                        continue
                    entry = ran.setdefault(pid, {"node": node, "torch": False})
                    try:
                        if not entry["torch"] and "libtorch_cpu" in Path(f"/proc/{pid}/maps").read_text():
                            entry["torch"] = True
                    except OSError:
                        pass
            stop.wait(0.3)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        cluster = fedsec.run(QUICKSTART, overrides=[f"engine.address={two_node_cluster['address']}"],
                             out=tmp_path / "cluster", progress=False)
    finally:
        stop.set()
        t.join(10)
    single = fedsec.run(QUICKSTART, out=tmp_path / "single", progress=False)
    assert cluster["status"] == "completed"
    nodes_with_actors = {e["node"] for e in ran.values()}
    nodes_that_trained = {e["node"] for e in ran.values() if e["torch"]}
    assert nodes_with_actors == {"head", "worker"}, ran
    assert nodes_that_trained == {"head", "worker"}, ran
    assert cluster["final"] == single["final"]
    assert cluster["per_hospital"] == single["per_hospital"]
    (tmp_path / "cluster-actors.json").write_text(json.dumps(ran))

"""fedsec sweep on Ray, stopped half-way (Ctrl-C, then SIGKILL) and re-run: only unfinished
cells run again, nothing is left running, and the final tables equal an uninterrupted sweep's.

Tiny grid: quickstart (2 hospitals), 2 rounds, strategy=fedavg,median, one seed. 200 local
epochs make each round last a few seconds, so a signal meant to land mid-cell does.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = str(ROOT / "scenarios" / "quickstart.yaml")


def sweep_cmd(out: Path) -> list[str]:
    return [sys.executable, "-m", "fedsec.sweep", QUICKSTART, "federation.rounds=2", "federation.local.epochs=200",
            "--grid", "strategy=fedavg,median", "--seeds", "0", "--out", str(out), "--parallel", "1"]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # a zombie waiting for init to reap it is dead


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(p.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def cell_statuses(out: Path) -> dict[str, str]:
    import json

    res = {}
    for d in sorted((out / "cells").glob("*")) if (out / "cells").exists() else []:
        try:
            res[d.name.split(",")[0]] = json.loads((d / "summary.json").read_text())["status"]
        except (OSError, ValueError, KeyError):
            res[d.name.split(",")[0]] = "starting"
    return res


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def stop_and_check_no_orphans(proc: subprocess.Popen, sig: int) -> int:
    family = descendants(proc.pid)
    assert family, "the sweep started no worker / Ray processes"
    os.kill(proc.pid, sig)
    code = proc.wait(timeout=120)
    wait_for(lambda: not any(_alive(p) for p in family), 90, "the sweep's workers and Ray processes to exit")
    return code


def _ctrl_c_enabled():
    # A shell runs background jobs (`cmd &`, nohup) with SIGINT ignored, and Python keeps an
    # ignored SIGINT ignored: give the sweep the Ctrl-C a terminal user's sweep would get.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_to_end(out: Path) -> subprocess.CompletedProcess:
    res = subprocess.run(sweep_cmd(out), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def test_interrupt_kill_and_resume(tmp_path):
    ref, out = tmp_path / "uninterrupted", tmp_path / "resumed"
    run_to_end(ref)

    # 1. Ctrl-C while the first cell runs: exit 130, the cell is marked unfinished, nothing left running
    log = open(tmp_path / "a.log", "w")
    proc = subprocess.Popen(sweep_cmd(out), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=_ctrl_c_enabled)
    wait_for(lambda: cell_statuses(out).get("strategy=fedavg") == "running", 300, "the first cell to start")
    assert stop_and_check_no_orphans(proc, signal.SIGINT) == 130
    assert cell_statuses(out)["strategy=fedavg"] in ("interrupted", "running")

    # 2. re-run; SIGKILL once the first cell is done and the second one runs
    proc = subprocess.Popen(sweep_cmd(out), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=_ctrl_c_enabled)
    wait_for(lambda: cell_statuses(out) == {"strategy=fedavg": "completed", "strategy=median": "running"}, 400,
             "the first cell to complete and the second to start")
    assert stop_and_check_no_orphans(proc, signal.SIGKILL) == -signal.SIGKILL
    first = next((out / "cells").glob("strategy=fedavg*")) / "summary.json"
    stamp = first.stat().st_mtime_ns
    # the killed cell: "running", or "interrupted" / "failed" when its worker saw Ray go away first
    assert cell_statuses(out)["strategy=median"] in ("running", "interrupted", "failed")

    # 3. re-run: only the unfinished cell runs; tables equal the uninterrupted sweep's
    res = run_to_end(out)
    assert "1 already completed (skipped), 1 to run" in res.stderr
    assert "running strategy=median" in res.stderr and "running strategy=fedavg" not in res.stderr
    assert first.stat().st_mtime_ns == stamp
    assert cell_statuses(out) == {"strategy=fedavg": "completed", "strategy=median": "completed"}
    for name in ("summary.md", "summary.csv"):
        assert (out / name).read_text() == (ref / name).read_text(), name

    import csv

    def metrics(path):
        with open(path) as fh:
            return [{k: v for k, v in row.items() if not k.startswith("timing.")} for row in csv.DictReader(fh)]

    assert metrics(out / "sweep.csv") == metrics(ref / "sweep.csv")

"""Ctrl-C and SIGTERM on a real ``fedsec run`` (Ray): the run stops (it used to hang until a
second Ctrl-C, then died with a traceback), keeps its finished rounds and checkpoint, says
"interrupted" in summary.json and manifest.json, exits 130 / 143 without a traceback, and
leaves no process behind (Ray's head, raylet, agents, the hospitals' actors).

200 local epochs make each round last a few seconds, so the signal lands mid-round: the
stop must not wait for the round to end.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedsec.federation.engine import descendants

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = str(ROOT / "scenarios" / "quickstart.yaml")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _ctrl_c_enabled():
    # A shell's background job (nohup, `cmd &` in CI) starts with SIGINT ignored, and Python
    # keeps it ignored: give the run the Ctrl-C a terminal user's run would get.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("sig, to_group, code", [(signal.SIGINT, True, 130), (signal.SIGTERM, False, 143)],
                         ids=["ctrl-c", "sigterm"])
def test_signal_stops_the_run_and_keeps_its_rounds(tmp_path, sig, to_group, code):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "fedsec.cli", "run", QUICKSTART, "federation.rounds=30",
                             "federation.local.epochs=200", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=_ctrl_c_enabled)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            rounds = out / "rounds.jsonl"
            if rounds.exists() and rounds.read_text().strip() and (out / "checkpoint.pt").exists():
                break
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.1)
        family = descendants(proc.pid)
        assert any(b"ray::ClientAppActor" in Path(f"/proc/{p}/cmdline").read_bytes() for p in family
                   if _alive(p)), "the hospitals' actors should be running"
        time.sleep(0.5)  # into the next round
        t0 = time.monotonic()
        # Ctrl-C in a terminal signals the whole foreground group (Ray's processes too)
        (os.killpg if to_group else os.kill)(proc.pid, sig)
        stdout, stderr = proc.communicate(timeout=120)  # it used to hang here for ever
        stop_s = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == code, stderr[-3000:]
    assert "Traceback" not in stderr and "Traceback" not in stdout, stderr[-3000:]
    assert "interrupted after" in stderr and f"--resume {out}" in stderr
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in family) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [p for p in family if _alive(p)] == [], "processes of the run outlived it"
    summary = json.loads((out / "summary.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    assert summary["status"] == manifest["status"] == "interrupted"
    assert summary["error"] == f"interrupted by {signal.Signals(sig).name}"
    kept = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]
    assert 1 <= len(kept) < 30 and summary["rounds"] == len(kept)
    assert (out / "checkpoint.pt").is_file()
    print(f"{signal.Signals(sig).name}: stopped in {stop_s:.1f} s after {len(kept)} round(s)")

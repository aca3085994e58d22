"""A run with state that carries over between rounds, killed with SIGKILL mid-run and
resumed with ``fedsec run --resume DIR``, ends with exactly the metrics of an uninterrupted run, every
round: centered clipping (its center) and FoolsGold (its histories), each with an attack
that is active only in a window of rounds (``rounds: [a, b]``). The pattern of the kill is
test_ray_quickstart.py's."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import fedsec

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[2]
HEART = str(ROOT / "scenarios" / "heart_fedavg.yaml")
ROUNDS = 6
KILL_AFTER = 3  # rounds finished when the kill is sent: inside or after the attack's window

CASES = {
    # tau far below the update norms: each round starts from the previous round's center
    "centered_clipping": ["strategy={rule: centered_clipping, tau: 0.02}",
                          "attacks=[{attack: sign_flip, scale: 4.0, hospitals: [3], rounds: [2, 3]}]"],
    # the coalition sends one forged update from two hospitals in rounds 2-3: FoolsGold's
    # histories keep them alike afterwards
    "foolsgold": ["strategy={rule: foolsgold}",
                  "attacks=[{attack: ipm, eps: 2.0, hospitals: [2, 3], rounds: [2, 3]}]"],
}


def _processes_naming(text: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if text.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
        except OSError:
            pass
    return found


def _rounds(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]


def _kill_mid_run(overrides: list[str], out: Path, tmp: str) -> None:
    """Start ``fedsec run`` in a subprocess (Ray under the private TMPDIR ``tmp``), SIGKILL
    its driver once KILL_AFTER rounds are on disk, check that nothing of it survives."""
    proc = subprocess.Popen([sys.executable, "-m", "fedsec.cli", "run", HEART, *overrides, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "TMPDIR": tmp})
    try:
        deadline = time.time() + 240
        rounds = out / "rounds.jsonl"
        while time.time() < deadline and proc.poll() is None:
            if rounds.exists() and len(rounds.read_text().splitlines()) >= KILL_AFTER:
                break
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)  # the driver only, as the OOM killer would
        proc.wait()
        deadline = time.time() + 30
        while _processes_naming(tmp) and time.time() < deadline:
            time.sleep(0.2)
        assert _processes_naming(tmp) == [], "Ray processes outlived the killed run"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass


@pytest.mark.parametrize("case", sorted(CASES))
def test_killed_stateful_run_resumes_to_exactly_the_uninterrupted_metrics(case, tmp_path):
    import torch

    overrides = [f"federation.rounds={ROUNDS}", *CASES[case]]
    fedsec.run(HEART, overrides=overrides, out=tmp_path / "whole", progress=False)
    expected = _rounds(tmp_path / "whole")

    out = tmp_path / "killed"
    tmp = tempfile.mkdtemp(prefix="fk", dir="/tmp")  # short: Ray's socket paths stay < 107 characters
    try:
        _kill_mid_run(overrides, out, tmp)
        assert json.loads((out / "summary.json").read_text())["status"] == "running"
        # the record of a round is written before its checkpoint: a kill between the two
        # leaves one record more, which the resumed run redoes
        ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
        assert KILL_AFTER - 1 <= ckpt["round"] < ROUNDS, "the kill should land mid-run, inside the attack's window"
        assert ckpt["server"]["rule"]["name"] == case and ckpt["server"]["rule"]["state"]
        # the command line, as a user resumes; same TMPDIR, so it cleans up after the killed run
        done = subprocess.run([sys.executable, "-m", "fedsec.cli", "run", "--resume", str(out)],
                              capture_output=True, text=True, env={**os.environ, "TMPDIR": tmp}, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        assert [d for d in os.listdir(tmp) if d.startswith("fedsec-ray-")] == [], "Ray's temp dirs left behind"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds"] == ROUNDS
    resumed = _rounds(out)
    assert [r["round"] for r in resumed] == list(range(1, ROUNDS + 1))
    for key in ("global", "per_hospital", "defense", "update_norm"):
        assert [r[key] for r in resumed] == [r[key] for r in expected], key
    assert json.loads((out / "manifest.json").read_text())["resumed_at_round"] == ckpt["round"]

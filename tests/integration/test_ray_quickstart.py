"""The quickstart end to end on Flower's simulation engine (Ray): results, accuracy,
determinism, and a failing hospital failing the run visibly."""

import json
from pathlib import Path

import pytest

import fedsec
from fedsec.runner import RunFailed

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = str(ROOT / "scenarios" / "quickstart.yaml")


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    outs = [tmp_path_factory.mktemp(f"run{i}") for i in range(2)]
    return [(fedsec.run(QUICKSTART, overrides=["federation.rounds=3"], out=o, progress=False), o) for o in outs]


def test_quickstart_results_folder(two_runs):
    summary, out = two_runs[0]
    assert summary["status"] == "completed" and summary["rounds"] == 3
    for name in ("scenario.yaml", "manifest.json", "rounds.jsonl", "summary.json", "checkpoint.pt"):
        assert (out / name).is_file(), name
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["status"] == "completed"
    assert set(on_disk["final"]) >= {"loss", "accuracy", "auroc", "sensitivity", "specificity"}
    assert set(on_disk["per_hospital"]) == {"cleveland", "hungary"}
    assert on_disk["timing"]["wall_s"] > on_disk["timing"]["startup_s"] > 0
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert set(rounds[0]["train"]) == {"cleveland", "hungary"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["versions"]["flwr"] == "1.41.0"


def test_quickstart_learns_above_chance(two_runs):
    summary, _ = two_runs[0]
    # the union test set is 45% positive: always predicting one class scores at most 0.55
    assert summary["final"]["accuracy"] > 0.7
    assert summary["final"]["auroc"] > 0.75


def test_same_seed_same_metrics(two_runs):
    (a, out_a), (b, out_b) = two_runs
    ra = [json.loads(x) for x in (out_a / "rounds.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in (out_b / "rounds.jsonl").read_text().splitlines()]
    assert [r["global"] for r in ra] == [r["global"] for r in rb]
    assert [r["per_hospital"] for r in ra] == [r["per_hospital"] for r in rb]


def test_failing_hospital_fails_the_run(tmp_path, capfd):
    overrides = ["federation.rounds=2",
                 "attacks=[{preset: hospital_fault, hospitals: [1], message: disk full}]"]
    with pytest.raises(RunFailed) as info:
        fedsec.run(QUICKSTART, overrides=overrides, out=tmp_path, progress=False)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["rounds"] == 0
    assert "hungary: RuntimeError: disk full at hospital 1" in summary["error"]
    assert summary["failures"] == [
        {"round": 1, "hospital": "hungary", "reason": "RuntimeError: disk full at hospital 1"}]
    assert "hungary" in str(info.value) and "Traceback" not in str(info.value)
    # the console gets no Flower / Ray tracebacks; failures.log keeps the hospital's
    console = capfd.readouterr()
    assert "Traceback" not in console.err + console.out and "\x1b[" not in console.err
    log = (tmp_path / "failures.log").read_text()
    assert "=== round 1, training, hungary" in log and "in poison_data" in log and "\x1b[" not in log


def test_hospital_failing_every_round_is_not_completed(tmp_path):
    boom = "attacks=[{preset: hospital_fault, hospitals: [1], message: disk full}]"
    summary = fedsec.run(QUICKSTART, overrides=["federation.rounds=2", "federation.min_hospitals=1", boom],
                         out=tmp_path, progress=False)
    assert summary["status"] == "completed_with_failures" and summary["rounds"] == 2
    assert [(f["round"], f["hospital"]) for f in summary["failures"]] == [(1, "hungary"), (2, "hungary")]
    assert json.loads((tmp_path / "manifest.json").read_text())["status"] == "completed_with_failures"


def test_diverged_hospital_fails_the_run_or_is_left_out(tmp_path):
    nan = "attacks=[{preset: hospital_fault, hospitals: [1], mode: nan}]"
    with pytest.raises(RunFailed, match=r"hungary: its update has NaN"):
        fedsec.run(QUICKSTART, overrides=["federation.rounds=2", nan], out=tmp_path / "strict", progress=False)
    # allowed to go on with 1 of the 2 hospitals: the NaN update is dropped every round, named in
    # the round's failures, and the model still learns
    summary = fedsec.run(QUICKSTART, overrides=["federation.rounds=2", "federation.min_hospitals=1", nan],
                         out=tmp_path / "lenient", progress=False)
    rounds = [json.loads(x) for x in (tmp_path / "lenient" / "rounds.jsonl").read_text().splitlines()]
    assert [any("hungary: its update has NaN" in f for f in r["failures"]) for r in rounds] == [True, True]
    assert list(rounds[0]["train"]) == ["cleveland"]
    assert summary["final"]["auroc"] > 0.75


def _processes_naming(text: str) -> list[int]:
    import os

    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if text.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
        except OSError:
            pass
    return found


def test_killed_run_keeps_rounds_and_resumes_to_the_same_metrics(two_runs, tmp_path, monkeypatch):
    """SIGKILL a run after its first round: its Ray processes die with it, the next run removes
    its Ray temp dir, and resuming it keeps the finished rounds and ends with exactly the
    metrics of an uninterrupted one."""
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import tempfile
    import time

    out = tmp_path / "killed"
    # a short private TMPDIR (Ray's socket paths must stay under 107 characters) tells this
    # run's Ray processes apart from any other run's
    tmp = tempfile.mkdtemp(prefix="fk", dir="/tmp")
    proc = subprocess.Popen([sys.executable, "-m", "fedsec.cli", "run", QUICKSTART, "federation.rounds=3",
                             "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env={**os.environ, "TMPDIR": tmp})
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            rounds = out / "rounds.jsonl"
            if rounds.exists() and len(rounds.read_text().splitlines()) >= 1 and (out / "checkpoint.pt").exists():
                break
            time.sleep(0.05)
        assert _processes_naming(tmp), "Ray's head should be running under the private TMPDIR"
        os.kill(proc.pid, signal.SIGKILL)  # the driver only, as the OOM killer would
        proc.wait()
        deadline = time.time() + 30
        while _processes_naming(tmp) and time.time() < deadline:
            time.sleep(0.2)
        assert _processes_naming(tmp) == [], "Ray processes outlived the killed run"
        ray_dirs = lambda: [d for d in os.listdir(tmp) if d.startswith("fedsec-ray-")]  # noqa: E731
        assert len(ray_dirs()) == 1  # what a SIGKILL leaves behind
        kept = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]
        assert 1 <= len(kept) < 3, "the kill should land mid-run"
        assert json.loads((out / "summary.json").read_text())["status"] == "running"

        monkeypatch.setattr(tempfile, "tempdir", tmp)  # the next run starts in the same TMPDIR
        summary = fedsec.run(None, resume=out, progress=False)
        assert ray_dirs() == [], "the killed run's Ray temp dir should be gone"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        shutil.rmtree(tmp, ignore_errors=True)
    assert summary["status"] == "completed" and summary["rounds"] == 3
    resumed = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]
    _, reference = two_runs[0]
    expected = [json.loads(x) for x in (reference / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in resumed] == [1, 2, 3]
    assert [r["global"] for r in resumed] == [r["global"] for r in expected]

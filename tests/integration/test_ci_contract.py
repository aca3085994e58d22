"""The downstream CI recipe of docs/ci.md, run as documented: its scenario
(docs/ci/two_hospitals.yaml) and its pytest fixture (docs/ci/conftest_fedsec.py), from a
working directory that is not this checkout; and the exit-code contract: 0 completed,
1 the run failed, 2 bad input (130 / 143: tests/integration/test_signals.py)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CI = ROOT / "docs" / "ci"
_spec = importlib.util.spec_from_file_location("conftest_fedsec", CI / "conftest_fedsec.py")
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)
fedsec_run = _module.fedsec_run  # the documented fixture, used as is


@pytest.fixture
def downstream(tmp_path):
    """A downstream project: its own ci/ scenario, no scenarios/ attacks/ strategies/ folders."""
    project = tmp_path / "hospital-app"
    (project / "ci").mkdir(parents=True)
    (project / "ci" / "two_hospitals.yaml").write_text((CI / "two_hospitals.yaml").read_text())
    return project


@pytest.mark.ray
def test_exit_0_a_completed_two_hospital_run(fedsec_run, downstream):
    summary = fedsec_run("ci/two_hospitals.yaml", cwd=downstream)
    assert summary["status"] == "completed" and summary["rounds"] == 2
    assert set(summary["per_hospital"]) == {"cleveland", "hungary"}
    assert summary["failures"] == [] and summary["final"]["auroc"] > 0.7


@pytest.mark.ray
def test_exit_1_a_run_that_started_and_failed(fedsec_run, downstream):
    # no hospital can join, or reply, within a millisecond: the run fails, naming them
    summary = fedsec_run("ci/two_hospitals.yaml", "federation.timeout_s=0.001", expect=1, cwd=downstream)
    assert summary["status"] == "failed" and summary["rounds"] == 0
    if "did not join" in summary["error"]:  # the nodes were not registered yet
        assert "partition-id [0, 1] did not join within 0.001 s" in summary["error"]
    else:
        assert summary["failures"] == [{"round": 1, "hospital": h, "reason": "no reply within 0.001 s"}
                                       for h in ("cleveland", "hungary")]
    err = summary["_stderr"]
    assert "Traceback" not in err and "\x1b[" not in err and len(err.splitlines()) < 10, err


def test_exit_2_bad_input_runs_nothing(fedsec_run, downstream, tmp_path):
    summary = fedsec_run("ci/two_hospitals.yaml", "federation.roundz=2", expect=2, cwd=downstream)
    assert summary == {"_stderr": summary["_stderr"]}  # no results folder was written
    assert "federation.roundz" in summary["_stderr"] and "Traceback" not in summary["_stderr"]
    assert fedsec_run("ci/missing.yaml", expect=2, cwd=downstream)["_stderr"].count("\n") == 1


@pytest.mark.ray
def test_fedsec_run_with_no_argument_from_another_folder(tmp_path):
    """The packaged quickstart: `fedsec run` works wherever it is started."""
    res = subprocess.run([sys.executable, "-m", "fedsec.cli", "run", "federation.rounds=1", "--out", "q"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "q" / "summary.json").read_text())
    assert summary["scenario"] == "quickstart" and summary["status"] == "completed"

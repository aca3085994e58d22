"""A pytest fixture for a downstream project's CI: copy this file's fixture into your
``conftest.py``. ``fedsec_run("ci/two_hospitals.yaml", "federation.rounds=1")`` runs the
scenario in a fresh results folder, checks the exit code (docs/ci.md) and returns
summary.json's dict.

Exit codes: 0 completed (status "completed", or "completed_with_failures" when
federation.min_hospitals let hospitals fail), 1 the run started and failed, 2 bad input
(nothing ran), 130 / 143 stopped by Ctrl-C / SIGTERM.
"""

import json
import subprocess
import sys

import pytest


@pytest.fixture
def fedsec_run(tmp_path):
    def run(scenario, *overrides, expect: int = 0, timeout: float = 900, cwd=None):
        out = tmp_path / f"fedsec-{len(list(tmp_path.glob('fedsec-*')))}"
        res = subprocess.run([sys.executable, "-m", "fedsec.cli", "run", str(scenario), *overrides, "--out", str(out)],
                             capture_output=True, text=True, timeout=timeout, cwd=cwd)
        assert res.returncode == expect, f"fedsec exited {res.returncode}:\n{res.stderr[-3000:]}"
        summary = out / "summary.json"
        result = json.loads(summary.read_text()) if summary.exists() else {}
        result["_stderr"] = res.stderr
        return result

    return run

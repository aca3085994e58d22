"""``fedsec run`` without Ray: argument order, the path-or-override rule, exit codes and
what the results folder says for an unexpected error, an interrupted run, hospital
failures and an ``engine.address`` that does not answer. The engine is replaced by a stub
where a run must "start"; tests/integration/ runs the real one."""

import json
import os
import shutil
import signal
import socket
import time
from pathlib import Path

import pytest

import fedsec.runner as runner
from fedsec.cli import _split_args, build_parser, is_path, main, parse_args
from fedsec.errors import FedsecError
from fedsec.federation import engine
from fedsec.scenario import load_scenario

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = str(ROOT / "scenarios" / "quickstart.yaml")


# ---- argument order and the path-or-override rule ------------------------------------------

@pytest.mark.parametrize("argv", [
    ["run", QUICKSTART, "--out", "x", "federation.rounds=3", "seed=4"],
    ["run", QUICKSTART, "federation.rounds=3", "--out", "x", "seed=4"],
    ["run", "--out", "x", QUICKSTART, "federation.rounds=3", "seed=4"],
    ["run", "federation.rounds=3", "--out", "x", "seed=4", QUICKSTART],
])
def test_options_scenario_and_overrides_in_any_order(argv):
    args = parse_args(build_parser(), argv)
    assert args.out == "x"
    assert _split_args(args.items) == ([QUICKSTART], ["federation.rounds=3", "seed=4"])


def test_unknown_option_is_still_an_error(capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(build_parser(), ["run", QUICKSTART, "--outt", "x"])
    assert info.value.code == 2 and "--outt" in capsys.readouterr().err


def test_a_path_with_equals_signs_is_a_path(tmp_path):
    cell = tmp_path / "runs" / "sw" / "cells" / "attacks=alie,seed=0" / "scenario.yaml"
    assert is_path(str(cell))  # ends in .yaml, even before it exists
    cell.parent.mkdir(parents=True)
    shutil.copy(QUICKSTART, cell)
    plain = tmp_path / "attacks=none"
    shutil.copy(QUICKSTART, plain)  # an existing file whose name looks like an override
    assert is_path(str(plain)) and is_path("scenario") and is_path("dir/x=1")
    assert not is_path("federation.rounds=3") and not is_path("attacks=[{preset: alie}]")
    assert not is_path("attacks=none")  # no such file here: an override
    assert _split_args([str(cell), "federation.rounds=1"]) == ([str(cell)], ["federation.rounds=1"])


def test_a_sweep_cells_scenario_file_can_be_validated_and_run(tmp_path, monkeypatch, capsys):
    cell = tmp_path / "sw" / "cells" / "attacks=alie,seed=0-3f09a2"
    cell.mkdir(parents=True)
    # a cell's resolved scenario, with the address of its sweep's (now gone) Ray head
    (cell / "scenario.yaml").write_text(load_scenario(QUICKSTART, ["engine.address=127.0.0.1:1"]).to_yaml())
    assert main(["validate", str(cell / "scenario.yaml"), "federation.rounds=2"]) == 0
    assert "ok " in capsys.readouterr().out

    def one_round(run_dir, on_round):
        run_dir.append_round(a_round(1))

    stub_engine(monkeypatch, one_round)
    out = tmp_path / "again"
    assert main(["run", str(cell / "scenario.yaml"), "federation.rounds=1", "engine.address=null",
                 "--out", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"


# ---- exit codes and the results folder ---------------------------------------------------

def stub_engine(monkeypatch, behaviour):
    """Replace the engine: ``behaviour(run_dir, on_round)`` plays the run."""
    def fake(scenario, hospitals, task, run_dir, on_round, verbose, initial_state, offset, server_state=None):
        return behaviour(run_dir, on_round)

    monkeypatch.setattr(runner, "_engine_run", fake)


def a_round(n: int, failures=()):
    return {"round": n, "time_s": 0.01, "global": {"loss": 0.5, "accuracy": 0.8, "auroc": 0.9},
            "per_hospital": {}, "failures": list(failures)}


def test_unexpected_error_keeps_its_traceback_in_error_log(tmp_path, monkeypatch, capsys):
    def crash(run_dir, on_round):
        return {}["no such key"]

    stub_engine(monkeypatch, crash)
    out = tmp_path / "run"
    assert main(["run", QUICKSTART, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"traceback in {out / 'error.log'}" in err and "KeyError" in err
    assert "Traceback" not in err
    log = (out / "error.log").read_text()
    assert log.startswith("Traceback") and "def crash" not in log and "in crash" in log and "KeyError" in log
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and "error.log" in summary["error"]


def test_interrupted_run_exits_143_and_says_so(tmp_path, monkeypatch, capsys):
    def stopped(run_dir, on_round):
        rec = a_round(1)
        run_dir.append_round(rec)
        on_round(rec)
        raise engine.Interrupted(signal.SIGTERM)

    stub_engine(monkeypatch, stopped)
    out = tmp_path / "run"
    assert main(["run", QUICKSTART, "--out", str(out)]) == 143
    err = capsys.readouterr().err
    assert "interrupted after 1 finished round(s)" in err and "Traceback" not in err
    for name in ("summary.json", "manifest.json"):
        assert json.loads((out / name).read_text())["status"] == "interrupted"
    assert json.loads((out / "summary.json").read_text())["error"] == "interrupted by SIGTERM"


def test_hospital_failures_are_in_the_summary_and_its_status(tmp_path, monkeypatch, capsys):
    def flaky(run_dir, on_round):
        for r in (1, 2):
            rec = a_round(r, ["hungary: RuntimeError: disk full"])
            run_dir.append_round(rec)
            on_round(rec)

    stub_engine(monkeypatch, flaky)
    out = tmp_path / "run"
    assert main(["run", QUICKSTART, "federation.rounds=2", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("failed: hungary: RuntimeError: disk full") == 2
    assert "status completed_with_failures" in captured.out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed_with_failures"  # failed in every round: not "completed"
    assert summary["failures"] == [{"round": 1, "hospital": "hungary", "reason": "RuntimeError: disk full"},
                                   {"round": 2, "hospital": "hungary", "reason": "RuntimeError: disk full"}]


def test_the_round_that_fails_the_run_is_in_the_summary(tmp_path, monkeypatch):
    def fails(run_dir, on_round):
        err = FedsecError("round 1: 1 of 2 hospitals failed during training")
        err.failures = [{"round": 1, "hospital": "hungary", "reason": "OSError: no space"}]
        raise err

    stub_engine(monkeypatch, fails)
    assert main(["run", QUICKSTART, "--out", str(tmp_path / "r")]) == 1
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["failures"][0]["hospital"] == "hungary"


def test_one_line_reason_of_a_ray_traceback():
    from fedsec.results import one_line_reason

    reason = ("<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'\x1b[36mray::ClientAppActor.run()"
              "\x1b[39m (pid=1)\n  File \"x.py\", line 3, in poison_data\n    raise RuntimeError('disk full')\n"
              "RuntimeError: disk full at hospital 1\n\nThe above exception was the direct cause of the following"
              " exception:\n\nflwr.clientapp.client_app.ClientAppException: \nException ClientAppException "
              "occurred. Message: disk full at hospital 1'>")
    assert one_line_reason(reason) == "RuntimeError: disk full at hospital 1"
    assert one_line_reason("no reply within 30 s") == "no reply within 30 s"
    assert "\x1b" not in one_line_reason("\x1b[31mboom\x1b[0m")


# ---- engine.address that does not answer ----------------------------------------------------

def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_address_that_does_not_answer_fails_within_the_timeout(tmp_path, monkeypatch, capsys):
    port = closed_port()
    s = load_scenario(QUICKSTART, [f"engine.address=127.0.0.1:{port}"])
    t0 = time.monotonic()
    with pytest.raises(FedsecError, match=rf"engine.address=127.0.0.1:{port}: no Ray cluster answered within 1.5 s"):
        engine.check_address(s, timeout=1.5)
    assert 1.5 <= time.monotonic() - t0 < 10
    monkeypatch.setattr(engine, "ADDRESS_TIMEOUT_S", 1.0)
    out = tmp_path / "never"
    assert main(["run", QUICKSTART, f"engine.address=127.0.0.1:{port}", "--out", str(out)]) == 2
    assert "engine.address=" in capsys.readouterr().err
    assert not out.exists()  # bad input: nothing written


def test_address_that_answers_passes(tmp_path):
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        s = load_scenario(QUICKSTART, [f"engine.address=127.0.0.1:{srv.getsockname()[1]}"])
        engine.check_address(s, timeout=2)
    with pytest.raises(FedsecError, match="expected host:port"):
        engine.check_address(load_scenario(QUICKSTART, ["engine.address=nohostport"]), timeout=1)


# ---- the stop machinery, in this process ---------------------------------------------------

def test_first_signal_asks_to_stop_second_one_interrupts():
    class Grid:
        def pull_messages(self, ids):
            return ["reply"]

    grid = Grid()
    engine._guard_grid(grid)
    before = signal.getsignal(signal.SIGTERM)
    with engine.stop_on_signals(kill_local_ray=False):
        assert grid.pull_messages([1]) == ["reply"] and engine.stop_requested() is None
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler runs between bytecodes of the main thread
        assert engine.stop_requested() == signal.SIGTERM
        with pytest.raises(engine.StopRequested):
            grid.pull_messages([1])
        with pytest.raises(engine.Interrupted) as info:  # (SIGINT may be ignored under nohup: SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
        assert info.value.exit_code == 143  # the first signal names the stop
    assert signal.getsignal(signal.SIGTERM) == before and engine.stop_requested() is None


def test_signal_while_the_data_loads_stops_before_the_engine(tmp_path, monkeypatch, capsys):
    import fedsec.tasks

    real = fedsec.tasks.build_task

    def build_then_signal(scenario):
        task = real(scenario)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        return task

    monkeypatch.setattr(fedsec.tasks, "build_task", build_then_signal)
    stub_engine(monkeypatch, lambda run_dir, on_round: pytest.fail("the engine should not start"))
    out = tmp_path / "run"
    assert main(["run", QUICKSTART, "--out", str(out)]) == 143
    assert json.loads((out / "summary.json").read_text())["status"] == "interrupted"
    assert "interrupted after 0 finished round(s)" in capsys.readouterr().err


@pytest.mark.parametrize("item, words", [
    ("nowhere=/tmp", ["--data: no hospital 'nowhere'", "cleveland, hungary"]),
    ("hungary", ["--data: expected HOSPITAL=PATH"]),
    ("hungary=/no/such/folder", ["--data hungary=/no/such/folder: no such file or folder"]),
])
def test_deploy_data_option_is_checked_before_anything_starts(item, words, capsys, monkeypatch):
    import fedsec.federation.deployment as deployment

    monkeypatch.setattr(deployment, "deploy", lambda *a, **k: pytest.fail("a deployment started"))
    repo = Path(__file__).resolve().parents[2]
    assert main(["deploy", str(repo / "scenarios" / "quickstart.yaml"), "--data", item]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err


def test_deploy_data_maps_each_hospital_to_its_partition(tmp_path):
    from fedsec.cli import _hospital_data

    repo = Path(__file__).resolve().parents[2]
    got = _hospital_data(str(repo / "scenarios" / "quickstart.yaml"), [], [f"hungary={tmp_path}"])
    assert got == {1: str(tmp_path.resolve())}


# ---- the process the CLI runs in -------------------------------------------------------------

@pytest.mark.parametrize("given,expected", [(None, "1"), ("0", "0")])
def test_cli_puts_large_tensors_on_huge_pages_before_torch_loads(given, expected):
    """fedsec.cli sets c10's THP_MEM_ALLOC_ENABLE before torch is imported (the server's
    Tensor[n, d] of replies; docs/defenses.md), and leaves a user's own value alone."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if given is not None:
        env["THP_MEM_ALLOC_ENABLE"] = given
    code = ("import os, sys; import fedsec.cli; assert 'torch' not in sys.modules; "
            "print(os.environ['THP_MEM_ALLOC_ENABLE'])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected


def test_a_run_does_not_load_the_sweep_and_report_modules_and_a_closed_pipe_is_no_traceback():
    import subprocess
    import sys

    code = ("import sys; from fedsec.cli import main; rc = main(['validate', %r]); "
            "print(rc, 'fedsec.sweep' in sys.modules, 'fedsec.analysis.report' in sys.modules)" % QUICKSTART)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split()[-3:] == ["0", "False", "False"]
    args = parse_args(build_parser(), ["sweep", QUICKSTART, "--parallel", "2"])  # the full parser still
    assert args.parallel == 2

    # `fedsec list | head -1`: the reader closes the pipe early
    proc = subprocess.Popen([sys.executable, "-m", "fedsec.cli", "list"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert "Traceback" not in err


def test_the_fedsec_process_leaves_without_teardown_and_every_results_file_is_complete(tmp_path):
    """`fedsec run` (in-process engine) ends with os._exit after the exit handlers: the
    results folder must be whole (summary, every round, the manifest's files, the figures)."""
    import subprocess
    import sys

    out = tmp_path / "run"
    code = ("import sys, fedsec.cli as c; left = []; c.os._exit = lambda rc: (left.append(rc), sys.exit(rc)); "
            "rc = c.main(); print('returned', rc)")
    # argv=None as the console script calls it; os._exit is wrapped to see that it was taken
    proc = subprocess.run([sys.executable, "-c", code, "run", QUICKSTART, "engine.name=inline", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "returned" not in proc.stdout  # it left through os._exit, not by returning
    summary = json.loads((out / "summary.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    assert summary["status"] == manifest["status"] == "completed"
    assert len((out / "rounds.jsonl").read_text().splitlines()) == summary["rounds"] == 5
    assert all((out / f).exists() for f in manifest["files"])
    # the real console script, end to end: exit code 0, the same files
    out2 = tmp_path / "run2"
    proc = subprocess.run([sys.executable, "-m", "fedsec.cli", "run", QUICKSTART, "engine.name=inline", "--out",
                           str(out2)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "results:" in proc.stdout
    assert json.loads((out2 / "summary.json").read_text())["final"] == summary["final"]


def test_validate_checks_a_sweep_file_cell_by_cell_and_writes_nothing(tmp_path, monkeypatch, capsys):
    """`fedsec validate sweeps/x.yaml` validates every grid cell as `fedsec sweep` would (a sweep
    file is not a scenario: it was refused with a misleading 'engine' error), naming the bad
    key and the first cell that has it; nothing is written."""
    from fedsec.cli import main

    monkeypatch.chdir(tmp_path)
    heart = Path(__file__).resolve().parents[2] / "scenarios" / "heart_fedavg.yaml"
    good = tmp_path / "good.yaml"
    good.write_text(f"scenario: {heart}\ngrid:\n  strategy:\n    fedavg: {{strategy: fedavg}}\n"
                    "    median: {strategy: median}\nseeds: 0-2\nengine: inline\n")
    assert main(["validate", str(good)]) == 0
    assert "6 cell(s), every cell's scenario valid" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"scenario: {heart}\ngrid:\n  strategy:\n    fedavg: {{strategy: fedavg}}\n"
                   "    bad: {strategy: {rule: trimmed_mean, trim: -3}}\nseeds: 0-1\n")
    assert main(["validate", str(bad)]) == 2
    out = capsys.readouterr().out
    assert "key 'strategy.trim'" in out and "first in cell strategy=bad,seed=0" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml", "good.yaml"]

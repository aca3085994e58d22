"""``fedsec.run``: one scenario end to end, on any engine, into one results folder."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

from fedsec.errors import FedsecError
from fedsec.metrics import METRIC_KEYS
from fedsec.results import RunDir, new_manifest, read_json, utc_now


class RunFailed(FedsecError):
    """The run started but did not finish; ``summary`` is what was written to summary.json."""

    def __init__(self, message: str, summary: dict):
        super().__init__(message)
        self.summary = summary


def _check_privacy(scenario, task) -> None:
    from fedsec.federation.adversary import build_plans
    from fedsec.privacy.defenses import check_privacy

    check_privacy(scenario, task, build_plans(scenario, task.data.num_hospitals))


class Progress:
    """One line per round on stderr: metrics, round time, ETA."""

    def __init__(self, scenario, enabled: bool = True, stream=None, tracker=None):
        self.tracker = tracker  # TensorBoard (output.tensorboard), or None
        self.total = scenario.federation.rounds
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.times: list[float] = []

    def __call__(self, record: dict) -> None:
        self.times.append(record["time_s"])
        if self.tracker:
            self.tracker(record)
        if not self.enabled:
            return
        g = record["global"]
        eta = (self.total - record["round"]) * (sum(self.times) / len(self.times))
        parts = [f"round {record['round']:>3}/{self.total}"]
        parts += [f"{k} {g[k]:.3f}" for k in ("loss", "accuracy", "auroc") if g.get(k) is not None
                  and not math.isnan(g[k])]
        parts += [f"{k} {v:.3f}" for k, v in record.get("attack", {}).items() if isinstance(v, float)][:2]
        if record.get("defense", {}).get("flagged"):
            parts.append(f"flagged {','.join(record['defense']['flagged'])}")
        parts.append(f"{record['time_s']:.2f} s" + (f", eta {eta:.0f} s" if record["round"] < self.total else ""))
        print("  " + " | ".join(parts), file=self.stream, flush=True)


def hospital_names(scenario, task) -> list[str]:
    return list(task.data.hospitals)


def build_summary(scenario, run_dir: RunDir, status: str, t0: float, error: str | None = None) -> dict:
    from fedsec.scenario import derived_threat_model

    rounds = run_dir.read_rounds()
    last = rounds[-1] if rounds else {}
    wall = time.perf_counter() - t0
    rounds_s = sum(r.get("time_s", 0.0) for r in rounds)
    return {
        "status": status,
        "scenario": scenario.name,
        "seed": scenario.seed,
        "rounds": len(rounds),
        "rounds_planned": scenario.federation.rounds,
        "final": {k: last.get("global", {}).get(k) for k in METRIC_KEYS} if last else {},
        "per_hospital": last.get("per_hospital", {}),
        "attack": last.get("attack", {}),
        "defense": last.get("defense", {}),
        "privacy": last.get("privacy", {}),
        "threat_model": derived_threat_model(scenario),
        "timing": {"wall_s": wall, "startup_s": max(wall - rounds_s, 0.0), "rounds_s": rounds_s,
                   "mean_round_s": rounds_s / len(rounds) if rounds else None},
        "error": error,
        "path": str(run_dir.path),
    }


def run(scenario, overrides=None, out=None, verbose: bool = False, resume: str | Path | None = None,
        progress: bool = True) -> dict:
    """Load (or take) a scenario, run it, write the results folder, return summary.json's dict.

    ``resume``: a results folder of an interrupted run; its scenario and checkpoint are
    used and only the unfinished rounds run. Raises ScenarioError before anything starts
    when the scenario is invalid, and RunFailed (with the written summary) if the run fails.
    """
    from fedsec.federation.engine import quiet
    from fedsec.scenario import Scenario, load_scenario
    from fedsec.tasks import build_task

    t0 = time.perf_counter()
    quiet(verbose)
    if resume is not None:
        run_dir = RunDir(resume)
        if not (run_dir.path / "scenario.yaml").exists():
            raise FedsecError(f"{run_dir.path}: not a results folder (no scenario.yaml)")
        scenario = load_scenario(run_dir.path / "scenario.yaml", overrides)
    else:
        scenario = scenario if isinstance(scenario, Scenario) and not overrides else load_scenario(scenario, overrides)
        run_dir = RunDir.for_scenario(scenario, out)
        if run_dir.has_results():  # a fresh run must not append to an earlier run's records
            print(f"fedsec: replacing the earlier results in {run_dir.path} (finish an interrupted run "
                  "with --resume instead)", file=sys.stderr)
            run_dir.clear()
    task = build_task(scenario)  # data errors surface here, before any engine starts
    _check_privacy(scenario, task)  # privacy options and combinations, before any engine starts
    hospitals = hospital_names(scenario, task)

    initial_state, offset = None, 0
    manifest = new_manifest(scenario, run_dir)
    if resume is not None:
        ckpt = run_dir.load_checkpoint()
        if ckpt is not None:
            initial_state, offset = ckpt["state"], int(ckpt["round"])
        run_dir.truncate_rounds(offset)
        old = run_dir.path / "manifest.json"
        if old.exists():
            manifest["started_at"] = read_json(old).get("started_at", manifest["started_at"])
        manifest["resumed_at_round"] = offset
    else:
        run_dir.write_scenario(scenario)
    run_dir.write_manifest(manifest)
    run_dir.write_summary(build_summary(scenario, run_dir, "running", t0))
    if progress:
        print(f"fedsec: {scenario.name} | {len(hospitals)} hospitals | {scenario.federation.rounds} rounds | "
              f"{scenario.engine.name} -> {run_dir.path}", file=sys.stderr, flush=True)

    from fedsec.tracking import TensorBoardTracker

    tracker = TensorBoardTracker.for_run(scenario, run_dir, resumed_from_round=offset)
    status, error = "failed", None
    try:
        _engine_run(scenario, hospitals, task, run_dir, Progress(scenario, progress, tracker=tracker), verbose,
                    initial_state, offset)
        status = "completed"
    except KeyboardInterrupt:
        status, error = "interrupted", "interrupted by the user"
        raise
    except FedsecError as err:
        error = str(err)
    except Exception as err:  # a bug or a library failure: keep the results, say what happened
        error = f"{type(err).__name__}: {err}"
    finally:
        if tracker:
            tracker.close()
        summary = build_summary(scenario, run_dir, status, t0, error)
        if status == "completed" and summary["rounds"] < scenario.federation.rounds:
            summary["status"], summary["error"] = "failed", (
                f"only {summary['rounds']} of {scenario.federation.rounds} rounds finished")
        run_dir.write_summary(summary)
        manifest.update(status=summary["status"], ended_at=utc_now())
        run_dir.write_manifest(manifest)
    if summary["status"] != "completed":
        raise RunFailed(f"run failed after {summary['rounds']} round(s): {summary['error']}\n"
                        f"results so far: {run_dir.path}", summary)
    return summary


def _engine_run(scenario, hospitals, task, run_dir, on_round, verbose, initial_state, offset):
    from fedsec.federation.server_app import serve

    if scenario.engine.name in ("ray", "inline"):
        from fedsec.federation.engine import run_engine

        if initial_state is None:
            initial_state = task.make_model(seed=scenario.seed).state_dict()

        def serve_fn(grid):
            return serve(grid, scenario, hospitals, run_dir, on_round, task, initial_state, offset)

        return run_engine(scenario, serve_fn, len(hospitals), verbose)
    raise FedsecError(f"engine.name={scenario.engine.name}: use `fedsec deploy` to run on real Flower nodes")


def run_on_grid(grid, scenario_ref: str, overrides: str, out: str) -> dict:
    """The deployment ServerApp's body: same results folder as a simulation."""
    import yaml

    from fedsec.federation.server_app import serve
    from fedsec.scenario import load_scenario
    from fedsec.tasks import build_task

    t0 = time.perf_counter()
    ref = scenario_ref.strip()
    source = yaml.safe_load(ref) if "\n" in ref else ref
    scenario = load_scenario(source, overrides.split() if overrides else None)
    run_dir = RunDir.for_scenario(scenario, out or None)
    run_dir.write_scenario(scenario)
    manifest = new_manifest(scenario, run_dir)
    manifest["engine"]["name"] = "deployment"
    run_dir.write_manifest(manifest)
    task = build_task(scenario)
    _check_privacy(scenario, task)
    status, error = "failed", None
    try:
        serve(grid, scenario, hospital_names(scenario, task), run_dir, Progress(scenario), task,
              task.make_model(seed=scenario.seed).state_dict(), 0)
        status = "completed"
    except Exception as err:
        error = str(err) if isinstance(err, FedsecError) else f"{type(err).__name__}: {err}"
        raise
    finally:
        summary = build_summary(scenario, run_dir, status, t0, error)
        run_dir.write_summary(summary)
        manifest.update(status=status, ended_at=utc_now())
        run_dir.write_manifest(manifest)
    return summary

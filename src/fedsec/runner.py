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
    """One line per round on stderr (metrics, round time, ETA), then one line per hospital
    that failed in the round. Also keeps the manifest's list of created files current, so a
    run killed outright still names most of its files."""

    def __init__(self, scenario, enabled: bool = True, stream=None, tracker=None, run_dir=None, manifest=None):
        self.run_dir, self.manifest = run_dir, manifest
        self.tracker = tracker  # TensorBoard (output.tensorboard), or None
        self.total = scenario.federation.rounds
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.times: list[float] = []

    def __call__(self, record: dict) -> None:
        self.times.append(record["time_s"])
        if self.tracker:
            self.tracker(record)
        if self.run_dir is not None and self.manifest is not None:
            self.manifest["files"] = self.run_dir.created_files()
            self.run_dir.write_manifest(self.manifest)
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
        for f in record.get("failures", []) or []:
            print(f"    failed: {f}", file=self.stream, flush=True)


def hospital_names(scenario, task) -> list[str]:
    return list(task.data.hospitals)


def build_summary(scenario, run_dir: RunDir, status: str, t0: float, error: str | None = None) -> dict:
    from fedsec.attacks.nulls import attack_summary
    from fedsec.scenario import derived_threat_model

    rounds = run_dir.read_rounds()
    last = rounds[-1] if rounds else {}
    wall = time.perf_counter() - t0
    rounds_s = sum(r.get("time_s", 0.0) for r in rounds)
    privacy = dict(last.get("privacy", {}))
    if any("dp_sgd" in r.get("privacy", {}) for r in rounds):
        from fedsec.privacy.dp_sgd import summarise

        # Every round, not the last one's hospitals: with fraction_train < 1 the largest epsilon
        # may belong to a hospital that did not train in the last round.
        privacy["dp_sgd"] = summarise(rounds)
    return {
        "status": status,
        "scenario": scenario.name,
        "seed": scenario.seed,
        "rounds": len(rounds),
        "rounds_planned": scenario.federation.rounds,
        "final": {k: last.get("global", {}).get(k) for k in METRIC_KEYS} if last else {},
        "per_hospital": last.get("per_hospital", {}),
        "attack": attack_summary(rounds, scenario),
        "defense": last.get("defense", {}),
        "privacy": privacy,
        "threat_model": derived_threat_model(scenario),
        "timing": {"wall_s": wall, "startup_s": max(wall - rounds_s, 0.0), "rounds_s": rounds_s,
                   "mean_round_s": rounds_s / len(rounds) if rounds else None},
        "error": error,
        "path": str(run_dir.path),
    }


FAILURE_STATUS = "completed_with_failures"


def round_failures(rounds: list[dict]) -> list[dict]:
    """Every hospital failure of the finished rounds: ``{"round", "hospital", "reason"}``
    (rounds.jsonl keeps them as ``"<hospital>: <one-line reason>"``)."""
    out = []
    for r in rounds:
        for text in r.get("failures", []) or []:
            hospital, _, reason = str(text).partition(": ")
            out.append({"round": r.get("round"), "hospital": hospital, "reason": reason})
    return out


def finish_summary(summary: dict, run_dir: RunDir, scenario, err: BaseException | None = None) -> dict:
    """Add the hospitals' failures (finished rounds + the round that failed the run) to a
    summary and say so in its status: a run in which hospitals failed is not "completed"."""
    failures = round_failures(run_dir.read_rounds())
    failures += [dict(f) for f in getattr(err, "failures", None) or []]
    summary["failures"] = failures
    if failures:
        summary["failures_log"] = str(run_dir.failures_log)
    if summary["status"] == "completed":
        if summary["rounds"] < scenario.federation.rounds:
            summary["status"], summary["error"] = "failed", (
                f"only {summary['rounds']} of {scenario.federation.rounds} rounds finished")
        elif failures:
            hospitals = sorted({f["hospital"] for f in failures})
            summary["status"] = FAILURE_STATUS
            summary["error"] = (f"{len(failures)} hospital failure(s) in {len({f['round'] for f in failures})} "
                                f"round(s) ({', '.join(hospitals)}); see {run_dir.failures_log}")
    return summary


def _unexpected(err: BaseException, run_dir: RunDir) -> str:
    """A bug or a library failure: its full traceback goes to error.log; -> one line naming it."""
    import traceback

    path = run_dir.write_error("".join(traceback.format_exception(err)))
    first = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {first} (traceback in {path})"


def run(scenario, overrides=None, out=None, verbose: bool = False, resume: str | Path | None = None,
        progress: bool = True, force: bool = False) -> dict:
    """Load (or take) a scenario, run it, write the results folder, return summary.json's dict.

    ``out`` must be new, empty or an earlier run's folder; ``force`` allows any other folder
    (nothing already there is removed or overwritten). ``resume``: a results folder of an
    interrupted run; its scenario and checkpoint are used and only the unfinished rounds run.
    Raises ScenarioError before anything starts when the scenario is invalid, RunFailed
    (with the written summary) if the run fails, and ``Interrupted`` (a KeyboardInterrupt)
    when SIGINT / SIGTERM stopped it (status "interrupted", finished rounds kept).
    """
    from fedsec.federation.engine import Interrupted, check_address, quiet, stop_on_signals, stop_requested
    from fedsec.results import is_results_folder
    from fedsec.scenario import Scenario, load_scenario

    t0 = time.perf_counter()
    quiet(verbose)
    previous = None
    if resume is not None:
        if not (Path(resume) / "scenario.yaml").exists() or not is_results_folder(resume):
            raise FedsecError(f"{resume}: not a fedsec results folder (no scenario.yaml / manifest.json)")
        run_dir = RunDir(resume)
        scenario = load_scenario(run_dir.path / "scenario.yaml", overrides)
        previous = read_json(run_dir.path / "manifest.json")
        check_address(scenario)
    else:
        scenario = scenario if isinstance(scenario, Scenario) and not overrides else load_scenario(scenario, overrides)
        check_address(scenario)  # an engine.address that does not answer is bad input: before any output
        run_dir = RunDir.for_scenario(scenario, out, force=force)
    run_dir.begin(previous)
    manifest = new_manifest(scenario, run_dir)
    if resume is not None:
        manifest["started_at"] = previous.get("started_at", manifest["started_at"])
    else:
        run_dir.write_scenario(scenario)
    manifest["files"] = run_dir.created_files()
    run_dir.write_manifest(manifest)
    run_dir.write_summary(build_summary(scenario, run_dir, "running", t0))

    status, error, failure, started = "failed", None, None, False
    tracker = None
    try:
        with stop_on_signals(kill_local_ray=not scenario.engine.address):
            from fedsec.tasks import build_task

            task = build_task(scenario)  # data errors surface here, before any engine starts
            _check_privacy(scenario, task)  # privacy options and combinations, before any engine starts
            hospitals = hospital_names(scenario, task)
            initial_state, offset, server_state = None, 0, None
            if resume is not None:
                ckpt = run_dir.load_checkpoint()
                if ckpt is not None:  # the model and the server's state (rule, attacks, central DP)
                    initial_state, offset, server_state = ckpt["state"], int(ckpt["round"]), ckpt.get("server")
                run_dir.truncate_rounds(offset)
                manifest["resumed_at_round"] = offset
            if progress:
                print(f"fedsec: {scenario.name} | {len(hospitals)} hospitals | {scenario.federation.rounds} rounds | "
                      f"{scenario.engine.name} -> {run_dir.path}", file=sys.stderr, flush=True)

            from fedsec.tracking import TensorBoardTracker

            tracker = TensorBoardTracker.for_run(scenario, run_dir, resumed_from_round=offset)
            if stop_requested() is not None:  # Ctrl-C while the data loaded: do not start Ray
                raise Interrupted(stop_requested())
            started = True
            _engine_run(scenario, hospitals, task, run_dir,
                        Progress(scenario, progress, tracker=tracker, run_dir=run_dir, manifest=manifest),
                        verbose, initial_state, offset, server_state)
            status = "completed"
    except KeyboardInterrupt as err:  # Ctrl-C / SIGTERM (Interrupted), or a Ctrl-C before the engine ran
        failure = err if isinstance(err, Interrupted) else Interrupted()
        status, error = "interrupted", f"interrupted by {signal_name(failure.signum)}"
    except FedsecError as err:
        error, failure = str(err), err
    except Exception as err:  # a bug or a library failure: keep the results and the traceback
        error, failure = _unexpected(err, run_dir), err
    finally:
        if tracker:
            tracker.close()
        summary = finish_summary(build_summary(scenario, run_dir, status, t0, error), run_dir, scenario, failure)
        run_dir.write_summary(summary)
        manifest.update(status=summary["status"], ended_at=utc_now(), files=run_dir.created_files())
        run_dir.write_manifest(manifest)
    if status == "interrupted":
        if progress:
            print(f"fedsec: interrupted after {summary['rounds']} finished round(s); they are kept in "
                  f"{run_dir.path} (finish with: fedsec run --resume {run_dir.path})", file=sys.stderr, flush=True)
        raise failure
    if isinstance(failure, FedsecError) and not started:
        raise failure  # bad input found before any engine started (data, privacy options): exit 2
    if summary["status"] not in ("completed", FAILURE_STATUS):
        raise RunFailed(f"run failed after {summary['rounds']} round(s): {summary['error']}\n"
                        f"results so far: {run_dir.path}", summary)
    return summary


def signal_name(signum: int) -> str:
    import signal

    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _engine_run(scenario, hospitals, task, run_dir, on_round, verbose, initial_state, offset, server_state=None):
    from fedsec.federation.server_app import serve

    if scenario.engine.name in ("ray", "inline"):
        from fedsec.federation.engine import run_engine

        if initial_state is None:
            initial_state = task.make_model(seed=scenario.seed).state_dict()

        def serve_fn(grid):
            return serve(grid, scenario, hospitals, run_dir, on_round, task, initial_state, offset, server_state)

        return run_engine(scenario, serve_fn, len(hospitals), verbose)
    raise FedsecError(f"engine.name={scenario.engine.name}: use `fedsec deploy` to run on real Flower nodes")


def run_on_grid(grid, scenario_ref: str, overrides: str, out: str) -> dict:
    """The deployment ServerApp's body: same results folder as a simulation."""
    from fedsec.federation.server_app import serve
    from fedsec.scenario import load_scenario, parse_yaml_text
    from fedsec.tasks import build_task

    t0 = time.perf_counter()
    ref = scenario_ref.strip()
    # scenario text from the run config is untrusted input: the same bounded parser as a file
    source = parse_yaml_text(ref, "the run's scenario") if "\n" in ref else ref
    scenario = load_scenario(source, overrides.split() if overrides else None)
    # `fedsec deploy` checked --out before it started the nodes (their logs are in it by now)
    run_dir = RunDir(out) if out else RunDir.for_scenario(scenario, None)
    run_dir.begin()
    run_dir.claim("deployment")
    run_dir.write_scenario(scenario)
    manifest = new_manifest(scenario, run_dir)
    manifest["engine"]["name"] = "deployment"
    run_dir.write_manifest(manifest)
    task = build_task(scenario)
    _check_privacy(scenario, task)
    status, error, failure = "failed", None, None
    try:
        serve(grid, scenario, hospital_names(scenario, task), run_dir, Progress(scenario), task,
              task.make_model(seed=scenario.seed).state_dict(), 0)
        status = "completed"
    except Exception as err:
        failure = err
        error = str(err) if isinstance(err, FedsecError) else _unexpected(err, run_dir)
        raise
    finally:
        summary = finish_summary(build_summary(scenario, run_dir, status, t0, error), run_dir, scenario, failure)
        run_dir.write_summary(summary)
        manifest.update(status=summary["status"], ended_at=utc_now(), files=run_dir.created_files())
        run_dir.write_manifest(manifest)
    return summary

"""``fedsec.run``: one scenario end to end, on any engine, into one results folder."""

from __future__ import annotations

import contextlib
import math
import sys
import time
from pathlib import Path

from fedsec.errors import FedsecError
from fedsec.metrics import METRIC_KEYS
from fedsec.privacy.budget import STATUS as BUDGET_STATUS, BudgetExhausted
from fedsec.results import RunDir, new_manifest, read_json, utc_now


class RunFailed(FedsecError):
    """The run started but did not finish; ``summary`` is what was written to summary.json."""

    def __init__(self, message: str, summary: dict):
        super().__init__(message)
        self.summary = summary


def _check_privacy(scenario, task) -> None:
    """task: the built Task, or a deployment's NodesTask (the hospitals' description)."""
    from fedsec.federation.adversary import build_plans
    from fedsec.privacy.defenses import check_privacy

    check_privacy(scenario, task, build_plans(scenario, len(task.train_sizes())))


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
            files = self.run_dir.created_files()
            if files != self.manifest.get("files"):  # an fsync'd rewrite only when the list changed
                self.manifest["files"] = files
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


def _check_participation(scenario, hospitals: list[str]) -> None:
    from fedsec.federation.participation import check_hospital_names

    check_hospital_names(scenario, hospitals)


def hospital_names(scenario, task) -> list[str]:
    return list(task.data.hospitals)


def hospital_sizes(task) -> dict[str, dict]:
    """hospital name -> {"train_n", "test_n"}: from the data (simulation) or from the
    hospitals' introductions (a deployment's ``NodesTask``, whose server holds no data)."""
    if hasattr(task, "data"):
        return {h: {"train_n": len(tr), "test_n": len(te)}
                for h, tr, te in zip(task.data.hospitals, task.data.train, task.data.test)}
    tests = getattr(task, "test_sizes", None) or {}
    return {h: {"train_n": int(n), "test_n": int(tests[h]) if h in tests else None} for h, n in task.sizes.items()}


def attackers(scenario, hospitals: list[str] | None) -> list[dict]:
    """summary.json's ``attackers``: each attack entry's name, its hospitals (by name) and
    its rounds window, as the server's adversary plans them (``adversary.malicious_ids``)."""
    from fedsec.federation.adversary import malicious_ids

    out = []
    for i, entry in enumerate(scenario.attacks or []):
        if hospitals is None:
            who = [f"hospital {h}" for h in (entry.get("hospitals") or [])]
        else:
            who = [hospitals[h] if 0 <= h < len(hospitals) else f"hospital {h}"
                   for h in malicious_ids(entry, len(hospitals), scenario.seed, i)]
        first, last = entry.get("rounds") or [1, scenario.federation.rounds]
        out.append({"attack": str(entry.get("preset", entry["attack"])), "class": str(entry["attack"]),
                    "hospitals": who, "rounds": [int(first), int(last)]})
    return out


def hospitals_block(scenario, hospitals: list[str] | None, sizes: dict | None) -> dict:
    """summary.json's ``hospitals``: name -> {"train_n", "test_n", "malicious", "attacks"}."""
    if hospitals is None:
        return {}
    plans = attackers(scenario, hospitals)
    sizes = sizes or {}
    return {h: {"train_n": sizes.get(h, {}).get("train_n"), "test_n": sizes.get(h, {}).get("test_n"),
                "malicious": any(h in a["hospitals"] for a in plans),
                "attacks": [a["attack"] for a in plans if h in a["hospitals"]]} for h in hospitals}


def build_summary(scenario, run_dir: RunDir, status: str, t0: float, error: str | None = None,
                  hospitals: list[str] | None = None, sizes: dict | None = None) -> dict:
    """summary.json's dict. hospitals: the run's hospital names (None before they are known);
    sizes: :func:`hospital_sizes`."""
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
    if (scenario.privacy.dp_sgd or {}).get("budgets"):  # a privacy budget per hospital: its ledger
        from fedsec.privacy import budget

        privacy["dp_sgd"] = budget.summarise(scenario, rounds, privacy.get("dp_sgd"), status == budget.STATUS)
    return {
        "status": status,
        "scenario": scenario.name,
        "seed": scenario.seed,
        "rounds": len(rounds),
        "rounds_planned": scenario.federation.rounds,
        "final": {k: last.get("global", {}).get(k) for k in METRIC_KEYS} if last else {},
        "per_hospital": last.get("per_hospital", {}),
        "per_hospital_undefined": last.get("undefined", {}),
        "hospitals": hospitals_block(scenario, hospitals, sizes),
        "attackers": attackers(scenario, hospitals),
        "attack": attack_summary(rounds, scenario),
        "defense": last.get("defense", {}),
        "privacy": privacy,
        "threat_model": derived_threat_model(scenario),
        "availability": _availability(scenario, rounds),
        "timing": {"wall_s": wall, "startup_s": max(wall - rounds_s, 0.0), "rounds_s": rounds_s,
                   "mean_round_s": rounds_s / len(rounds) if rounds else None},
        "error": error,
        "path": str(run_dir.path),
    }


def _availability(scenario, rounds: list[dict]) -> dict:
    """Rounds lost, simulated / wall time to the target metric, per-hospital participation
    (fedsec.federation.participation.availability_summary)."""
    from fedsec.federation.participation import availability_summary

    return availability_summary(scenario, rounds)


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
    from fedsec.federation.engine import check_address, quiet
    from fedsec.scenario import Scenario, load_scenario

    t0 = time.perf_counter()
    quiet(verbose)
    previous = None
    if resume is not None:
        run_dir, previous = _resumed_folder(resume)
        scenario = load_scenario(run_dir.path / "scenario.yaml", overrides)
        check_address(scenario)
    else:
        scenario = scenario if isinstance(scenario, Scenario) and not overrides else load_scenario(scenario, overrides)
        check_address(scenario)  # an engine.address that does not answer is bad input: before any output
        run_dir = RunDir.for_scenario(scenario, out, force=force)
    return RunLifecycle(scenario, run_dir, t0, previous=previous, progress=progress).execute(
        lambda life: _engine_run(scenario, life.hospitals, life.task, run_dir, life.on_round, verbose,
                                 life.initial_state, life.offset, life.server_state))


def _resumed_folder(resume) -> tuple[RunDir, dict]:
    from fedsec.results import is_results_folder

    if not (Path(resume) / "scenario.yaml").exists() or not is_results_folder(resume):
        raise FedsecError(f"{resume}: not a fedsec results folder (no scenario.yaml / manifest.json)")
    run_dir = RunDir(resume)
    return run_dir, read_json(run_dir.path / "manifest.json")


class RunLifecycle:
    """One run's life, the same for a simulation (``run``) and a deployment's ServerApp
    (``run_on_grid``): open the results folder (manifest, scenario, a "running" summary),
    check the task and privacy options, resume from the checkpoint, report progress and
    TensorBoard, and whatever happens write the final summary and manifest.

    A simulation builds the task (``holds_data``); a deployment's server holds no patient
    data: the hospitals' introductions describe the model, and what would need data on the
    server is refused before the first round (``adversary.server_data_needs``).
    """

    def __init__(self, scenario, run_dir: RunDir, t0: float, *, previous: dict | None = None,
                 progress: bool = True, holds_data: bool = True, engine_name: str | None = None):
        self.scenario, self.run_dir, self.t0 = scenario, run_dir, t0
        self.previous, self.progress, self.holds_data = previous, progress, holds_data
        self.resumed = previous is not None
        self.engine_name = engine_name or scenario.engine.name
        self.task = None
        self.hospitals: list[str] | None = None
        self.sizes: dict | None = None  # hospital_sizes(): train / test records of each hospital
        self.initial_state, self.offset, self.server_state = None, 0, None
        self.on_round = None

    def _open(self) -> dict:
        run_dir, scenario = self.run_dir, self.scenario
        run_dir.begin(self.previous)
        if self.engine_name == "deployment":
            run_dir.claim("deployment")  # `fedsec deploy` wrote the nodes' logs there before
        manifest = new_manifest(scenario, run_dir)
        manifest["engine"]["name"] = self.engine_name
        if self.resumed:
            manifest["started_at"] = self.previous.get("started_at", manifest["started_at"])
        else:
            run_dir.write_scenario(scenario)
        manifest["files"] = run_dir.created_files()
        run_dir.write_manifest(manifest)
        run_dir.write_summary(build_summary(scenario, run_dir, "running", self.t0))
        return manifest

    def _prepare(self, manifest: dict) -> None:
        """Data and privacy checks, the checkpoint, the first progress line: before any engine."""
        scenario, run_dir = self.scenario, self.run_dir
        if self.holds_data:
            from fedsec.tasks import build_task

            self.task = build_task(scenario)  # data errors surface here, before any engine starts
            _check_privacy(scenario, self.task)  # privacy options and combinations
            self.hospitals = hospital_names(scenario, self.task)
            self.sizes = hospital_sizes(self.task)
            _check_participation(scenario, self.hospitals)  # participation keys naming hospitals
        else:
            from fedsec.federation.adversary import server_data_needs

            needs = server_data_needs(scenario)
            if needs:
                raise FedsecError("a deployment's server holds no patient data, but " + "; ".join(needs))
            _check_privacy_options(scenario)  # the rest once the hospitals describe their data
        if self.resumed:
            ckpt = run_dir.load_checkpoint()
            if ckpt is not None:  # the model and the server's state (rule, attacks, central DP)
                self.initial_state, self.offset, self.server_state = ckpt["state"], int(ckpt["round"]), ckpt.get("server")
            run_dir.truncate_rounds(self.offset)
            manifest["resumed_at_round"] = self.offset
        if self.progress:
            who = f"{len(self.hospitals)} hospitals" if self.hospitals is not None else "hospital nodes"
            print(f"fedsec: {scenario.name} | {who} | {scenario.federation.rounds} rounds | "
                  f"{self.engine_name} -> {run_dir.path}", file=sys.stderr, flush=True)

    def execute(self, start) -> dict:
        """Run ``start(self)`` (the engine, or the ServerApp's rounds) inside the lifecycle.
        -> summary.json's dict; raises as :func:`run` documents."""
        from fedsec.federation.engine import Interrupted, stop_on_signals, stop_requested
        from fedsec.tracking import TensorBoardTracker

        scenario, run_dir = self.scenario, self.run_dir
        manifest = self._open()
        status, error, failure, started = "failed", None, None, False
        tracker = None
        simulation = self.engine_name != "deployment"
        guard = (stop_on_signals(kill_local_ray=not scenario.engine.address, uses_ray=self.engine_name != "inline")
                 if simulation else contextlib.nullcontext())
        try:
            with guard:
                self._prepare(manifest)
                tracker = TensorBoardTracker.for_run(scenario, run_dir, resumed_from_round=self.offset)
                self.on_round = Progress(scenario, self.progress, tracker=tracker, run_dir=run_dir, manifest=manifest)
                if simulation and stop_requested() is not None:  # Ctrl-C while the data loaded
                    raise Interrupted(stop_requested())
                started = True
                start(self)
                status = "completed"
        except KeyboardInterrupt as err:  # Ctrl-C / SIGTERM (Interrupted), or a Ctrl-C before the engine ran
            failure = err if isinstance(err, Interrupted) else Interrupted()
            status, error = "interrupted", f"interrupted by {signal_name(failure.signum)}"
        except BudgetExhausted as err:  # no hospital can train within its privacy budget: a clean end
            status, error = BUDGET_STATUS, str(err)
        except FedsecError as err:
            error, failure = str(err), err
        except Exception as err:  # a bug or a library failure: keep the results and the traceback
            error, failure = _unexpected(err, run_dir), err
        finally:
            if tracker:
                tracker.close()
            run_dir.sync_rounds()
            summary = finish_summary(build_summary(scenario, run_dir, status, self.t0, error, self.hospitals,
                                                   self.sizes), run_dir, scenario, failure)
            run_dir.write_summary(summary)
            manifest.update(status=summary["status"], ended_at=utc_now(), files=run_dir.created_files())
            run_dir.write_manifest(manifest)
        if not simulation and failure is not None:
            raise failure  # the ServerApp's run fails (Flower reports it; the summary says why)
        if status == "interrupted":
            if self.progress:
                print(f"fedsec: interrupted after {summary['rounds']} finished round(s); they are kept in "
                      f"{run_dir.path} (finish with: fedsec run --resume {run_dir.path})", file=sys.stderr, flush=True)
            raise failure
        if isinstance(failure, FedsecError) and not started:
            raise failure  # bad input found before any engine started (data, privacy options): exit 2
        if summary["status"] not in ("completed", FAILURE_STATUS, BUDGET_STATUS):
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


def run_on_grid(grid, scenario_ref: str, overrides: str, out: str, resume: bool = False) -> dict:
    """The deployment ServerApp's body: the same lifecycle and results folder as a
    simulation, with no patient data on the server. ``resume``: continue the interrupted
    run whose results folder is ``out`` from its checkpoint."""
    from fedsec.federation.server_app import serve
    from fedsec.scenario import load_scenario, parse_yaml_text

    t0 = time.perf_counter()
    previous = None
    if resume:
        if not out:
            raise FedsecError("resume: give the interrupted run's results folder (out)")
        run_dir, previous = _resumed_folder(out)
        scenario = load_scenario(run_dir.path / "scenario.yaml", overrides.split() if overrides else None)
    else:
        ref = scenario_ref.strip()
        # scenario text from the run config is untrusted input: the same bounded parser as a file
        source = parse_yaml_text(ref, "the run's scenario") if "\n" in ref else ref
        scenario = load_scenario(source, overrides.split() if overrides else None)
        # `fedsec deploy` checked --out before it started the nodes (their logs are in it by now)
        run_dir = RunDir(out) if out else RunDir.for_scenario(scenario, None)
    n = _expected_hospitals(scenario)

    def start(life: RunLifecycle) -> None:
        def introduced(nodes_task) -> None:
            life.hospitals, life.sizes = list(nodes_task.hospitals), hospital_sizes(nodes_task)
            _introduced(scenario, nodes_task)

        strategy = serve(grid, scenario, None, run_dir, life.on_round, None, life.initial_state, life.offset,
                         life.server_state, num_hospitals=n, on_introduced=introduced)
        life.hospitals = strategy.hospitals

    return RunLifecycle(scenario, run_dir, t0, previous=previous, holds_data=False,
                        engine_name="deployment").execute(start)


def _introduced(scenario, nodes_task) -> None:
    """A deployment's checks once the hospitals have described their data."""
    _check_privacy(scenario, nodes_task)
    _check_participation(scenario, nodes_task.hospitals)


def _expected_hospitals(scenario) -> int:
    """How many hospital nodes a deployment waits for, from the scenario alone."""
    from fedsec.federation.deployment import _hospital_names

    return len(_hospital_names(scenario))


def _check_privacy_options(scenario) -> None:
    from fedsec.federation.adversary import build_plans
    from fedsec.privacy.defenses import check_privacy

    check_privacy(scenario, None, build_plans(scenario, _expected_hospitals(scenario)))

"""``fedsec run | validate | list`` (and the commands later issues add).

Exit codes (docs/ci.md): 0 success (also a run in which hospitals failed but that
``federation.min_hospitals`` let finish: its status is ``completed_with_failures``);
1 a run that started and failed (its results folder says why); 2 bad input (scenario,
override, file, ``--out`` folder), with one clear message and no traceback; 130 stopped by
Ctrl-C, 143 by SIGTERM (finished rounds kept).

Options, the scenario file and ``key=value`` overrides may come in any order. A word is
the scenario's path when it names an existing file or ends in ``.yaml`` / ``.yml``;
otherwise it is an override when it has a ``key=`` (a dotted key) before its first ``=``,
and a path if not. So a sweep cell's own ``runs/sw/cells/attacks=alie,seed=0/scenario.yaml``
is a path.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

# PyTorch's CPU allocator puts tensors of 2 MB and more on transparent huge pages when this
# is set before torch is imported (c10's THP_MEM_ALLOC_ENABLE). The server's Tensor[n, d] of
# replies is the case it is for: 200 MB at 50 x 1M, written once a round into fresh memory,
# where 4 KB page faults were most of the unpacking (0.20-0.30 s -> 0.11-0.12 s,
# bench/bench_aggregation.py; docs/defenses.md). Numbers are unchanged: only where the memory
# lies. Ray's workers inherit it; a user's own value wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from fedsec.errors import FedsecError

_KEY = re.compile(r"[A-Za-z_][\w.\[\]]*")


def default_scenario() -> Path:
    """The quickstart: ./scenarios/quickstart.yaml if there is one, else the packaged one."""
    from fedsec.scenario import catalogue_dirs

    for d in catalogue_dirs("scenarios"):
        if (d / "quickstart.yaml").is_file():
            return d / "quickstart.yaml"
    raise FedsecError("no scenarios/quickstart.yaml here nor in the installed package; give a scenario file")


def is_path(word: str) -> bool:
    """A scenario path rather than a ``key=value`` override (rule in the module doc)."""
    if word.endswith((".yaml", ".yml")):
        return True
    try:
        if Path(word).is_file():
            return True
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte: not a file
        pass
    key, sep, _ = word.partition("=")
    return not (sep and _KEY.fullmatch(key.strip()))


def _split_args(items: list[str]) -> tuple[list[str], list[str]]:
    """Positional words -> (scenario paths, overrides), each in the order given."""
    paths = [a for a in items if is_path(a)]
    overrides = [a for a in items if not is_path(a)]
    return paths, overrides


def cmd_run(args) -> int:
    import fedsec

    paths, overrides = _split_args(args.items)
    if args.resume:
        if paths:
            raise FedsecError("--resume takes the results folder; do not also give a scenario")
        summary = fedsec.run(None, overrides=overrides, verbose=args.verbose, resume=args.resume)
    else:
        if len(paths) > 1:
            raise FedsecError(f"one scenario at a time, got {len(paths)}: {' '.join(paths)}")
        scenario = paths[0] if paths else str(default_scenario())
        summary = fedsec.run(scenario, overrides=overrides, out=args.out, verbose=args.verbose, force=args.force)
    f = summary["final"]
    t = summary["timing"]
    print(f"completed {summary['rounds']} rounds in {t['wall_s']:.1f} s (start-up {t['startup_s']:.1f} s, "
          f"rounds {t['rounds_s']:.1f} s)")
    if summary["status"] != "completed":
        print(f"status {summary['status']}: {summary['error']}")
    print("final (union of hospitals' test sets): " + ", ".join(
        f"{k} {v:.3f}" for k, v in f.items() if v is not None))
    stats = summary.get("attack", {}).get("stats") or {}
    for k, v in summary.get("attack", {}).items():
        if isinstance(v, (int, float)) and k not in stats:
            print(f"attack {k}: {v:.3f}")
    from fedsec.attacks.nulls import describe

    for k, st in stats.items():  # with its null, effect and 95% CI
        print(f"attack {k}: {describe(st)}")
    print(f"results: {summary['path']}")
    return 0


def cmd_deploy(args) -> int:
    from fedsec.federation.deployment import deploy

    paths, overrides = _split_args(args.items)
    scenario = paths[0] if paths else str(default_scenario())
    if args.out:
        from fedsec.results import RunDir, check_out_folder, is_results_folder

        check_out_folder(args.out, args.force)
        if is_results_folder(args.out):  # an earlier run's folder: its files go, nothing else
            RunDir(args.out).clear()
    data = _hospital_data(scenario, overrides, args.data or [])
    if args.docker:  # containers: TLS + node authentication always (docs/deployment.md)
        from fedsec.federation.docker_deploy import deploy_docker

        summary = deploy_docker(scenario, overrides, args.out, image=args.image, data_dirs=data or None)
        mode = "Docker containers, TLS + node authentication"
    else:
        summary = _deploy_stopping_on_sigterm(deploy, scenario, overrides, args)
        mode = "TLS + node authentication" if args.secure else "insecure, loopback"
    f = summary["final"]
    print(f"deployment ({mode}) completed "
          f"{summary['rounds']} rounds in {summary['timing']['wall_s']:.1f} s")
    print("final (union of hospitals' test sets): " + ", ".join(
        f"{k} {v:.3f}" for k, v in f.items() if v is not None))
    print(f"results: {summary['path']}")
    return 0


def _hospital_data(scenario, overrides, items: list[str]) -> dict[int, str]:
    """``--data HOSPITAL=PATH`` (repeatable) -> partition-id -> the hospital's own data folder
    or file, mounted / given to that hospital's node only. Bad input exits 2 naming it."""
    if not items:
        return {}
    from fedsec.errors import ScenarioError
    from fedsec.federation.deployment import _hospital_names
    from fedsec.registry import did_you_mean
    from fedsec.scenario import load_scenario

    names = _hospital_names(load_scenario(scenario, overrides or None))
    out: dict[int, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ScenarioError(f"--data: expected HOSPITAL=PATH, got {item!r}")
        if name not in names:
            raise ScenarioError(f"--data: no hospital '{name}'{did_you_mean(name, names)}; the scenario's "
                                f"hospitals are {', '.join(names)}")
        if not Path(path).expanduser().exists():
            raise ScenarioError(f"--data {name}={path}: no such file or folder")
        out[names.index(name)] = str(Path(path).expanduser().resolve())
    return out


def _deploy_stopping_on_sigterm(deploy, scenario, overrides, args) -> dict:
    """SIGTERM stops a deployment like Ctrl-C: the SuperLink and SuperNodes are stopped in order
    (LocalDeployment's exit), the results folder says "interrupted", exit 143."""
    import signal

    from fedsec.federation.engine import Interrupted

    def on_term(signum, frame):
        raise Interrupted(signum)

    try:
        previous = signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread
        previous = None
    try:
        return deploy(scenario, overrides, args.out, args.secure, clientapp=args.clientapp, verbose=True,
                      data_paths=_hospital_data(scenario, overrides, args.data or []) or None)
    except KeyboardInterrupt as err:
        _mark_interrupted(args.out, err)
        raise err if isinstance(err, Interrupted) else Interrupted(signal.SIGINT) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _mark_interrupted(out, err) -> None:
    """A deployment's ServerApp process was stopped mid-run: its summary says "running" (or
    "failed", when it saw the SuperLink go away first)."""
    from fedsec.federation.engine import Interrupted
    from fedsec.results import read_json, utc_now, write_json

    if not out:
        return
    for name in ("summary.json", "manifest.json"):
        f = Path(out) / name
        try:
            data = read_json(f)
        except (OSError, ValueError):
            continue
        if data.get("status") in ("running", "failed"):  # the ServerApp saw its link go away
            data["status"] = "interrupted"
            if name == "summary.json":
                data["error"] = f"interrupted by {err.args[0] if isinstance(err, Interrupted) else 'SIGINT'}"
            else:
                data["ended_at"] = utc_now()
            write_json(f, data)
    print(f"fedsec: deployment interrupted; the SuperLink and SuperNodes are stopped; results so far: {out}",
          file=sys.stderr)


def _is_sweep_file(path: str) -> bool:
    """A sweep file (fedsec.sweep.is_sweep_file), after a cheap look for a top-level
    ``scenario:`` line, so that validating scenarios does not import the sweep module (a
    command's start-up cost, tests/unit/test_cli_run.py)."""
    from fedsec.scenario import MAX_SCENARIO_BYTES

    try:
        with open(path, "rb") as f:  # no more than a scenario may hold: an oversized file is load_scenario's error
            head = f.read(MAX_SCENARIO_BYTES).decode("utf-8", errors="replace")
    except OSError:
        return False
    if not re.search(r"^scenario\s*:", head, re.M):
        return False
    from fedsec.sweep import is_sweep_file

    return is_sweep_file(path)


def cmd_validate(args) -> int:
    from fedsec.scenario import load_scenario

    bad = 0
    paths, overrides = _split_args(args.items)
    if not paths:
        raise FedsecError("give one or more scenario files to validate")
    for p in paths:
        try:
            if _is_sweep_file(p):
                # a sweep file (sweeps/*.yaml): every grid cell's scenario, checked as `fedsec sweep`
                # checks it before anything runs; nothing is written
                from fedsec.sweep import load_sweep_file, run_sweep

                res = run_sweep(p, overrides=overrides, dry_run=True, stream=None)
                print(f"ok       {p} (sweep of {Path(load_sweep_file(p).scenario).name}: "
                      f"{len(res['cells'])} cell(s), every cell's scenario valid)")
                continue
            s = load_scenario(p, overrides)
            print(f"ok       {p} ({s.name}: {s.task.name}/{s.task.model}, strategy {s.strategy['rule']}, "
                  f"{len(s.attacks)} attack(s))")
        except FedsecError as err:
            print(f"invalid  {err}")
            bad += 1
    return 2 if bad else 0


def cmd_list(args) -> int:
    from fedsec.registry import MODELS, PARTITIONERS, RULES, TASKS
    from fedsec.scenario import list_presets

    what = args.what
    sections = {
        "tasks": lambda: [f"{n:<24} {f.spec.domain}" for n, f in TASKS.items()],
        "models": lambda: MODELS.names(),
        "partitioners": lambda: PARTITIONERS.names(),
        "rules": lambda: [f"{n:<24} {c.tolerates}" for n, c in RULES.items()],
        "strategies": lambda: _presets("strategies", list_presets),
        "attacks": lambda: _presets("attacks", list_presets),
        "scenarios": lambda: _presets("scenarios", list_presets),
    }
    for name, fn in sections.items():
        if what in (None, name):
            print(f"{name}:")
            for line in fn():
                print(f"  {line}")
    return 0


def _presets(kind, list_presets) -> list[str]:
    import yaml

    out = []
    for name, path in sorted(list_presets(kind).items()):
        try:
            desc = (yaml.safe_load(path.read_text()) or {}).get("description", "")
        except Exception:
            desc = "(unreadable)"
        out.append(f"{name:<24} {str(desc).splitlines()[0] if desc else ''}")
    return out


def cmd_baseline(args) -> int:
    from fedsec.baseline import centralised
    from fedsec.scenario import load_scenario

    paths, overrides = _split_args(args.items)
    if len(paths) > 1:
        raise FedsecError(f"one scenario at a time, got {len(paths)}: {' '.join(paths)}")
    scenario = load_scenario(paths[0] if paths else str(default_scenario()), overrides)
    run_dir = None
    if args.out:
        from fedsec.results import RunDir, check_out_folder

        check_out_folder(args.out, args.force)  # before the training, not after
    res = centralised(scenario, epochs=args.epochs)
    print(f"centralised baseline of {scenario.name}: {res['train_rows']} pooled training rows, "
          f"{res['epochs']} epochs, {res['seconds']:.1f} s")
    print("union test: " + ", ".join(f"{k} {v:.3f}" for k, v in res["final"].items() if v == v))
    if args.out:
        run_dir = RunDir.for_scenario(scenario, args.out, force=args.force)
        write_baseline(run_dir, scenario, res)
        print(f"results: {run_dir.path}")
    return 0


def write_baseline(run_dir, scenario, res: dict) -> None:
    """A baseline's results folder: scenario.yaml, manifest.json, summary.json (kind "baseline")."""
    from fedsec.results import new_manifest, utc_now

    run_dir.begin()
    run_dir.write_scenario(scenario)
    manifest = new_manifest(scenario, run_dir)
    manifest["engine"] = {"name": "centralised"}
    run_dir.write_summary({"status": "completed", "kind": "baseline", "scenario": scenario.name,
                           "seed": scenario.seed, "epochs": res["epochs"], "train_rows": res["train_rows"],
                           "final": res["final"], "timing": {"wall_s": res["seconds"]},
                           "path": str(run_dir.path)})
    manifest.update(status="completed", ended_at=utc_now())
    manifest["files"] = sorted(set(run_dir.created_files()) | {"manifest.json"})
    run_dir.write_manifest(manifest)


# commands whose parsers live in this file: for them the sweep and report modules (and their
# imports, ~0.15 s of a 6 s quickstart) are not loaded
_OWN_COMMANDS = ("run", "baseline", "deploy", "validate", "list")


def build_parser(full: bool = True) -> argparse.ArgumentParser:
    """full=False: ``sweep`` and ``report`` are bare placeholders (for a command line whose
    first word is one of _OWN_COMMANDS; ``main`` decides)."""
    parser = argparse.ArgumentParser(prog="fedsec", description="Federated-learning security testbed for hospitals")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run a scenario (default: the embedded quickstart)")
    p.add_argument("items", nargs="*", metavar="SCENARIO|key=value",
                   help="a scenario file and key=value overrides (e.g. federation.rounds=3)")
    p.add_argument("--out", help="results folder (default runs/<name>/<UTC time>-<hash>/); must be new, empty "
                                 "or an earlier run's folder")
    p.add_argument("--force", action="store_true",
                   help="write into a non-empty --out folder that is not a fedsec run (nothing already there "
                        "is removed or overwritten)")
    p.add_argument("--resume", metavar="RUN_DIR", help="finish an interrupted run from its results folder")
    p.add_argument("-v", "--verbose", action="store_true", help="show Flower's and Ray's logs")
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("baseline", help="train the scenario's model on pooled data (the centralised reference)")
    p.add_argument("items", nargs="*", metavar="SCENARIO|key=value")
    p.add_argument("--epochs", type=int, help="default: rounds x local epochs")
    p.add_argument("--out", help="write scenario.yaml, manifest.json and summary.json into this folder")
    p.add_argument("--force", action="store_true", help="as for run: allow a non-empty folder that is not a fedsec run")
    p.set_defaults(fn=cmd_baseline)

    p = sub.add_parser("deploy", help="run a scenario on real Flower processes: a SuperLink + one SuperNode "
                                      "per hospital on loopback")
    p.add_argument("items", nargs="*", metavar="SCENARIO|key=value")
    p.add_argument("--out", help="results folder (new, empty or an earlier run's)")
    p.add_argument("--force", action="store_true", help="as for run: allow a non-empty folder that is not a fedsec run")
    p.add_argument("--secure", action="store_true", help="TLS certificates + SuperNode authentication")
    p.add_argument("--clientapp", choices=["warm", "subprocess"], default="warm",
                   help="warm: one long-lived ClientApp process per hospital (default); subprocess: Flower's "
                        "stock executor (a new process per message)")
    p.add_argument("--docker", action="store_true", help="one container per hospital and one for the "
                   "SuperLink (TLS + node authentication), from the image docker/build-images.sh makes")
    p.add_argument("--image", help="with --docker: the fedsec image to use (default: build or reuse one)")
    p.add_argument("--data", action="append", metavar="HOSPITAL=PATH",
                   help="a hospital's own data folder or file, given to its node only (with --docker: mounted "
                        "read-only at /data in its container only); repeat per hospital")
    p.set_defaults(fn=cmd_deploy)

    p = sub.add_parser("validate", help="check scenario files (exit 0 if all valid, 2 otherwise)")
    p.add_argument("items", nargs="*", metavar="SCENARIO|key=value")
    p.set_defaults(fn=cmd_validate)

    if full:
        from fedsec.analysis.report import add_report_parser
        from fedsec.sweep import add_sweep_parser

        add_sweep_parser(sub)
        add_report_parser(sub)
    else:
        sub.add_parser("sweep")
        sub.add_parser("report")

    p = sub.add_parser("list", help="list tasks, models, partitioners, rules, strategies, attacks, scenarios "
                                    "(every option: docs/components.md)")
    p.add_argument("what", nargs="?", choices=["tasks", "models", "partitioners", "rules", "strategies", "attacks",
                                               "scenarios"])
    p.set_defaults(fn=cmd_list)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None):
    """Options, scenario and overrides in any order: argparse stops filling a positional
    list at the first option, so the words after it come back as extras; they join ``items``
    in order. An unknown option is still an error."""
    args, extras = parser.parse_known_args(argv)
    unknown = [e for e in extras if e.startswith("-")]
    if unknown or (extras and not hasattr(args, "items")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extras)}")
    if extras:
        args.items = list(args.items or []) + extras
    return args


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    parser = build_parser(full=not (words and words[0] in _OWN_COMMANDS))
    args = parse_args(parser, argv)
    from fedsec.federation.engine import Interrupted
    from fedsec.runner import RunFailed

    try:
        code = args.fn(args)
        if argv is None and args.command == "run":  # the `fedsec` process itself, not a caller's
            _leave_without_teardown(code)
        return code
    except RunFailed as err:
        print(f"fedsec: {err}", file=sys.stderr)
        return 1
    except FedsecError as err:
        print(f"fedsec: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `fedsec list | head`: the reader left; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt as err:
        code = err.exit_code if isinstance(err, Interrupted) else 130
        if not isinstance(err, Interrupted):  # the run's own message was printed otherwise
            print("fedsec: interrupted; finished rounds are kept (resume with --resume RUN_DIR)", file=sys.stderr)
        _exit_if_stuck(code)
        return code


def _leave_without_teardown(code: int) -> None:
    """After a finished in-process `fedsec run`: run the exit handlers, flush, and end the
    process without the interpreter's teardown of torch's modules, which took 0.5-1 s here (more
    than the quickstart's five rounds). Every results file is written and closed by then
    (atomic writes; rounds.jsonl closed by the run). Not when Ray was loaded: its processes
    get the normal exit; and not for a failed run (its exception path returns normally)."""
    if "ray" in sys.modules or any(t.is_alive() and not t.daemon for t in _threads()):
        return
    import atexit
    import logging

    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)  # CPython's own (logging, weakref finalizers)
    if run_exit_handlers is not None:
        run_exit_handlers()
    else:
        logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _threads():
    import threading

    return [t for t in threading.enumerate() if t is not threading.main_thread()]


def _exit_if_stuck(code: int) -> None:
    """After an interrupt: if a thread of the stopped run is still stuck (a call that never
    returns), exit now rather than wait for it at interpreter exit; the results are written."""
    import time

    def stuck() -> bool:
        return any(t.is_alive() and not t.daemon for t in _threads())

    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and stuck():
        time.sleep(0.1)
    if stuck():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    sys.exit(main())

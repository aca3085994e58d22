"""``fedsec run | validate | list`` (and the commands later issues add).

Exit codes: 0 success; 1 a run that started and failed (its results folder says why);
2 bad input (scenario, override, file), with one clear message and no traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedsec.errors import FedsecError


def default_scenario() -> Path:
    from fedsec.scenario import project_root

    return project_root() / "scenarios" / "quickstart.yaml"


def _split_args(items: list[str]) -> tuple[list[str], list[str]]:
    """Positional words: the ones with '=' are overrides, the others scenario paths."""
    paths = [a for a in items if "=" not in a]
    overrides = [a for a in items if "=" in a]
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
        summary = fedsec.run(scenario, overrides=overrides, out=args.out, verbose=args.verbose)
    f = summary["final"]
    t = summary["timing"]
    print(f"completed {summary['rounds']} rounds in {t['wall_s']:.1f} s (start-up {t['startup_s']:.1f} s, "
          f"rounds {t['rounds_s']:.1f} s)")
    print("final (union of hospitals' test sets): " + ", ".join(
        f"{k} {v:.3f}" for k, v in f.items() if v is not None))
    for k, v in summary.get("attack", {}).items():
        if isinstance(v, (int, float)):
            print(f"attack {k}: {v:.3f}")
    print(f"results: {summary['path']}")
    return 0


def cmd_deploy(args) -> int:
    from fedsec.federation.deployment import deploy

    paths, overrides = _split_args(args.items)
    scenario = paths[0] if paths else str(default_scenario())
    if args.docker:  # containers: TLS + node authentication always (docs/deployment.md)
        from fedsec.federation.docker_deploy import deploy_docker

        summary = deploy_docker(scenario, overrides, args.out, image=args.image)
        mode = "Docker containers, TLS + node authentication"
    else:
        summary = deploy(scenario, overrides, args.out, args.secure, clientapp=args.clientapp, verbose=True)
        mode = "TLS + node authentication" if args.secure else "insecure, loopback"
    f = summary["final"]
    print(f"deployment ({mode}) completed "
          f"{summary['rounds']} rounds in {summary['timing']['wall_s']:.1f} s")
    print("final (union of hospitals' test sets): " + ", ".join(
        f"{k} {v:.3f}" for k, v in f.items() if v is not None))
    print(f"results: {summary['path']}")
    return 0


def cmd_validate(args) -> int:
    from fedsec.scenario import load_scenario

    bad = 0
    paths, overrides = _split_args(args.items)
    if not paths:
        raise FedsecError("give one or more scenario files to validate")
    for p in paths:
        try:
            s = load_scenario(p, overrides)
            print(f"ok       {p} ({s.name}: {s.task.name}/{s.task.model}, strategy {s.strategy['rule']}, "
                  f"{len(s.attacks)} attack(s))")
        except FedsecError as err:
            print(f"invalid  {err}")
            bad += 1
    return 2 if bad else 0


def cmd_list(args) -> int:
    from fedsec.registry import MODELS, TASKS
    from fedsec.scenario import list_presets

    what = args.what
    sections = {
        "tasks": lambda: TASKS.names(),
        "models": lambda: MODELS.names(),
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
    scenario = load_scenario(paths[0] if paths else str(default_scenario()), overrides)
    res = centralised(scenario, epochs=args.epochs)
    print(f"centralised baseline of {scenario.name}: {res['train_rows']} pooled training rows, "
          f"{res['epochs']} epochs, {res['seconds']:.1f} s")
    print("union test: " + ", ".join(f"{k} {v:.3f}" for k, v in res["final"].items() if v == v))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedsec", description="Federated-learning security testbed for hospitals")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run a scenario (default: the embedded quickstart)")
    p.add_argument("items", nargs="*", metavar="SCENARIO|key=value",
                   help="a scenario file and key=value overrides (e.g. federation.rounds=3)")
    p.add_argument("--out", help="results folder (default runs/<name>/<UTC time>-<hash>/)")
    p.add_argument("--resume", metavar="RUN_DIR", help="finish an interrupted run from its results folder")
    p.add_argument("-v", "--verbose", action="store_true", help="show Flower's and Ray's logs")
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("baseline", help="train the scenario's model on pooled data (the centralised reference)")
    p.add_argument("items", nargs="*", metavar="SCENARIO|key=value")
    p.add_argument("--epochs", type=int, help="default: rounds x local epochs")
    p.set_defaults(fn=cmd_baseline)

    p = sub.add_parser("deploy", help="run a scenario on real Flower processes: a SuperLink + one SuperNode "
                                      "per hospital on loopback")
    p.add_argument("items", nargs="*", metavar="SCENARIO|key=value")
    p.add_argument("--out", help="results folder")
    p.add_argument("--secure", action="store_true", help="TLS certificates + SuperNode authentication")
    p.add_argument("--clientapp", choices=["warm", "subprocess"], default="warm",
                   help="warm: one long-lived ClientApp process per hospital (default); subprocess: Flower's "
                        "stock executor (a new process per message)")
    p.add_argument("--docker", action="store_true", help="one container per hospital and one for the "
                   "SuperLink (TLS + node authentication), from the image docker/build-images.sh makes")
    p.add_argument("--image", help="with --docker: the fedsec image to use (default: build or reuse one)")
    p.set_defaults(fn=cmd_deploy)

    p = sub.add_parser("validate", help="check scenario files (exit 0 if all valid, 2 otherwise)")
    p.add_argument("items", nargs="*", metavar="SCENARIO|key=value")
    p.set_defaults(fn=cmd_validate)

    from fedsec.report import add_report_parser
    from fedsec.sweep import add_sweep_parser

    add_sweep_parser(sub)
    add_report_parser(sub)

    p = sub.add_parser("list", help="list tasks, models, strategies, attacks, scenarios")
    p.add_argument("what", nargs="?", choices=["tasks", "models", "strategies", "attacks", "scenarios"])
    p.set_defaults(fn=cmd_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from fedsec.runner import RunFailed

    try:
        return args.fn(args)
    except RunFailed as err:
        print(f"fedsec: {err}", file=sys.stderr)
        return 1
    except FedsecError as err:
        print(f"fedsec: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedsec: interrupted; finished rounds are kept (resume with --resume RUN_DIR)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

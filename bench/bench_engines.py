"""The engines side by side, end to end (process start to exit), in one run:

  plain Flower   a plain Flower 1.41 Message-API simulation on Ray: two ClientApps, Flower's
                 FedAvg, `run_simulation`, Flower's defaults (its 0.1 s message polling)
  fedsec ray     `fedsec run SCENARIO` (engine.name=ray, the default)
  fedsec inline  `fedsec run SCENARIO engine.name=inline` (in-process engine)
  plain PyTorch  the same federated rounds in one Python loop: the physical floor

All four do the same work per round: each hospital trains from the global model with the
scenario's local settings (fedsec's train_local on the same data), the server averages, and
every hospital scores its test split. Each system runs in a fresh process, so imports, data
loading and (for Ray) `ray.init`, actor start and shutdown count; "per round" is the mean of
rounds 2..N (round 1 carries the start-up), and "fixed/round" is that minus the plain
PyTorch loop's per-round time: what an engine adds to every round.

Configurations: the quickstart (2 hospitals, logistic regression, 1 epoch) and a heavier one
(the same two hospitals, an MLP 2x1024, 20 epochs: about a second of training per round).

    .venv/bin/python bench/bench_engines.py [--rounds 5] [--repeat 3] [--only light]

Prints a table (median over --repeat runs) and writes it as JSON under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "scenarios" / "quickstart.yaml")
CONFIGS = {
    "light": ("quickstart (logistic, 1 epoch)", []),
    "heavy": ("MLP 2x1024, 20 epochs", ["task.model=mlp", "task.model_options={hidden: [1024, 1024]}",
                                        "federation.local.epochs=20"]),
}
SYSTEMS = ("plain Flower (Ray)", "fedsec ray", "fedsec inline", "plain PyTorch")
# also selectable with --systems: fedsec's Ray engine through Flower's run_simulation (its 0.1 s
# message polling), as before fedsec drove Flower's RayBackend directly
EXTRA_SYSTEMS = ("fedsec ray-run_simulation",)


# --------------------------------------------------------------------------------------
# Workers: each runs in its own process and writes {"rounds": [seconds, ...]} to a file
# --------------------------------------------------------------------------------------


def _scenario(overrides: list[str]):
    from fedsec.scenario import load_scenario

    return load_scenario(QUICKSTART, overrides)


def worker_plain_torch(overrides: list[str]) -> list[float]:
    """The same rounds without Flower or Ray."""
    import torch

    from fedsec.core.params import flatten_state, unflatten_state
    from fedsec.core.training import predict, train_local
    from fedsec.tasks import build_task

    torch.set_num_threads(1)
    scenario = _scenario(overrides)
    task = build_task(scenario)
    global_state = task.make_model(seed=scenario.seed).state_dict()
    model = task.make_model()
    times = []
    for r in range(1, scenario.federation.rounds + 1):
        t0 = time.perf_counter()
        local, weights = [], []
        for h, data in enumerate(task.data.train):
            model.load_state_dict(global_state)
            train_local(model, data, task, scenario.federation.local, torch.Generator().manual_seed(r * 1000 + h))
            local.append(flatten_state(model.state_dict()))
            weights.append(float(len(data)))
        w = torch.tensor(weights)
        global_state = unflatten_state((torch.stack(local) * (w / w.sum())[:, None]).sum(0), global_state)
        model.load_state_dict(global_state)
        for data in task.data.test:
            predict(model, data, task)
        times.append(time.perf_counter() - t0)
    return times


def worker_plain_flower(overrides: list[str]) -> list[float]:
    """A plain Flower simulation: bench/flower_plain_app.py's ServerApp and ClientApp."""
    import logging

    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    logging.getLogger("flwr").setLevel(logging.ERROR)
    sys.path.insert(0, str(ROOT / "bench"))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT / "bench"), os.environ.get("PYTHONPATH", "")])
    os.environ["FEDSEC_BENCH_OVERRIDES"] = json.dumps(overrides)
    import tempfile

    from flower_plain_app import client_app, make_server_app  # noqa: E402
    from flwr.simulation import run_simulation

    scenario = _scenario(overrides)
    times: list[float] = []
    with tempfile.TemporaryDirectory(prefix="fedsec-bench-ray-") as tmp:
        run_simulation(server_app=make_server_app(scenario.federation.rounds, times), client_app=client_app,
                       num_supernodes=len(scenario.federation.sites or []) or 2,
                       backend_config={"client_resources": {"num_cpus": 1.0, "num_gpus": 0.0},
                                       "init_args": {"num_cpus": os.cpu_count() or 1, "_node_ip_address": "127.0.0.1",
                                                     "_temp_dir": tmp, "include_dashboard": False,
                                                     "logging_level": logging.ERROR, "log_to_driver": False}})
    return times


# --------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------


def _timed(cmd: list[str], env=None) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-3000:]}")
    return wall


def run_system(system: str, overrides: list[str], out: Path) -> dict:
    py = sys.executable
    out.mkdir(parents=True, exist_ok=True)
    if system.startswith("fedsec"):
        engine = system.split()[1]
        env = dict(os.environ)
        if engine == "ray-run_simulation":
            engine, env["FEDSEC_RAY_RUNTIME"] = "ray", "flower"
        run_dir = out / "run"
        cmd = [str(Path(py).parent / "fedsec"), "run", QUICKSTART, *overrides, f"engine.name={engine}", "--out", str(run_dir)]
        wall = _timed(cmd, env)
        rounds = [json.loads(x)["time_s"] for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
    else:
        kind = "torch" if system == "plain PyTorch" else "flower"
        result = out / "rounds.json"
        wall = _timed([py, __file__, "--worker", kind, "--result", str(result), "--", *overrides])
        rounds = json.loads(result.read_text())
    later = rounds[1:] or rounds
    return {"wall_s": wall, "rounds": rounds, "per_round_s": sum(later) / len(later)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=1, help="runs per system; the table shows medians")
    ap.add_argument("--only", choices=sorted(CONFIGS), action="append", help="configurations to run (default all)")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset of: " + ", ".join(SYSTEMS + EXTRA_SYSTEMS))
    ap.add_argument("--out", default="/tmp/fedsec-bench-engines")
    ap.add_argument("--worker", choices=["torch", "flower"], help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        fn = worker_plain_torch if args.worker == "torch" else worker_plain_flower
        Path(args.result).write_text(json.dumps(fn(args.overrides)))
        return
    systems = [s.strip() for s in args.systems.split(",")]
    out = Path(args.out)
    results: dict = {}
    print(f"{os.cpu_count()} CPUs, {args.rounds} rounds, median of {args.repeat}", flush=True)
    for key in args.only or list(CONFIGS):
        label, ov = CONFIGS[key]
        ov = ov + [f"federation.rounds={args.rounds}"]
        for system in systems:
            runs = [run_system(system, ov, out / key / system.replace(" ", "_").replace("(", "").replace(")", "") / str(i))
                    for i in range(args.repeat)]
            results.setdefault(key, {})[system] = {
                "wall_s": statistics.median(r["wall_s"] for r in runs),
                "per_round_s": statistics.median(r["per_round_s"] for r in runs),
                "runs": runs,
            }
            print(f"  {label}: {system}: {results[key][system]['wall_s']:.1f} s", file=sys.stderr, flush=True)
    floor = "plain PyTorch"
    print()
    print(f"{'configuration':<32} {'system':<26} {'wall s':>8} {'per round ms':>13} {'fixed/round ms':>15} {'vs Flower':>10}")
    for key, by_system in results.items():
        base = by_system.get(floor, {}).get("per_round_s")
        flower = by_system.get("plain Flower (Ray)", {}).get("wall_s")
        for system, r in by_system.items():
            fixed = "" if base is None or system == floor else f"{1000 * (r['per_round_s'] - base):.0f}"
            ratio = f"{r['wall_s'] / flower:.2f}x" if flower else ""
            print(f"{CONFIGS[key][0]:<32} {system:<26} {r['wall_s']:>8.1f} {1000 * r['per_round_s']:>13.0f} "
                  f"{fixed:>15} {ratio:>10}")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\n(wall: process start to exit; per round: mean of rounds 2..{args.rounds}; fixed/round: per round "
          f"minus the plain PyTorch loop's) -> {out / 'results.json'}")


if __name__ == "__main__":
    main()

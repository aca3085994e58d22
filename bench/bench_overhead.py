"""fedsec's cost over plain PyTorch, on the heart-disease task.

The plain loop does the same work in one process: for each round, every hospital trains
from the global model (same epochs, batch size, lr, seeds), FedAvg averages, and the global
model is scored on every hospital's test split. fedsec adds Flower messaging, serialisation,
Ray scheduling and the results folder.

Prints:
  (a) the fixed cost per round in ms on the quickstart-sized heart task, where training
      itself takes milliseconds: fedsec's mean round time minus the plain loop's;
  (b) fedsec's time per round over the plain loop's on a configuration where a round's
      training takes a second or more (a wide MLP, several epochs). Target: < 1.5x.
Both exclude start-up (imports, Ray, actors), which fedsec reports separately.

    .venv/bin/python bench/bench_overhead.py [--rounds 6]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import fedsec  # noqa: E402
from fedsec.core.params import flatten_state, unflatten_state  # noqa: E402
from fedsec.core.training import predict, train_local  # noqa: E402
from fedsec.scenario import load_scenario  # noqa: E402
from fedsec.tasks import build_task  # noqa: E402


def plain_loop(scenario) -> list[float]:
    """Per-round seconds of the same federated training without Flower/Ray."""
    torch.set_num_threads(1)
    task = build_task(scenario)
    model = task.make_model(seed=scenario.seed)
    global_state = model.state_dict()
    times = []
    for r in range(1, scenario.federation.rounds + 1):
        t0 = time.perf_counter()
        locals_, weights = [], []
        for h, data in enumerate(task.data.train):
            model.load_state_dict(global_state)
            gen = torch.Generator().manual_seed(r * 1000 + h)
            train_local(model, data, task, scenario.federation.local, gen)
            locals_.append(flatten_state(model.state_dict()))
            weights.append(len(data))
        w = torch.tensor(weights, dtype=torch.float32)
        avg = (torch.stack(locals_) * (w / w.sum())[:, None]).sum(0)
        global_state = unflatten_state(avg, global_state)
        model.load_state_dict(global_state)
        for data in task.data.test:
            predict(model, data, task)
        times.append(time.perf_counter() - t0)
    return times


def fedsec_rounds(scenario_path: str, overrides: list[str], out: Path) -> tuple[list[float], dict]:
    summary = fedsec.run(scenario_path, overrides=overrides, out=out, progress=False)
    import json

    rounds = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]
    return [r["time_s"] for r in rounds], summary


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--out", default="/tmp/fedsec-bench-overhead")
    args = ap.parse_args()
    out = Path(args.out)
    configs = {
        "light (quickstart: logistic, 1 epoch)": ["task.model=logistic", "federation.local.epochs=1"],
        "heavy (MLP 2x1024, 30 epochs)": ["task.model=mlp", "task.model_options={hidden: [1024, 1024]}",
                                          "federation.local.epochs=30"],
    }
    base = str(ROOT / "scenarios" / "quickstart.yaml")
    print(f"{'configuration':<40} {'plain s/round':>14} {'fedsec s/round':>15} {'diff ms':>9} {'ratio':>7}")
    for i, (label, ov) in enumerate(configs.items()):
        ov = ov + [f"federation.rounds={args.rounds}"]
        scenario = load_scenario(base, ov)
        plain = plain_loop(scenario)[1:]  # first round warms caches in both cases
        fed, summary = fedsec_rounds(base, ov, out / f"c{i}")
        fed = fed[1:]
        p, f = sum(plain) / len(plain), sum(fed) / len(fed)
        print(f"{label:<40} {p:>14.3f} {f:>15.3f} {1000 * (f - p):>9.0f} {f / p:>7.2f}"
              f"   (fedsec start-up {summary['timing']['startup_s']:.1f} s)")
    print("(a) = 'diff ms' of the light row; (b) = 'ratio' of the heavy row (target < 1.5)")


if __name__ == "__main__":
    main()

"""FLamby's Fed-Heart-Disease benchmark reproduced (docs/data.md, "Comparing with FLamby"):
FedAvg (scenarios/heart_flamby.yaml, in-process) and the centralised baseline over seeds,
scored as FLamby scores them, next to FLamby's stored results.

    python bench/flamby_heart.py [--seeds 42 43 44 45 46] [--out runs/flamby_heart]

FLamby's figure is the accuracy on each hospital's own test set (standardised with that
hospital's statistics), averaged over the 4 hospitals; its "Pooled Test" is the union of the
test sets standardised with pooled statistics. Prints mean +- sd and a t-based 95% CI.
About a minute a seed on one core (measured 2026-12-01, shared machine).
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import replace
from pathlib import Path

import torch

SCENARIO = Path(__file__).resolve().parents[1] / "scenarios" / "heart_flamby.yaml"

# owkin/FLamby flamby/results/results_benchmark_fed_heart_disease/heart_seed42..46.csv
# (commit edacf54d): accuracy on client_test_0..3 and on the "Pooled Test", seeds 42..46.
FLAMBY = {
    "FedAvg100": {"clients": [[0.7596, 0.6966, 0.6875, 0.6222], [0.7212, 0.7416, 0.7500, 0.6667],
                              [0.7404, 0.7528, 0.5000, 0.5778], [0.7308, 0.6742, 0.7500, 0.6222],
                              [0.7019, 0.7303, 0.5625, 0.7111]],
                  "pooled": [0.7520, 0.7638, 0.7638, 0.7008, 0.7598]},
    "Pooled Training": {"clients": [[0.7981, 0.7640, 0.7500, 0.6444], [0.7788, 0.7640, 0.7500, 0.6444],
                                    [0.7885, 0.7640, 0.7500, 0.6444], [0.7788, 0.7640, 0.7500, 0.6444],
                                    [0.7692, 0.7640, 0.7500, 0.6444]],
                        "pooled": [0.7913, 0.7953, 0.7953, 0.7992, 0.7953]},
}


def t_ci(values):
    from scipy import stats

    m, sd = statistics.fmean(values), statistics.stdev(values)
    h = stats.t.ppf(0.975, len(values) - 1) * sd / len(values) ** 0.5
    return f"{m:.3f} +- {sd:.3f} [{m - h:.3f}, {m + h:.3f}]"


def fedavg(seed: int, out: Path) -> tuple[float, float]:
    """-> (mean over hospitals' own test sets, union test with pooled statistics)."""
    import fedsec
    from fedsec.core.training import evaluate
    from fedsec.scenario import load_scenario
    from fedsec.tasks import build_task

    run = out / f"fedavg_s{seed}"
    summary = fedsec.run(str(SCENARIO), [f"seed={seed}", "engine.name=inline"], out=str(run), progress=False)
    clients = statistics.fmean(h["accuracy"] for h in summary["per_hospital"].values())
    sc = load_scenario(run / "scenario.yaml")
    task = build_task(sc)
    pooled = build_task(load_scenario(run / "scenario.yaml", ["task.options.normalize=pooled"])).data
    model = task.make_model(seed=sc.seed)
    model.load_state_dict(torch.load(run / "checkpoint.pt", weights_only=False)["state"])
    return clients, evaluate(model, pooled.union_test(), task)["accuracy"]


def centralised(seed: int) -> tuple[float, float]:
    """FLamby's pooled baseline (Adam, 50 epochs, pooled statistics), the loop of
    fedsec.baseline.centralised -> (mean over hospitals' test sets standardised with their
    own statistics, as FLamby scores it; union test)."""
    from fedsec.core.training import evaluate, make_optimizer, train_local
    from fedsec.data.base import Split
    from fedsec.scenario import load_scenario
    from fedsec.tasks import build_task

    over = [f"seed={seed}", "federation.local.optimizer=adam"]
    sc = load_scenario(SCENARIO, over + ["task.options.normalize=pooled"])
    own = build_task(load_scenario(SCENARIO, over)).data
    task = build_task(sc)
    model = task.make_model(seed=seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = make_optimizer(model, sc.federation.local)
    one_epoch = replace(sc.federation.local, epochs=1, steps=None)
    pooled = Split.concat(task.data.train)
    for _ in range(50):
        train_local(model, pooled, task, one_epoch, generator, optimizer=optimizer)
    clients = statistics.fmean(evaluate(model, t, task)["accuracy"] for t in own.test)
    return clients, evaluate(model, task.data.union_test(), task)["accuracy"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44, 45, 46])
    p.add_argument("--out", default="runs/flamby_heart")
    args = p.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    fa, ce = [], []
    for s in args.seeds:
        fa.append(fedavg(s, out))
        ce.append(centralised(s))
        print(f"seed {s}: FedAvg {fa[-1][0]:.3f} / {fa[-1][1]:.3f}, centralised {ce[-1][0]:.3f} / {ce[-1][1]:.3f}",
              flush=True)
    rows = [("FedAvg, mean over hospitals' test sets", [a for a, _ in fa], "FedAvg100", "clients"),
            ("FedAvg, pooled test (pooled statistics)", [b for _, b in fa], "FedAvg100", "pooled"),
            ("centralised, pooled test", [b for _, b in ce], "Pooled Training", "pooled"),
            ("centralised, mean over hospitals' test sets", [a for a, _ in ce], "Pooled Training", "clients")]
    print(f"\n{'accuracy':45s} {'fedsec':32s} FLamby")
    for label, ours, method, kind in rows:
        ref = FLAMBY[method][kind]
        ref = [statistics.fmean(r) for r in ref] if kind == "clients" else ref
        print(f"{label:45s} {t_ci(ours):32s} {t_ci(ref)}")


if __name__ == "__main__":
    main()

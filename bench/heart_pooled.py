"""Heart disease, FedAvg against the centralised (pooled-data) reference, over seeds (README,
"Heart disease, FedAvg vs. pooled"):

    python bench/heart_pooled.py [--seeds 0-9] [--out runs/heart-pooled]

For each seed: ``fedsec run scenarios/heart_fedavg.yaml seed=S`` (in-process engine) and
``fedsec baseline scenarios/heart_fedavg.yaml seed=S`` (the same model, code and epochs on the
pooled training records). Prints accuracy and AUROC on the union of the hospitals' test sets,
mean [95% Student-t interval] over the seeds, and the paired difference pooled minus FedAvg
(same seed), "no detectable difference" when its interval includes 0. A few seconds a seed.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCENARIO = ROOT / "scenarios" / "heart_fedavg.yaml"


def fmt(values: list[float], signed: bool = False) -> str:
    from fedsec.analysis.tables import t_interval

    lo, hi = t_interval(values)
    s = "+" if signed else ""
    return f"{statistics.fmean(values):{s}.3f} [{lo:{s}.3f}, {hi:{s}.3f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0-9", help="0-9 or 0,1,2 (default 0-9)")
    ap.add_argument("--out", default="runs/heart-pooled", type=Path)
    args = ap.parse_args()
    import torch

    import fedsec
    from fedsec.analysis.tables import paired_difference
    from fedsec.baseline import centralised
    from fedsec.scenario import load_scenario
    from fedsec.sweep import parse_seeds

    args.seeds = parse_seeds(args.seeds)

    torch.set_num_threads(1)
    fed, pooled = [], []
    for seed in args.seeds:
        run = args.out / f"fedavg_s{seed}"
        summary = fedsec.run(str(SCENARIO), [f"seed={seed}", "engine.name=inline"], out=str(run),
                             progress=False, force=True)
        fed.append(summary["final"])
        pooled.append(centralised(load_scenario(str(SCENARIO), [f"seed={seed}"]))["final"])
        print(f"seed {seed}: FedAvg accuracy {fed[-1]['accuracy']:.3f} AUROC {fed[-1]['auroc']:.3f}; "
              f"pooled {pooled[-1]['accuracy']:.3f} / {pooled[-1]['auroc']:.3f}", flush=True)
    print(f"\nSeeds {args.seeds[0]}-{args.seeds[-1]} ({len(args.seeds)}); mean [95% t interval]; union test\n")
    print("| | accuracy | AUROC |\n|---|---|---|")
    for name, rows in (("FedAvg", fed), ("centralised (pooled data, same code and epochs)", pooled)):
        print(f"| {name} | {fmt([r['accuracy'] for r in rows])} | {fmt([r['auroc'] for r in rows])} |")
    for metric in ("accuracy", "auroc"):
        d = paired_difference([(p[metric], f[metric]) for p, f in zip(pooled, fed)])
        verdict = "the interval excludes 0" if d["detectable"] else "no detectable difference"
        print(f"pooled minus FedAvg, {metric} (paired by seed): {d['mean']:+.3f} [{d['low']:+.3f}, "
              f"{d['high']:+.3f}]: {verdict}")


if __name__ == "__main__":
    main()

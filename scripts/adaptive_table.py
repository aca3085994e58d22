"""The "Adaptive attacks" table of docs/results.md, from the sweeps of scripts/adaptive_sweeps.sh.

    scripts/adaptive_sweeps.sh 0-4 runs/adaptive-heart     # the runs (resumable)
    python scripts/adaptive_table.py runs/adaptive-heart    # the table (markdown, stdout)
    python scripts/adaptive_table.py runs/adaptive-heart balanced_accuracy   # another metric

Each cell: effect = metric - null, paired by seed (the null: the same scenario, defense and
seed with the attacker training honestly, poison_fraction 0, so the rules keep f = 1 and the
clean model's ASR is measured). Metric: the attack success rate for backdoors (effect > 0 is
harm), the final AUROC on the union test set otherwise (effect < 0 is harm). Mean over seeds
and a 95% Student-t confidence interval; ``*`` marks a CI that excludes 0.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from scipy import stats

DEFENSES = ("fedavg", "norm_bounding", "median", "trimmed_mean", "flame")
BACKDOOR = ("bounded_ehr_trigger", "flame_evading_ehr_trigger", "ehr_trigger_boost4")


def label(values: dict) -> str:
    a = str(values.get("attacks", "none"))
    return "ehr_trigger_boost4" if a.startswith("[") else a


def cells(folder: Path):
    sweep = json.loads((folder / "sweep.json").read_text())
    for c in sweep["cells"]:
        summary = folder / c["path"] / "summary.json"
        if c["status"] not in ("completed", "completed_with_failures") or not summary.exists():
            continue
        s = json.loads(summary.read_text())
        yield label(c["values"]), c["values"]["strategy"], c["seed"], s, c.get("wall_s")


def ci(values: list[float]) -> tuple[float, float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan"), float("nan")
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def main(out: str, clean_metric: str = "auroc") -> None:
    root = Path(out)
    null: dict[tuple[str, int], dict] = {}
    for _, strategy, seed, s, _ in cells(root / "null"):
        null[(strategy, seed)] = {"auroc": s["final"][clean_metric], "asr": (s.get("attack") or {}).get("asr")}
    runs: dict[tuple[str, str], dict[int, dict]] = {}
    walls = []
    for sub in ("adaptive", "baseline"):
        if not (root / sub / "sweep.json").exists():
            continue
        for attack, strategy, seed, s, wall in cells(root / sub):
            runs.setdefault((attack, strategy), {})[seed] = {"auroc": s["final"][clean_metric],
                                                             "asr": (s.get("attack") or {}).get("asr")}
            walls.append(wall or 0.0)
    attacks = sorted({a for a, _ in runs}, key=lambda a: (a in BACKDOOR, not a.startswith(("adaptive", "bounded",
                                                                                          "flame_evading")), a))
    seeds = sorted({seed for (_, seed) in null})
    print(f"seeds {','.join(map(str, seeds))}; null AUROC / ASR per defense (mean):")
    for d in DEFENSES:
        vals = [null[(d, s)] for s in seeds if (d, s) in null]
        if vals:
            print(f"- {d}: {clean_metric} {sum(v['auroc'] for v in vals) / len(vals):.3f}, "
                  f"clean-model ASR {sum(v['asr'] for v in vals) / len(vals):.3f}")
    print()
    print("| attack (metric) | " + " | ".join(DEFENSES) + " |")
    print("|---|" + "---|" * len(DEFENSES))
    for a in attacks:
        metric = "asr" if a in BACKDOOR else "auroc"
        row = [f"`{a}` ({'ASR' if metric == 'asr' else clean_metric})"]
        for d in DEFENSES:
            per_seed = runs.get((a, d), {})
            effects = [per_seed[s][metric] - null[(d, s)][metric] for s in seeds
                       if s in per_seed and (d, s) in null and per_seed[s][metric] is not None]
            if not effects:
                row.append("—")
                continue
            m, lo, hi = ci(effects)
            star = "*" if (lo > 0 or hi < 0) else ""
            row.append(f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]{star} (n={len(effects)})")
        print("| " + " | ".join(row) + " |")
    if walls:
        print(f"\n{len(walls)} attack runs, {sum(walls) / len(walls):.1f} s each on average (wall, 2 shared cores)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/adaptive-heart", *(sys.argv[2:3]))

"""Attack metrics against their nulls, over seeds: reads the runs written by the commands in
docs/results.md ("Attack metrics with their nulls") and prints one table per attack.

    python bench/attack_nulls.py runs/nulls

Each run's summary.json carries, per metric, value / null / effect / 95% bootstrap CI over
records (fedsec.attacks.nulls). Across seeds this prints the mean and sd of value, null and
effect, a t-based 95% CI of the mean effect, and how many seeds were "at floor" (the run's
own effect CI includes 0).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def t_ci(values):
    from scipy import stats

    n = len(values)
    if n < 2:
        return (float("nan"), float("nan"))
    m, sd = statistics.fmean(values), statistics.stdev(values)
    h = stats.t.ppf(0.975, n - 1) * sd / n ** 0.5
    return (m - h, m + h)


def table(runs: list[dict], metrics: list[str]) -> None:
    print(f"{'metric':28s} {'value':>13s} {'null':>13s} {'effect':>13s} {'effect 95% CI':>18s} at-floor")
    for m in metrics:
        rows = [r["attack"]["stats"][m] for r in runs if m in (r["attack"].get("stats") or {})]
        if not rows:
            continue
        v = [s["value"] for s in rows]
        nl = [s["null"] for s in rows]
        e = [s["effect"] for s in rows]
        lo, hi = t_ci(e)
        sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0  # noqa: E731
        print(f"{m:28s} {statistics.fmean(v):6.3f}±{sd(v):5.3f} {statistics.fmean(nl):6.3f}±{sd(nl):5.3f} "
              f"{statistics.fmean(e):+6.3f}±{sd(e):5.3f}  [{lo:+.3f}, {hi:+.3f}]   "
              f"{sum(bool(s['at_floor']) for s in rows)}/{len(rows)} ({rows[0]['null_kind']})")


def main(root: str) -> None:
    root = Path(root)
    groups: dict[str, list[dict]] = {}
    for f in sorted(root.glob("*_s*/summary.json")):
        s = json.loads(f.read_text())
        if s.get("status") == "completed":
            groups.setdefault(f.parent.name.rsplit("_s", 1)[0], []).append(s)
    for name, runs in groups.items():
        seeds = sorted(r["seed"] for r in runs)
        print(f"\n## {name} (seeds {seeds})")
        if name == "clean":
            continue
        metrics = sorted({m for r in runs for m in (r["attack"].get("stats") or {})})
        table(runs, metrics)
        durs = [r["attack"].get("durability") for r in runs if r["attack"].get("durability")]
        if durs:
            keys = sorted({k for d in durs for k in d["after"]}, key=int)
            print("durability: ASR at end of attack "
                  f"{statistics.fmean(d['at_end_of_attack'] for d in durs):.3f}; " + ", ".join(
                      f"+{k}: {statistics.fmean(d['after'][k] for d in durs if k in d['after']):.3f}" for k in keys)
                  + "; rounds to floor: " + ", ".join(str(d["rounds_to_floor"]) if d["rounds_to_floor"] is not None
                                                       else f">{d['censored_after']}" for d in durs))
        first = []  # observers also report every round: the first round's figures beside the last's
        for r in runs:
            lines = (Path(r["path"]) / "rounds.jsonl").read_text().splitlines() if r.get("path") else []
            if lines:
                first.append({"attack": {"stats": {k: v for k, v in (json.loads(lines[0])["attack"].get("stats") or {})
                                                   .items() if k.startswith("provenance")}}})
        if any(f["attack"]["stats"] for f in first):
            print("round 1:")
            table(first, ["provenance_acc"])
        costs = [r["attack"].get("main_task_cost") for r in runs if r["attack"].get("main_task_cost")]
        for k in ("balanced_accuracy", "auroc"):
            vals = [c[k]["cost"] for c in costs if k in c]
            if vals:
                lo, hi = t_ci(vals)
                print(f"main-task cost ({k}, no-attack - attacked): {statistics.fmean(vals):+.3f} "
                      f"[{lo:+.3f}, {hi:+.3f}] over {len(vals)} seeds")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/nulls")

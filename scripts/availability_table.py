"""The availability results table (docs/results.md, "Availability"): stall and strategic
dropout by one hospital against the server's `wait` and `proceed` (+ deadline) policies, with
the no-attack null, on scenarios/availability_heart.yaml and the inline engine. Resumable:
finished cells are skipped.

    .venv/bin/python scripts/availability_table.py [--seeds 0,1,2,3,4] [--out results/availability]

Writes <out>/table.md and table.csv; each cell's run folder is under <out>/runs/. Cells show
the mean and 95% t interval over seeds of: rounds lost (the aggregate had fewer hospitals
than were selected), simulated seconds to the target AUROC (the scenario's target_value;
"never" when a seed did not reach it), the total simulated seconds, and the final AUROC.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import fedsec  # noqa: E402
from fedsec.analysis.tables import t_interval  # noqa: E402
from fedsec.runner import RunFailed  # noqa: E402

SCENARIO = ROOT / "scenarios" / "availability_heart.yaml"
# attack label -> `attacks` override; VA Long Beach (hospital 3) is the attacker
ATTACKS = {
    "none": "none",
    "stall": "[{preset: stall, hospitals: [3]}]",
    # VA's data is 73% positive: with rare_label 1 / min_share 0.5 it withholds it every round
    "strategic_dropout": "[{preset: strategic_dropout, hospitals: [3]}]",
}
POLICIES = ["wait", "proceed"]


def run_grid(seeds: list[int], out: Path) -> list[dict]:
    rows, t0 = [], time.perf_counter()
    cells = [(a, p, s) for a in ATTACKS for p in POLICIES for s in seeds]
    for i, (attack, policy, seed) in enumerate(cells, 1):
        run_dir = out / "runs" / f"{attack}-{policy}-s{seed}"
        summary_file = run_dir / "summary.json"
        status = json.loads(summary_file.read_text())["status"] if summary_file.exists() else None
        if status not in ("completed", "completed_with_failures"):
            print(f"[{i}/{len(cells)}] {attack} / {policy}, seed {seed} ...", file=sys.stderr, flush=True)
            ov = [f"seed={seed}", f"attacks={ATTACKS[attack]}", f"federation.participation.policy={policy}",
                  "engine.name=inline"]
            try:
                fedsec.run(str(SCENARIO), overrides=ov, out=run_dir, progress=False)
            except RunFailed as err:
                print(f"  failed: {err}", file=sys.stderr)
        s = json.loads(summary_file.read_text())
        a = s.get("availability", {})
        reached = (a.get("target") or {}).get("reached")
        rows.append({"attack": attack, "policy": policy, "seed": seed, "status": s["status"],
                     "rounds": s["rounds"], "rounds_lost": a.get("rounds_lost"),
                     "simulated_time_s": a.get("simulated_time_s"),
                     "target_round": reached["round"] if reached else None,
                     "simulated_to_target_s": reached["simulated_s"] if reached else None,
                     "wall_to_target_s": reached["wall_s"] if reached else None,
                     "auroc": s["final"].get("auroc"),
                     "auroc_va": (s.get("per_hospital", {}).get("va") or {}).get("auroc"),
                     "wall_s": s["timing"]["wall_s"]})
    print(f"grid done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return rows


def fmt(values: list, digits: int = 3) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "never"
    mean = statistics.fmean(vals)
    low, high = t_interval(vals)
    text = f"{mean:.{digits}f}"
    if low is not None and high - low > 10 ** -digits:
        text += f" [{low:.{digits}f}, {high:.{digits}f}]"
    missing = len(values) - len(vals)
    return text + (f" ({missing} never)" if missing else "")


def write_table(rows: list[dict], out: Path, seeds: list[int]) -> str:
    with (out / "table.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = [f"Availability, heart disease (4 hospitals, VA attacks), inline engine, seeds {seeds}: "
             "mean [95% t interval]", "",
             "| attack | policy | rounds lost (of 20) | simulated s to AUROC >= 0.84 | simulated s (20 rounds) | "
             "final AUROC | VA's AUROC | status |",
             "|---|---|---|---|---|---|---|---|"]
    for attack in ATTACKS:
        for policy in POLICIES:
            sel = [r for r in rows if r["attack"] == attack and r["policy"] == policy]
            statuses = sorted({r["status"] for r in sel})
            lines.append(f"| {attack} | {policy} | {fmt([r['rounds_lost'] for r in sel], 1)} | "
                         f"{fmt([r['simulated_to_target_s'] for r in sel], 1)} | "
                         f"{fmt([r['simulated_time_s'] for r in sel], 1)} | {fmt([r['auroc'] for r in sel])} | "
                         f"{fmt([r['auroc_va'] for r in sel])} | "
                         f"{', '.join(statuses)} |")
    table = "\n".join(lines) + "\n"
    (out / "table.md").write_text(table)
    return table


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--out", default=str(ROOT / "results" / "availability"))
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(write_table(run_grid(seeds, out), out, seeds))


if __name__ == "__main__":
    main()

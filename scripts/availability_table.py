"""The availability results table (docs/results.md, "Availability") from the sweep
`sweeps/availability_heart.yaml`: stall and strategic dropout by one hospital against the
server's `wait`, `proceed` (+ deadline) and `buffered` policies, with the no-attack null.

    fedsec sweep sweeps/availability_heart.yaml               # the runs (resumable)
    .venv/bin/python scripts/availability_table.py runs/availability-heart

Writes <sweep>/availability.md and availability.csv. Cells show the mean and 95% t interval
over seeds of: rounds lost (the aggregate had fewer hospitals than were selected),
simulated seconds to the target AUROC (the scenario's target_value; "never" when a seed did
not reach it), the total simulated seconds, and the final AUROC.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fedsec.analysis.tables import t_interval  # noqa: E402

ATTACKS = ["none", "stall", "strategic_dropout"]
POLICIES = ["wait", "proceed", "buffered"]


def read_sweep(folder: Path) -> tuple[list[dict], list[int]]:
    """One row per finished cell of the sweep in ``folder`` (its sweep.json and cells)."""
    sweep = json.loads((folder / "sweep.json").read_text())
    rows, seeds = [], set()
    for c in sweep["cells"]:
        summary_file = folder / c["path"] / "summary.json"
        if not summary_file.exists():
            continue
        s = json.loads(summary_file.read_text())
        if s["status"] not in ("completed", "completed_with_failures"):
            continue
        a = s.get("availability", {})
        reached = (a.get("target") or {}).get("reached")
        seeds.add(c["seed"])
        rows.append({"attack": c["values"]["attack"], "policy": c["values"]["policy"], "seed": c["seed"],
                     "status": s["status"], "rounds": s["rounds"], "rounds_lost": a.get("rounds_lost"),
                     "simulated_time_s": a.get("simulated_time_s"),
                     "target_round": reached["round"] if reached else None,
                     "simulated_to_target_s": reached["simulated_s"] if reached else None,
                     "wall_to_target_s": reached["wall_s"] if reached else None,
                     "auroc": s["final"].get("auroc"),
                     "auroc_va": (s.get("per_hospital", {}).get("va") or {}).get("auroc"),
                     "wall_s": s["timing"]["wall_s"]})
    return rows, sorted(seeds)


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
    with (out / "availability.csv").open("w", newline="") as fh:
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
    (out / "availability.md").write_text(table)
    return table


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("sweep", nargs="?", default=str(ROOT / "runs" / "availability-heart"),
                    help="the folder of `fedsec sweep sweeps/availability_heart.yaml`")
    args = ap.parse_args()
    out = Path(args.sweep)
    if not (out / "sweep.json").exists():
        raise SystemExit(f"{out}: not a sweep folder (run: fedsec sweep sweeps/availability_heart.yaml)")
    rows, seeds = read_sweep(out)
    if not rows:
        raise SystemExit(f"{out}: no finished cell yet")
    print(write_table(rows, out, seeds))


if __name__ == "__main__":
    main()

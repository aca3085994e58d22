"""The availability results tables (docs/results.md, "Availability") from the sweeps
`sweeps/availability_heart.yaml` and `sweeps/availability_cxr.yaml`: availability attacks by
one hospital against the server's `wait`, `proceed` (+ deadline) and `buffered` policies,
with the no-attack null.

    fedsec sweep sweeps/availability_heart.yaml               # the runs (resumable)
    .venv/bin/python scripts/availability_table.py runs/availability-heart
    fedsec sweep sweeps/availability_cxr.yaml
    .venv/bin/python scripts/availability_table.py runs/availability-cxr --attacker hospital_0

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

ATTACKS = ["none", "stall", "strategic_dropout"]  # the order of the rows; other labels follow
POLICIES = ["wait", "proceed", "buffered"]


def read_sweep(folder: Path, attacker: str = "va") -> tuple[list[dict], list[int]]:
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
                     "auroc_attacker": (s.get("per_hospital", {}).get(attacker) or {}).get("auroc"),
                     "rounds_planned": s.get("rounds_planned", s["rounds"]),
                     "target": {k: (a.get("target") or {}).get(k) for k in ("metric", "value")},
                     "wall_s": s["timing"]["wall_s"]})
    return rows, sorted(seeds)


def fmt(values: list, digits: int = 3, missing_word: str = "never") -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return missing_word
    mean = statistics.fmean(vals)
    low, high = t_interval(vals)
    text = f"{mean:.{digits}f}"
    if low is not None and high - low > 10 ** -digits:
        text += f" [{low:.{digits}f}, {high:.{digits}f}]"
    missing = len(values) - len(vals)
    return text + (f" ({missing} {missing_word})" if missing else "")


def write_table(rows: list[dict], out: Path, seeds: list[int], attacker: str = "va", title: str = "") -> str:
    with (out / "availability.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    rounds = max(r["rounds_planned"] for r in rows)
    target = rows[0]["target"]
    to_target = f"simulated s to {target['metric'].upper() if target['metric'] == 'auroc' else target['metric']} " \
                f">= {target['value']}" if target.get("value") is not None else "simulated s to target"
    attacks = [a for a in ATTACKS if any(r["attack"] == a for r in rows)]
    attacks += sorted({r["attack"] for r in rows} - set(attacks))
    lines = [f"Availability, {title or out.name} ({attacker} attacks), seeds {seeds}: mean [95% t interval]", "",
             f"| attack | policy | rounds lost (of {rounds}) | {to_target} | simulated s ({rounds} rounds) | "
             f"final AUROC | {attacker}'s AUROC | status |",
             "|---|---|---|---|---|---|---|---|"]
    for attack in attacks:
        for policy in POLICIES:
            sel = [r for r in rows if r["attack"] == attack and r["policy"] == policy]
            if not sel:
                continue
            statuses = sorted({r["status"] for r in sel})
            lines.append(f"| {attack} | {policy} | {fmt([r['rounds_lost'] for r in sel], 1)} | "
                         f"{fmt([r['simulated_to_target_s'] for r in sel], 1)} | "
                         f"{fmt([r['simulated_time_s'] for r in sel], 1)} | {fmt([r['auroc'] for r in sel])} | "
                         f"{fmt([r['auroc_attacker'] for r in sel], missing_word='undefined')} | "
                         f"{', '.join(statuses)} |")
    table = "\n".join(lines) + "\n"
    (out / "availability.md").write_text(table)
    return table


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("sweep", nargs="?", default=str(ROOT / "runs" / "availability-heart"),
                    help="the folder of `fedsec sweep sweeps/availability_heart.yaml`")
    ap.add_argument("--attacker", default="va", help="the attacking hospital's name (its AUROC column)")
    ap.add_argument("--title", default="", help="the table's title (default: the sweep folder's name)")
    args = ap.parse_args()
    out = Path(args.sweep)
    if not (out / "sweep.json").exists():
        raise SystemExit(f"{out}: not a sweep folder (run: fedsec sweep sweeps/availability_heart.yaml)")
    rows, seeds = read_sweep(out, args.attacker)
    if not rows:
        raise SystemExit(f"{out}: no finished cell yet")
    print(write_table(rows, out, seeds, args.attacker, args.title))


if __name__ == "__main__":
    main()

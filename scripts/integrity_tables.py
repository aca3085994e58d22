"""The integrity tables of docs/results.md from a finished sweep folder (sweeps/integrity_*.yaml):

    fedsec sweep sweeps/integrity_heart.yaml            # the runs (resumable)
    .venv/bin/python scripts/integrity_tables.py runs/integrity-heart

Prints two Markdown tables, mean [95% Student-t interval] over the seeds:
1. attack x defense: final AUROC and balanced accuracy on the union of the hospitals' tests;
2. for each backdoor cell: its ASR, the floor (the ASR of the same seed's no-attack model,
   the sweep's null_run), the effect over the floor (paired by seed), and the main-task cost
   (no-attack minus attacked balanced accuracy / AUROC, paired by seed), with the number of
   seeds whose own record-level interval put the ASR at its floor.
Everything is read from the cells' summary.json (attack.stats.asr, attack.main_task_cost).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fedsec.analysis.tables import t_interval  # noqa: E402


def fmt(values: list[float], signed: bool = False, digits: int = 3) -> str:
    if not values:
        return "-"
    m = statistics.fmean(values)
    lo, hi = t_interval(values)
    s = "+" if signed else ""
    if lo is None:
        return f"{m:{s}.{digits}f}"
    return f"{m:{s}.{digits}f} [{lo:{s}.{digits}f}, {hi:{s}.{digits}f}]"


def cells(folder: Path) -> list[dict]:
    sweep = json.loads((folder / "sweep.json").read_text())
    out = []
    for c in sweep["cells"]:
        f = folder / c["path"] / "summary.json"
        if f.exists():
            s = json.loads(f.read_text())
            if s.get("status") in ("completed", "completed_with_failures"):
                out.append({"values": c["values"], "seed": c["seed"], "summary": s})
    return out


def finished_cells(folder: Path) -> list[dict]:
    """:func:`cells`, or exit naming the folder when none has finished."""
    rows = cells(folder)
    if not rows:
        raise SystemExit(f"{folder}: no finished cell")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("sweep", help="a sweep folder of sweeps/integrity_*.yaml")
    ap.add_argument("--rows", default="attacks")
    ap.add_argument("--cols", default="strategy")
    args = ap.parse_args()
    rows = finished_cells(Path(args.sweep))
    rlabels = list(dict.fromkeys(r["values"][args.rows] for r in rows))
    clabels = list(dict.fromkeys(r["values"][args.cols] for r in rows))
    seeds = sorted({r["seed"] for r in rows})
    print(f"Seeds {seeds}; mean [95% t interval]; AUROC / balanced accuracy on the union of the test sets\n")
    print(f"| {args.rows} \\ {args.cols} | " + " | ".join(clabels) + " |")
    print("|---|" + "---|" * len(clabels))
    for a in rlabels:
        line = []
        for d in clabels:
            sel = [r["summary"]["final"] for r in rows if r["values"][args.rows] == a and r["values"][args.cols] == d]
            line.append(f"AUROC {fmt([s['auroc'] for s in sel])}<br>bal. acc. "
                        f"{fmt([s['balanced_accuracy'] for s in sel])}" if sel else "-")
        print(f"| {a} | " + " | ".join(line) + " |")
    backdoors = [a for a in rlabels if any("stats" in (r["summary"].get("attack") or {})
                                           and "asr" in r["summary"]["attack"]["stats"]
                                           for r in rows if r["values"][args.rows] == a)]
    for a in backdoors:
        print(f"\nBackdoor `{a}`: ASR against its floor, paired by seed\n")
        print("| defense | ASR | floor (same seed, no attack) | effect over the floor | balanced-accuracy cost "
              "| AUROC cost | seeds at floor |")
        print("|---|---|---|---|---|---|---|")
        for d in clabels:
            sel = [r["summary"]["attack"] for r in rows if r["values"][args.rows] == a and r["values"][args.cols] == d]
            st = [x["stats"]["asr"] for x in sel if "asr" in x.get("stats", {})]
            cost = [x["main_task_cost"] for x in sel if "main_task_cost" in x]
            print(f"| {d} | {fmt([s['value'] for s in st])} | {fmt([s['null'] for s in st])} | "
                  f"{fmt([s['effect'] for s in st], True)} | "
                  f"{fmt([c['balanced_accuracy']['cost'] for c in cost], True)} | "
                  f"{fmt([c['auroc']['cost'] for c in cost], True)} | "
                  f"{sum(bool(s.get('at_floor')) for s in st)}/{len(st)} |")


if __name__ == "__main__":
    main()

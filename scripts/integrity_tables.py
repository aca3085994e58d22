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

With ``--paired`` it also prints, for every attack row, the paired loss (no-attack cell minus
attacked cell, same defense and seed) of balanced accuracy and AUROC, bold where the interval
excludes 0 (the balanced-accuracy table adds, in brackets, the seeds whose model ends at
balanced accuracy <= 0.51: one class for every record), and for Krum cells the number of
rounds in which Krum applied the update of a hospital attacking in that round (absent from
the round's ``defense.flagged``), one count per seed.
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
                out.append({"values": c["values"], "seed": c["seed"], "summary": s, "dir": folder / c["path"]})
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
    ap.add_argument("--paired", action="store_true",
                    help="also the paired losses against the no-attack row and Krum's selections")
    ap.add_argument("--null-row", default="none", help="the no-attack row's label (default none)")
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
    if args.paired:
        paired(rows, args, rlabels, clabels)


COLLAPSED = 0.51  # balanced accuracy at or below this: the model calls (nearly) every record one class


def krum_selections(row: dict) -> int:
    """Rounds in which Krum kept an attacker's update: a hospital attacking in that round (its
    ``attackers`` window) that is absent from the round's ``defense.flagged``."""
    attackers = row["summary"].get("attackers") or []
    n = 0
    for line in (row["dir"] / "rounds.jsonl").read_text().splitlines():
        r = json.loads(line)
        active = {h for a in attackers if a["rounds"][0] <= r["round"] <= a["rounds"][1]
                  for h in a["hospitals"]}
        flagged = set((r.get("defense") or {}).get("flagged") or [])
        n += bool(flagged) and bool(active - flagged)
    return n


def paired(rows: list[dict], args, rlabels: list[str], clabels: list[str]) -> None:
    base = {(r["values"][args.cols], r["seed"]): r["summary"]["final"] for r in rows
            if r["values"][args.rows] == args.null_row}

    def cell(a: str, d: str, metric: str) -> str:
        diffs = [base[(d, r["seed"])][metric] - r["summary"]["final"][metric] for r in rows
                 if r["values"][args.rows] == a and r["values"][args.cols] == d
                 and (d, r["seed"]) in base]
        if not diffs:
            return "-"
        text = fmt(diffs, signed=True)
        lo, hi = t_interval(diffs) if len(diffs) > 1 else (None, None)
        text = f"**{text}**" if lo is not None and (lo > 0 or hi < 0) else text
        if metric == "balanced_accuracy":
            collapsed = sum(r["summary"]["final"][metric] <= COLLAPSED for r in rows
                            if r["values"][args.rows] == a and r["values"][args.cols] == d)
            text += f" ({collapsed})"
        return text

    for metric, name in (("balanced_accuracy", "balanced accuracy"), ("auroc", "AUROC")):
        print(f"\nPaired loss of {name}: no-attack cell minus attacked cell, same defense and seed "
              "(positive = the attack cost; bold: the interval excludes 0"
              + ("; in brackets: seeds ending at balanced accuracy <= 0.51" if metric == "balanced_accuracy" else "")
              + ")\n")
        print(f"| {args.rows} | " + " | ".join(clabels) + " |")
        print("|---|" + "---|" * len(clabels))
        for a in rlabels:
            if a != args.null_row:
                print(f"| {a} | " + " | ".join(cell(a, d, metric) for d in clabels) + " |")
    krum = [d for d in clabels if "krum" in d]
    for d in krum:
        print(f"\nRounds in which `{d}` applied an attacker's update, seeds in order\n")
        print("| attack | rounds (per seed) | of |\n|---|---|---|")
        for a in rlabels:
            if a == args.null_row:
                continue
            sel = sorted((r for r in rows if r["values"][args.rows] == a and r["values"][args.cols] == d),
                         key=lambda r: r["seed"])
            counts = [krum_selections(r) for r in sel]
            of = sel[0]["summary"].get("rounds") if sel else "-"
            print(f"| {a} | {', '.join(map(str, counts))} | {of} |")


if __name__ == "__main__":
    main()

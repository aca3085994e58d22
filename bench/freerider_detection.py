"""Free-rider detection and Sybil down-weighting, read from a sweep folder's rounds.jsonl.

    python bench/freerider_detection.py runs/heart-freeriders [runs/heart-sybils ...]

For each (attacks, strategy) group of cells (over seeds) prints: the final AUROC and balanced
accuracy (mean and 95% t interval over seeds), the detection rate (share of the malicious
hospitals' rounds in which the rule named them in ``defense.flagged``) and the false-positive
rate (share of the honest hospitals' rounds in which it named them). Malicious hospitals are
read from each cell's resolved scenario (``attacks[*].hospitals``); hospital ids map to names
through round 1's ``selected`` list (every hospital trains in round 1, in id order).
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import yaml

from fedsec.analysis.tables import t_interval


def cell_figures(cell: Path) -> dict | None:
    rounds_file, scenario_file = cell / "rounds.jsonl", cell / "scenario.yaml"
    if not rounds_file.exists() or not scenario_file.exists():
        return None
    rounds = [json.loads(line) for line in rounds_file.read_text().splitlines() if line.strip()]
    if not rounds:
        return None
    scenario = yaml.safe_load(scenario_file.read_text())
    names = list(rounds[0]["selected"])
    bad = {names[h] for a in scenario.get("attacks") or [] for h in a.get("hospitals") or []}
    hit = mal = fp = honest = 0
    for r in rounds:
        flagged = set((r.get("defense") or {}).get("flagged") or [])
        for h in r.get("train") or {}:
            if h in bad:
                mal += 1
                hit += h in flagged
            else:
                honest += 1
                fp += h in flagged
    g = rounds[-1]["global"]
    return {"auroc": g.get("auroc"), "balanced_accuracy": g.get("balanced_accuracy"),
            "hit": hit, "mal": mal, "fp": fp, "honest": honest}


def _ci(values) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "n/a"
    lo, hi = t_interval(vals)
    mean = statistics.fmean(vals)
    return f"{mean:.3f} [{lo:.3f}, {hi:.3f}]" if lo is not None else f"{mean:.3f}"


def main(folders: list[str]) -> int:
    for folder in folders:
        sweep = json.loads((Path(folder) / "sweep.json").read_text())
        groups: dict[tuple, list[dict]] = defaultdict(list)
        for c in sweep["cells"]:
            fig = cell_figures(Path(folder) / "cells" / c["id"])
            if fig is None:
                continue
            key = tuple(f"{k}={v}" for k, v in sorted(c["values"].items()))
            groups[key].append({**fig, "seed": c.get("seed")})
        print(f"\n{folder}")
        print("| cell | seeds | AUROC (95% CI) | balanced accuracy (95% CI) | detected | false positives |")
        print("|---|---|---|---|---|---|")
        for key, cells in groups.items():
            hit, mal = sum(c["hit"] for c in cells), sum(c["mal"] for c in cells)
            fp, honest = sum(c["fp"] for c in cells), sum(c["honest"] for c in cells)
            det = f"{hit}/{mal} = {hit / mal:.2f}" if mal else "-"
            fpr = f"{fp}/{honest} = {fp / honest:.3f}" if honest else "-"
            print(f"| {', '.join(key)} | {len(cells)} | {_ci(c['auroc'] for c in cells)} | "
                  f"{_ci(c['balanced_accuracy'] for c in cells)} | {det} | {fpr} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

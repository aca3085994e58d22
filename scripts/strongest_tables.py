"""The defense x attack table of a strongest-attack sweep (docs/results.md, "Strongest attack
per defense"), from its finished cells:

    fedsec sweep sweeps/cxr_strongest.yaml          # the runs (resumable)
    fedsec report runs/cxr-strongest                # strongest.json, hospitals.md, the risk matrix
    .venv/bin/python scripts/strongest_tables.py runs/cxr-strongest

Prints one Markdown table, a row per defense: the no-attack cell's test AUROC and balanced
accuracy, then every candidate's test effect on the reporting seeds only, paired by seed with
the same rule's no-attack cell (fedsec.analysis.strongest.test_effect: the ASR above the clean
model's floor for backdoors, else the share of the AUROC skill above chance lost), mean [95%
Student-t interval]; bold where the interval excludes 0. The last column is the winner chosen
on the validation split of the selection seeds (strongest.json, written by `fedsec report`).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from fedsec.analysis.strongest import _seed_cells, test_effect
from fedsec.analysis.tables import collect_rows, load_sweep, t_interval


def cell_text(values: list[float], digits: int = 3) -> str:
    if not values:
        return "-"
    m = statistics.fmean(values)
    low, high = t_interval(values)
    if low is None:
        return f"{m:+.{digits}f} (n = {len(values)})"
    text = f"{m:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"
    return f"**{text}**" if not (low <= 0.0 <= high) else text


def plain_text(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    low, high = t_interval(values)
    m = statistics.fmean(values)
    return f"{m:.3f}" if low is None else f"{m:.3f} [{low:.3f}, {high:.3f}]"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep_dir")
    ap.add_argument("--metric", default="auroc")
    args = ap.parse_args(argv)
    sweep = Path(args.sweep_dir)
    meta = load_sweep(sweep)
    spec = meta["strongest"]
    akey, dkey, null = spec["attacks"], spec["defenses"], spec["no_attack"]
    report_seeds = spec.get("report_seeds")
    grid = meta["grid"]
    attacks = [str(a) for a in grid[akey] if str(a) != null]
    defenses = [str(d) for d in grid[dkey]]
    rows, _ = collect_rows(sweep)
    cells = _seed_cells(rows, akey, dkey)
    best = {}
    if (sweep / "strongest.json").exists():
        best = json.loads((sweep / "strongest.json").read_text()).get("by_defense", {})
    print(f"| defense | no attack: {args.metric} | balanced accuracy | " + " | ".join(f"`{a}`" for a in attacks)
          + " | strongest (validation) |")
    print("|---|---|---|" + "---|" * len(attacks) + "---|")
    for d in defenses:
        clean = cells.get((d, null), {})
        seeds = [s for s in clean if report_seeds is None or s in report_seeds]
        out = [plain_text([clean[s].get(args.metric) for s in seeds]),
               plain_text([clean[s].get("balanced_accuracy") for s in seeds])]
        for a in attacks:
            mine = cells.get((d, a), {})
            effects = []
            for s in sorted(set(mine) & set(seeds), key=str):
                e = test_effect(mine[s], clean[s], args.metric)
                if e is not None:
                    effects.append(e)
            out.append(cell_text(effects))
        w = (best.get(d) or {}).get("winner")
        out.append(f"`{w}`" if w else "-")
        print(f"| {d} | " + " | ".join(out) + " |")
    print(f"\nReporting seeds: {', '.join(str(s) for s in report_seeds) if report_seeds else 'all'}; "
          f"cells from {sweep}.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The drift table of docs/results.md ("Close to Baruch et al."): from a sweep's cells, the
round records' ``drift`` (the rule's aggregate minus the benign mean, projected on ALIE's
direction -std of the benign updates; fedsec.strategies.drift).

    fedsec sweep sweeps/integrity_cxr_baruch.yaml --seeds 0-2
    .venv/bin/python scripts/drift_table.py runs/integrity-cxr-baruch

Prints one markdown row per grid cell (seeds pooled): ``drift.cumulative`` at mid-run and at
the last round (parameter units), the per-round shift in benign-std units (``std_units``,
averaged over the rounds; ALIE's own update scores z), its cosine with -std, and the final
AUROC; mean and 95% t interval over the completed seeds.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fedsec.analysis.tables import t_interval  # noqa: E402


def cells(sweep: Path) -> dict[str, list[list[dict]]]:
    """cell label (without the seed) -> the round records of each completed seed."""
    out: dict[str, list[list[dict]]] = {}
    for cell in sorted((sweep / "cells").iterdir()):
        summary = cell / "summary.json"
        if not summary.is_file() or json.loads(summary.read_text()).get("status") != "completed":
            continue
        records = [json.loads(line) for line in (cell / "rounds.jsonl").read_text().splitlines() if line]
        if records and "drift" in records[0]:
            out.setdefault(cell.name.rsplit(",seed=", 1)[0], []).append(records)
    return out


def fmt(values: list[float]) -> str:
    lo, hi = t_interval(values)
    mean = statistics.fmean(values)
    return f"{mean:.3f}" if lo is None else f"{mean:.3f} [{lo:.3f}, {hi:.3f}]"


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not (Path(argv[0]) / "cells").is_dir():
        print("usage: drift_table.py SWEEP_DIR (a folder with cells/)", file=sys.stderr)
        return 2
    print("| cell | seeds | cumulative, mid-run | cumulative, last round | per round, std units | cosine with -std | final AUROC |")
    print("|---|---|---|---|---|---|---|")
    for name, runs in cells(Path(argv[0])).items():
        mid = [r[len(r) // 2 - 1]["drift"]["cumulative"] for r in runs]
        last = [r[-1]["drift"]["cumulative"] for r in runs]
        units = [statistics.fmean(x["drift"]["std_units"] for x in r) for r in runs]
        cosine = [statistics.fmean(x["drift"]["cosine"] for x in r) for r in runs]
        auroc = [r[-1]["global"]["auroc"] for r in runs]
        print(f"| {name} | {len(runs)} | {fmt(mid)} | {fmt(last)} | {fmt(units)} | {fmt(cosine)} | {fmt(auroc)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

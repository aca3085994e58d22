"""The privacy tables of docs/results.md from a finished sweep folder (sweeps/privacy_*.yaml):

    fedsec sweep sweeps/privacy_heart.yaml              # the runs (resumable)
    .venv/bin/python scripts/privacy_tables.py runs/privacy-heart

Prints Markdown tables, one row per privacy defense, mean [95% Student-t interval] over the
seeds (each cell's own null is paired with it by construction: same seed, same records):
1. utility and membership inference (cells without a ``probe`` axis, or ``probe=utility``):
   final AUROC and accuracy on the union of the test sets; the loss-threshold attack's mean
   AUROC over hospitals, its null (the same attack on the untrained model), the effect
   (value - null) and TPR at 1% FPR with its effect (then a second table: the label-stratified
   AUROC and the TPR at 0.1% FPR, each with its null); the largest record-level epsilon of any
   hospital (DP-SGD) or the hospital-level epsilon (central DP), and its delta;
2. inversion (``probe=inversion``, or a sweep of an inversion scenario): the attack's metric
   against its null (the population-mean reconstruction): PSNR / SSIM for images, mean
   absolute error (standardised units; lower = more leakage) and the share of records
   recovered for tabular data.
Everything is read from the cells' summary.json (attack.stats, privacy).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from integrity_tables import finished_cells, fmt  # noqa: E402


def _stat(rows: list[dict], metric: str, field: str) -> list[float]:
    out = []
    for r in rows:
        st = ((r["summary"].get("attack") or {}).get("stats") or {}).get(metric) or {}
        if st.get(field) is not None:
            out.append(float(st[field]))
    return out


def _epsilon(rows: list[dict]) -> str:
    dp = [(r["summary"].get("privacy") or {}).get("dp_sgd") for r in rows]
    eps = [d["epsilon_max"] for d in dp if d and d.get("epsilon_max") is not None]
    if eps:
        deltas = sorted({led.get("delta") for d in dp if d for led in (d.get("ledger") or {}).values()})
        # hospitals differ by a record or two, so their deltas agree to two figures: print each once
        where = ", ".join(dict.fromkeys(f"{x:.2g}" for x in deltas if x is not None))
        return f"{fmt(eps, digits=2)} (record, delta {where})"
    cdp = [(r["summary"].get("privacy") or {}).get("central_dp") for r in rows]
    eps = [d.get("epsilon") for d in cdp if d and d.get("epsilon") is not None]
    if eps:
        return f"{fmt(eps, digits=2)} (hospital)"
    return "-"


def utility_table(rows: list[dict], defenses: list[str]) -> None:
    print("| defense | AUROC | accuracy | MIA AUROC | null (untrained) | effect | TPR @ 1% FPR (effect) "
          "| epsilon |")
    print("|---|---|---|---|---|---|---|---|")
    for d in defenses:
        sel = [r for r in rows if r["values"]["defense"] == d]
        final = [r["summary"]["final"] for r in sel]
        print(f"| {d} | {fmt([f['auroc'] for f in final])} | {fmt([f['accuracy'] for f in final])} | "
              f"{fmt(_stat(sel, 'auroc_mean', 'value'))} | {fmt(_stat(sel, 'auroc_mean', 'null'))} | "
              f"{fmt(_stat(sel, 'auroc_mean', 'effect'), True)} | "
              f"{fmt(_stat(sel, 'tpr_at_1pct_fpr', 'value'))} ({fmt(_stat(sel, 'tpr_at_1pct_fpr', 'effect'), True)}) | "
              f"{_epsilon(sel)} |")


def membership_detail_table(rows: list[dict], defenses: list[str]) -> None:
    """The label-stratified AUROC (members and non-members compared within each label) and the
    TPR at 0.1% FPR, each against the untrained model's value."""
    print("| defense | label-stratified MIA AUROC | null | effect | TPR @ 0.1% FPR | null | effect |")
    print("|---|---|---|---|---|---|---|")
    for d in defenses:
        sel = [r for r in rows if r["values"]["defense"] == d]
        parts = [fmt(_stat(sel, m, f), f == "effect")
                 for m in ("auroc_stratified_mean", "tpr_at_0.1pct_fpr") for f in ("value", "null", "effect")]
        print(f"| {d} | " + " | ".join(parts) + " |")


def inversion_table(rows: list[dict], defenses: list[str]) -> None:
    metrics = [m for m in ("psnr", "ssim", "mean_abs_error", "records_recovered")
               if any(_stat([r], m, "value") for r in rows)]
    if not metrics:
        print("(no inversion statistics with a null in these cells)")
        return
    print("| defense | " + " | ".join(f"{m} | null | effect" for m in metrics) + " |")
    print("|---|" + "---|---|---|" * len(metrics))
    for d in defenses:
        sel = [r for r in rows if r["values"]["defense"] == d]
        parts = []
        for m in metrics:
            parts += [fmt(_stat(sel, m, "value")), fmt(_stat(sel, m, "null")), fmt(_stat(sel, m, "effect"), True)]
        print(f"| {d} | " + " | ".join(parts) + " |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("sweep", help="a sweep folder of sweeps/privacy_*.yaml")
    rows = finished_cells(Path(ap.parse_args().sweep))
    defenses = list(dict.fromkeys(r["values"]["defense"] for r in rows))
    seeds = sorted({r["seed"] for r in rows})
    probe = {r["values"].get("probe") for r in rows}
    print(f"Seeds {seeds}; mean [95% t interval over seeds]\n")
    utility = [r for r in rows if r["values"].get("probe") in (None, "utility")
               and "auroc_mean" in ((r["summary"].get("attack") or {}).get("stats") or {})]
    inversion = [r for r in rows if r["values"].get("probe") == "inversion"
                 or (probe == {None} and r not in utility)]
    if utility:
        print("Utility and membership inference\n")
        utility_table(utility, defenses)
        if any(_stat([r], "auroc_stratified_mean", "value") for r in utility):
            print("\nMembership inference, label-stratified and at 0.1% FPR\n")
            membership_detail_table(utility, defenses)
    if inversion:
        print("\nInversion (null: the population-mean reconstruction)\n")
        inversion_table(inversion, defenses)


if __name__ == "__main__":
    main()

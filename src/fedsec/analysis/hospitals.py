"""Harm per hospital: the worst-off and the smallest benign hospital, against the no-attack cell.

A sweep's global metric can hide a hospital the attack (or the defense) hurts: the union of
the test sets is dominated by the large hospitals, and a robust rule that ignores sample
counts can silence a small one (Switzerland holds 30 of heart-disease's training records).
From the per-hospital final metrics every run records (``summary.json`` -> ``per_hospital``),
per table cell (attack x defense) and seed:

- **worst hospital**: the lowest metric among the benign hospitals (the attack's own
  hospitals are left out);
- **smallest hospital**: the metric of the benign hospital with the fewest training records;

each as a mean with a Student-t 95% interval over seeds and as a paired difference (same
seed) against the no-attack cell of the same defense; for the no-attack row the paired
difference is against FedAvg without attack (what the defense itself costs that hospital).

The default metric is accuracy: AUROC is undefined for a hospital whose test records are all
of one class (Switzerland's are). Written as ``hospitals.md`` / ``hospitals.csv`` with the
sweep's tables.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from fedsec.analysis.runs import NO_ATTACK, REFERENCE_DEFENSE
from fedsec.analysis.tables import (
    FINISHED,
    _mean_std,
    default_axes,
    paired_difference,
    t_interval,
)

HOSPITAL_METRIC = "accuracy"
_SIZES: dict = {}


def _scenario(row: dict) -> dict:
    from fedsec.analysis.matrix import _scenario_of

    return _scenario_of(row)


def malicious_names(row: dict, names: list[str]) -> set[str]:
    block = (row.get("_summary") or {}).get("hospitals")
    if isinstance(block, dict) and block:  # summary.json names them (attackers by fraction too)
        return {h for h, v in block.items() if isinstance(v, dict) and v.get("malicious")}
    ids = {int(h) for a in _scenario(row).get("attacks") or [] for h in (a.get("hospitals") or [])}
    return {names[i] for i in ids if i < len(names)}


def hospital_sizes(row: dict) -> dict[str, int]:
    """Training records per hospital name, from the run's summary (``hospitals``, or an older
    ``hospital_sizes``) when it
    has them, else from its task built from its scenario.yaml (cached per task)."""
    summary = row.get("_summary") or {}
    block = summary.get("hospitals")
    if isinstance(block, dict) and block and all(isinstance(v, dict) and v.get("train_n") is not None
                                                 for v in block.values()):
        return {str(k): int(v["train_n"]) for k, v in block.items()}
    if isinstance(summary.get("hospital_sizes"), dict):
        return {str(k): int(v) for k, v in summary["hospital_sizes"].items()}
    sc = _scenario(row)
    key = repr((sc.get("task"), (sc.get("federation") or {}).get("sites"),
                (sc.get("federation") or {}).get("partition"), (sc.get("federation") or {}).get("hospitals"),
                sc.get("seed")))
    if key not in _SIZES:
        import copy

        from fedsec.scenario import load_scenario
        from fedsec.tasks import build_task

        s = copy.deepcopy(sc)
        if isinstance(s.get("engine"), dict):
            s["engine"]["address"] = None
        data = build_task(load_scenario(s)).data
        _SIZES[key] = {name: len(tr) for name, tr in zip(data.hospitals, data.train)}
    return _SIZES[key]


def hospital_numbers(row: dict, metric: str = HOSPITAL_METRIC, exclude: set | None = None) -> dict | None:
    """``{"worst": (name, value), "smallest": (name, value)}`` over the benign hospitals of one
    completed run (None when it recorded no per-hospital metric). ``exclude``: hospital names
    left out as well (a reference cell is read over the attacked cell's benign hospitals)."""
    per = (row.get("_summary") or {}).get("per_hospital") or {}
    if not per:
        return None
    try:
        sizes = hospital_sizes(row)
    except Exception:  # noqa: BLE001 - the task's data cannot be built here: no "smallest"
        sizes = {}
    names = list(sizes) if sizes else list(per)
    bad = malicious_names(row, names) | set(exclude or ())
    benign = {h: m.get(metric) for h, m in per.items() if h not in bad and isinstance(m, dict)}
    valued = {h: v for h, v in benign.items() if v is not None}
    if not valued:
        return None
    worst = min(valued, key=lambda h: (valued[h], h))
    smallest = min(benign, key=lambda h: (sizes.get(h, float("inf")), h)) if sizes else None
    return {"worst": (worst, valued[worst]),
            "smallest": (smallest, benign[smallest]) if smallest is not None else ("?", None)}


def _benign_of(row: dict, metric: str) -> set[str]:
    """Names of the benign hospitals of a run (its attack's hospitals left out)."""
    per = (row.get("_summary") or {}).get("per_hospital") or {}
    try:
        names = list(hospital_sizes(row)) or list(per)
    except Exception:  # noqa: BLE001
        names = list(per)
    return set(per) - malicious_names(row, names)


def _is_none(v) -> bool:
    return v is None or str(v).strip().lower() in NO_ATTACK


def harm_table(rows: list[dict], keys: list[str], row_key: str | None, col_key: str | None,
               metric: str = HOSPITAL_METRIC) -> list[dict]:
    """One dict per table cell: worst / smallest benign hospital, mean and 95% interval over
    seeds, and the paired difference against the reference cell (see the module docstring)."""
    by_seed: dict[tuple, dict] = {}
    order: list[tuple] = []
    for r in rows:
        g = (r.get(row_key) if row_key else None, r.get(col_key) if col_key else None)
        if g not in by_seed:
            by_seed[g] = {}
            order.append(g)
        if r["status"] == FINISHED:
            by_seed[g][r.get("seed")] = r
    null = next((g[0] for g in order if _is_none(g[0])), None) if row_key else None
    out = []
    for g in order:
        mine, excluded = {}, {}
        for seed, r in by_seed[g].items():
            h = hospital_numbers(r, metric)
            if h is not None:
                mine[seed] = h
                excluded[seed] = {h for h in r["_summary"]["per_hospital"] if h not in
                                  _benign_of(r, metric)}
        if null is not None and g[0] != null:
            ref_rows, against = by_seed.get((null, g[1]), {}), "no attack, same defense"
        elif null is not None and col_key and g[1] != REFERENCE_DEFENSE and (null, REFERENCE_DEFENSE) in by_seed:
            ref_rows, against = by_seed[(null, REFERENCE_DEFENSE)], "FedAvg without attack"
        else:
            ref_rows, against = {}, None
        # the reference over the same benign hospitals as this cell (the attack's own left out)
        ref = {s: h for s in mine if s in ref_rows
               for h in [hospital_numbers(ref_rows[s], metric, exclude=excluded[s])] if h is not None}
        entry = {"row": g[0], "col": g[1], "metric": metric, "n": len(mine), "against": against}
        for which in ("worst", "smallest"):
            vals = [mine[s][which][1] for s in mine]
            mean, _std, _n = _mean_std(vals)
            low, high = t_interval(vals)
            hosp = sorted({mine[s][which][0] for s in mine})
            seeds = sorted(set(mine) & set(ref), key=str)
            diff = paired_difference([(mine[s][which][1], ref[s][which][1]) for s in seeds]) if against else None
            entry[which] = {"hospitals": hosp, "mean": mean, "low": low, "high": high, "diff": diff}
        out.append(entry)
    return out


def _f(v, d=3):
    return "" if v is None else f"{v:.{d}f}"


def _ci(x: dict) -> str:
    if x["mean"] is None:
        return "-"
    return f"{x['mean']:.3f}" + (f" [{x['low']:.3f}, {x['high']:.3f}]" if x["low"] is not None else "")


def _d(d: dict | None) -> str:
    if not d:
        return "-"
    if d["low"] is None:
        return f"{d['mean']:+.3f} (one seed)"
    text = f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"
    return text if d["detectable"] else f"{text} (n.s.)"


def harm_markdown(table: list[dict], row_key, col_key, metric: str) -> str:
    lines = ["# Harm per hospital", "",
             f"Final **{metric}** of the benign hospitals on their own test records (the attack's hospitals left "
             "out): the worst-off hospital and the hospital with the fewest training records, mean [95% t "
             "interval] over seeds, and the paired difference (same seed) against the no-attack cell of the same "
             "defense — for the no-attack row, against FedAvg without attack. n.s.: the interval includes 0.", "",
             f"| {row_key or 'row'} | {col_key or 'col'} | seeds | worst hospital | worst {metric} | Δ worst | "
             f"smallest hospital | smallest {metric} | Δ smallest | Δ against |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for e in table:
        w, s = e["worst"], e["smallest"]
        lines.append(f"| {e['row']} | {e['col']} | {e['n']} | {', '.join(w['hospitals'])} | {_ci(w)} | {_d(w['diff'])} "
                     f"| {', '.join(s['hospitals'])} | {_ci(s)} | {_d(s['diff'])} | {e['against'] or '-'} |")
    return "\n".join(lines) + "\n"


def write_harm_tables(sweep_dir, rows: list[dict], keys: list[str], row_key=None, col_key=None,
                      metric: str = HOSPITAL_METRIC) -> dict:
    from fedsec.results import atomic_write

    sweep_dir = Path(sweep_dir)
    row_key, col_key = default_axes(keys, row_key, col_key)
    table = harm_table(rows, keys, row_key, col_key, metric)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([row_key or "row", col_key or "col", "metric", "n", "against",
                *[f"{which}_{k}" for which in ("worst", "smallest")
                  for k in ("hospitals", "mean", "low", "high", "diff", "diff_low", "diff_high")]])
    for e in table:
        cells = []
        for which in ("worst", "smallest"):
            x, d = e[which], e[which]["diff"] or {}
            cells += [";".join(x["hospitals"]), _f(x["mean"], 6), _f(x["low"], 6), _f(x["high"], 6),
                      _f(d.get("mean"), 6), _f(d.get("low"), 6), _f(d.get("high"), 6)]
        w.writerow([e["row"], e["col"], metric, e["n"], e["against"] or "", *cells])
    atomic_write(sweep_dir / "hospitals.csv", buf.getvalue())
    atomic_write(sweep_dir / "hospitals.md", harm_markdown(table, row_key, col_key, metric))
    return {"hospitals_csv": sweep_dir / "hospitals.csv", "hospitals_md": sweep_dir / "hospitals.md"}

"""A sweep's tables: one row per cell (sweep.csv), and per table cell the mean, standard
deviation and 95% confidence interval over seeds, with paired differences against the
no-attack cell and the FedAvg cell of the same seed (summary.csv, summary.md).

Confidence intervals over seeds are Student-t intervals of the mean (n - 1 degrees of
freedom): a handful of seeds gives wide intervals, and the tables say "no detectable
difference" whenever a paired difference's interval includes 0.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from pathlib import Path

from fedsec.errors import FedsecError

# The attack's own success measure, first one present wins (backdoor ASR, reconstruction
# PSNR, membership-inference AUROC).
ATTACK_METRICS = ("asr", "psnr", "mia_auroc", "auroc_mean", "records_recovered", "ssim", "label_acc",
                  "advantage_mean")
METRIC_KEYS = ("loss", "accuracy", "auroc", "sensitivity", "specificity", "balanced_accuracy")
TIMING_KEYS = ("wall_s", "startup_s", "rounds_s")
FINISHED = "completed"


def _num(v):
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v) else None


def attack_metric_of(attack: dict) -> tuple[str | None, float | None]:
    """The attack's success measure in a summary's ``attack`` dict: (name, value)."""
    attack = attack or {}
    for name in ATTACK_METRICS:
        if _num(attack.get(name)) is not None:
            return name, float(attack[name])
        vals = [_num(v) for k, v in attack.items() if k.endswith("/" + name) or k.endswith("." + name)]
        vals = [v for v in vals if v is not None]
        if vals:
            return name, float(statistics.fmean(vals))
    return None, None


def load_sweep(sweep_dir) -> dict:
    from fedsec.results import read_json

    sweep_dir = Path(sweep_dir)
    f = sweep_dir / "sweep.json"
    if not f.exists():
        raise FedsecError(f"{sweep_dir}: not a sweep folder (no sweep.json)")
    return read_json(f)


def collect_rows(sweep_dir) -> tuple[list[dict], list[str]]:
    """One dict per cell from its summary.json: grid values, seed, status, metrics, timing.
    Returns (rows, grid keys)."""
    from fedsec.results import read_json

    sweep_dir = Path(sweep_dir)
    meta = load_sweep(sweep_dir)
    keys = list(meta.get("grid", {}))
    rows = []
    for c in meta.get("cells", []):
        row: dict = {"cell": c["id"], **{k: c["values"].get(k) for k in keys}, "seed": c.get("seed")}
        f = sweep_dir / c.get("path", f"cells/{c['id']}") / "summary.json"
        summary = None
        if f.exists():
            try:
                summary = read_json(f)
            except (OSError, ValueError):
                summary = None
        status = (summary or {}).get("status") or "missing"
        if status == "running" and meta.get("status") != "running":
            status = "interrupted"
        row["status"] = status
        row["error"] = ((summary or {}).get("error") or c.get("error") or "").replace("\n", " ") or None
        if row["seed"] is None and summary:
            row["seed"] = summary.get("seed")
        row["rounds"] = (summary or {}).get("rounds")
        final = (summary or {}).get("final") or {}
        for k in METRIC_KEYS:
            row[k] = _num(final.get(k))
        attack = (summary or {}).get("attack") or {}
        for k, v in attack.items():
            if _num(v) is not None:
                row[f"attack.{k}"] = float(v)
        for k, st in (attack.get("stats") or {}).items():  # each metric's null and effect (fedsec.attacks.nulls)
            for part in ("null", "effect"):
                if _num((st or {}).get(part)) is not None:
                    row[f"attack.{k}.{part}"] = float(st[part])
        name, value = attack_metric_of(attack)
        row["attack_metric"], row["attack_value"] = name, value
        flagged = ((summary or {}).get("defense") or {}).get("flagged")
        row["defense.flagged"] = ";".join(flagged) if isinstance(flagged, list) else None
        timing = (summary or {}).get("timing") or {}
        for k in TIMING_KEYS:
            row[f"timing.{k}"] = _num(timing.get(k))
        row["_summary"] = summary
        row["_dir"] = str(f.parent)
        rows.append(row)
    return rows, keys


def default_axes(keys: list[str], rows: str | None = None, cols: str | None = None) -> tuple[str | None, str | None]:
    """rows = attack axis, cols = defense axis: the ``attacks`` / ``strategy`` grid keys when
    present, else the first two grid keys."""
    rest = [k for k in keys if k not in (rows, cols)]
    if rows is None:
        rows = "attacks" if "attacks" in keys and cols != "attacks" else (rest.pop(0) if rest else None)
        rest = [k for k in rest if k != rows]
    if cols is None:
        cols = "strategy" if "strategy" in keys and rows != "strategy" else (rest.pop(0) if rest else None)
    return rows, cols


def t_interval(values: list[float], level: float = 0.95) -> tuple[float | None, float | None]:
    """Student-t confidence interval of the mean of ``values`` (None below two values)."""
    vals = [v for v in values if v is not None]
    if len(vals) < 2:
        return None, None
    from scipy.stats import t

    mean, sd = statistics.fmean(vals), statistics.stdev(vals)
    half = float(t.ppf(0.5 + level / 2, len(vals) - 1)) * sd / math.sqrt(len(vals))
    return mean - half, mean + half


def paired_difference(pairs: list[tuple[float, float]]) -> dict | None:
    """Mean of ``a - b`` over seed-matched pairs, its 95% t interval, and whether the
    interval excludes 0 (``detectable``)."""
    diffs = [a - b for a, b in pairs if a is not None and b is not None]
    if not diffs:
        return None
    low, high = t_interval(diffs)
    detectable = None if low is None else not (low <= 0.0 <= high)
    return {"mean": statistics.fmean(diffs), "low": low, "high": high, "n": len(diffs), "detectable": detectable}


def _mean_std(values: list[float]) -> tuple[float | None, float | None, int]:
    """Mean and sample standard deviation (n - 1); std is None below two values."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None, 0
    mean = statistics.fmean(vals)
    std = statistics.stdev(vals) if len(vals) > 1 else None
    return mean, std, len(vals)


def aggregate(rows: list[dict], keys: list[str], row_key: str | None, col_key: str | None,
              metric: str = "auroc") -> list[dict]:
    """Mean / std over seeds per table cell. Grid keys other than rows / cols stay part of
    the row (each combination is its own row). Only completed cells count."""
    extra = [k for k in keys if k not in (row_key, col_key) and k != "seed"]
    groups: dict[tuple, list[dict]] = {}
    order: list[tuple] = []
    for r in rows:
        g = (tuple(r.get(k) for k in extra), r.get(row_key) if row_key else None, r.get(col_key) if col_key else None)
        if g not in groups:
            groups[g] = []
            order.append(g)
        groups[g].append(r)
    def by_seed(group: tuple) -> dict:
        return {r.get("seed"): r for r in groups.get(group, []) if r["status"] == FINISHED}

    no_attack = next((g[1] for g in order if _no_attack(g[1])), None) if row_key == "attacks" else None
    reference = REFERENCE_DEFENSE if col_key == "strategy" and any(g[2] == REFERENCE_DEFENSE for g in order) else None
    out = []
    for g in order:
        members = groups[g]
        ok = [r for r in members if r["status"] == FINISHED]
        mean, std, n = _mean_std([r.get(metric) for r in ok])
        low, high = t_interval([r.get(metric) for r in ok])
        names = [r["attack_metric"] for r in ok if r.get("attack_metric")]
        aname = names[0] if names else None
        avals = [r.get("attack_value") for r in ok if r.get("attack_metric") == aname]
        amean, astd, an = _mean_std(avals)
        alow, ahigh = t_interval(avals)
        mine = by_seed(g)
        # paired by seed: the utility the attack costs (no-attack cell minus this one, same
        # defense and seed), and the attack metric above its no-attack floor
        vs_clean = vs_clean_attack = vs_reference = None
        if no_attack is not None and g[1] != no_attack:
            clean = by_seed((g[0], no_attack, g[2]))
            seeds = sorted(set(mine) & set(clean), key=str)
            vs_clean = paired_difference([(clean[s].get(metric), mine[s].get(metric)) for s in seeds])
            if aname:
                vs_clean_attack = paired_difference(
                    [(mine[s].get("attack_value"), _attack_value(clean[s], aname)) for s in seeds])
        if reference is not None and g[2] != reference:
            ref = by_seed((g[0], g[1], reference))
            seeds = sorted(set(mine) & set(ref), key=str)
            vs_reference = paired_difference([(mine[s].get(metric), ref[s].get(metric)) for s in seeds])
        out.append({
            **{k: v for k, v in zip(extra, g[0])},
            "row": g[1], "col": g[2], "metric": metric, "mean": mean, "std": std, "n": n,
            "ci_low": low, "ci_high": high,
            "attack_metric": aname, "attack_mean": amean, "attack_std": astd, "attack_n": an,
            "attack_ci_low": alow, "attack_ci_high": ahigh,
            "cost_of_attack": vs_clean, "attack_over_null": vs_clean_attack, "vs_fedavg": vs_reference,
            "cells": len(members), "not_completed": len(members) - len(ok),
        })
    return out


REFERENCE_DEFENSE = "fedavg"
_NO_ATTACK = {"none", "null", "", "[]", "~"}


def _no_attack(value) -> bool:
    return value is None or str(value).strip().lower() in _NO_ATTACK


def _attack_value(row: dict, name: str) -> float | None:
    """The attack metric ``name`` in a (no-attack) cell: the null of that metric, when the
    run recorded it (e.g. the backdoor's trigger evaluated on a clean model)."""
    v = row.get(f"attack.{name}")
    return v if v is not None else (row.get("attack_value") if row.get("attack_metric") == name else None)


def _f(v, digits=3) -> str:
    return "" if v is None else f"{v:.{digits}f}"


def write_tables(sweep_dir, rows: str | None = None, cols: str | None = None, metric: str | None = None) -> dict:
    """sweep.csv, summary.csv and summary.md in the sweep folder. Returns their paths."""
    from fedsec.results import atomic_write

    sweep_dir = Path(sweep_dir)
    meta = load_sweep(sweep_dir)
    opts = meta.get("table") or {}
    rows = rows or opts.get("rows")
    cols = cols or opts.get("cols")
    metric = metric or opts.get("metric") or "auroc"
    if metric not in METRIC_KEYS:
        raise FedsecError(f"--metric '{metric}': one of {', '.join(METRIC_KEYS)}")
    data, keys = collect_rows(sweep_dir)
    row_key, col_key = default_axes(keys, rows, cols)

    # sweep.csv: one row per cell and seed
    attack_cols = sorted({k for r in data for k in r if k.startswith("attack.")})
    header = (["cell", *keys, "seed", "status", "error", "rounds", *METRIC_KEYS, "attack_metric", "attack_value",
               *attack_cols, "defense.flagged", *[f"timing.{k}" for k in TIMING_KEYS]])
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in data:
        w.writerow(["" if r.get(h) is None else (f"{r[h]:.6g}" if isinstance(r.get(h), float) else r[h])
                    for h in header])
    atomic_write(sweep_dir / "sweep.csv", buf.getvalue())

    # summary.csv: long format, one line per table cell
    agg = aggregate(data, keys, row_key, col_key, metric)
    extra = [k for k in keys if k not in (row_key, col_key) and k != "seed"]
    sheader = [*extra, row_key or "row", col_key or "col", "metric", "mean", "std", "n", "ci_low", "ci_high",
               "attack_metric", "attack_mean", "attack_std", "attack_n", "attack_ci_low", "attack_ci_high",
               "cost_of_attack", "cost_of_attack_low", "cost_of_attack_high",
               "attack_over_null", "attack_over_null_low", "attack_over_null_high",
               "vs_fedavg", "vs_fedavg_low", "vs_fedavg_high", "cells", "not_completed"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(sheader)

    def diff(d):
        return [_f(d["mean"], 6), _f(d["low"], 6), _f(d["high"], 6)] if d else ["", "", ""]

    for a in agg:
        w.writerow([*(a[k] for k in extra), a["row"], a["col"], a["metric"], _f(a["mean"], 6), _f(a["std"], 6), a["n"],
                    _f(a["ci_low"], 6), _f(a["ci_high"], 6),
                    a["attack_metric"] or "", _f(a["attack_mean"], 6), _f(a["attack_std"], 6), a["attack_n"],
                    _f(a["attack_ci_low"], 6), _f(a["attack_ci_high"], 6),
                    *diff(a["cost_of_attack"]), *diff(a["attack_over_null"]), *diff(a["vs_fedavg"]),
                    a["cells"], a["not_completed"]])
    atomic_write(sweep_dir / "summary.csv", buf.getvalue())

    atomic_write(sweep_dir / "summary.md", summary_markdown(meta, agg, extra, row_key, col_key, metric, data))
    paths = {"sweep_csv": sweep_dir / "sweep.csv", "summary_csv": sweep_dir / "summary.csv",
             "summary_md": sweep_dir / "summary.md"}
    # The extra tables must never cost the sweep its main ones: a failure is written in their place.
    from fedsec.analysis.hospitals import write_harm_tables

    try:
        paths.update(write_harm_tables(sweep_dir, data, keys, row_key, col_key))
    except Exception as err:  # noqa: BLE001 - e.g. a task whose data cannot be loaded here
        atomic_write(sweep_dir / "hospitals.md", f"# Harm per hospital\n\nnot computed: {type(err).__name__}: {err}\n")
    if meta.get("strongest"):
        from fedsec.analysis.strongest import write_strongest

        try:
            paths.update(write_strongest(sweep_dir, metric))
        except Exception as err:  # noqa: BLE001 - e.g. a cell without checkpoint.pt
            atomic_write(sweep_dir / "strongest.md",
                         f"# Strongest attack per defense\n\nnot computed: {type(err).__name__}: {err}\n")
            paths["strongest_md"] = sweep_dir / "strongest.md"
    return paths


def format_cell(a: dict | None) -> str:
    """``0.812 ± 0.013 · asr 0.97 ± 0.02`` (n < seeds and failures noted)."""
    if a is None:
        return ""
    if a["n"] == 0:
        return f"not completed ({a['not_completed']}/{a['cells']})"
    text = _f(a["mean"]) + (f" ± {_f(a['std'])}" if a["std"] is not None else "")
    if a["attack_metric"] and a["attack_mean"] is not None:
        text += f" · {a['attack_metric']} {_f(a['attack_mean'], 2)}"
        text += f" ± {_f(a['attack_std'], 2)}" if a["attack_std"] is not None else ""
    if a["not_completed"]:
        text += f" ({a['not_completed']} of {a['cells']} not completed)"
    return text


def describe_difference(d: dict | None, what: str, digits: int = 3) -> str:
    """``-0.052 [-0.081, -0.023]`` or ``no detectable difference (+0.004 [-0.010, 0.018])``."""
    if not d:
        return ""
    if d["low"] is None:
        return f"{what} {d['mean']:+.{digits}f} (one seed: no interval)"
    text = f"{d['mean']:+.{digits}f} [{d['low']:+.{digits}f}, {d['high']:+.{digits}f}]"
    return f"{what} {text}" if d["detectable"] else f"{what}: no detectable difference ({text})"


def uncertainty_markdown(agg: list[dict], extra: list[str], row_key, col_key, metric: str) -> list[str]:
    """The table's 95% intervals and seed-paired differences, one line per table cell."""
    lines = ["## 95% confidence intervals and paired differences", "",
             f"Intervals are Student-t over seeds. Paired differences match cells by seed: the {metric} an attack "
             "costs (no-attack cell minus this cell, same defense), the attack metric above its value in the "
             f"no-attack cell (its null), and the {metric} against FedAvg (same attack). An interval that "
             "includes 0 reads \"no detectable difference\".", ""]
    any_line = False
    for a in agg:
        where = ", ".join([*(f"{k}={a[k]}" for k in extra), *(x for x in (
            f"{row_key}={a['row']}" if row_key else "", f"{col_key}={a['col']}" if col_key else "") if x)])
        parts = []
        if a.get("ci_low") is not None:
            parts.append(f"{metric} {a['mean']:.3f} [{a['ci_low']:.3f}, {a['ci_high']:.3f}] (n = {a['n']})")
        if a.get("attack_ci_low") is not None:
            parts.append(f"{a['attack_metric']} {a['attack_mean']:.2f} [{a['attack_ci_low']:.2f}, "
                         f"{a['attack_ci_high']:.2f}]")
        for key, what in (("cost_of_attack", f"{metric} lost to the attack"),
                          ("attack_over_null", f"{a.get('attack_metric')} above the no-attack null"),
                          ("vs_fedavg", f"{metric} vs FedAvg")):
            text = describe_difference(a.get(key), what)
            if text:
                parts.append(text)
        if parts:
            any_line = True
            lines.append(f"- {where or 'all'}: " + "; ".join(parts))
    return lines + [""] if any_line else []


def summary_markdown(meta: dict, agg: list[dict], extra: list[str], row_key, col_key, metric: str,
                     data: list[dict] | None = None) -> str:
    seeds = meta.get("seeds")
    lines = [f"# Sweep of {meta.get('scenario')}", ""]
    lines.append(f"Cells show the final **{metric}** on the union of the hospitals' test sets, mean ± sample "
                 f"standard deviation over {len(seeds) if seeds else 1} seed(s)"
                 + (f" ({', '.join(map(str, seeds))})" if seeds else "")
                 + ", then the attack's own metric (asr: attack success rate of the backdoor; psnr: "
                   "reconstruction quality in dB; mia_auroc / auroc_mean: membership inference) when it has one.")
    if meta.get("overrides"):
        lines.append(f"Every cell: `{' '.join(meta['overrides'])}`.")
    lines.append("")
    col_values = list(dict.fromkeys(a["col"] for a in agg))
    row_ids = list(dict.fromkeys((tuple(a[k] for k in extra), a["row"]) for a in agg))
    by = {(tuple(a[k] for k in extra), a["row"], a["col"]): a for a in agg}
    corner = f"{row_key} \\ {col_key}" if row_key and col_key else (row_key or "")
    head = [*extra, corner] + [f"{col_key}={c}" if col_key else metric for c in col_values]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join("---" for _ in head) + "|")
    for ex, r in row_ids:
        label = [*map(str, ex), str(r) if row_key else "all"]
        lines.append("| " + " | ".join(label + [format_cell(by.get((ex, r, c))) for c in col_values]) + " |")
    lines.append("")
    lines += uncertainty_markdown(agg, extra, row_key, col_key, metric)
    failures = [r for r in data or [] if r["status"] != FINISHED]
    if failures:
        lines += ["## Cells that did not complete", ""]
        lines += [f"- `{r['cell']}`: {r['status']}" + (f" — {r['error'][:300]}" if r.get("error") else "")
                  for r in failures]
        lines.append("")
    return "\n".join(lines)



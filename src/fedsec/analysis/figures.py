"""Figures: the risk matrix, learning curves, privacy-utility plots (matplotlib, no screen)."""

from __future__ import annotations

import statistics
from pathlib import Path

import yaml

from fedsec.analysis.matrix import (
    RiskMatrix,
    _is_none,
    _mean,
    _metric_name,
)
from fedsec.analysis.runs import RunInfo, _class_info, _num

# --------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "figure.dpi": 100, "pdf.fonttype": 42,
                         "svg.fonttype": "none"})
    return plt


def _save(fig, stem: Path) -> Path:
    """PNG (embedded in the page) and PDF (for papers) side by side."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    png = stem.with_suffix(".png")
    fig.savefig(png, dpi=110, bbox_inches="tight")
    fig.savefig(stem.with_suffix(".pdf"), bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return png


def _success_cmap():
    from matplotlib.colors import LinearSegmentedColormap

    return LinearSegmentedColormap.from_list("success", ["#1a9850", "#fee08b", "#d73027"])


def _cost_cmap():
    from matplotlib.colors import LinearSegmentedColormap

    return LinearSegmentedColormap.from_list("cost", ["#ffffff", "#762a83"])


COST_FULL = 0.10  # a utility drop of 0.10 (e.g. AUROC) is drawn at full cost colour


def _hex(rgba) -> str:
    return "#{:02x}{:02x}{:02x}".format(*(int(round(255 * x)) for x in rgba[:3]))


def plot_risk_matrix(m: RiskMatrix, stem: Path, title: str = "") -> Path:
    from matplotlib.patches import Polygon, Rectangle

    plt = _pyplot()
    layout: list[tuple[str, str]] = []  # ("group", label) | ("attack", name)
    for label, members in m.groups:
        layout.append(("group", label))
        layout += [("attack", a) for a in members]
    heights = [0.45 if k == "group" else 1.0 for k, _ in layout]
    total = sum(heights)
    ncols = len(m.defenses)
    fig, ax = plt.subplots(figsize=(2.4 + 2.1 * ncols, 0.9 + 0.78 * total))
    cmap, ccmap = _success_cmap(), _cost_cmap()
    y = 0.0
    yticks, ylabels = [], []
    for (kind, name), h in zip(layout, heights):
        if kind == "group":
            ax.add_patch(Rectangle((0, y), ncols, h, facecolor="#eaeaf2", edgecolor="white", lw=2))
            ax.text(0.03, y + h / 2, name, ha="left", va="center", fontsize=8, style="italic", color="#333")
            y += h
            continue
        yticks.append(y + 0.5)
        ylabels.append(name)
        for j, d in enumerate(m.defenses):
            c = m.cells[(name, d)]
            colour = "#dddddd" if c.success is None else cmap(c.success)
            ax.add_patch(Rectangle((j, y), 1, 1, facecolor=colour, edgecolor="white", lw=2))
            if c.cost is not None:
                ax.add_patch(Polygon([(j + 1, y), (j + 1, y + 0.38), (j + 0.62, y)], closed=True,
                                     facecolor=ccmap(max(0.0, min(1.0, c.cost / COST_FULL))), edgecolor="#555",
                                     lw=0.5))
            lines = [] if not getattr(c, "winner", None) else [str(c.winner)]
            if c.utility is not None:
                lines.append(f"{_metric_name(m.metric)} {c.utility:.2f}"
                                 + (f"±{c.utility_std:.2f}" if c.utility_std is not None else ""))
            if c.attack_metric and c.attack_value is not None:
                fmt = f"{c.attack_value:.1f}" if c.attack_metric == "psnr" else f"{c.attack_value:.2f}"
                lines.append(f"{c.attack_metric} {fmt}")
            elif c.damage is not None and not _is_none(name):
                lines.append(f"damage {max(c.damage, 0):.0%}")
            if c.n < c.n_cells:
                lines.append(f"{c.n_cells - c.n} failed")
            ax.text(j + 0.5, y + 0.55, "\n".join(lines) or "n/a", ha="center", va="center", fontsize=8)
        y += 1.0
    ax.set_xlim(0, ncols)
    ax.set_ylim(total, 0)
    ax.set_xticks([j + 0.5 for j in range(ncols)])
    ax.set_xticklabels([m.column_title(d).replace(" + ", "\n+ ") for d in m.defenses], rotation=0)
    ax.xaxis.tick_top()
    ax.set_yticks(yticks)
    ax.set_yticklabels(ylabels)
    ax.tick_params(axis="y", pad=4)
    for s in ax.spines.values():
        s.set_visible(False)
    ax.set_xlabel(f"defense ({m.col_key})\ncorner: defense cost = {_metric_name(m.metric)} lost without attack "
                  f"vs FedAvg (white 0, purple >= {COST_FULL:.2f}); grey: not measurable", fontsize=8)
    ax.set_ylabel(f"attack ({m.row_key})")
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    sm = ScalarMappable(norm=Normalize(0, 1), cmap=cmap)
    cb = fig.colorbar(sm, ax=ax, fraction=0.04, pad=0.02)
    cb.set_label("attack success", fontsize=8)
    if title:
        ax.set_title(title, pad=28)
    return _save(fig, stem)


def _metric_series(run: RunInfo, key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in run.rounds:
        v = _num((r.get("global") or {}).get(key))
        if v is not None:
            xs.append(int(r["round"]))
            ys.append(v)
    return xs, ys


def _attack_series(run: RunInfo) -> dict[str, tuple[list[int], list[float]]]:
    from fedsec.analysis.tables import ATTACK_METRICS

    out: dict[str, tuple[list[int], list[float]]] = {}
    for r in run.rounds:
        att = r.get("attack") or {}
        for name in ATTACK_METRICS:
            v = _num(att.get(name))
            if v is not None:
                xs, ys = out.setdefault(name, ([], []))
                xs.append(int(r["round"]))
                ys.append(v)
    return out


def plot_learning_curves(runs: list[RunInfo], metric: str, stem: Path, title: str) -> Path:
    """One figure for one configuration: global metric per run (seed), per-hospital metric
    (mean over the runs), the attack's metric over rounds when recorded; attack rounds shaded."""
    plt = _pyplot()
    attack_series = [_attack_series(r) for r in runs]
    has_attack = any(attack_series)
    n = 3 if has_attack else 2
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 2.8), sharex=True)
    ax_g, ax_h = axes[0], axes[1]
    for run in runs:
        xs, ys = _metric_series(run, metric)
        seed = run.summary.get("seed", run.scenario.get("seed"))
        ax_g.plot(xs, ys, marker="o", ms=3, lw=1.3, label=f"seed {seed}" if len(runs) > 1 else "union of hospitals")
    ax_g.set_title(f"global {_metric_name(metric)}")
    hospitals = list(dict.fromkeys(h for r in runs for rec in r.rounds for h in (rec.get("per_hospital") or {})))
    malicious_names = set()
    for run in runs[:1]:
        names = list((run.rounds[0].get("per_hospital") or {}).keys()) if run.rounds else []
        _, hospital_names = _class_info(run.scenario) if run.scenario else ([], [])
        names = hospital_names or names
        malicious_names = {names[i] for i in run.malicious() if i < len(names)}
    for h in hospitals:
        by_round: dict[int, list[float]] = {}
        for run in runs:
            for rec in run.rounds:
                v = _num(((rec.get("per_hospital") or {}).get(h) or {}).get(metric))
                if v is not None:
                    by_round.setdefault(int(rec["round"]), []).append(v)
        xs = sorted(by_round)
        if not xs:  # e.g. AUROC of a hospital whose test records are all one class: say so, with why
            why = next((((r.summary.get("per_hospital_undefined") or {}).get(h) or {}).get(metric)
                        for r in runs if ((r.summary.get("per_hospital_undefined") or {}).get(h) or {}).get(metric)),
                       None)
            ax_h.plot([], [], ls="none", marker="x", color="#888888",
                      label=f"{h}: undefined" + (f" ({why})" if why else ""))
            continue
        ax_h.plot(xs, [statistics.fmean(by_round[x]) for x in xs], marker=".", lw=1.1,
                  ls="--" if h in malicious_names else "-", label=h + (" (malicious)" if h in malicious_names else ""))
    ax_h.set_title(f"per hospital {_metric_name(metric)}" + (" (mean over seeds)" if len(runs) > 1 else ""))
    if has_attack:
        ax_a = axes[2]
        for run, series in zip(runs, attack_series):
            for name, (xs, ys) in series.items():
                ax_a.plot(xs, ys, marker="o", ms=3, lw=1.2, label=f"{name} seed {run.summary.get('seed')}"
                          if len(runs) > 1 else name)
        ax_a.set_title("attack metric over rounds")
        if any(name in ("asr", "auroc_mean", "ssim", "label_acc") for s in attack_series for name in s):
            ax_a.set_ylim(-0.02, 1.02)
    windows = runs[0].attack_windows() if runs else []
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        for i, (a, b, name) in enumerate(windows):
            ax.axvspan(a - 0.5, b + 0.5, color="#d73027", alpha=0.10, lw=0, label="attack active" if i == 0 else None)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        if handles:
            ax.legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, stem)


def _numeric_leaf(value) -> float | None:
    """A number from a grid value: ``1.0``, ``{noise_multiplier: 1.0}``, ``null`` -> 0."""
    try:
        v = yaml.safe_load(value) if isinstance(value, str) else value
    except yaml.YAMLError:
        return None
    if v is None or v is False:
        return 0.0
    if v is True:
        return 1.0
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, dict):
        for k in ("noise_multiplier", "target_epsilon", "epsilon", "sigma", "noise", "clip", "max_norm"):
            if isinstance(v.get(k), (int, float)):
                return float(v[k])
        for x in v.values():
            if isinstance(x, (int, float)) and not isinstance(x, bool):
                return float(x)
    return None


def _find_epsilon(obj) -> float | None:
    """The largest ``*epsilon*`` number anywhere in a summary (per-hospital epsilons -> worst case)."""
    found = []

    def walk(o, key=""):
        if isinstance(o, dict):
            for k, v in o.items():
                walk(v, f"{key}.{k}")
        elif isinstance(o, list):
            for v in o:
                walk(v, key)
        elif "epsilon" in key.lower() and "target" not in key.lower() and _num(o) is not None:
            found.append(float(o))

    walk(obj)
    return max(found) if found else None


def plot_privacy_utility(rows: list[dict], keys: list[str], metric: str, stem: Path) -> Path | None:
    """Utility and leakage against every privacy.* grid key (and against epsilon when the runs
    report one). None when the sweep varies no privacy setting."""
    pkeys = [k for k in keys if k.startswith("privacy")]
    if not pkeys:
        return None
    plt = _pyplot()
    xs_sets = []
    for k in pkeys:
        xs_sets.append((k, lambda r, k=k: _numeric_leaf(r.get(k))))
    if any(_find_epsilon(r.get("_summary")) is not None for r in rows):
        xs_sets.append(("epsilon (reported)", lambda r: _find_epsilon(r.get("_summary"))))
    fig, axes = plt.subplots(1, len(xs_sets), figsize=(4.2 * len(xs_sets), 3.0), squeeze=False)
    for ax, (label, xfn) in zip(axes[0], xs_sets):
        others = [k for k in keys if k not in pkeys and k != "seed"]
        series: dict[tuple, dict[float, list[dict]]] = {}
        for r in rows:
            if r["status"] != "completed":
                continue
            x = xfn(r)
            if x is None:
                continue
            series.setdefault(tuple(r.get(k) for k in others), {}).setdefault(x, []).append(r)
        ax2 = None
        for group, points in series.items():
            xs = sorted(points)
            name = ", ".join(f"{k}={v}" for k, v in zip(others, group)) or "utility"
            ys = [_mean([r.get(metric) for r in points[x]]) for x in xs]
            ax.plot(xs, ys, marker="o", label=name)
            leak = [_mean([r.get("attack_value") for r in points[x]]) for x in xs]
            if any(v is not None for v in leak):
                ax2 = ax2 or ax.twinx()
                ax2.plot(xs, leak, marker="s", ls="--", label=f"leakage ({points[xs[0]][0].get('attack_metric')})")
        ax.set_xlabel(label)
        ax.set_ylabel(_metric_name(metric))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
        if ax2 is not None:
            ax2.set_ylabel("attack metric (dashed)")
            ax2.legend(fontsize=7, loc="upper right")
    fig.suptitle("privacy vs utility (mean over seeds)", fontsize=10)
    fig.tight_layout()
    return _save(fig, stem)

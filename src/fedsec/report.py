"""``fedsec report RUN_OR_SWEEP_DIR``: figures and one offline HTML page per results folder.

Writes into ``<dir>/report/``:

    index.html                    self-contained (images as base64 data URIs, inline CSS, no JS)
    risk_matrix.png / .pdf        attacks x defenses, colour = attack success, corner = defense cost
    curves_<run>.png / .pdf       learning curves (global + per hospital), attack rounds shaded,
                                  the attack's metric (ASR, PSNR, ...) over rounds when recorded
    privacy_utility.png / .pdf    utility / leakage vs privacy settings (only when a sweep varies privacy.*)

plus, in a sweep folder, fresh ``sweep.csv`` / ``summary.csv`` / ``summary.md`` (see
:mod:`fedsec.sweep`). Reconstructions an inversion attack wrote under ``figures/`` are shown
next to their originals as they are.

The risk matrix reads a sweep whose grid varies ``attacks`` (rows) and ``strategy``
(columns) — or the keys given with --rows / --cols. For each cell:

- attack success (the colour): the backdoor's attack success rate (asr); for privacy attacks the
  leakage scaled to [0, 1] (membership AUROC 0.5 -> 0, 1 -> 1; PSNR 10 dB -> 0, 30 dB -> 1;
  share of records recovered); for attacks without a metric of their own (label flipping,
  Byzantine updates) the share of the model's skill above chance that the attack destroys,
  (utility without attack - utility under attack) / (utility without attack - chance), which
  needs the no-attack row (``attacks=none``).
- defense cost (the corner): how much utility the defense gives up without an attack, the
  no-attack row's utility under FedAvg minus under the defense (needs ``attacks=none`` and a
  ``fedavg`` column).
- a one-line reading generated from these numbers, the number of malicious hospitals, the
  task's domain and class names.

``python -m fedsec.report --threat-map [FILE]`` writes the taxonomy coverage table
(docs/threat-model.md) from the attack and strategy presets.
"""

from __future__ import annotations

import argparse
import base64
import copy
import html
import math
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fedsec.errors import FedsecError

NO_ATTACK = {"none", "null", "", "[]", "~"}
REFERENCE_DEFENSE = "fedavg"
CHANCE = {"auroc": 0.5, "balanced_accuracy": 0.5, "accuracy": 0.5, "sensitivity": 0.0, "specificity": 0.0}
# Display names, verbs, class names and modalities come from the components' declarations
# (fedsec.registry): this module keeps no list of component names.


def _rule_cls(name):
    from fedsec.registry import RULES

    return RULES.get(name) if name in RULES else None


def _attack_cls(name):
    from fedsec.registry import ATTACKS

    return ATTACKS.get(name) if name in ATTACKS else None


def _task_spec(name):
    from fedsec.registry import TASKS

    return TASKS.get(name).spec if name in TASKS else None


ADVERSARY_NOUNS = {"curious_server": "a curious server", "external": "an outside attacker",
                   "vendor": "a compromised third-party vendor", "patient": "a malicious patient",
                   "clinician": "a malicious clinician"}


# --------------------------------------------------------------------------------------
# Reading results folders
# --------------------------------------------------------------------------------------


def _read_json(path: Path):
    import json

    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _num(v):
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v) else None


@dataclass
class RunInfo:
    """One run folder: scenario, round records, summary, figures written by attacks."""

    path: Path
    label: str
    scenario: dict
    rounds: list[dict]
    summary: dict
    figures: list[Path] = field(default_factory=list)

    @classmethod
    def load(cls, path, label: str | None = None) -> "RunInfo":
        path = Path(path)
        try:
            scenario = yaml.safe_load((path / "scenario.yaml").read_text()) or {}
        except (OSError, yaml.YAMLError):
            scenario = {}
        rounds = []
        try:
            import json

            for line in (path / "rounds.jsonl").read_text().splitlines():
                try:
                    rounds.append(json.loads(line))
                except ValueError:
                    break
        except OSError:
            pass
        summary = _read_json(path / "summary.json") or {}
        figures = sorted((path / "figures").glob("*.png")) if (path / "figures").is_dir() else []
        return cls(path, label or path.name, scenario, rounds, summary, figures)

    @property
    def planned_rounds(self) -> int:
        return int((self.scenario.get("federation") or {}).get("rounds") or len(self.rounds) or 1)

    def attack_windows(self) -> list[tuple[int, int, str]]:
        """(first, last, name) of every attack; default window: all rounds."""
        out = []
        for a in self.scenario.get("attacks") or []:
            r = a.get("rounds") or [1, self.planned_rounds]
            out.append((int(r[0]), int(r[1]), str(a.get("preset") or a.get("attack"))))
        return out

    def malicious(self) -> list[int]:
        ids: set[int] = set()
        for a in self.scenario.get("attacks") or []:
            ids.update(int(h) for h in a.get("hospitals") or [])
        return sorted(ids)


def _class_info(scenario: dict, _cache: dict = {}) -> tuple[list[str], list[str]]:  # noqa: B006 - a cache
    """(class names, hospital names) of the scenario's dataset; the known names when the data
    cannot be loaded here."""
    task = scenario.get("task") or {}
    fed = scenario.get("federation") or {}
    key = repr((task, fed.get("sites"), fed.get("hospitals"), fed.get("partition")))
    if key not in _cache:
        spec = _task_spec(task.get("name"))
        classes, hospitals = list(spec.class_names if spec else []), []
        try:
            from fedsec.scenario import load_scenario
            from fedsec.tasks import build_task

            s = copy.deepcopy(scenario)
            if isinstance(s.get("engine"), dict):
                s["engine"]["address"] = None
            data = build_task(load_scenario(s)).data
            classes, hospitals = list(data.class_names) or classes, list(data.hospitals)
        except Exception:  # a report must not need the data; fall back to the known names
            pass
        _cache[key] = (classes, hospitals)
    return _cache[key]


# --------------------------------------------------------------------------------------
# Risk matrix: numbers
# --------------------------------------------------------------------------------------


def _mean(vals):
    vals = [v for v in vals if v is not None]
    return statistics.fmean(vals) if vals else None


def _std(vals):
    vals = [v for v in vals if v is not None]
    return statistics.stdev(vals) if len(vals) > 1 else None


def success_score(attack_metric: str | None, value: float | None, damage: float | None) -> float | None:
    """Attack success in [0, 1] (see the module docstring)."""
    def clip(v):
        return max(0.0, min(1.0, v))

    if attack_metric and value is not None:
        if attack_metric in ("mia_auroc", "auroc_mean"):
            return clip((value - 0.5) / 0.5)
        if attack_metric == "psnr":
            return clip((value - 10.0) / 20.0)
        if attack_metric == "advantage_mean":
            return clip(value)
        return clip(value)  # asr, ssim, label_acc, records_recovered: already shares
    return None if damage is None else clip(damage)


@dataclass
class MatrixCell:
    attack: str
    defense: str
    n: int = 0
    n_cells: int = 0
    utility: float | None = None
    utility_std: float | None = None
    attack_metric: str | None = None
    attack_value: float | None = None
    attack_std: float | None = None
    clean_utility: float | None = None  # same defense, no attack
    damage: float | None = None  # share of skill above chance destroyed
    success: float | None = None
    cost: float | None = None  # defense's utility cost without attack, vs FedAvg
    reference_utility: float | None = None  # FedAvg, same attack
    reference_attack_value: float | None = None
    threat: dict = field(default_factory=dict)
    scenario: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    reading: str = ""


@dataclass
class RiskMatrix:
    row_key: str
    col_key: str
    metric: str
    attacks: list[str]
    defenses: list[str]
    cells: dict[tuple[str, str], MatrixCell]
    groups: list[tuple[str, list[str]]]  # (threat group label, attacks in it)
    notes: list[str] = field(default_factory=list)


def _scenario_of(row: dict) -> dict:
    """The resolved scenario.yaml of a sweep row's run folder (cached on the row)."""
    if "_scenario" not in row:
        try:
            row["_scenario"] = yaml.safe_load((Path(row["_dir"]) / "scenario.yaml").read_text()) or {}
        except (KeyError, OSError, yaml.YAMLError):
            row["_scenario"] = {}
    return row["_scenario"]


def _attack_label(scenario: dict) -> str:
    return ",".join(str(a.get("preset") or a.get("attack")) for a in scenario.get("attacks") or []) or "none"


def _defense_label(scenario: dict) -> str:
    st = scenario.get("strategy") or "fedavg"
    return str(st.get("preset") or st.get("rule")) if isinstance(st, dict) else str(st)


def matrix_axes(keys: list[str], rows: str | None, cols: str | None) -> tuple[str | None, str | None, list[str]]:
    """(attack axis, defense axis, grid keys averaged over). The attack axis is --rows or the
    ``attacks`` grid key, the defense axis --cols or ``strategy``; a missing axis comes from the
    runs' scenarios (one row / one column). With neither, the table's first two grid keys."""
    from fedsec.sweep import default_axes

    r = rows or ("attacks" if "attacks" in keys else None)
    c = cols or ("strategy" if "strategy" in keys else None)
    if r is None and c is None:
        r, c = default_axes(keys, rows, cols)
    averaged = [k for k in keys if k not in (r, c) and k != "seed"]
    return r, c, averaged


def _is_none(value) -> bool:
    return str(value).strip().lower() in NO_ATTACK


def _threat_group(threat: dict, is_reference: bool) -> str:
    if is_reference:
        return "reference: no attack"
    parts = [str(threat.get(k) or "?").replace("_", " ") for k in ("domain", "adversary", "goal")]
    return " · ".join(parts)


def build_matrix(rows: list[dict], keys: list[str], row_key: str | None, col_key: str | None,
                 metric: str) -> RiskMatrix:
    """From sweep rows (fedsec.sweep.collect_rows) to the attack x defense matrix; seeds
    (and grid keys other than rows / cols) are averaged."""
    for r in rows:
        sc = _scenario_of(r)
        r["_attack"] = str(r.get(row_key)) if row_key else _attack_label(sc)
        r["_defense"] = str(r.get(col_key)) if col_key else _defense_label(sc)
    attacks = list(dict.fromkeys(r["_attack"] for r in rows))
    defenses = list(dict.fromkeys(r["_defense"] for r in rows))
    higher_better = metric != "loss"
    chance = CHANCE.get(metric, 0.0)
    cells: dict[tuple[str, str], MatrixCell] = {}
    for a in attacks:
        for d in defenses:
            members = [r for r in rows if r["_attack"] == a and r["_defense"] == d]
            if not members:
                cells[(a, d)] = MatrixCell(a, d)
                continue
            ok = [r for r in members if r["status"] == "completed"]
            c = MatrixCell(a, d, n=len(ok), n_cells=len(members))
            c.utility, c.utility_std = _mean([r.get(metric) for r in ok]), _std([r.get(metric) for r in ok])
            names = [r["attack_metric"] for r in ok if r.get("attack_metric")]
            if names:
                c.attack_metric = names[0]
                vals = [r["attack_value"] for r in ok if r.get("attack_metric") == c.attack_metric]
                c.attack_value, c.attack_std = _mean(vals), _std(vals)
            first = (ok or members)[0]
            c.summary = first.get("_summary") or {}
            c.threat = dict(c.summary.get("threat_model") or {})
            c.scenario = _scenario_of(first)
            cells[(a, d)] = c
    none_row = next((a for a in attacks if _is_none(a)), None)
    ref_col = REFERENCE_DEFENSE if REFERENCE_DEFENSE in defenses else None
    notes = []
    if none_row is None:
        notes.append(f"no '{row_key}=none' row: the damage of attacks without their own metric and the defenses' "
                     "cost cannot be measured (add none to the grid)")
    if ref_col is None:
        notes.append("no 'fedavg' column: the defenses' cost is not measured against plain averaging")
    for (a, d), c in cells.items():
        clean = cells.get((none_row, d)) if none_row else None
        c.clean_utility = clean.utility if clean else None
        if c.clean_utility is not None and c.utility is not None and not _is_none(a):
            drop = (c.clean_utility - c.utility) if higher_better else (c.utility - c.clean_utility)
            skill = (c.clean_utility - chance) if higher_better else None
            c.damage = drop / max(skill, 0.05) if skill is not None else drop
        if none_row and ref_col:
            base, mine = cells.get((none_row, ref_col)), cells.get((none_row, d))
            if base and mine and base.utility is not None and mine.utility is not None:
                c.cost = (base.utility - mine.utility) if higher_better else (mine.utility - base.utility)
        if ref_col:
            ref = cells.get((a, ref_col))
            if ref:
                c.reference_utility, c.reference_attack_value = ref.utility, ref.attack_value
        c.success = None if _is_none(a) else success_score(c.attack_metric, c.attack_value, c.damage)
    # group rows by the threat-model tags (domain, adversary, goal), the reference row first
    groups: dict[str, list[str]] = {}
    for a in attacks:
        threat = next((cells[(a, d)].threat for d in defenses if cells[(a, d)].threat), {})
        groups.setdefault(_threat_group(threat, _is_none(a)), []).append(a)
    ordered = sorted(groups.items(), key=lambda kv: (not kv[0].startswith("reference"), kv[0]))
    matrix = RiskMatrix(row_key or "attacks", col_key or "strategy", metric,
                        [a for _, g in ordered for a in g], defenses,
                        cells, ordered, notes)
    for c in cells.values():
        c.reading = reading(c, matrix)
    return matrix


# --------------------------------------------------------------------------------------
# Risk matrix: one sentence per cell
# --------------------------------------------------------------------------------------


def defense_short(d: str) -> str:
    """Column headers: ``Krum``, ``Median``."""
    cls = _rule_cls(str(d))
    return (cls and (cls.short_title or cls.title)) or str(d).replace("_", " ")


def defense_name(d: str) -> str:
    cls = _rule_cls(str(d))
    return (cls and cls.title) or str(d).replace("_", " ")


def _metric_name(metric: str) -> str:
    return {"auroc": "AUROC", "balanced_accuracy": "balanced accuracy"}.get(metric, metric.replace("_", " "))


def _inputs_noun(scenario: dict, domain: str | None) -> str:
    spec = _task_spec((scenario.get("task") or {}).get("name"))
    if spec is not None and spec.inputs != "inputs":
        return spec.inputs
    if domain == "ehr_prediction":
        return "patient records"
    if domain and domain.startswith("image"):
        return "images"
    return "inputs"


def _subject(c: MatrixCell, hospital_names: list[str]) -> str:
    adversary = c.threat.get("adversary")
    if adversary in ADVERSARY_NOUNS:
        return ADVERSARY_NOUNS[adversary]
    mal: set[int] = set()
    for a in c.scenario.get("attacks") or []:
        mal.update(int(h) for h in a.get("hospitals") or [])
    n_total = len(hospital_names) or len(c.summary.get("per_hospital") or {}) or None
    names = [hospital_names[h] for h in sorted(mal) if h < len(hospital_names)]
    who = f" ({', '.join(names)})" if names else ""
    sees = " that sees the other hospitals' updates" if c.threat.get("knowledge") == "omniscient" else ""
    if len(mal) <= 1:
        return f"a single malicious hospital{who}{sees}"
    of = f" of {n_total}" if n_total else ""
    return f"{len(mal)}{of} hospitals, colluding{who}{sees},"


def _other_class(scenario: dict, classes: list[str]) -> str | None:
    """Binary tasks: the class a backdoor flips away from ('disease' when the target is 'no disease')."""
    for a in scenario.get("attacks") or []:
        t = a.get("target")
        if isinstance(t, int) and not isinstance(t, bool) and len(classes) == 2 and t in (0, 1):
            return f"'{classes[1 - t]}'"
    return None


def _target_class(scenario: dict, classes: list[str]) -> str | None:
    for a in scenario.get("attacks") or []:
        t = a.get("target")
        if isinstance(t, int) and not isinstance(t, bool):
            return f"'{classes[t]}'" if 0 <= t < len(classes) else f"class {t}"
    return None


def reading(c: MatrixCell, m: RiskMatrix) -> str:
    """One sentence a clinician can follow, generated from the cell's numbers."""
    metric = _metric_name(m.metric)
    D = defense_name(c.defense) if m.col_key == "strategy" else f"{m.col_key}={c.defense}"
    D_cap = D[0].upper() + D[1:]
    if c.n == 0:
        return f"{c.n_cells} run(s), none completed: no reading."
    U = c.utility
    if _is_none(c.attack):
        text = f"No attack: with {D} the model reaches {metric} {U:.2f}"
        if c.cost is not None and c.defense != REFERENCE_DEFENSE:
            text += (f", {abs(c.cost):.2f} {'below' if c.cost > 0 else 'above'} FedAvg" if abs(c.cost) >= 0.005
                     else ", as good as FedAvg")
        return text + "."
    classes, hospital_names = _class_info(c.scenario) if c.scenario else ([], [])
    domain = c.threat.get("domain")
    inputs = _inputs_noun(c.scenario, domain)
    subject = _subject(c, hospital_names)
    goal = c.threat.get("goal")
    kind = _attack_impl(c.scenario)
    target = _target_class(c.scenario, classes)
    v = c.attack_value
    if c.attack_metric == "asr" and v is not None:
        verdict = "stops it" if v < 0.2 else ("only partly stops it" if v < 0.5 else "does not stop it")
        other = _other_class(c.scenario, classes)
        text = (f"{subject} plants a backdoor that flips {v:.0%} of triggered {other + ' ' if other else ''}{inputs}"
                f"{f' to {target}' if target else ''}; {D} {verdict}")
        if c.defense != REFERENCE_DEFENSE and c.reference_attack_value is not None:
            text += f" (FedAvg: {c.reference_attack_value:.0%})"
        text += f"; {metric} on clean {inputs} {U:.2f}."
    elif c.attack_metric in ("mia_auroc", "auroc_mean") and v is not None:
        text = (f"{subject} tells whether a patient's record was used for training with AUROC {v:.2f} "
                f"(0.5 = guessing); with {D} the model's {metric} is {U:.2f}.")
    elif c.attack_metric == "psnr" and v is not None:
        quality = "recognisable" if v >= 20 else ("blurry" if v >= 13 else "unrecognisable")
        text = (f"{subject} rebuilds a hospital's training {inputs} from what it sees of the updates at "
                f"{v:.1f} dB PSNR ({quality}) with {D}; {metric} {U:.2f}.")
    elif c.attack_metric == "records_recovered" and v is not None:
        text = (f"{subject} recovers {v:.0%} of a hospital's training {inputs} from what it sees of the updates "
                f"with {D}; {metric} {U:.2f}.")
    else:
        if kind == "label_flip":
            action = f"relabels its {inputs}{f' as {target}' if target else ''}"
        else:
            cls = _attack_cls(kind or "")
            action = (cls and cls.verb) or f"poisons its updates ({c.attack})"
        if c.clean_utility is None:
            text = f"{subject} {action}; with {D} {metric} is {U:.2f} (no no-attack run to compare)."
        else:
            dmg = c.damage or 0.0
            if dmg < 0.1:
                text = (f"{subject} {action}, but with {D} the model barely suffers: {metric} {U:.2f} "
                        f"({c.clean_utility:.2f} without the attack).")
            else:
                how = "limits the damage" if dmg < 0.5 else "does not stop it"
                text = (f"{subject} {action}: {metric} falls from {c.clean_utility:.2f} to {U:.2f} "
                        f"({min(dmg, 1.0):.0%} of the skill above chance lost); {D} {how}.")
    if goal == "confidentiality" and c.attack_metric is None:
        text = f"{subject} attacks confidentiality ({c.attack}) but recorded no leakage metric; {metric} {U:.2f}."
    return text[0].upper() + text[1:] if text else D_cap


def _attack_impl(scenario: dict) -> str | None:
    attacks = scenario.get("attacks") or []
    return str(attacks[0].get("attack")) if attacks else None


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
            lines = []
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
    ax.set_xticklabels([defense_short(d) for d in m.defenses], rotation=0)
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
    from fedsec.sweep import ATTACK_METRICS

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


# --------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------

CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:24px auto;max-width:1200px;
color:#222;line-height:1.45;padding:0 16px}
h1{font-size:1.5em;margin-bottom:4px}h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}
.meta{color:#555;font-size:.9em}nav a{margin-right:14px}
table{border-collapse:collapse;margin:8px 0;font-size:.88em}
th,td{border:1px solid #ccc;padding:5px 8px;vertical-align:top;text-align:left}
th{background:#f4f4f4}
table.risk td.cell{width:230px;position:relative;padding-right:18px}
table.risk td.cell .num{font-weight:600}
table.risk td.cell .cost{position:absolute;top:0;right:0;width:12px;height:100%}
table.risk tr.group th{background:#eaeaf2;font-style:italic;font-weight:normal}
.reading{font-size:.92em;margin-top:3px}
.legend span{display:inline-block;padding:2px 8px;margin-right:4px;border:1px solid #ccc;font-size:.85em}
figure{margin:12px 0;display:inline-block;vertical-align:top}
figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.85em;color:#555}
.note{background:#fff8e1;border-left:4px solid #f0c000;padding:6px 10px;font-size:.9em}
.failed{color:#b00020}
code{background:#f4f4f4;padding:1px 4px}
"""


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _figure(path: Path, caption: str) -> str:
    return f"<figure>{_img(path, caption)}<figcaption>{html.escape(caption)}</figcaption></figure>"


def risk_matrix_html(m: RiskMatrix) -> str:
    cmap, ccmap = _success_cmap(), _cost_cmap()
    e = html.escape
    out = ['<table class="risk" id="risk-matrix-table">',
           f"<thead><tr><th>attack ({e(m.row_key)}) \\ defense ({e(m.col_key)})</th>"
           + "".join(f"<th>{e(defense_short(d))}<br><code>{e(d)}</code></th>" for d in m.defenses)
           + "</tr></thead><tbody>"]
    for label, members in m.groups:
        out.append(f'<tr class="group"><th colspan="{len(m.defenses) + 1}">{e(label)}</th></tr>')
        for a in members:
            desc = _attack_description(m, a)
            out.append(f'<tr><th title="{e(desc)}">{e(a)}</th>')
            for d in m.defenses:
                c = m.cells[(a, d)]
                bg = "#eeeeee" if c.success is None else _hex(cmap(c.success))
                nums = []
                if c.utility is not None:
                    nums.append(f"{_metric_name(m.metric)} {c.utility:.3f}"
                                + (f" ± {c.utility_std:.3f}" if c.utility_std is not None else ""))
                if c.attack_metric and c.attack_value is not None:
                    nums.append(f"{c.attack_metric} {c.attack_value:.2f}"
                                + (f" ± {c.attack_std:.2f}" if c.attack_std is not None else ""))
                elif c.damage is not None and not _is_none(a):
                    nums.append(f"damage {max(c.damage, 0):.0%}")
                if c.cost is not None and d != REFERENCE_DEFENSE:
                    nums.append(f"cost {c.cost:+.3f}")
                nums.append(f"n={c.n}" + (f" ({c.n_cells - c.n} not completed)" if c.n < c.n_cells else ""))
                cost_bar = ""
                if c.cost is not None:
                    cc = _hex(ccmap(max(0.0, min(1.0, c.cost / COST_FULL))))
                    cost_bar = f'<span class="cost" style="background:{cc}" title="defense cost {c.cost:+.3f}"></span>'
                success = "" if c.success is None else f"{c.success:.3f}"
                out.append(f'<td class="cell" style="background:{bg}" data-success="{success}">'
                           f'<div class="num">{e(" · ".join(nums))}</div><div class="reading">{e(c.reading)}</div>'
                           f"{cost_bar}</td>")
            out.append("</tr>")
    out.append("</tbody></table>")
    legend = ['<p class="legend">attack success: ']
    for v, t in ((0.0, "0 (attack fails)"), (0.5, "0.5"), (1.0, "1 (attack succeeds)")):
        legend.append(f'<span style="background:{_hex(cmap(v))}">{t}</span>')
    legend.append('<span style="background:#eeeeee">not measurable</span> · defense cost (right edge): ')
    for v, t in ((0.0, "0"), (COST_FULL / 2, f"{COST_FULL / 2:.2f}"), (COST_FULL, f"≥ {COST_FULL:.2f}")):
        legend.append(f'<span style="background:{_hex(ccmap(v / COST_FULL))}">{t}</span>')
    legend.append("</p>")
    notes = "".join(f'<p class="note">{e(n)}</p>' for n in m.notes)
    return "".join(legend) + "\n".join(out) + notes


def _attack_description(m: RiskMatrix, attack: str) -> str:
    for d in m.defenses:
        sc = m.cells[(attack, d)].scenario
        for a in sc.get("attacks") or []:
            if a.get("description"):
                return str(a["description"])
    return "no attack" if _is_none(attack) else attack


def _table_html(headers: list[str], rows: list[list], cls: str = "") -> str:
    e = html.escape
    out = [f'<table class="{cls}"><thead><tr>' + "".join(f"<th>{e(str(h))}</th>" for h in headers)
           + "</tr></thead><tbody>"]
    for r in rows:
        out.append("<tr>" + "".join(f"<td>{e('' if v is None else str(v))}</td>" for v in r) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _page(title: str, meta: str, sections: list[tuple[str, str, str]]) -> str:
    nav = "".join(f'<a href="#{sid}">{html.escape(t)}</a>' for sid, t, _ in sections)
    body = "".join(f'<section id="{sid}"><h2>{html.escape(t)}</h2>{content}</section>' for sid, t, content in sections)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><p class=\"meta\">{meta}</p><nav>{nav}</nav>{body}</body></html>\n")


# --------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:80] or "run"


def _reconstructions(runs: list[RunInfo], limit: int = 24) -> str:
    figs = [(r, f) for r in runs for f in r.figures]
    if not figs:
        return ("<p>No reconstructions: no run wrote figures (inversion attacks with <code>save_grid: true</code> "
                "do).</p>")
    parts = ["<p>Originals next to the attack's reconstructions, as the inversion attack saved them "
             "(top: originals, bottom: reconstructions; titles give each image's PSNR).</p>"]
    for run, f in figs[:limit]:
        parts.append(_figure(f, f"{run.label}: {f.name}"))
    if len(figs) > limit:
        parts.append(f"<p>{len(figs) - limit} more under the runs' figures/ folders.</p>")
    return "".join(parts)


def report_run(run_dir: Path, metric: str = "auroc", out: Path | None = None) -> Path:
    run = RunInfo.load(run_dir)
    if not run.summary and not run.rounds:
        raise FedsecError(f"{run_dir}: no summary.json or rounds.jsonl: not a results folder")
    out = out or run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    sections = []
    s = run.summary
    name = s.get("scenario") or run.scenario.get("name") or run_dir.name
    # a one-cell risk matrix from the run itself
    from fedsec.sweep import attack_metric_of

    am, av = attack_metric_of(s.get("attack") or {})
    row = {"status": s.get("status"), metric: _num((s.get("final") or {}).get(metric)), "attack_metric": am,
           "attack_value": av, "_summary": s, "_dir": str(run_dir), "_scenario": run.scenario}
    matrix = build_matrix([row], [], None, None, metric)
    png = plot_risk_matrix(matrix, out / "risk_matrix", f"{name}: risk")
    sections.append(("risk-matrix", "Risk matrix",
                     risk_matrix_html(matrix) + _figure(png, "risk matrix (PNG; PDF next to it)")))
    curves = plot_learning_curves([run], metric, out / f"curves_{_slug(run_dir.name)}",
                                  f"{name} (seed {s.get('seed')})")
    sections.append(("curves", "Learning curves", "<p>Attack rounds shaded.</p>" + _figure(curves, "learning curves")))
    final = s.get("final") or {}
    ph = s.get("per_hospital") or {}
    headers = ["", *final.keys()]
    rows = [["union", *(_fmt(final.get(k)) for k in final)]]
    rows += [[h, *(_fmt((v or {}).get(k)) for k in final)] for h, v in ph.items()]
    sections.append(("final", "Final metrics", _table_html(headers, rows)))
    sections.append(("reconstructions", "Reconstructions", _reconstructions([run])))
    meta = (f"run <code>{html.escape(str(run_dir))}</code> · status {html.escape(str(s.get('status')))} · "
            f"{s.get('rounds')} rounds · threat model {html.escape(_tags(s.get('threat_model')))}")
    page = _page(f"fedsec report — {name}", meta, sections)
    (out / "index.html").write_text(page)
    return out / "index.html"


def _fmt(v, digits=3):
    v = _num(v)
    return "" if v is None else f"{v:.{digits}f}"


def _tags(t) -> str:
    return ", ".join(f"{k} {v}" for k, v in (t or {}).items() if v) or "(none)"


def report_sweep(sweep_dir: Path, rows: str | None = None, cols: str | None = None, metric: str | None = None,
                 out: Path | None = None, max_curves: int = 60) -> Path:
    from fedsec.sweep import collect_rows, default_axes, load_sweep, write_tables

    meta = load_sweep(sweep_dir)
    opts = meta.get("table") or {}
    metric = metric or opts.get("metric") or "auroc"
    tables = write_tables(sweep_dir, rows=rows, cols=cols, metric=metric)
    data, keys = collect_rows(sweep_dir)
    row_key, col_key = default_axes(keys, rows or opts.get("rows"), cols or opts.get("cols"))
    out = out or sweep_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    e = html.escape
    sections = []

    # risk matrix
    m_row, m_col, averaged = matrix_axes(keys, rows or opts.get("rows"), cols or opts.get("cols"))
    matrix = build_matrix(data, keys, m_row, m_col, metric)
    if averaged:
        matrix.notes.append(f"averaged over the grid key(s) {', '.join(averaged)} as well as the seeds; "
                            "give --rows / --cols to choose the axes")
    name = next((r["_summary"].get("scenario") for r in data if r.get("_summary")), None) \
        or Path(str(meta.get("scenario"))).stem
    png = plot_risk_matrix(matrix, out / "risk_matrix", f"{name}: attacks x defenses "
                                                        f"({len(meta.get('seeds') or [None])} seed(s) each)")
    content = ("<p>Each cell: the final utility under attack (mean ± std over seeds), the attack's own "
               "metric, and a reading generated from the numbers. Colour: attack success; right edge: "
               "what the defense costs without an attack. Rows are grouped by the threat-model tags "
               "(domain · adversary · goal).</p>" + risk_matrix_html(matrix)
               + _figure(png, "risk matrix (risk_matrix.png / risk_matrix.pdf)"))
    sections.append(("risk-matrix", "Risk matrix", content))

    # summary table (summary.md as HTML)
    from fedsec.sweep import aggregate, format_cell

    agg = aggregate(data, keys, row_key, col_key, metric)
    extra = [k for k in keys if k not in (row_key, col_key) and k != "seed"]
    col_values = list(dict.fromkeys(a["col"] for a in agg))
    row_ids = list(dict.fromkeys((tuple(a[k] for k in extra), a["row"]) for a in agg))
    by = {(tuple(a[k] for k in extra), a["row"], a["col"]): a for a in agg}
    headers = [*extra, f"{row_key or ''} \\ {col_key or ''}"] + [str(c) for c in col_values]
    trows = [[*ex, r] + [format_cell(by.get((ex, r, c))) for c in col_values] for ex, r in row_ids]
    sections.append(("summary", f"Summary ({_metric_name(metric)}, mean ± std over seeds)",
                     _table_html(headers, trows, "summary")
                     + f"<p>Files: <code>{e(tables['summary_md'].name)}</code>, "
                       f"<code>{e(tables['summary_csv'].name)}</code>, "
                       f"<code>{e(tables['sweep_csv'].name)}</code> in the sweep folder.</p>"))

    # learning curves: one figure per configuration (seeds as separate lines)
    configs: dict[tuple, list[RunInfo]] = {}
    for r in data:
        if r["status"] not in ("completed", "failed", "interrupted"):
            continue
        cfg = tuple((k, r.get(k)) for k in keys)
        run = RunInfo.load(r["_dir"], label=r["cell"])
        if run.rounds:
            configs.setdefault(cfg, []).append(run)
    parts = ["<p>Global and per-hospital utility per round (one line per seed; the malicious hospital dashed), "
             "the attack's metric over rounds when it has one; red band: rounds in which the attack is active.</p>"]
    for i, (cfg, runs) in enumerate(configs.items()):
        if i >= max_curves:
            parts.append(f"<p>{len(configs) - max_curves} more configurations not drawn.</p>")
            break
        label = ", ".join(f"{k}={v}" for k, v in cfg) or "base"
        png = plot_learning_curves(runs, metric, out / f"curves_{_slug(label)}", label)
        parts.append(_figure(png, label))
    sections.append(("curves", "Learning curves", "".join(parts)))

    # privacy-utility
    png = plot_privacy_utility(data, keys, metric, out / "privacy_utility")
    sections.append(("privacy", "Privacy vs utility",
                     _figure(png, "privacy-utility curves") if png else
                     "<p>This sweep varies no privacy setting (no <code>privacy.*</code> grid key): "
                     "no privacy-utility curve.</p>"))

    # reconstructions
    runs_all = [RunInfo.load(r["_dir"], label=r["cell"]) for r in data]
    sections.append(("reconstructions", "Reconstructions", _reconstructions(runs_all)))

    # cells
    crow = [[r["cell"], r["status"], _fmt(r.get(metric)), r.get("attack_metric") or "", _fmt(r.get("attack_value")),
             _fmt(r.get("timing.wall_s"), 1), (r.get("error") or "")[:200]] for r in data]
    cell_headers = ["cell", "status", metric, "attack metric", "value", "wall s", "error"]
    sections.append(("cells", "Cells", _table_html(cell_headers,
                                                    crow, "cells")))
    n_ok = sum(r["status"] == "completed" for r in data)
    meta_line = (f"sweep <code>{e(str(sweep_dir))}</code> of <code>{e(str(meta.get('scenario')))}</code> · "
                 f"{n_ok}/{len(data)} cells completed · grid "
                 + e("; ".join(f"{k} = {', '.join(v)}" for k, v in (meta.get("grid") or {}).items()))
                 + (f" · seeds {e(', '.join(map(str, meta['seeds'])))}" if meta.get("seeds") else "")
                 + f"<br>command: <code>{e(meta.get('command') or '')}</code>")
    page = _page(f"fedsec report — sweep of {name}", meta_line, sections)
    (out / "index.html").write_text(page)
    return out / "index.html"


def report(path, rows: str | None = None, cols: str | None = None, metric: str | None = None,
           out=None) -> Path:
    """Write ``<path>/report/`` for a sweep folder (sweep.json) or a run folder; returns index.html."""
    path = Path(path)
    if not path.is_dir():
        raise FedsecError(f"{path}: no such results folder")
    out = Path(out) if out else None
    if (path / "sweep.json").exists():
        return report_sweep(path, rows, cols, metric, out)
    if (path / "summary.json").exists() or (path / "rounds.jsonl").exists():
        return report_run(path, metric or "auroc", out)
    raise FedsecError(f"{path}: neither a sweep folder (sweep.json) nor a run folder (summary.json)")


# --------------------------------------------------------------------------------------
# Threat map (docs/threat-model.md)
# --------------------------------------------------------------------------------------

# Which data an attack implementation works on (the rest work on any model update).
DOMAIN_MODALITY = {"image_classification": "image", "image_detection": "image", "image_segmentation": "image",
                   "imaging": "image", "ehr_prediction": "tabular", "electrogram": "signal",
                   "multi_omics": "tabular", "cross_modal": "multi"}
# What a robust aggregation rule is built against (robust rules: hospital insiders poisoning training).
ROBUST_TARGETS = {"goals": ("integrity", "availability"), "adversaries": ("hospital_insider",), "phase": "training"}
def _privacy_defenses() -> list:
    """(scenario key, title) of every registered privacy defense."""
    from fedsec.registry import PRIVACY

    return [(f"privacy.{name}", cls.title) for name, cls in PRIVACY.items()]


SCENARIO_FILE_THREATS = [
    "## The scenario file itself", "",
    "A scenario is input from someone else: a colleague's shared file, or, in a deployment, the text the "
    "server sends every hospital. Its threat model: the author may be careless or hostile; fedsec must not "
    "let it run code, read secrets, write outside the results folder, exhaust the machine, or silently "
    "change what is measured.", "",
    "| threat | what fedsec does |", "|---|---|",
    "| code execution (`attack: \"os:system\"`) | components are looked up among registered classes only; "
    "no value is imported or called |",
    "| secrets copied into results (`${oc.env:SECRET}`) | interpolation is refused |",
    "| writes elsewhere (`name: ../../x`, absolute `output.dir`) | `name` is a plain name, `output.dir` relative; "
    "`--out` is the one deliberate way out |",
    "| exhaustion (a symlink to `/dev/zero`, an alias bomb, `rounds: 1e12`) | regular files up to 1 MiB, "
    "bounded aliases and values, documented numeric ranges |",
    "| silent changes (duplicate keys or sites, ignored `hospitals`) | errors naming the key |", "",
    "Details and the full list: [scenarios.md](scenarios.md#what-a-scenario-file-may-contain-and-why).", "",
]


def threat_map_markdown() -> str:
    """docs/threat-model.md, generated from attacks/*.yaml and strategies/*.yaml."""
    from fedsec.registry import TASKS
    from fedsec.scenario import TAXONOMY, list_presets, project_root

    root = project_root()
    attacks = []
    for name, path in sorted(list_presets("attacks").items()):
        data = yaml.safe_load(path.read_text()) or {}
        attacks.append({"preset": name, "attack": data.get("attack"), "threat": data.get("threat") or {},
                        "description": " ".join(str(data.get("description", "")).split())})
    strategies = []
    for name, path in sorted(list_presets("strategies").items()):
        data = yaml.safe_load(path.read_text()) or {}
        strategies.append({"preset": name, "rule": data.get("rule"),
                           "description": " ".join(str(data.get("description", "")).split())})
    tasks_by_domain: dict[str, list[str]] = {}
    for task, builder in TASKS.items():
        tasks_by_domain.setdefault(builder.spec.domain, []).append(task)
    domains = [d for d in TAXONOMY["domain"] if d != "imaging"]
    covered_domains = [d for d in domains if d in tasks_by_domain]

    def applies(a, domain) -> bool:
        modality = DOMAIN_MODALITY.get(domain)
        cls = _attack_cls(a["attack"])
        if cls is not None and cls.modality != "any":
            return modality == cls.modality
        return True

    L = ["# Threat model: what fedsec covers", "",
         "<!-- generated by `python -m fedsec.report --threat-map docs/threat-model.md` from attacks/*.yaml and "
         "strategies/*.yaml; edit those, then regenerate -->", "",
         "fedsec tags every scenario, attack preset and report with the taxonomy of Chang et al., "
         "\"SoK: Security and Privacy Risks of Healthcare AI\" (arXiv 2409.07415): **domain** x **adversary "
         "role** x **knowledge** x **phase** x **goal** (docs/design.md §2). A scenario's `threat_model` tags "
         "are checked against its attacks' tags, left-out tags are derived from the task and the attacks, and "
         "`fedsec report` groups the risk matrix by (domain, adversary, goal).", "",
         "## The taxonomy", "",
         "| axis | values | meaning |", "|---|---|---|",
         "| domain | " + ", ".join(f"`{d}`" for d in domains) + " | the clinical data / task "
         "(`imaging` is accepted as a synonym of image classification) |",
         "| adversary | " + ", ".join(f"`{a}`" for a in TAXONOMY["adversary"]) + " | who attacks: a patient, a "
         "clinician, an insider of a participating hospital, a third-party vendor, the (honest-but-)curious FL "
         "server, an outsider |",
         "| knowledge | " + ", ".join(f"`{k}`" for k in TAXONOMY["knowledge"]) + " | what the adversary knows; "
         "`omniscient` = a coalition that sees every benign update of the round (simulation only) |",
         "| phase | " + ", ".join(f"`{p}`" for p in TAXONOMY["phase"]) + " | when it acts |",
         "| goal | " + ", ".join(f"`{g}`" for g in TAXONOMY["goal"]) + " | integrity: poisoning, backdoors, "
         "evasion; confidentiality: membership inference, model inversion, data reconstruction; availability: "
         "degrading or stalling training |", "",
         "## Tasks per domain", "", "| domain | fedsec tasks |", "|---|---|"]
    for d in domains:
        L.append(f"| `{d}` | " + (", ".join(f"`{t}`" for t in tasks_by_domain.get(d, [])) or "— (none yet)") + " |")
    L += ["", "## Attacks per (domain, adversary) x goal", "",
          "Each entry: attack preset (knowledge, phase). Only domains that have a task are listed; "
          "an attack appears under a domain when its implementation works on that domain's data "
          "(image triggers and image inversion need images, EHR triggers and tabular inversion need tables).", ""]
    goals = list(TAXONOMY["goal"])
    L.append("| domain | adversary | " + " | ".join(goals) + " |")
    L.append("|---|---|" + "---|" * len(goals))
    empty_cells = []
    for d in covered_domains:
        for adv in TAXONOMY["adversary"]:
            row = []
            for g in goals:
                hits = [a for a in attacks if a["threat"].get("adversary") == adv and a["threat"].get("goal") == g
                        and applies(a, d)]
                if hits:
                    row.append(", ".join(f"`{a['preset']}` ({a['threat'].get('knowledge', '?')}, "
                                         f"{a['threat'].get('phase', '?')})" for a in hits))
                else:
                    row.append("—")
                    empty_cells.append((d, adv, g))
            L.append(f"| `{d}` | `{adv}` | " + " | ".join(row) + " |")
    L += ["", "## Defenses", "",
          "| defense | what it is | built against | status |", "|---|---|---|---|"]
    for s in strategies:
        if s["rule"] == "fedavg":
            L.append(f"| `strategy: {s['preset']}` | {s['description']} | nothing (the undefended reference) "
                     "| available |")
            continue
        L.append(f"| `strategy: {s['preset']}` | {s['description']} | hospital insiders, integrity + availability, "
                 "training | available |")
    for key, desc in _privacy_defenses():
        L.append(f"| `{key}` | {desc} | curious server / external, confidentiality | available |")
    L += ["", "## Coverage: which (domain, adversary, goal) cells have attacks and defenses", "",
          "| goal | adversary | attacks | defenses |", "|---|---|---|---|"]
    robust = [s["preset"] for s in strategies if s["rule"] != "fedavg"]
    privacy = [k for k, _ in _privacy_defenses()]
    for g in goals:
        for adv in TAXONOMY["adversary"]:
            hits = [a["preset"] for a in attacks
                    if a["threat"].get("adversary") == adv and a["threat"].get("goal") == g]
            if not hits:
                continue
            if g in ROBUST_TARGETS["goals"] and adv in ROBUST_TARGETS["adversaries"]:
                defs = ", ".join(f"`{r}`" for r in robust) or "—"
            elif g == "confidentiality":
                defs = ", ".join(f"`{p}`" for p in privacy) or "— (privacy defenses not yet in this version)"
            else:
                defs = "—"
            L.append(f"| {g} | `{adv}` | " + ", ".join(f"`{h}`" for h in hits) + f" | {defs} |")
    L += ["", "## Still empty", ""]
    missing_domains = [d for d in domains if d not in tasks_by_domain]
    if missing_domains:
        L.append("- Domains without a task (so without any attack): "
                 + ", ".join(f"`{d}`" for d in missing_domains) + ".")
    unused_adv = [a for a in TAXONOMY["adversary"] if not any(x["threat"].get("adversary") == a for x in attacks)]
    if unused_adv:
        L.append("- Adversary roles no preset plays: " + ", ".join(f"`{a}`" for a in unused_adv) + ".")
    for k in ("knowledge", "phase"):
        unused = [v for v in TAXONOMY[k] if not any(x["threat"].get(k) == v for x in attacks)]
        if unused:
            L.append(f"- {k.capitalize()} values no preset uses: " + ", ".join(f"`{v}`" for v in unused)
                     + (" (no evasion / test-time attack yet)" if k == "phase" and "inference" in unused else "") + ".")
    for g in goals:
        for ph in TAXONOMY["phase"]:
            if not any(x["threat"].get("goal") == g and x["threat"].get("phase") == ph for x in attacks):
                what = {("integrity", "inference"): " (evasion: adversarial examples at test time)",
                        ("availability", "inference"): " (e.g. sponge / denial-of-service inputs)"}.get((g, ph), "")
                L.append(f"- No {g} attack in the {ph} phase{what}.")
    by_goal_adv = {}
    for d, adv, g in empty_cells:
        by_goal_adv.setdefault((adv, g), []).append(d)
    have_attack = {(a["threat"].get("adversary"), a["threat"].get("goal")) for a in attacks}
    partial = [(adv, g, ds) for (adv, g), ds in by_goal_adv.items() if (adv, g) in have_attack]
    for adv, g, ds in partial:
        L.append(f"- `{adv}` x {g} has attacks, but none for " + ", ".join(f"`{d}`" for d in ds) + ".")
    goals_without_def = [g for g in goals if g == "confidentiality" and not privacy]
    if goals_without_def:
        L.append("- Confidentiality attacks have no defense that runs in this version yet "
                 "(DP-SGD, central DP and secure aggregation are in the schema).")
    L += ["", f"{len(attacks)} attack presets, {len(strategies)} strategy presets "
          f"({sum(1 for s in strategies if s['rule'] != 'fedavg')} robust rules).", ""]
    L += SCENARIO_FILE_THREATS
    del root
    return "\n".join(L)


# --------------------------------------------------------------------------------------
# Command line (the lead wires add_report_parser into fedsec.cli)
# --------------------------------------------------------------------------------------


def add_report_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("report", help="figures + one offline HTML page (risk matrix) for a run or sweep folder",
                              description="Writes <DIR>/report/index.html (self-contained) and PNG/PDF figures.")
    p.add_argument("path", nargs="?", metavar="RUN_OR_SWEEP_DIR")
    p.add_argument("--rows", metavar="KEY", help="grid key of the attack axis (default: attacks)")
    p.add_argument("--cols", metavar="KEY", help="grid key of the defense axis (default: strategy)")
    p.add_argument("--metric", default=None, help="utility metric (default: auroc)")
    p.add_argument("--out", help="report folder (default <DIR>/report)")
    p.add_argument("--threat-map", nargs="?", const="-", metavar="FILE",
                   help="write the taxonomy coverage table (docs/threat-model.md) to FILE or stdout, and exit")
    p.set_defaults(fn=cmd_report)
    return p


def cmd_report(args) -> int:
    if args.threat_map:
        text = threat_map_markdown()
        if args.threat_map == "-":
            print(text)
        else:
            Path(args.threat_map).write_text(text)
            print(f"wrote {args.threat_map}")
        return 0
    if not args.path:
        raise FedsecError("give a run or sweep folder (or --threat-map)")
    from fedsec.sweep import METRIC_KEYS

    if args.metric and args.metric not in METRIC_KEYS:
        raise FedsecError(f"--metric '{args.metric}': one of {', '.join(METRIC_KEYS)}")
    index = report(args.path, rows=args.rows, cols=args.cols, metric=args.metric, out=args.out)
    print(f"report: {index}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m fedsec.report ...`` = ``fedsec report ...``."""
    from fedsec.cli import main as cli_main

    return cli_main(["report", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())

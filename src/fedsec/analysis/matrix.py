"""The attack x defense risk matrix and its one-line readings, from a sweep's rows."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fedsec.analysis.runs import (
    ADVERSARY_NOUNS,
    CHANCE,
    NO_ATTACK,
    REFERENCE_DEFENSE,
    _attack_cls,
    _class_info,
    _rule_cls,
    _task_spec,
)

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


SECONDARY_METRICS = ("balanced_accuracy", "accuracy")


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
    winner: str | None = None  # the "strongest attack" row: the candidate selected on validation
    effect: dict | None = None  # its test effect over the null: mean, low, high, n, kind
    # the attack metric over its own null (summary.json's attack.stats, one per seed): mean
    # effect, 95% t interval over seeds, the mean null and its kind; at_floor when the
    # interval includes 0 (or, with one seed, the run's bootstrap interval does)
    over_null: dict | None = None
    # accuracy and balanced accuracy next to the matrix's metric (mean over seeds): a label flip
    # that barely moves AUROC can cost accuracy (the cell shows them for integrity attacks)
    also: dict = field(default_factory=dict)


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
    privacy: dict[str, str] = field(default_factory=dict)  # defense column -> privacy defenses in force

    def column_title(self, d: str) -> str:
        """A column's short title with the privacy defenses in force: ``FedAvg + DP-SGD ε=2.1``."""
        note = self.privacy.get(d)
        return defense_short(d) + (f" + {note}" if note else "")


# the value success_score maps to 0: an effect e over the null is scored as this origin + e
NULL_ORIGIN = {"mia_auroc": 0.5, "auroc_mean": 0.5, "psnr": 10.0}


def _over_null(runs: list[dict], metric: str) -> dict | None:
    """The cell's attack metric against its null, from each run's ``attack.stats`` (seeds paired
    by construction: each run scores its own null on the same records)."""
    from fedsec.analysis.tables import t_interval

    stats = [((r.get("_summary") or {}).get("attack") or {}).get("stats", {}).get(metric) for r in runs]
    stats = [st for st in stats if isinstance(st, dict) and st.get("effect") is not None]
    if not stats:
        return None
    effects = [float(st["effect"]) for st in stats]
    mean = sum(effects) / len(effects)
    low, high = t_interval(effects)
    if low is None:  # one seed: the run's own bootstrap interval
        low, high = (stats[0].get("effect_ci") or [None, None])
    at_floor = low is not None and high is not None and low <= 0.0 <= high
    nulls = [float(st["null"]) for st in stats if st.get("null") is not None]
    return {"effect": mean, "low": low, "high": high, "n": len(effects), "at_floor": at_floor,
            "null": sum(nulls) / len(nulls) if nulls else None, "null_kind": stats[0].get("null_kind")}


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


def _epsilon(block) -> float | None:
    from fedsec.analysis.figures import _find_epsilon

    return _find_epsilon(block) if block else None


def privacy_note(scenario: dict, summary: dict | None) -> str:
    """The privacy defenses a run's scenario puts in force, with the epsilon its summary
    reports: ``DP-SGD ε=2.31 + SecAgg`` ("" when none). A column of the risk matrix shows it
    next to the rule, so a DP-SGD run is not read as plain FedAvg."""
    p = scenario.get("privacy") or {}
    spent = (summary or {}).get("privacy") or {}
    parts = []
    for key, title in (("dp_sgd", "DP-SGD"), ("central_dp", "central DP")):
        if p.get(key):
            eps = _epsilon(spent.get(key))
            parts.append(title + (f" ε={eps:.3g}" if eps is not None else ""))
    if p.get("secure_aggregation"):
        parts.append("SecAgg")
    comp = p.get("compression")
    if comp:
        comp = comp if isinstance(comp, dict) else {}
        what = [f"top {float(comp['keep_ratio']):.0%}" if comp.get("keep_ratio") is not None else "",
                f"{comp['bits']}-bit" if comp.get("bits") else ""]
        parts.append("compression" + (f" ({', '.join(w for w in what if w)})" if any(what) else ""))
    return " + ".join(parts)


def _defense_label(scenario: dict) -> str:
    st = scenario.get("strategy") or "fedavg"
    return str(st.get("preset") or st.get("rule")) if isinstance(st, dict) else str(st)


def matrix_axes(keys: list[str], rows: str | None, cols: str | None) -> tuple[str | None, str | None, list[str]]:
    """(attack axis, defense axis, grid keys averaged over). The attack axis is --rows or the
    ``attacks`` grid key, the defense axis --cols or ``strategy``; a missing axis comes from the
    runs' scenarios (one row / one column). With neither, the table's first two grid keys."""
    from fedsec.analysis.tables import default_axes

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
    """From sweep rows (fedsec.analysis.tables.collect_rows) to the attack x defense matrix; seeds
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
                c.over_null = _over_null(ok, c.attack_metric)
            first = (ok or members)[0]
            c.summary = first.get("_summary") or {}
            c.threat = dict(c.summary.get("threat_model") or {})
            c.scenario = _scenario_of(first)
            c.also = {k: _mean([r.get(k) for r in ok]) for k in SECONDARY_METRICS if k != metric}
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
        if c.success is not None and c.over_null is not None:
            # colour by what the attack adds over its null (a clean model's backdoor "success",
            # an untrained model's membership AUROC), not by the raw value
            o = c.over_null
            c.success = 0.0 if o["at_floor"] else success_score(
                c.attack_metric, o["effect"] + NULL_ORIGIN.get(c.attack_metric, 0.0), None)
    # group rows by the threat-model tags (domain, adversary, goal), the reference row first
    groups: dict[str, list[str]] = {}
    for a in attacks:
        threat = next((cells[(a, d)].threat for d in defenses if cells[(a, d)].threat), {})
        groups.setdefault(_threat_group(threat, _is_none(a)), []).append(a)
    ordered = sorted(groups.items(), key=lambda kv: (not kv[0].startswith("reference"), kv[0]))
    matrix = RiskMatrix(row_key or "attacks", col_key or "strategy", metric,
                        [a for _, g in ordered for a in g], defenses,
                        cells, ordered, notes)
    for d in defenses:  # the privacy defenses in force in the column (the same in each of its cells)
        notes_d = [privacy_note(c.scenario, c.summary) for (_, dd), c in cells.items() if dd == d and c.scenario]
        if notes_d and notes_d[0]:
            matrix.privacy[d] = notes_d[0]
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
    if m.privacy.get(c.defense):
        D += f" with {m.privacy[c.defense]}"
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
    o = c.over_null
    if o is not None and o.get("null") is not None:
        ci = f" [{o['low']:+.2f}, {o['high']:+.2f}]" if o.get("low") is not None else ""
        null = f"{o['null']:.2f} on {'the no-attack run' if o.get('null_kind') == 'no_attack_run' else 'an untrained model' if o.get('null_kind') == 'untrained' else 'its null'}"
        text += (f" At floor: no detectable difference from its null ({null}; effect {o['effect']:+.2f}{ci})."
                 if o["at_floor"] else f" Above its null ({null}; effect {o['effect']:+.2f}{ci}).")
    if goal == "confidentiality" and c.attack_metric is None:
        text = f"{subject} attacks confidentiality ({c.attack}) but recorded no leakage metric; {metric} {U:.2f}."
    return text[0].upper() + text[1:] if text else D_cap


def _attack_impl(scenario: dict) -> str | None:
    attacks = scenario.get("attacks") or []
    return str(attacks[0].get("attack")) if attacks else None


# --------------------------------------------------------------------------------------
# The "strongest attack" row (fedsec.analysis.strongest)
# --------------------------------------------------------------------------------------

STRONGEST_ROW = "strongest attack"


def add_strongest_row(m: RiskMatrix, res: dict, rows: list[dict] | None = None,
                      keys: list[str] | None = None) -> None:
    """Append the row naming, per defense column, the candidate selected on the validation
    split, with its test numbers and the 95% interval of its effect over the no-attack null.
    When the sweep has separate selection seeds (``res["report_seeds"]``), the winner's numbers
    (utility, attack metric, n) come from a matrix of the reporting seeds' ``rows`` only."""
    import copy

    from fedsec.analysis.strongest import describe, seeds_text

    separate = res.get("report_seeds") is not None
    source = m
    if separate and rows is not None:
        keep = set(res["report_seeds"])
        source = build_matrix([r for r in rows if r.get("seed") in keep], keys or [], m.row_key, m.col_key, m.metric)

    by = res.get("by_defense") or {}
    for d in m.defenses:
        e = by.get(d) or (by.get("all") if len(by) == 1 else None)
        w = (e or {}).get("winner")
        src = source.cells.get((w, d)) if w else None
        if src is None:
            c = MatrixCell(STRONGEST_ROW, d)
            c.reading = "No candidate completed next to a no-attack cell: nothing selected."
        else:
            c = copy.copy(src)
            c.attack, c.winner, c.effect = STRONGEST_ROW, w, dict(e.get("test") or {})
            c.reading = (describe(defense_name(d) if m.col_key == "strategy" else d, e, m.metric, separate) + " "
                         + src.reading)
            c.reading = c.reading[0].upper() + c.reading[1:]
        m.cells[(STRONGEST_ROW, d)] = c
    m.attacks.append(STRONGEST_ROW)
    how = (f"selected on validation of seeds {seeds_text(res.get('selection_seeds'))}, measured on test of seeds "
           f"{seeds_text(res['report_seeds'])}" if separate else "selected on validation, measured on test")
    m.groups.append((f"strongest attack per defense ({how})", [STRONGEST_ROW]))

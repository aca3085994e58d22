"""The strongest attack per defense: selected on a validation split, reported on the test split.

A sweep with ``--strongest`` (or ``strongest:`` in a sweep file) runs every candidate attack
(the labels of the attack axis) against every defense, with every seed, next to the no-attack
cell. Then, per defense:

1. **Selection (validation only).** Each cell's final global model (``checkpoint.pt``) is
   evaluated on the hospitals' validation records (``task.options.val_fraction``: a stratified
   share of each hospital's training records set aside before training, never trained on).
   The *effect* of a candidate in one seed is measured against the no-attack cell of the same
   defense and seed:

   - a backdoor (its success metric is ``asr``): its ASR on the triggered validation records
     minus the ASR of the same trigger on the no-attack model (the clean-model floor);
   - any other attack: the share of the model's skill above chance it destroys,
     ``(U_clean - U_attack) / max(U_clean - chance, 0.05)`` on the validation records, the
     risk matrix's damage scale (docs/sweeps.md).

   Both are shares in [0, 1], so backdoors and degradation attacks compete on one scale. The
   candidate with the largest mean effect over seeds wins (ties: the first in the grid). The
   test split is not read: the task the selection builds has its test splits removed.

   The two scales are not the same quantity, though: a backdoor that lifts the ASR by 0.03 in
   every seed can lose to a degradation attack that costs 0.05 of the skill in one seed and
   nothing in the others. So the selection is also made **per family** (``families`` in
   strongest.json): the strongest *backdoor* (effect: ASR above the floor) and the strongest
   *untargeted* attack (effect: skill lost), each selected on validation among its own
   family and reported on test like the overall winner. The overall ``winner`` (the risk
   matrix's row) is the cross-family maximum; the per-family winners are what the threat map
   and docs/results.md read, so a defense is not called safe against backdoors because an
   untargeted attack happened to have a larger mean.
2. **Reporting (test split).** The winner's effect is measured again in the same way on the
   union of the hospitals' test sets (the ASR from its summary.json, the floor from the
   no-attack model; utilities from the summaries) with a Student-t 95% interval over seeds.

Seeds. By default the same seeds select and report, so the reported effect carries some
selection optimism (the models' randomness is shared between the validation and the test
evaluation; the records are not). With separate *selection seeds* (``--selection-seeds``, or
``strongest: {selection_seeds: ...}`` in a sweep file; the sweep's ``--seeds`` are then the
*reporting seeds*), step 1 reads only the selection seeds' cells (validation split) and
step 2 only the reporting seeds' cells (test split): the winner's reported effect comes from
runs that played no part in choosing it. The spec in sweep.json then holds
``selection_seeds`` and ``report_seeds``; the sweep refuses overlapping sets unless
``allow_seed_overlap`` is set (fedsec.sweep.resolve_strongest_seeds).

Results: ``strongest.json`` and ``strongest.md`` in the sweep folder; the risk matrix gets a
"strongest attack" row (fedsec.analysis.matrix), computed from the reporting seeds' cells only.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from fedsec.analysis.runs import CHANCE
from fedsec.analysis.tables import FINISHED, t_interval
from fedsec.errors import FedsecError

VALIDATION_FILE = "validation.json"
MIN_SKILL = 0.05
# the two effect scales (module docstring): a backdoor's ASR above the floor, any other
# attack's share of the skill lost; the per-family winners are selected within each
FAMILIES = {"asr": "backdoor (ASR above the clean-model floor)",
            "damage": "untargeted (share of the skill above chance lost)"}


# --------------------------------------------------------------------------------------
# Evaluating a cell's final model (validation split; the test split only for the report)
# --------------------------------------------------------------------------------------

_TASKS: dict = {}


def _scenario_obj(cell_dir: Path):
    import yaml

    from fedsec.scenario import load_scenario

    d = yaml.safe_load((cell_dir / "scenario.yaml").read_text()) or {}
    if isinstance(d.get("engine"), dict):
        d["engine"]["address"] = None
    return load_scenario(d)


def _task(scenario, split: str):
    """The cell's task, holding only ``split`` (``val`` or ``test``): a selection cannot read
    the test records because the task it gets has none."""
    from fedsec.tasks import build_task

    key = (repr(scenario.task), repr(scenario.federation.sites), repr(scenario.federation.partition),
           scenario.federation.hospitals, scenario.seed, split)
    if key not in _TASKS:
        task = build_task(scenario)
        if split == "val":
            if not task.data.val:
                raise FedsecError(f"task '{scenario.task.name}': no validation split; set task.options.val_fraction")
            task.data.test = None  # selection never sees the test split
        else:
            task.data.val = None
        _TASKS[key] = task
    return _TASKS[key]


def _records(task, split: str):
    from fedsec.data.base import Split

    parts = task.data.val if split == "val" else task.data.test
    return Split.concat([p for p in parts if len(p)])


def _model(cell_dir: Path, task):
    import torch

    ckpt = torch.load(cell_dir / "checkpoint.pt", weights_only=False)
    model = task.make_model()
    model.load_state_dict(ckpt["state"])
    model.eval()
    return model


def _utility(model, task, records, metric: str) -> float:
    import torch

    from fedsec.metrics import classification_metrics

    with torch.no_grad():
        scores = task.scores(model(records.x))
    return classification_metrics(scores, records.y, multilabel=task.multilabel).get(metric)


def _plans(scenario, task):
    from fedsec.federation.adversary import build_plans

    return build_plans(scenario, task.data.num_hospitals)


def _asr(attack_dir: Path, model, task, records) -> float | None:
    """The ASR of the backdoor of the cell in ``attack_dir`` on ``model`` (None: not a backdoor)."""
    import torch

    from fedsec.attacks.base import AttackContext

    scenario = _scenario_obj(attack_dir)
    values = []
    for p in _plans(scenario, task):
        if getattr(p.attack, "success_metric", None) != "asr":
            continue
        ctx = AttackContext(scenario.federation.rounds, None, p.hospitals, task.data.num_hospitals, task, None)
        with torch.no_grad():
            values.append(float(p.attack.evaluate(model, records, ctx)["asr"]))
    return statistics.fmean(values) if values else None


def _cache(cell_dir: Path) -> dict:
    try:
        return json.loads((cell_dir / VALIDATION_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _save_cache(cell_dir: Path, data: dict) -> None:
    from fedsec.results import atomic_write

    atomic_write(cell_dir / VALIDATION_FILE, json.dumps(data, indent=1, sort_keys=True))


def validation_numbers(cell_dir, metric: str, trigger_of=None) -> dict:
    """``{"utility": U_val, "asr": ASR_val or None}`` of the cell's final model on its validation
    records; ``trigger_of``: the cell whose backdoor's trigger is evaluated (default: the cell
    itself; the no-attack cell is evaluated with each candidate's trigger). Cached in the cell's
    validation.json, which is all a fake cell in a test needs."""
    cell_dir = Path(cell_dir)
    trigger_of = Path(trigger_of) if trigger_of is not None else cell_dir
    cache = _cache(cell_dir)
    ukey, akey = f"utility/{metric}", f"asr/{trigger_of.name}"
    if ukey in cache and akey in cache:
        return {"utility": cache[ukey], "asr": cache[akey]}
    scenario = _scenario_obj(cell_dir)
    task = _task(scenario, "val")
    records = _records(task, "val")
    model = _model(cell_dir, task)
    if ukey not in cache:
        cache[ukey] = _utility(model, task, records, metric)
    if akey not in cache:
        cache[akey] = _asr(trigger_of, model, task, records)
    _save_cache(cell_dir, cache)
    return {"utility": cache[ukey], "asr": cache[akey]}


def test_floor(clean_dir, attack_dir) -> float | None:
    """For the report only: the ASR of ``attack_dir``'s trigger on the no-attack model, on the
    test split (the null the winner's test ASR is compared with)."""
    clean_dir, attack_dir = Path(clean_dir), Path(attack_dir)
    cache = _cache(clean_dir)
    key = f"test_asr/{attack_dir.name}"
    if key not in cache:
        scenario = _scenario_obj(clean_dir)
        task = _task(scenario, "test")
        cache[key] = _asr(attack_dir, _model(clean_dir, task), task, _records(task, "test"))
        _save_cache(clean_dir, cache)
    return cache[key]


# --------------------------------------------------------------------------------------
# Effects and selection
# --------------------------------------------------------------------------------------


def effect(clean: dict, attacked: dict, metric: str) -> float | None:
    """One seed's effect (see the module docstring). ``clean`` / ``attacked``: ``{"utility",
    "asr"}`` of the no-attack and the attacked model (``asr``: the candidate's trigger)."""
    if attacked.get("asr") is not None:
        floor = clean.get("asr") or 0.0
        return attacked["asr"] - floor
    u0, u1 = clean.get("utility"), attacked.get("utility")
    if u0 is None or u1 is None:
        return None
    if metric == "loss":
        return u1 - u0
    return (u0 - u1) / max(u0 - CHANCE.get(metric, 0.0), MIN_SKILL)


def test_effect(row: dict, clean_row: dict, metric: str) -> float | None:
    """One seed's effect on the test split: a backdoor cell's ASR above the clean cell's floor,
    else the share of the ``metric`` skill lost against the clean cell (rows of collect_rows)."""
    asr = row.get("attack.asr")
    if asr is not None:
        return effect({"asr": test_floor(clean_row["_dir"], row["_dir"]), "utility": clean_row.get(metric)},
                      {"asr": asr, "utility": row.get(metric)}, metric)
    return effect({"utility": clean_row.get(metric)}, {"utility": row.get(metric)}, metric)


def select(effects: dict[str, list[float]]) -> tuple[str | None, dict[str, float]]:
    """``{candidate: [effect per seed]}`` -> (winner, mean effect per candidate). The largest mean
    wins; ties go to the first candidate; candidates without numbers cannot win."""
    means = {a: statistics.fmean(v) for a, v in effects.items() if v}
    if not means:
        return None, means
    best = max(means.values())
    return next(a for a in effects if a in means and means[a] == best), means


def seeds_text(seeds) -> str:
    """``[0, 1, 2, 5]`` -> ``0-2, 5`` (None: ``all``)."""
    if seeds is None:
        return "all"
    seeds = sorted(seeds)
    parts, i = [], 0
    while i < len(seeds):
        j = i
        while j + 1 < len(seeds) and seeds[j + 1] == seeds[j] + 1:
            j += 1
        parts.append(str(seeds[i]) if j == i else f"{seeds[i]}-{seeds[j]}" if j > i + 1
                     else f"{seeds[i]}, {seeds[j]}")
        i = j + 1
    return ", ".join(parts)


def _seed_cells(rows: list[dict], attacks_key: str, defenses_key: str | None):
    """{(defense, attack): {seed: row}} of completed cells."""
    out: dict = {}
    for r in rows:
        if r["status"] != FINISHED:
            continue
        d = str(r.get(defenses_key)) if defenses_key else "all"
        out.setdefault((d, str(r.get(attacks_key))), {})[r.get("seed")] = r
    return out


def strongest(sweep_dir, metric: str = "auroc") -> dict:
    """Select the strongest attack per defense on validation, then measure it on test.
    Returns strongest.json's dict."""
    from fedsec.analysis.tables import collect_rows, load_sweep

    sweep_dir = Path(sweep_dir)
    meta = load_sweep(sweep_dir)
    spec = meta.get("strongest")
    if not spec:
        raise FedsecError(f"{sweep_dir}: this sweep did not ask for the strongest attack (--strongest)")
    rows, _keys = collect_rows(sweep_dir)
    akey, dkey, null = spec["attacks"], spec.get("defenses"), spec["no_attack"]
    grid = meta.get("grid", {})
    candidates = [str(a) for a in grid.get(akey, []) if str(a) != null]
    defenses = [str(d) for d in grid.get(dkey, [])] if dkey else ["all"]
    cells = _seed_cells(rows, akey, dkey)
    # None: every seed selects and reports (the sweep's default); lists: disjoint roles
    sel_seeds, rep_seeds = spec.get("selection_seeds"), spec.get("report_seeds")
    result = {"metric": metric, "attacks": akey, "defenses": dkey, "null": null, "candidates": candidates,
              "selection": "validation split (task.options.val_fraction)",
              "selection_seeds": sel_seeds, "report_seeds": rep_seeds, "by_defense": {}}

    def paired(mine: dict, clean: dict, role) -> list:
        """Seeds with both the candidate's and the no-attack cell completed, of one role."""
        return sorted((s for s in set(mine) & set(clean) if role is None or s in role), key=str)

    for d in defenses:
        clean = cells.get((d, null), {})
        per_attack: dict[str, list[float]] = {}
        seeds_of: dict[str, list] = {}
        family_of: dict[str, str] = {}
        # --- selection: validation numbers only ---
        for a in candidates:
            mine = cells.get((d, a), {})
            vals = []
            for seed in paired(mine, clean, sel_seeds):
                a_dir, c_dir = Path(mine[seed]["_dir"]), Path(clean[seed]["_dir"])
                attacked = validation_numbers(a_dir, metric)
                family_of[a] = "asr" if attacked.get("asr") is not None else "damage"
                e = effect(validation_numbers(c_dir, metric, trigger_of=a_dir), attacked, metric)
                if e is not None:
                    vals.append(e)
            per_attack[a] = vals
            seeds_of[a] = paired(mine, clean, sel_seeds)
        winner, means = select(per_attack)
        entry = {"winner": winner, "validation": {a: {"mean": means.get(a), "n": len(v), "effects": v,
                                                      "seeds": seeds_of[a], "family": family_of.get(a)}
                                                  for a, v in per_attack.items()}}

        # --- report: a winner on the test split (the reporting seeds only, when given) ---
        def report_on_test(w: str) -> dict:
            mine = cells[(d, w)]
            tests, utils = [], []
            report = seeds_of[w] if rep_seeds is None else paired(mine, clean, rep_seeds)
            for seed in report:
                row, crow = mine[seed], clean[seed]
                utils.append(row.get(metric))
                e = test_effect(row, crow, metric)
                if e is not None:
                    tests.append(e)
            low, high = t_interval(tests)
            ulow, uhigh = t_interval(utils)
            kind = "asr" if any(mine[s].get("attack.asr") is not None for s in report) else "damage"
            return {"kind": kind, "effects": tests, "mean": statistics.fmean(tests) if tests else None,
                    "low": low, "high": high, "n": len(tests), "seeds": report,
                    "detectable": None if low is None else not (low <= 0.0 <= high),
                    "utility": statistics.fmean([u for u in utils if u is not None]) if utils else None,
                    "utility_low": ulow, "utility_high": uhigh}

        if winner is not None:
            entry["test"] = report_on_test(winner)
        # --- per family: the strongest backdoor and the strongest untargeted attack ---
        entry["families"] = {}
        for fam in FAMILIES:
            fw, _ = select({a: v for a, v in per_attack.items() if family_of.get(a) == fam})
            if fw is not None:
                entry["families"][fam] = {"winner": fw, "validation_mean": means.get(fw),
                                          "test": entry["test"] if fw == winner else report_on_test(fw)}
        result["by_defense"][d] = entry
    return result


def _pct(v) -> str:
    return "-" if v is None else f"{v:+.0%}" if abs(v) >= 0.005 else "+0%"


def describe(d: str, entry: dict, metric: str = "auroc", separate: bool = False) -> str:
    """One line per defense: who wins on validation and what it does on test; ``separate``:
    selection and reporting seeds differ (the line names both sets)."""
    w = entry.get("winner")
    if w is None:
        return f"{d}: no candidate completed next to a no-attack cell: nothing selected."
    t = entry.get("test") or {}
    what = ("ASR above the clean-model floor" if t.get("kind") == "asr"
            else f"share of the {metric.upper() if metric == 'auroc' else metric} skill above chance lost")
    ci = (f" [{t['low']:+.2f}, {t['high']:+.2f}]" if t.get("low") is not None else " (one seed: no interval)")
    verdict = ("" if t.get("detectable") is None else
               ("; the interval excludes 0" if t["detectable"] else "; no detectable effect (the interval includes 0)"))
    val = entry["validation"][w]["mean"]
    others = len([a for a, v in entry["validation"].items() if v["n"]])
    sel = entry["validation"][w].get("seeds")
    mean = t.get("mean")
    seeds_sel = f" (seeds {seeds_text(sel)})" if separate and sel is not None else ""
    seeds_rep = f" (seeds {seeds_text(t.get('seeds'))})" if separate and t.get("seeds") is not None else ""
    return (f"{d}: strongest of {others} candidate(s) on validation{seeds_sel} is {w} (validation effect "
            f"{val:+.2f}); on test{seeds_rep} its {what} is {float('nan') if mean is None else mean:+.2f}{ci} over "
            f"{t.get('n', 0)} seed(s){verdict}.")


def strongest_markdown(res: dict) -> str:
    metric = res["metric"]
    lines = ["# Strongest attack per defense", "",
             f"Candidates ({res['attacks']} axis): {', '.join(res['candidates'])}; null: `{res['null']}`. Selected on "
             "the validation split (the hospitals' held-out training records), never the test split; the "
             "effect is the ASR above the clean-model floor for backdoors, else the share of the "
             f"{metric} skill above chance lost, paired by seed with the no-attack cell of the same defense. "
             "Test: the winner's effect on the union of the hospitals' test sets, mean [95% t interval].", "",
             seeds_paragraph(res), ""]
    head = ["defense", "winner", "validation effect", "test effect [95% CI]", "n", f"test {metric}",
            "all candidates (validation)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for d, e in res["by_defense"].items():
        t = e.get("test") or {}
        ci = (f"{t['mean']:+.3f} [{t['low']:+.3f}, {t['high']:+.3f}]" if t.get("low") is not None
              else (f"{t['mean']:+.3f}" if t.get("mean") is not None else "-"))
        util = "-" if t.get("utility") is None else f"{t['utility']:.3f}"
        cands = ", ".join(f"{a} {v['mean']:+.3f}" for a, v in e["validation"].items() if v["mean"] is not None)
        w = e.get("winner") or "-"
        val = e["validation"].get(w, {}).get("mean")
        lines.append(f"| {d} | {w} | {'-' if val is None else f'{val:+.3f}'} | {ci} "
                     f"({t.get('kind', '')}) | {t.get('n', 0)} | {util} | {cands} |")
    separate = res.get("report_seeds") is not None
    lines += ["", *(f"- {describe(d, e, metric, separate)}" for d, e in res["by_defense"].items()), ""]
    lines += family_table(res)
    return "\n".join(lines)


def _ci_text(t: dict) -> str:
    if t.get("mean") is None:
        return "-"
    if t.get("low") is None:
        return f"{t['mean']:+.3f} (one seed)"
    text = f"{t['mean']:+.3f} [{t['low']:+.3f}, {t['high']:+.3f}]"
    return f"**{text}**" if t.get("detectable") else text


def family_table(res: dict) -> list[str]:
    """The strongest backdoor and the strongest untargeted attack per defense, each selected
    within its own family on validation and reported on test (Markdown lines)."""
    by = res.get("by_defense") or {}
    if not any(e.get("families") for e in by.values()):
        return []
    head = ["defense"] + [x for fam in FAMILIES for x in (f"strongest {fam_name(fam)}", "test effect [95% CI]")]
    lines = ["## Per family", "",
             "The two effect scales are different quantities, so each family also gets its own winner, selected "
             "on validation within the family: " + "; ".join(FAMILIES.values()) + ". Bold: the interval excludes "
             "0.", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for d, e in by.items():
        cells = []
        for fam in FAMILIES:
            f = (e.get("families") or {}).get(fam)
            cells += ["-", "-"] if not f else [f["winner"], _ci_text(f.get("test") or {})]
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    return lines + [""]


def fam_name(fam: str) -> str:
    return FAMILIES[fam].split(" ")[0]


def seeds_paragraph(res: dict) -> str:
    """Which seeds selected and which reported (one sentence for strongest.md and the report)."""
    sel, rep = res.get("selection_seeds"), res.get("report_seeds")
    if rep is None:
        return ("Seeds: the same seeds select and report, so the test effect carries some selection optimism "
                "(give separate selection seeds with --selection-seeds to remove it).")
    shared = sorted(set(sel or []) & set(rep))
    return (f"Seeds: the winner is selected on seeds {seeds_text(sel)} (their validation splits only) and its test "
            f"effect, interval and n come from seeds {seeds_text(rep)} only (their test splits). "
            + (f"The sets share seed(s) {seeds_text(shared)} (allowed by --allow-seed-overlap): those seeds both "
               "select and report." if shared else "The sets are disjoint: no selection bias."))


def write_strongest(sweep_dir, metric: str = "auroc") -> dict:
    """strongest.json and strongest.md in the sweep folder; returns their paths."""
    from fedsec.results import atomic_write

    sweep_dir = Path(sweep_dir)
    res = strongest(sweep_dir, metric)
    atomic_write(sweep_dir / "strongest.json", json.dumps(res, indent=1))
    atomic_write(sweep_dir / "strongest.md", strongest_markdown(res))
    return {"strongest_json": sweep_dir / "strongest.json", "strongest_md": sweep_dir / "strongest.md"}

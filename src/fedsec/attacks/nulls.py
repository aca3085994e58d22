"""Every attack metric with its null and its uncertainty (issue 13, item 1).

An attack's ``evaluate`` / ``observe`` may return, besides its plain metrics, a ``stats``
entry: ``{metric: {value, null, null_kind, effect, ci, effect_ci, n, at_floor}}`` built by
:func:`stat`. ``value`` is the metric, ``null`` the same metric where the attack cannot work
(a clean or untrained model, a population-mean reconstruction, a share-based guess),
``effect = value - null``; ``ci`` / ``effect_ci`` are 95% percentile-bootstrap intervals
over the records scored (seeded: the same run gives the same interval); ``at_floor`` is
True when ``effect_ci`` includes 0 (the attack is not distinguishable from its null).

:func:`attack_summary` turns the last round's attack block into ``summary.json``'s: the
plain metrics as before, ``stats`` (every metric's value / null / effect / CI) and, for a
backdoor whose window ends before the run does, ``durability``.

The bootstrap is written here (a few lines of numpy) rather than with
``scipy.stats.bootstrap`` because the resamples must be paired (the attacked and the null
model scored on the same resampled records) and stratified (members and non-members, per
hospital), which scipy's paired mode does not combine with strata.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

N_BOOT = 1000
ALPHA = 0.05


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def percentile_ci(samples, alpha: float = ALPHA) -> list[float] | None:
    s = np.asarray(samples, dtype=np.float64)
    s = s[np.isfinite(s)]
    if s.size == 0:
        return None
    return [float(np.quantile(s, alpha / 2)), float(np.quantile(s, 1 - alpha / 2))]


def stat(value, null, ci=None, effect_ci=None, n: int | None = None, null_kind: str = "",
         null_ci=None) -> dict:
    """One metric's entry in ``stats``. ``at_floor``: the effect's CI includes 0 (or, with no
    effect CI, the value's CI includes the null)."""
    value = float(value) if _finite(value) else None
    null = float(null) if _finite(null) else None
    effect = value - null if value is not None and null is not None else None
    at_floor = None
    if effect_ci is not None:
        at_floor = bool(effect_ci[0] <= 0.0 <= effect_ci[1])
    elif ci is not None and null is not None:
        at_floor = bool(ci[0] <= null <= ci[1])
    out = {"value": value, "null": null, "null_kind": null_kind, "effect": effect, "ci": ci,
           "effect_ci": effect_ci, "n": n, "at_floor": at_floor}
    if null_ci is not None:
        out["null_ci"] = null_ci
    return out


def rng_for(seed: int = 0, *salt: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, 4242, *[int(s) & 0xFFFFFFFF for s in salt]])


def mean_stat(hits, null_hits, null_kind: str, seed: int = 0, n_boot: int = N_BOOT) -> dict:
    """A rate (mean of per-record 0/1 or scores) against the same rate on the same records
    under the null: paired bootstrap over records."""
    a = np.asarray(hits, dtype=np.float64).reshape(-1)
    b = np.asarray(null_hits, dtype=np.float64).reshape(-1)
    if a.size == 0:
        return stat(float("nan"), float("nan"), n=0, null_kind=null_kind)
    if a.size == 1:  # resampling one record always returns it: a zero-width "interval" is no interval
        return stat(a.mean(), b.mean() if b.size else float("nan"), n=1, null_kind=null_kind)
    idx = rng_for(seed, a.size).integers(0, a.size, size=(n_boot, a.size))
    va, vb = a[idx].mean(1), b[idx].mean(1) if b.size == a.size else None
    ci = percentile_ci(va)
    if vb is None:  # null on other records (or a constant): unpaired
        return stat(a.mean(), b.mean() if b.size else float("nan"), ci, n=int(a.size), null_kind=null_kind)
    return stat(a.mean(), b.mean(), ci, percentile_ci(va - vb), int(a.size), null_kind, percentile_ci(vb))


def bootstrap_groups(fn, groups: list[int], seed: int = 0, n_boot: int = N_BOOT) -> np.ndarray:
    """``fn(list of index arrays, one per group) -> tuple of floats`` evaluated on the full
    data (row 0) and on ``n_boot`` stratified resamples (each group resampled with
    replacement within itself). -> array [n_boot + 1, k]."""
    rng = rng_for(seed, *groups)
    rows = [fn([np.arange(g) for g in groups])]
    for _ in range(n_boot):
        rows.append(fn([rng.integers(0, g, size=g) if g else np.arange(0) for g in groups]))
    return np.asarray(rows, dtype=np.float64)


# --------------------------------------------------------------------------------------
# summary.json
# --------------------------------------------------------------------------------------

def attack_summary(rounds: list[dict], scenario=None) -> dict:
    """summary.json's ``attack`` block from rounds.jsonl: the last round's metrics (as
    before), ``stats`` (each metric's value / null / effect / CI: the last round in which the
    attack reported it) and, for a backdoor whose window ends before the run, ``durability``."""
    if not rounds:
        return {}
    last = dict(rounds[-1].get("attack") or {})
    stats: dict = {}
    for r in rounds:  # an observer active in earlier rounds only keeps its last stats
        for k, v in (r.get("attack") or {}).items():
            if (k == "stats" or k.endswith((".stats", "/stats"))) and isinstance(v, dict):
                prefix = k[: -len("stats")]
                for m, s in v.items():
                    stats[prefix + m] = s
    for k in [k for k in last if k == "stats" or k.endswith((".stats", "/stats"))]:
        last.pop(k)
    if stats:
        last["stats"] = stats
    dur = durability(rounds, scenario)
    if dur:
        last["durability"] = dur
    null_run = null_run_of(scenario)
    if null_run is not None:
        from fedsec.results import read_json

        try:
            null_summary = read_json(Path(null_run) / "summary.json")
        except (OSError, ValueError):
            null_summary = None
        if null_summary:
            last["main_task_cost"] = {"null_run": str(null_run), **main_task_cost(
                {"final": (rounds[-1].get("global") or {})}, null_summary)}
    return last


def null_run_of(scenario) -> str | None:
    """The ``null_run`` option of the scenario's first attack that has one: the results
    folder of the no-attack run of the same scenario and seed."""
    for entry in (getattr(scenario, "attacks", None) or []):
        if entry.get("null_run"):
            return str(entry["null_run"])
    return None


def attack_windows(scenario) -> list[tuple[str, int, int]]:
    out = []
    if scenario is None:
        return out
    total = int(scenario.federation.rounds)
    for entry in scenario.attacks or []:
        first, last = entry.get("rounds") or [1, total]
        out.append((str(entry.get("preset", entry.get("attack"))), int(first), int(last)))
    return out


def durability(rounds: list[dict], scenario=None, metric: str = "asr", offsets=(1, 3, 5, 10)) -> dict | None:
    """How long a backdoor lasts once its attacker stops: ``metric`` k rounds after the last
    attack round b (k in ``offsets``, those the run has), ``rounds_to_floor`` (the first k at
    which the metric's effect CI includes 0, i.e. it is back at its null; None = not within
    the run, then ``censored_after`` says how many rounds were watched) and the metric in the
    attack's last round. None when no attack window ends before the run's last round or the
    metric was never recorded."""
    last_round = _last_round(rounds)
    windows = [(n, a, b) for n, a, b in attack_windows(scenario) if b < last_round]
    by_round = {int(r.get("round", i + 1)): r.get("attack") or {} for i, r in enumerate(rounds)}
    if not windows or not any(_metric(a, metric)[0] is not None for a in by_round.values()):
        return None
    name, first, b = windows[0]
    out = {"metric": metric, "attack": name, "window": [first, b], "at_end_of_attack": _metric(by_round.get(b, {}), metric)[0],
           "after": {}, "rounds_to_floor": None, "censored_after": last_round - b}
    for k in offsets:
        if b + k in by_round:
            out["after"][str(k)] = _metric(by_round[b + k], metric)[0]
    for r in range(b + 1, last_round + 1):
        s = _metric(by_round.get(r, {}), metric)[1]
        if s is not None and s.get("at_floor"):
            out["rounds_to_floor"] = r - b
            break
    return out


def _last_round(rounds) -> int:
    return max((int(r.get("round", i + 1)) for i, r in enumerate(rounds)), default=0)


def _metric(attack: dict, metric: str):
    """(value, stats entry) of ``metric`` in one round's attack block (prefixed or not)."""
    value = attack.get(metric)
    stats = (attack.get("stats") or {}).get(metric)
    if value is None:
        for k, v in attack.items():
            if k.endswith("." + metric) and _finite(v):
                value = v
                stats = (attack.get(k[: -len(metric)] + "stats") or {}).get(metric)
                break
    return (float(value) if _finite(value) else None), stats


def main_task_cost(summary: dict, null_summary: dict, keys=("balanced_accuracy", "auroc", "accuracy")) -> dict:
    """The attack's cost to the main task: the no-attack run's final metric minus this run's
    (positive = the attack made the model worse), for each of ``keys``."""
    f, g = summary.get("final") or {}, null_summary.get("final") or {}
    out = {}
    for k in keys:
        a, b = f.get(k), g.get(k)
        if _finite(a) and _finite(b):
            out[k] = {"attacked": float(a), "no_attack": float(b), "cost": float(b) - float(a)}
    return out


def describe(entry: dict, digits: int = 3) -> str:
    """One line for a report: ``0.812 (null 0.240, effect +0.572 [0.49, 0.65])`` and the
    verdict: "at floor" / "no detectable difference" when the effect's CI includes 0."""
    v, n, e, ci = entry.get("value"), entry.get("null"), entry.get("effect"), entry.get("effect_ci")

    def f(x):
        return "n/a" if not _finite(x) else f"{x:.{digits}f}"

    text = f"{f(v)} (null {f(n)} [{entry.get('null_kind') or '?'}]"
    if _finite(e):
        text += f", effect {e:+.{digits}f}"
        if ci:
            text += f" [{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]"
        elif entry.get("n") == 1:
            text += ", one record: no interval (a sweep's is over seeds)"
    text += ")"
    if entry.get("at_floor") is True:
        text += " — at floor: no detectable difference from the null"
    return text


def merge_attack_metrics(dst: dict, src: dict) -> dict:
    """``dst.update(src)`` for a round's attack block, except that the attacks' ``stats``
    dicts are merged (two attacks in one run each bring their own)."""
    for k, v in (src or {}).items():
        if (k == "stats" or k.endswith((".stats", "/stats"))) and isinstance(v, dict) and isinstance(dst.get(k), dict):
            dst[k] = {**dst[k], **v}
        else:
            dst[k] = v
    return dst

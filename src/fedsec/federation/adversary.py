"""Who attacks, when, and with which hooks: the scenario's ``attacks`` turned into plans.

Client and server build the same plans from the same resolved scenario, so the malicious
hospitals chosen by ``fraction`` agree on both sides without any extra message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedsec.attacks.base import Attack
from fedsec.scenario import ATTACK_FRAMEWORK_KEYS


def overrides(attack: Attack, hook: str) -> bool:
    """True when the attack implements ``hook`` (the base class's version does nothing)."""
    return getattr(type(attack), hook) is not getattr(Attack, hook)


@dataclass
class AttackPlan:
    index: int
    name: str
    attack: Attack
    hospitals: list[int]
    first_round: int
    last_round: int
    only_when_selected: bool
    entry: dict

    def active(self, server_round: int) -> bool:
        return self.first_round <= server_round <= self.last_round

    def has(self, hook: str) -> bool:
        return overrides(self.attack, hook)


def malicious_ids(entry: dict, num_hospitals: int, seed: int, index: int) -> list[int]:
    if entry.get("hospitals") is not None:
        return sorted(int(h) for h in entry["hospitals"])
    if entry.get("fraction") is not None:
        k = max(1, int(math.floor(float(entry["fraction"]) * num_hospitals)))
        rng = np.random.default_rng([int(seed), 7919, index])
        return sorted(int(h) for h in rng.choice(num_hospitals, size=k, replace=False))
    return []


def build_plans(scenario, num_hospitals: int) -> list[AttackPlan]:
    if not scenario.attacks:
        return []
    from fedsec.attacks import make_attack

    plans = []
    for i, entry in enumerate(scenario.attacks):
        options = {k: v for k, v in entry.items() if k not in ATTACK_FRAMEWORK_KEYS}
        attack = make_attack(entry["attack"], **options)
        first, last = entry.get("rounds") or [1, scenario.federation.rounds]
        plans.append(AttackPlan(
            index=i, name=str(entry.get("preset", entry["attack"])), attack=attack,
            hospitals=malicious_ids(entry, num_hospitals, scenario.seed, i),
            first_round=int(first), last_round=int(last),
            only_when_selected=bool(entry.get("only_when_selected", False)), entry=entry,
        ))
    return plans


def all_malicious(plans: list[AttackPlan]) -> list[int]:
    return sorted({h for p in plans for h in p.hospitals})


def forge_updates(plans: list[AttackPlan], server_round: int, hospitals: list[int], updates, *,
                  num_hospitals: int, generator=None, extra: dict | None = None) -> list[int]:
    """The server-side adversary: each active coalition (``collude`` hook) rewrites its own
    hospitals' rows of ``updates`` in place, knowing the benign rows of the round.

    hospitals: the hospital id of each row of ``updates`` (Tensor[n, d], local - global, as
    received). extra: what the coalition knows besides the updates (global parameters, the
    rule's name), passed on in ``AttackContext.extra``. A coalition with no hospital in the
    round, or no benign hospital to learn from, sends its honest updates.
    -> the rows rewritten (sorted).
    """
    from fedsec.attacks.base import AttackContext

    malicious = set(all_malicious(plans))
    rewritten: set[int] = set()
    for p in plans:
        if not (p.active(server_round) and p.has("collude")):
            continue
        mal_rows = [i for i, h in enumerate(hospitals) if h in p.hospitals]
        benign_rows = [i for i, h in enumerate(hospitals) if h not in malicious]
        if not mal_rows or not benign_rows:
            continue
        known = {**(extra or {}), "malicious_updates": updates[mal_rows].clone()}
        if known.get("weights") is not None:  # sample counts: the benign rows', then the coalition's
            known["benign_weights"], known["malicious_weights"] = known["weights"][benign_rows], known["weights"][mal_rows]
        ctx = AttackContext(server_round, None, p.hospitals, num_hospitals, None, generator, extra=known,
                            participants=list(hospitals))
        forged = p.attack.collude(updates[benign_rows], len(mal_rows), ctx)
        if forged is not None:
            updates[mal_rows] = forged.to(updates.dtype)
            rewritten.update(mal_rows)
    return sorted(rewritten)


def server_data_needs(scenario) -> list[str]:
    """What in ``scenario`` needs patient data on the server, one sentence each (empty: none).

    A deployment's server holds no hospital data, so each of these is refused before a
    deployment starts. Attack metrics that the hospitals can compute on their own test
    records (``evaluate_records``, e.g. a backdoor's success rate) are not on the list: they
    are evaluated federated, like the model's metrics."""
    from fedsec.registry import RULES

    needs = []
    for i, p in enumerate(build_plans(scenario, scenario.federation.hospitals or 2)):
        if p.has("observe"):
            needs.append(f"attacks[{i}] ({p.name}) is an observer scored against the hospitals' true records, "
                         "which only a simulation has")
        elif (getattr(p.attack, "options", None) or {}).get("null_run"):
            needs.append(f"attacks[{i}].null_run names a results folder on this machine, which the hospitals' "
                         "nodes cannot read")
        elif p.has("evaluate") and not p.has("evaluate_records"):
            needs.append(f"attacks[{i}] ({p.name}) is evaluated by the server on the hospitals' records "
                         "(its metric cannot be computed on each hospital's own test data)")
    spec = scenario.strategy if isinstance(scenario.strategy, dict) else {"rule": scenario.strategy}
    rule = spec.get("rule") or "fedavg"
    if rule in RULES.names() and RULES.get(rule).spec().needs_root_data:
        needs.append(f"strategy '{rule}' trains on a clean root set kept on the server")
    return needs

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

"""The attack contract (docs/design.md §3): a class with optional hooks, each run in one place.

Options of an attack are exactly its YAML preset (``attacks/<name>.yaml``); the scenario
adds ``hospitals`` (malicious ids) and ``rounds`` ([first, last], inclusive) which the
framework handles, so hooks are only called for malicious hospitals in active rounds.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from fedsec.data.base import Split
from fedsec.errors import FedsecError, ScenarioError


@dataclass
class AttackContext:
    """server_round: 1-based. hospital: the id of the hospital the hook acts for (client hooks).
    malicious: all malicious hospital ids. num_hospitals: n. task: the Task (model factory,
    loss, modality, num_classes) for hooks that need to build or query a model.
    generator: torch.Generator seeded from (scenario seed, round, hospital).
    participants: the ids of the hospitals training in this round (None: not known).
    """

    server_round: int = 1
    hospital: int | None = None
    malicious: list[int] = field(default_factory=list)
    num_hospitals: int = 0
    task: object | None = None
    generator: torch.Generator | None = None
    extra: dict = field(default_factory=dict)
    participants: list[int] | None = None


def plain(value):
    """OmegaConf containers (DictConfig / ListConfig) -> plain dicts / lists; other values as is."""
    if type(value).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(value, resolve=True)
    return value


def resolve_options(owner: str, defaults: dict, given: dict) -> dict:
    """``defaults`` updated with ``given``; an unknown option is a ScenarioError that names
    it (as its key), the valid options and the closest match."""
    from fedsec.registry import did_you_mean

    unknown = [k for k in given if k not in defaults]
    if unknown:
        key = unknown[0]
        valid = ", ".join(sorted(defaults)) or "(none)"
        raise ScenarioError(f"attack '{owner}' has no option '{key}'{did_you_mean(key, defaults)}; "
                            f"options: {valid}", key=str(key))
    options = copy.deepcopy(defaults)
    options.update({k: plain(v) for k, v in given.items()})
    return options


@dataclass(frozen=True)
class AttackSpec:
    """What the rest of fedsec needs to know about an attack, read from its class.

    hooks: the hooks it implements (poison_data, poison_update, collude, observe, evaluate).
    server_only: it needs no malicious hospital (a curious server's observer).
    simulation_only: it exists only in simulation (an omniscient coalition).
    success_metric: the metric that says how well it worked, and how to read it.
    targets: the defenses (aggregation rule names, or ``central_dp``) it adapts to: it reads
      their declared bound / options in force (``fedsec.attacks.defense``); empty: none.
    """

    name: str
    goal: str
    kind: str
    hooks: tuple[str, ...]
    server_only: bool
    simulation_only: bool
    modality: str
    success_metric: str | None
    success_wording: str | None
    targets: tuple[str, ...] = ()


HOOKS = ("poison_data", "poison_update", "poison_reply", "collude", "observe", "evaluate", "evaluate_records")


class Attack:
    """Override the hooks the attack needs; the base versions do nothing.

    goal: "integrity" | "confidentiality" | "availability" (checked against threat_model tags).
    kind: "data_poisoning" | "model_poisoning" | "collusion" | "backdoor" | "inversion" | "membership".
    """

    name: str = "attack"
    goal: str = "integrity"
    kind: str = "model_poisoning"
    simulation_only: bool = False  # True for omniscient coalitions (collude hook)
    server_only: bool = False  # True for observers that need no malicious hospital
    modality: ClassVar[str] = "any"  # "image" or "tabular" when it only works on that data
    verb: ClassVar[str | None] = None  # what the attacker does, in a report's sentence
    # the metric that measures success (recorded under ``attack`` in rounds.jsonl) and its reading
    success_metric: ClassVar[str | None] = None
    success_wording: ClassVar[str | None] = None
    # the defenses it adapts to (rule names, or "central_dp"): it reads their declared options /
    # bound in force through fedsec.attacks.defense.defense_in_force
    targets: ClassVar[tuple[str, ...]] = ()

    # attributes that carry over between rounds (history an attack keeps): saved in the run's
    # checkpoint by state_dict() so a resumed run continues the attack exactly. Caches that
    # are a function of the options and data need not be listed.
    state_attributes: ClassVar[tuple[str, ...]] = ()

    # The attack's options, exactly the keys an ``attacks/<preset>.yaml`` may set, are declared
    # by each subclass as a nested dataclass ``Options`` (fields typed, with
    # ``fedsec.registry.option``), or as typed keyword parameters of its constructor.

    @classmethod
    def threat_for(cls, options: dict) -> dict:
        """Threat tags the options in force decide, over the preset's ``threat`` (e.g. a boost
        of ``auto`` needs the number of hospitals in the round: white box). ``options``: every
        option, defaults filled in. -> {} when the options change nothing."""
        return {}

    @classmethod
    def option_defaults(cls) -> dict:
        """option name -> default, from the ``Options`` declaration."""
        from fedsec.registry import options_of

        return {o.name: o.default for o in options_of(cls) or []}

    @classmethod
    def spec(cls) -> AttackSpec:
        """The attack's capabilities, read from its class."""
        return AttackSpec(
            name=getattr(cls, "registry_name", cls.name), goal=cls.goal, kind=cls.kind,
            hooks=tuple(h for h in HOOKS if getattr(cls, h) is not getattr(Attack, h)),
            server_only=cls.server_only, simulation_only=cls.simulation_only, modality=cls.modality,
            success_metric=cls.success_metric, success_wording=cls.success_wording,
            targets=tuple(cls.targets))

    def check(self, num_hospitals: int | None, malicious: list[int], key: str = "") -> None:
        """Checks of the options against the scenario (the number of hospitals, who is
        malicious), run at load time; raise ScenarioError naming the option."""

    @staticmethod
    def check_hospital_ids(option: str, value, num_hospitals: int | None) -> None:
        """``value`` (an id, a list of ids, "all" or None) names hospitals that exist."""
        if num_hospitals is None or value in (None, "all"):
            return
        ids = value if isinstance(value, (list, tuple)) else [value]
        bad = [h for h in ids if not (isinstance(h, int) and 0 <= h < num_hospitals)]
        if bad:
            raise ScenarioError(f"hospital ids {bad} out of range: there are {num_hospitals} hospitals "
                                f"(0..{num_hospitals - 1})", key=option)

    @staticmethod
    def check_round_ids(option: str, value, num_rounds: int | None) -> None:
        if num_rounds is None or value in (None, "all"):
            return
        ids = value if isinstance(value, (list, tuple)) else [value]
        bad = [r for r in ids if not (isinstance(r, int) and 1 <= r <= num_rounds)]
        if bad:
            raise ScenarioError(f"rounds {bad} out of range: the run has rounds 1..{num_rounds}", key=option)

    def __init__(self, **options):
        """Options are exactly the YAML preset's keys; unknown ones raise ScenarioError."""
        self.options = resolve_options(self.name, self.option_defaults(), options)

    def option_error(self, option: str, message: str) -> FedsecError:
        """A ScenarioError that names this attack and the offending option (as its key)."""
        return ScenarioError(f"attack '{self.name}': option '{option}' {message} "
                             f"(got {self.options.get(option)!r})", key=option)

    def state_dict(self) -> dict:
        """The server-side attack's state kept between rounds (``state_attributes``), for the
        checkpoint. An attack whose state is not plain attributes overrides this and
        :meth:`load_state_dict`. (Client-side hooks must not keep state between rounds: each
        round's message may reach any Ray actor, so they derive everything from the round
        and the seed.)"""
        return {k: copy.deepcopy(getattr(self, k)) for k in self.state_attributes}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (resuming a run)."""
        unknown = sorted(set(state) - set(self.state_attributes))
        if unknown:
            raise FedsecError(f"attack '{self.name}': the checkpoint holds state {unknown} this attack does not keep")
        for k, v in state.items():
            setattr(self, k, copy.deepcopy(v))

    # --- ClientApp side -------------------------------------------------------------------
    def poison_data(self, data: Split, rng: np.random.Generator, ctx: AttackContext) -> Split:
        """Return the malicious hospital's training data, possibly altered. Shapes unchanged."""
        return data

    def poison_update(self, global_params: torch.Tensor, local_params: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        """Tensor[d] flat params in, Tensor[d] flat params out (what the hospital sends)."""
        return local_params

    def poison_reply(self, state: dict, metrics: dict, ctx: AttackContext) -> tuple[dict, dict]:
        """The reply the hospital sends, last thing in its ClientApp: ``state`` (array name ->
        tensor, after poison_update and compression) and ``metrics`` (name -> number) in, the
        same out. Availability attacks act here: extra arrays (an oversized reply), or the
        reply metrics the server's participation model reads (``sim-arrival-s``,
        ``sim-dropped``: fedsec.federation.participation). ``ctx.extra`` holds the resolved
        ``scenario`` and the hospital's training ``data``."""
        return state, metrics

    # --- ServerApp side -------------------------------------------------------------------
    def collude(self, benign_updates: torch.Tensor, n_malicious: int, ctx: AttackContext) -> torch.Tensor | None:
        """benign_updates: Tensor[n_b, d] (local - global). Return Tensor[n_malicious, d] updates
        that replace the malicious hospitals' replies, or None to leave them."""
        return None

    def observe(self, server_round: int, updates: dict[int, torch.Tensor] | None, aggregate: torch.Tensor,
                global_params: torch.Tensor, ctx: AttackContext) -> dict:
        """Read-only look at what the server sees. ``updates`` is None under secure aggregation.
        Return metrics to record for this round."""
        return {}

    def evaluate(self, model: torch.nn.Module, test: Split, ctx: AttackContext) -> dict:
        """Attack metrics on the global model (e.g. {"asr": 0.97}); called every round."""
        return {}

    # --- either side: an attack metric the hospitals compute on their own test records ----
    def evaluate_records(self, model: torch.nn.Module, test: Split, ctx: AttackContext) -> dict[str, torch.Tensor]:
        """Per-record outcomes of the attack on ``test``: metric name -> Tensor[len(test)] float,
        NaN for records the metric does not count. The metric is the mean over the non-NaN
        records of every evaluated hospital's test split, so each hospital computes its
        share on its own records (EVALUATE message) and the server only averages: no test
        data on the server, and the same number as evaluating the union at once. An attack
        implementing this need not implement :meth:`evaluate`."""
        return {}

    def summarise_records(self, records: dict[str, torch.Tensor], seed: int = 0) -> dict:
        """The pooled per-record outcomes of :meth:`evaluate_records` (every evaluated
        hospital's, in hospital order) -> the round's metrics. Default: the mean of each
        metric over its counted records; names with "@" are auxiliary (e.g. the null's
        outcomes) and left to the attack's own summary."""
        return {k: v for k, v in self.mean_of_records(records).items() if "@" not in k}

    @staticmethod
    def mean_of_records(records: dict[str, torch.Tensor]) -> dict[str, float]:
        """metric -> nanmean of its per-record outcomes (NaN when no record counts)."""
        out = {}
        for k, v in records.items():
            v = v.double()
            keep = ~torch.isnan(v)
            out[k] = float(v[keep].mean()) if bool(keep.any()) else float("nan")
        return out

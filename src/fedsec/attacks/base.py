"""The attack contract (docs/design.md §3): a class with optional hooks, each run in one place.

Options of an attack are exactly its YAML preset (``attacks/<name>.yaml``); the scenario
adds ``hospitals`` (malicious ids) and ``rounds`` ([first, last], inclusive) which the
framework handles, so hooks are only called for malicious hospitals in active rounds.
"""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from fedsec.data.base import Split
from fedsec.errors import FedsecError


@dataclass
class AttackContext:
    """server_round: 1-based. hospital: the id of the hospital the hook acts for (client hooks).
    malicious: all malicious hospital ids. num_hospitals: n. task: the Task (model factory,
    loss, modality, num_classes) for hooks that need to build or query a model.
    generator: torch.Generator seeded from (scenario seed, round, hospital).
    """

    server_round: int = 1
    hospital: int | None = None
    malicious: list[int] = field(default_factory=list)
    num_hospitals: int = 0
    task: object | None = None
    generator: torch.Generator | None = None
    extra: dict = field(default_factory=dict)


def plain(value):
    """OmegaConf containers (DictConfig / ListConfig) -> plain dicts / lists; other values as is."""
    if type(value).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(value, resolve=True)
    return value


def resolve_options(owner: str, defaults: dict, given: dict) -> dict:
    """``defaults`` updated with ``given``; an unknown option is a FedsecError that names it,
    the valid options and the closest match."""
    unknown = [k for k in given if k not in defaults]
    if unknown:
        key = unknown[0]
        valid = ", ".join(sorted(defaults)) or "(none)"
        close = difflib.get_close_matches(str(key), list(defaults), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise FedsecError(f"attack '{owner}': unknown option '{key}' (valid options: {valid}){hint}")
    options = copy.deepcopy(defaults)
    options.update({k: plain(v) for k, v in given.items()})
    return options


class Attack:
    """Override the hooks the attack needs; the base versions do nothing.

    goal: "integrity" | "confidentiality" | "availability" (checked against threat_model tags).
    kind: "data_poisoning" | "model_poisoning" | "collusion" | "backdoor" | "inversion" | "membership".
    """

    name: str = "attack"
    goal: str = "integrity"
    kind: str = "model_poisoning"
    simulation_only: bool = False  # True for omniscient coalitions (collude hook)
    # option name -> default: exactly the keys an ``attacks/<preset>.yaml`` may set
    defaults: ClassVar[dict] = {}
    # attributes that carry over between rounds (history an attack keeps): saved in the run's
    # checkpoint by state_dict() so a resumed run continues the attack exactly. Caches that
    # are a function of the options and data need not be listed.
    state_attributes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **options):
        """Options are exactly the YAML preset's keys; unknown ones raise FedsecError."""
        self.options = resolve_options(self.name, self.defaults, options)

    def option_error(self, option: str, message: str) -> FedsecError:
        """A FedsecError that names this attack and the offending option."""
        return FedsecError(f"attack '{self.name}': option '{option}' {message} (got {self.options.get(option)!r})")

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

"""The attack contract (docs/design.md §3): a class with optional hooks, each run in one place.

Options of an attack are exactly its YAML preset (``attacks/<name>.yaml``); the scenario
adds ``hospitals`` (malicious ids) and ``rounds`` ([first, last], inclusive) which the
framework handles, so hooks are only called for malicious hospitals in active rounds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from fedsec.data.base import Split


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


class Attack:
    """Override the hooks the attack needs; the base versions do nothing.

    goal: "integrity" | "confidentiality" | "availability" (checked against threat_model tags).
    kind: "data_poisoning" | "model_poisoning" | "collusion" | "backdoor" | "inversion" | "membership".
    """

    name: str = "attack"
    goal: str = "integrity"
    kind: str = "model_poisoning"
    simulation_only: bool = False  # True for omniscient coalitions (collude hook)

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

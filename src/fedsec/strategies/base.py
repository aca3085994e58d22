"""The contract every robust aggregation rule follows.

A rule sees the stacked *updates* of one round (``local - global``, flattened over all
float entries of the model state), never Flower messages: that keeps each rule a small,
vectorised, unit-testable function of the paper's definition.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class RuleContext:
    """What a rule may need beyond the updates.

    global_params: Tensor[d], the current global model (flattened like the updates).
    root_update: Tensor[d] | None, the server's update on its clean root set (FLTrust).
    generator: torch.Generator seeded per round (FLAME noise, random tie-breaks).
    server_round: 1-based round number.
    num_malicious: the number of Byzantine hospitals the rule should tolerate (f).
    """

    global_params: torch.Tensor | None = None
    root_update: torch.Tensor | None = None
    generator: torch.Generator | None = None
    server_round: int = 1
    num_malicious: int = 0


@dataclass
class RuleResult:
    """update: Tensor[d], the aggregated update added to the global model.

    flagged: indices (rows of the input) the rule excluded or down-weighted to zero.
    info: extra numbers worth logging (e.g. clipping norm, cluster sizes).
    """

    update: torch.Tensor
    flagged: list[int] = field(default_factory=list)
    info: dict = field(default_factory=dict)


class AggregationRule:
    """Base class. Subclasses take their options as keyword arguments (exactly their YAML)
    and implement ``aggregate``. Stateful rules (centered clipping, FoolsGold) keep their
    state on ``self`` between rounds.

    needs_individual_updates: False only for rules that work on the sum alone (FedAvg);
    such rules are the only ones compatible with secure aggregation.
    """

    name: str = "rule"
    needs_individual_updates: bool = True

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor, ctx: RuleContext) -> RuleResult:
        raise NotImplementedError

    def __call__(self, updates: torch.Tensor, weights: torch.Tensor, ctx: RuleContext | None = None) -> RuleResult:
        if updates.dim() != 2:
            raise ValueError(f"updates must be [n, d], got {tuple(updates.shape)}")
        return self.aggregate(updates, weights.to(updates.dtype), ctx or RuleContext())

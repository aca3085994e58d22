"""FedAvg (McMahan et al. 2017): the sample-weighted mean, the baseline every defense is
compared against, and the only rule that works on the sum alone (secure aggregation)."""

from __future__ import annotations

import torch

from fedsec.errors import FedsecError
from fedsec.strategies.base import AggregationRule, RuleContext, RuleResult
from fedsec.registry import RULES


def normalised_weights(weights: torch.Tensor) -> torch.Tensor:
    """weights: Tensor[n] of sample counts (finite, >= 0, not all 0) -> Tensor[n] summing to 1.

    Rules see their weights checked first (``AggregationRule.check_weights`` names the
    hospital); this check stays for direct callers."""
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise FedsecError(f"sample-count weights must be finite and >= 0, got {weights.tolist()}")
    total = weights.sum()
    if float(total) <= 0:
        raise FedsecError("sample-count weights sum to 0: no hospital reported any samples")
    return weights / total


def weighted_mean(updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """updates: Tensor[n, d], weights: Tensor[n] (>= 0, not all 0) -> Tensor[d]."""
    return normalised_weights(weights) @ updates


@RULES.register()
class FedAvg(AggregationRule):
    """Weighted mean of the updates, weighted by sample counts. No defense; flags nothing.

    Options: none.
    """

    name = "fedavg"
    title = "FedAvg"
    short_title = "FedAvg"
    needs_individual_updates = False
    mean_like = True

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor, ctx: RuleContext) -> RuleResult:
        return RuleResult(update=weighted_mean(updates, weights))

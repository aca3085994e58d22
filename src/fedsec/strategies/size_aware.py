"""A size-aware robust rule: the sample-weighted trimmed mean with capped weights.

The coordinate-wise median and trimmed mean (Yin et al. 2018) give every hospital the same
say whatever its size: a hospital with 30 records (heart disease's Switzerland) counts as much
as one with 200, and a small hospital whose data differ is trimmed away as an outlier. FedAvg
honours sample counts but lets one hospital move the model without bound. This rule does both:

1. **Capped sample weights** (McMahan, Ramage, Talwar & Zhang, "Learning Differentially
   Private Recurrent Language Models", ICLR 2018, which caps each user's weight to bound
   their influence): ``w_i = n_i / sum n``, then every weight above ``max_share`` is set to
   ``max_share`` and the rest are rescaled to sum to 1, repeated until none exceeds it
   (water-filling). A hospital cannot buy influence beyond ``max_share`` by reporting more
   samples; hospitals below the cap keep their proportions.
2. **Weighted trimmed mean per coordinate**: Yin et al.'s trimmed mean with the trimming done
   on weight instead of on counts: sort the coordinate's values, cut weight ``trim_share``
   from each end (a hospital straddling the cut keeps the part inside), average the middle
   ``1 - 2 * trim_share`` of the weight. This is the weighted form of the trimmed mean (as
   the weighted median / weighted geometric median of Pillutla, Kakade & Harchaoui, "Robust
   Aggregation for Federated Learning", IEEE TSP 2022, weight hospitals by sample count).

The bound. If the f Byzantine hospitals together hold at most ``trim_share`` of the capped
weight (``f * max_share <= trim_share``, checked at load), then in every coordinate a value
they push to one end lies inside the trimmed weight and is cut, and a value they leave in the
middle lies between two benign values: the aggregate stays within the benign hospitals' range
in every coordinate, however far they scale their updates. Without an attack, one hospital's
share of any coordinate's output is at most ``max_share / (1 - 2 * trim_share)``.

With f = 0 and trim_share = 0 it is FedAvg with capped weights.
"""

from __future__ import annotations

import torch

from fedsec.registry import RULES
from fedsec.strategies.base import FaultTolerantRule, RuleContext, RuleResult
from fedsec.strategies.coordinatewise import column_blocks


def capped_weights(counts: torch.Tensor, max_share: float) -> torch.Tensor:
    """Sample counts -> weights summing to 1, none above ``max_share`` (water-filling).

    counts: Tensor[n] >= 0, not all 0; needs n * max_share >= 1. A hospital with 0 samples
    keeps weight 0 unless the cap forces weight onto it (then every uncapped hospital shares
    the rest equally)."""
    w = counts.double() / counts.double().sum()
    n = len(w)
    if n * max_share < 1 - 1e-12:
        raise ValueError(f"cannot cap {n} weights at {max_share}: they must sum to 1")
    capped = torch.zeros(n, dtype=torch.bool)
    for _ in range(n):
        over = (w > max_share + 1e-12) & ~capped
        if not bool(over.any()):
            break
        capped |= over
        rest = 1.0 - max_share * int(capped.sum())
        free = w[~capped]
        total = float(free.sum())
        w = torch.where(capped, torch.tensor(max_share, dtype=w.dtype),
                        w * (rest / total) if total > 0 else torch.full_like(w, rest / max(int((~capped).sum()), 1)))
    return w.to(counts.dtype if counts.is_floating_point() else torch.float32)


def weighted_trimmed_mean(updates: torch.Tensor, weights: torch.Tensor, trim_share: float) -> torch.Tensor:
    """updates: Tensor[n, d], weights: Tensor[n] summing to 1 -> Tensor[d]: per coordinate, the
    weighted mean of the values left after cutting weight ``trim_share`` from each end."""
    if trim_share == 0:
        return weights.to(updates.dtype) @ updates
    keep_lo, keep_hi = trim_share, 1.0 - trim_share
    out = torch.empty(updates.shape[1], dtype=updates.dtype, device=updates.device)
    w = weights.to(updates.dtype)
    for cols, block in column_blocks(updates):
        values, order = torch.sort(block, dim=0)
        wsorted = w[order]  # [n, c]
        end = torch.cumsum(wsorted, dim=0)
        start = end - wsorted
        mass = (torch.minimum(end, torch.tensor(keep_hi, dtype=end.dtype))
                - torch.maximum(start, torch.tensor(keep_lo, dtype=end.dtype))).clamp_(min=0)
        # each value scaled before the sum (finite attackers' values cannot overflow it), and a
        # value with no mass contributes exactly 0 (not 0 * inf)
        out[cols] = torch.where(mass > 0, values * (mass / (keep_hi - keep_lo)), 0.0).sum(dim=0)
    return out


@RULES.register()
class SizeAware(FaultTolerantRule):
    """Size-aware robust aggregation: the sample-weighted trimmed mean with capped weights
    (McMahan et al. 2018's weight cap + Yin et al. 2018's trimmed mean, trimming weight; see
    the module docstring). Honours sample counts up to the cap; the aggregate stays within the
    benign hospitals' range in every coordinate while f * max_share <= trim_share.

    Options:
        num_malicious: f, default None (the scenario's number of malicious hospitals).
        trim_share: weight cut from each end of each coordinate, in [0, 0.5); default 0.4.
        max_share: the most weight one hospital gets; default None = trim_share / max(f, 1)
            (the same rule with and without an attack when f <= 1; 1 when trim_share = 0).
            Must leave f * max_share <= trim_share and n * max_share >= 1.
    """

    name = "size_aware"
    title = "the size-aware trimmed mean"
    short_title = "Size-aware"
    tolerates = "f with f * max_share <= trim_share (the Byzantine hospitals' capped weight is trimmed)"

    def __init__(self, *, num_malicious: int | None = None, trim_share: float = 0.4,
                 max_share: float | None = None):
        super().__init__(num_malicious=num_malicious)
        self.trim_share = self.float_option("trim_share", trim_share)
        if self.trim_share >= 0.5:
            raise self.option_fail("trim_share", f"must be in [0, 0.5) (the weight cut from each end), got {trim_share}")
        self.max_share = self.float_option("max_share", max_share, minimum=0.0, strict=True, allow_none=True)
        if self.max_share is not None and self.max_share > 1:
            raise self.option_fail("max_share", f"must be in (0, 1], got {max_share}")

    def cap(self, f: int) -> float:
        if self.max_share is not None:
            return self.max_share
        return self.trim_share / max(f, 1) if self.trim_share > 0 else 1.0

    def min_updates(self, f: int) -> int:
        return 2 * f + 1

    def check(self, f: int, per_round: int) -> None:
        cap = self.cap(f)
        if f and f * cap > self.trim_share + 1e-12:
            raise self.option_fail("max_share" if self.max_share is not None else "trim_share",
                                   f"lets the f = {f} malicious hospitals hold {f} x {cap:g} = {f * cap:g} of the "
                                   f"weight, more than trim_share = {self.trim_share:g} is cut from each end: raise "
                                   "trim_share or lower max_share")
        if f and self.trim_share == 0:
            raise self.option_fail("trim_share", f"= 0 cuts nothing, so it cannot tolerate f = {f}")
        if per_round * cap < 1 - 1e-12:
            raise self.option_fail("max_share", f"= {cap:g} x {per_round} hospitals < 1: the weights cannot sum to 1; "
                                                f"use max_share >= {1 / per_round:.3g}")

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor, ctx: RuleContext) -> RuleResult:
        f = self.malicious(ctx)
        n = updates.shape[0]
        cap = max(self.cap(f), 1.0 / n)  # a round with fewer hospitals: the cap cannot go below 1 / n
        if float(weights.sum()) <= 0:
            weights = torch.ones_like(weights)
        w = capped_weights(weights, cap)
        return RuleResult(update=weighted_trimmed_mean(updates, w, self.trim_share),
                          info={"weights": [round(float(x), 6) for x in w], "max_share": cap,
                                "trim_share": self.trim_share})

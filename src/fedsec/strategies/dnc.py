"""Divide-and-Conquer, DnC (Shejwalkar & Houmansadr, "Manipulating the Byzantine: optimizing
model poisoning attacks and defenses for federated learning", NDSS 2021, Alg. 2)."""

from __future__ import annotations

import torch

from fedsec.strategies.base import FaultTolerantRule, RuleContext, RuleResult
from fedsec.registry import RULES


@RULES.register()
class DnC(FaultTolerantRule):
    """DnC: for each of ``iterations`` rounds of filtering, sample ``subsample_dim`` random
    coordinates, centre the sub-matrix, project each row on its top right singular vector;
    the squared projection is the outlier score, and the ``filter_fraction * f`` highest
    scores are removed. Rows that survive every iteration are averaged (uniformly).
    Coordinates are drawn from ``RuleContext.generator``.

    Options:
        num_malicious: f, default None (the scenario's count).
        filter_fraction: c, default 1.0 (the paper's value).
        iterations: default 1 (the paper's value).
        subsample_dim: b, default 10000 (the paper's value); all coordinates when d <= b.
    Flags the rows removed in any iteration.
    """

    name = "dnc"
    title = "Divide-and-Conquer"
    short_title = "DnC"

    def __init__(
        self,
        *,
        num_malicious: int | None = None,
        filter_fraction: float = 1.0,
        iterations: int = 1,
        subsample_dim: int = 10000,
    ):
        super().__init__(num_malicious=num_malicious)
        self.filter_fraction = self.float_option("filter_fraction", filter_fraction)
        self.iterations = self.int_option("iterations", iterations, minimum=1)
        self.subsample_dim = self.int_option("subsample_dim", subsample_dim, minimum=1)

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor, ctx: RuleContext) -> RuleResult:
        n, d = updates.shape
        f = self.malicious(ctx)
        removed_per_iteration = int(self.filter_fraction * f)
        if n - removed_per_iteration < 1:
            raise self.fail(
                f"would remove filter_fraction * f = {removed_per_iteration} of {n} updates "
                f"each iteration: needs n > c * f"
            )
        good = torch.ones(n, dtype=torch.bool, device=updates.device)
        for _ in range(self.iterations):
            if d <= self.subsample_dim:
                sub = updates
            else:
                coords = torch.randperm(d, generator=ctx.generator)[: self.subsample_dim]
                sub = updates[:, coords.to(updates.device)]
            # float64 before the mean: two finite float32 updates near 3.4e38 sum to inf.
            centred = sub.double()
            centred = centred - centred.mean(dim=0)
            top = torch.linalg.svd(centred, full_matrices=False).Vh[0]
            scores = (centred @ top) ** 2
            keep = torch.topk(scores, n - removed_per_iteration, largest=False).indices
            kept = torch.zeros(n, dtype=torch.bool, device=updates.device)
            kept[keep] = True
            good &= kept
        rows = good.nonzero().flatten()
        # Uniform mean of the survivors as one [n] x [n, d] product. With several iterations
        # the intersection can come out empty: then nothing is trusted and the update is 0.
        update = (good.to(updates.dtype) / max(1, len(rows))) @ updates
        return RuleResult(
            update=update,
            flagged=(~good).nonzero().flatten().tolist(),
            info={"removed_per_iteration": removed_per_iteration, "kept": rows.tolist()},
        )

"""Norm-based defenses: norm bounding (Sun et al. 2019) and centered clipping
(Karimireddy, He & Jaggi, ICML 2021)."""

from __future__ import annotations

import torch

from fedsec.strategies.base import AggregationRule, RuleContext, RuleResult
from fedsec.strategies.fedavg import normalised_weights
from fedsec.strategies.geometry import row_norms
from fedsec.registry import RULES


def clip_factors(norms: torch.Tensor, max_norm: float | torch.Tensor) -> torch.Tensor:
    """min(1, max_norm / norm) per row; norms: Tensor[n] -> Tensor[n]. A zero row keeps 1."""
    return torch.where(norms > max_norm, max_norm / norms.clamp(min=torch.finfo(norms.dtype).tiny), 1.0)


@RULES.register()
class NormBounding(AggregationRule):
    """Norm bounding ("Can you really backdoor federated learning?", Sun et al. 2019): scale
    every update down to norm <= M, then take the sample-weighted mean; optionally add
    Gaussian noise (the paper's "weak differential privacy").

    Options:
        max_norm: M, default None = the median update norm of the round (adaptive, as FLAME).
        noise_std: standard deviation of the Gaussian noise added to the mean, default 0.
    Flags nothing (clipped rows still count); info lists the clipped rows.
    """

    name = "norm_bounding"
    title = "norm bounding"
    short_title = "Norm bounding"

    def __init__(self, *, max_norm: float | None = None, noise_std: float = 0.0):
        self.max_norm = self.float_option("max_norm", max_norm, strict=True, allow_none=True)
        self.noise_std = self.float_option("noise_std", noise_std)

    def bound(self) -> float | str:
        """max_norm, or "median" when it follows the round's median update norm."""
        return self.max_norm if self.max_norm is not None else "median"

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor, ctx: RuleContext) -> RuleResult:
        norms = row_norms(updates)  # float64: no overflow for any finite update
        bound = self.max_norm if self.max_norm is not None else float(norms.median())
        # The weighted mean of the clipped rows is one [n] x [n, d] product: no clipped copy.
        coeffs = normalised_weights(weights).double() * clip_factors(norms, bound)
        update = coeffs.to(updates.dtype) @ updates
        if self.noise_std > 0:
            update += self.noise_std * torch.randn(
                update.shape, generator=ctx.generator, dtype=update.dtype, device="cpu"
            ).to(update.device)
        return RuleResult(
            update=update,
            info={"max_norm": bound, "clipped": (norms > bound).nonzero().flatten().tolist()},
        )


@RULES.register()
class CenteredClipping(AggregationRule):
    """Centered clipping (Karimireddy et al. 2021, "Learning from history for Byzantine robust
    optimization"): starting from the previous round's aggregate v, repeat
    ``v <- v + mean_i clip_tau(u_i - v)`` where clip_tau scales a vector to norm <= tau.
    Stateful: v carries over between rounds (zero in the first round). Uniform over rows.

    Options:
        tau: clipping radius, default 10.0.
        iterations: clipping iterations per round (the paper's l), default 1.
    Flags nothing; info counts the rows clipped in the last iteration.
    """

    name = "centered_clipping"
    title = "centered clipping"
    short_title = "Centered clipping"
    stateful = True

    def __init__(self, *, tau: float = 10.0, iterations: int = 1):
        self.tau = self.float_option("tau", tau, strict=True)
        self.iterations = self.int_option("iterations", iterations, minimum=1)
        self._center: torch.Tensor | None = None

    def bound(self) -> float:
        """tau: the radius around the previous aggregate (zero in the first round)."""
        return self.tau

    def reset(self) -> None:
        self._center = None

    def state_dict(self) -> dict:
        """{"center": Tensor[d] | None}: the previous round's aggregate v."""
        return {"center": None if self._center is None else self._center.detach().cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"center"}:
            raise self.fail(f"checkpoint state must hold 'center', got {sorted(state)}")
        self._center = None if state["center"] is None else state["center"].clone()

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor, ctx: RuleContext) -> RuleResult:
        n, d = updates.shape
        if self._center is None or self._center.shape != (d,):
            v = torch.zeros(d, dtype=updates.dtype, device=updates.device)
        else:
            v = self._center.to(device=updates.device, dtype=updates.dtype)
        clipped = 0
        for _ in range(self.iterations):
            deltas = updates - v
            factors = clip_factors(row_norms(deltas), self.tau)
            clipped = int((factors < 1).sum())
            v = v + (factors / n).to(deltas.dtype) @ deltas
        self._center = v.clone()
        return RuleResult(update=v, info={"tau": self.tau, "clipped": clipped})

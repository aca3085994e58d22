"""FLAME (Nguyen et al., "FLAME: Taming backdoors in federated learning", USENIX Security
2022): cluster out odd directions, clip to the median norm, add noise."""

from __future__ import annotations

import torch

from fedsec.strategies.base import AggregationRule, RuleContext, RuleResult
from fedsec.strategies.clipping import clip_factors
from fedsec.strategies.geometry import cosine_similarities
from fedsec.registry import RULES


@RULES.register()
class Flame(AggregationRule):
    """FLAME, three steps (Alg. 1 of the paper):

    1. HDBSCAN over the pairwise cosine distances ``1 - cos(u_i, u_j)`` with
       ``min_cluster_size = n/2 + 1``; only the majority cluster is admitted (HDBSCAN's noise
       points and smaller clusters are flagged). If HDBSCAN finds no cluster, all are admitted.
    2. Clipping bound S = median of all n update norms; admitted updates are scaled to
       norm <= S and averaged (uniformly).
    3. Gaussian noise with standard deviation ``noise_lambda * S`` is added, drawn from
       ``RuleContext.generator``.

    The paper clusters the local models W_i = G + u_i; here the updates u_i are clustered,
    because in float arithmetic the cosines between models are swamped by the shared G.

    Options:
        noise_lambda: lambda, noise std as a fraction of S, default 0.001 (the paper's value
            for image classification).
        min_cluster_size: default None = n // 2 + 1.
    Flags the rows outside the majority cluster.
    """

    name = "flame"
    title = "FLAME"
    short_title = "FLAME"

    def __init__(self, *, noise_lambda: float = 0.001, min_cluster_size: int | None = None):
        self.noise_lambda = self.float_option("noise_lambda", noise_lambda)
        self.min_cluster_size = self.int_option("min_cluster_size", min_cluster_size, minimum=2, allow_none=True)

    def bound(self) -> str:
        """FLAME clips to the round's median update norm."""
        return "median"

    def admitted(self, cos: torch.Tensor) -> tuple[list[int], list[int]]:
        """Rows in the majority HDBSCAN cluster, and the sizes of all clusters found.

        cos: Tensor[n, n] cosine similarities.
        """
        n = cos.shape[0]
        if n < 3:
            return list(range(n)), [n]
        # Imported here: sklearn costs ~1 s to import and only FLAME needs it.
        from sklearn.cluster import HDBSCAN

        distance = (1.0 - cos).clamp(min=0.0).cpu().numpy()
        distance = (distance + distance.T) / 2  # exact symmetry, as HDBSCAN expects
        labels = HDBSCAN(
            min_cluster_size=self.min_cluster_size or n // 2 + 1,
            min_samples=1,
            metric="precomputed",
            allow_single_cluster=True,
            copy=False,  # the distance matrix is ours to overwrite
        ).fit_predict(distance)
        found = sorted({int(x) for x in labels if x >= 0})
        sizes = [int((labels == c).sum()) for c in found]
        if not found:
            return list(range(n)), []
        majority = found[max(range(len(found)), key=lambda i: sizes[i])]
        return [i for i in range(n) if labels[i] == majority], sizes

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor, ctx: RuleContext) -> RuleResult:
        n = updates.shape[0]
        cos, norms = cosine_similarities(updates)
        admitted, sizes = self.admitted(cos)
        bound = float(norms.median())
        # Mean of the clipped admitted rows as one [n] x [n, d] product (0 for flagged rows),
        # without copying the admitted rows out.
        coeffs = torch.zeros(n, dtype=torch.float64, device=norms.device)
        keep = torch.tensor(admitted, device=norms.device)
        coeffs[keep] = clip_factors(norms[keep], bound) / len(admitted)
        update = coeffs.to(device=updates.device, dtype=updates.dtype) @ updates
        noise_std = self.noise_lambda * bound
        if noise_std > 0:
            noise = torch.randn(update.shape, generator=ctx.generator, dtype=update.dtype)
            update += noise_std * noise.to(update.device)
        admitted_set = set(admitted)
        return RuleResult(
            update=update,
            flagged=[i for i in range(n) if i not in admitted_set],
            info={"cluster_sizes": sizes, "admitted": admitted, "clip_norm": bound, "noise_std": noise_std},
        )

"""Distance-based selection: Krum, Multi-Krum (Blanchard et al., NeurIPS 2017) and Bulyan
(El Mhamdi et al., ICML 2018)."""

from __future__ import annotations

import torch

from fedsec.strategies.base import FaultTolerantRule, RuleContext, RuleResult
from fedsec.strategies.coordinatewise import coordinate_mean_around_median
from fedsec.strategies.fedavg import normalised_weights
from fedsec.strategies.geometry import squared_distances
from fedsec.registry import RULES


def krum_scores(distances: torch.Tensor, num_neighbours: int) -> torch.Tensor:
    """Krum score of each row: the sum of its squared distances to its ``num_neighbours``
    nearest other rows (n - f - 2 in the paper).

    distances: Tensor[n, n] of squared distances -> Tensor[n].
    """
    others = distances.clone()
    others.fill_diagonal_(float("inf"))
    return others.topk(num_neighbours, dim=1, largest=False).values.sum(dim=1)


def rank_by_score(scores: torch.Tensor, tie_break: torch.Tensor) -> torch.Tensor:
    """Row indices from best (lowest score) to worst. Exact ties, common when few neighbours
    are summed (two mutual nearest neighbours have the same 1-neighbour score), go to the row
    with the lower ``tie_break`` (its total distance to the others), so the choice depends on
    the updates and not on the order the hospitals' replies arrived in.

    scores, tie_break: Tensor[n] -> Tensor[n] (a permutation).
    """
    by_tie = torch.argsort(tie_break, stable=True)
    return by_tie[torch.argsort(scores[by_tie], stable=True)]


def symmetric_distances(updates: torch.Tensor) -> torch.Tensor:
    """squared_distances made exactly symmetric, so that tied scores are bitwise equal.

    updates: Tensor[n, d] -> Tensor[n, n].
    """
    dist = squared_distances(updates)
    return (dist + dist.T) / 2


@RULES.register()
class Krum(FaultTolerantRule):
    """Krum: keep the one update whose n - f - 2 nearest neighbours are closest (sum of squared
    distances), and use it as the round's update.

    Options: num_malicious (f, default None = the scenario's count). Needs n > 2f + 2.
    Flags every row but the selected one.
    """

    name = "krum"
    title = "Krum"
    short_title = "Krum"
    tolerates = "f with n > 2f + 2 (Blanchard et al. 2017)"

    def min_updates(self, f: int) -> int:
        return 2 * f + 3

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor, ctx: RuleContext) -> RuleResult:
        n, f = updates.shape[0], self.malicious(ctx)
        if n <= 2 * f + 2:
            raise self.fail(
                f"needs n > 2f + 2 updates to tolerate f = {f} Byzantine hospitals "
                f"(Blanchard et al. 2017, each score sums n - f - 2 >= 1 neighbours and the honest "
                f"ones must outnumber them), got n = {n}"
            )
        dist = symmetric_distances(updates)
        scores = krum_scores(dist, n - f - 2)
        best = int(rank_by_score(scores, dist.sum(dim=1))[0])
        return RuleResult(
            update=updates[best].clone(),
            flagged=[i for i in range(n) if i != best],
            info={"selected": [best], "scores": scores.tolist()},
        )


@RULES.register()
class MultiKrum(FaultTolerantRule):
    """Multi-Krum: average the m updates with the lowest Krum scores (scores computed once).

    Options:
        num_malicious: f, default None (the scenario's count). Needs n > 2f + 2.
        num_selected: m, default None = n - f (the paper's choice).
        weighted: average the selected updates by sample count (as Flower's MultiKrum), default
            True; False gives the paper's plain mean (identical when the counts are equal).
    Flags the rows not selected.
    """

    name = "multi_krum"
    title = "Multi-Krum"
    short_title = "Multi-Krum"
    tolerates = "f with n > 2f + 2 (Blanchard et al. 2017)"

    def min_updates(self, f: int) -> int:
        return 2 * f + 3

    def __init__(self, *, num_malicious: int | None = None, num_selected: int | None = None, weighted: bool = True):
        super().__init__(num_malicious=num_malicious)
        self.num_selected = self.int_option("num_selected", num_selected, minimum=1, allow_none=True)
        if not isinstance(weighted, bool):
            raise self.fail(f"option 'weighted' must be true or false, got {weighted!r}")
        self.weighted = weighted

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor, ctx: RuleContext) -> RuleResult:
        n, f = updates.shape[0], self.malicious(ctx)
        if n <= 2 * f + 2:
            raise self.fail(f"needs n > 2f + 2 updates to tolerate f = {f} (Blanchard et al. 2017), got n = {n}")
        m = self.num_selected if self.num_selected is not None else n - f
        if m > n:
            raise self.fail(f"num_selected = {m} is more than the {n} updates received")
        dist = symmetric_distances(updates)
        scores = krum_scores(dist, n - f - 2)
        chosen = rank_by_score(scores, dist.sum(dim=1))[:m].to(updates.device)
        w = weights[chosen] if self.weighted else torch.ones(m, dtype=updates.dtype, device=updates.device)
        # One coefficient per row (0 for the rows left out) and a single [n] x [n, d] product:
        # the m selected rows are never copied out.
        coeffs = torch.zeros_like(weights).index_copy_(0, chosen, normalised_weights(w))
        chosen_set = set(chosen.tolist())
        return RuleResult(
            update=coeffs @ updates,
            flagged=[i for i in range(n) if i not in chosen_set],
            info={"selected": sorted(chosen_set), "scores": scores.tolist()},
        )


@RULES.register()
class Bulyan(FaultTolerantRule):
    """Bulyan: pick theta = n - 2f updates by applying Krum recursively (each pick removed from
    the pool, scores recomputed on what is left), then per coordinate average the
    beta = theta - 2f values closest to the median of the theta picks.

    Options: num_malicious (f, default None = the scenario's count). Needs n >= 4f + 3.
    Flags the 2f rows that Krum never picked (the coordinate step drops values, not rows).
    """

    name = "bulyan"
    title = "Bulyan"
    short_title = "Bulyan"
    tolerates = "f with n >= 4f + 3 (El Mhamdi et al. 2018)"

    def min_updates(self, f: int) -> int:
        return 4 * f + 3

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor, ctx: RuleContext) -> RuleResult:
        n, f = updates.shape[0], self.malicious(ctx)
        if n < 4 * f + 3:
            raise self.fail(
                f"needs n >= 4f + 3 updates to tolerate f = {f} (El Mhamdi et al. 2018: Krum must "
                f"still run on the last of the n - 2f picks and 2f values per coordinate are "
                f"dropped around the median), got n = {n}"
            )
        theta, beta = n - 2 * f, n - 4 * f
        chosen = self._recursive_krum(symmetric_distances(updates), f, theta)
        chosen_set = set(chosen)
        rows = torch.tensor(chosen, device=updates.device)
        update = coordinate_mean_around_median(updates, beta, rows=rows)
        return RuleResult(
            update=update,
            flagged=[i for i in range(n) if i not in chosen_set],
            info={"selected": chosen, "theta": theta, "beta": beta},
        )

    @staticmethod
    def _recursive_krum(distances: torch.Tensor, f: int, count: int) -> list[int]:
        """Indices of ``count`` rows, chosen one at a time by Krum on the rows still left.

        distances: Tensor[n, n]. Each step is an n x n topk: the distances are computed once.
        """
        n = distances.shape[0]
        inf = float("inf")
        left = torch.ones(n, dtype=torch.bool, device=distances.device)
        pool = distances.clone()
        pool.fill_diagonal_(inf)
        chosen: list[int] = []
        for _ in range(count):
            remaining = n - len(chosen)
            if remaining == 1:
                chosen.append(int(left.nonzero()[0]))
                break
            # Flower's rule near the end of the recursion: at least one neighbour.
            k = max(1, remaining - f - 2)
            scores = pool.topk(k, dim=1, largest=False).values.sum(dim=1).masked_fill(~left, inf)
            spread = torch.where(pool.isinf(), 0.0, pool).sum(dim=1)
            best = int(rank_by_score(scores, spread)[0])
            chosen.append(best)
            left[best] = False
            pool[:, best] = inf
        return chosen

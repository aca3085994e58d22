"""Direction-based trust: FLTrust (Cao et al., NDSS 2021) and FoolsGold (Fung, Yoon &
Beschastnikh, RAID 2020)."""

from __future__ import annotations

import torch

from fedsec.strategies.base import AggregationRule, RuleContext, RuleResult
from fedsec.registry import RULES
from fedsec.strategies.geometry import cosine_similarities, row_dots, row_norms
# FoolsGold reference code (github.com/DistributedML/FoolsGold, ML/code/model_aggregator.py,
# function ``foolsgold``, commit 0aa5511): ``epsilon = 1e-5``, added to each hospital's
# maximum similarity before pardoning and inside the logit.
_FOOLSGOLD_EPSILON = 1e-5


@RULES.register()
class FLTrust(AggregationRule):
    """FLTrust: the server trains on a small clean root set; its update g0 is the reference.
    Trust ``TS_i = ReLU(cos(u_i, g0))``; each update is rescaled to ``|g0|`` (so no hospital
    wins by magnitude) and the result is ``sum TS_i * |g0|/|u_i| * u_i / sum TS_i``.
    If every trust score is 0 the round's update is zero. Sample counts are ignored.

    Needs ``RuleContext.root_update`` (Tensor[d]). Options: none.
    Flags the rows with trust 0 (pointing away from, or orthogonal to, the root update).
    """

    name = "fltrust"
    title = "FLTrust"
    short_title = "FLTrust"
    needs_root_data = True

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor, ctx: RuleContext) -> RuleResult:
        root = ctx.root_update
        if root is None:
            raise self.fail(
                "needs the server's update on its clean root set (RuleContext.root_update); "
                "the strategy must train the global model on a root dataset each round"
            )
        if root.shape != updates.shape[1:]:
            raise self.fail(f"root update has shape {tuple(root.shape)}, the updates [{updates.shape[1]}]")
        root = root.to(device=updates.device, dtype=updates.dtype)
        # float64 throughout: one finite update of norm > 1.8e19 overflows float32 squares.
        root_norm = row_norms(root[None])[0]
        norms = row_norms(updates)
        dots = row_dots(updates, root)
        usable = (norms > 0) & (root_norm > 0)
        safe_norms = norms.clamp(min=torch.finfo(torch.float64).tiny)
        cos = torch.where(usable, dots / safe_norms / root_norm.clamp(min=torch.finfo(torch.float64).tiny), 0.0)
        trust = cos.clamp(min=0.0)
        total = float(trust.sum())
        if total > 0:
            coeffs = trust * root_norm / safe_norms / total
            update = coeffs.to(updates.dtype) @ updates
        else:
            update = torch.zeros_like(updates[0])
        return RuleResult(
            update=update,
            flagged=(trust == 0).nonzero().flatten().tolist(),
            info={"trust": trust.tolist(), "root_norm": float(root_norm)},
        )


@RULES.register()
class FoolsGold(AggregationRule):
    """FoolsGold: sybils pushing one poisoning goal send similar updates over time, honest
    hospitals with different data do not. Each hospital's updates are summed over rounds
    (its history); from the cosine similarities of the histories, with "pardoning" of honest
    hospitals that merely resemble a sybil, each gets a weight in [0, 1] through a logit
    (Fung et al. 2020, Alg. 1; numbers as the authors' reference code). The update is
    ``sum_i w_i u_i / n``. Stateful: histories are keyed by ``RuleContext.client_ids``
    (row index when absent). Sample counts are ignored.

    Options:
        kappa: confidence, the slope of the logit, default 1.0.
        use_history: compare summed histories (paper) rather than this round's updates only,
            default True.
    Flags the rows whose weight is 0.
    """

    name = "foolsgold"
    title = "FoolsGold"
    short_title = "FoolsGold"
    stateful = True

    def __init__(self, *, kappa: float = 1.0, use_history: bool = True):
        self.kappa = self.float_option("kappa", kappa, strict=True)
        if not isinstance(use_history, bool):
            raise self.fail(f"option 'use_history' must be true or false, got {use_history!r}")
        self.use_history = use_history
        self._history: dict = {}

    def reset(self) -> None:
        self._history = {}

    def state_dict(self) -> dict:
        """{"history": {client id: Tensor[d]}}: each hospital's summed updates so far."""
        return {"history": {cid: h.detach().cpu().clone() for cid, h in self._history.items()}}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"history"}:
            raise self.fail(f"checkpoint state must hold 'history', got {sorted(state)}")
        self._history = {cid: h.clone() for cid, h in state["history"].items()}

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor, ctx: RuleContext) -> RuleResult:
        n = updates.shape[0]
        ids = list(ctx.client_ids) if ctx.client_ids is not None else list(range(n))
        if len(ids) != n or len(set(ids)) != n:
            raise self.fail(f"client_ids must be {n} distinct ids, one per update, got {ids}")
        if self.use_history:
            for row, cid in enumerate(ids):
                past = self._history.get(cid)
                self._history[cid] = updates[row].clone() if past is None else past + updates[row]
            features = torch.stack([self._history[cid] for cid in ids])
        else:
            features = updates
        wv = self.weights_from_similarity(cosine_similarities(features)[0], self.kappa)
        update = (wv.to(updates.dtype) / n) @ updates
        return RuleResult(
            update=update,
            flagged=(wv == 0).nonzero().flatten().tolist(),
            info={"weights": wv.tolist()},
        )

    @staticmethod
    def weights_from_similarity(cos: torch.Tensor, kappa: float) -> torch.Tensor:
        """FoolsGold's weights, step by step as the authors' reference code
        (DistributedML/FoolsGold, ML/code/model_aggregator.py, ``foolsgold``), with the
        paper's confidence kappa (Alg. 1; the code has kappa = 1).

        cos: Tensor[n, n] pairwise cosine similarities -> Tensor[n] in [0, 1].

        The code's ``cs = cosine_similarity(...) - eye(n)`` leaves each hospital's own
        similarity on the diagonal at 0 (-1 for a zero update, whose cosines are all 0); here
        that diagonal is set exactly, not left to float rounding. With a rounded self-cosine
        of 1 - 1e-16 the diagonal was -1e-16, the row's maximum (when every other similarity
        is negative) fell below a neighbour's 0, and pardoning then divided by that 0: the
        hospital's weight became 0. The code's epsilon (1e-5, added to every maximum before
        pardoning and inside the logit) keeps those divisions finite as well.
        """
        n = cos.shape[0]
        eps = _FOOLSGOLD_EPSILON
        cs = cos.double().clone()
        # Self-similarity 1 (0 for a zero row), minus eye(n): exactly 0 or -1.
        cs.diagonal().copy_(cs.diagonal().round() - 1.0)
        max_cs = cs.max(dim=1).values + eps
        # Pardoning, for i != j: when j looks more like a sybil than i does (max_i < max_j),
        # i's similarity to j is scaled by max_i / max_j, so an honest hospital is not
        # punished for resembling a sybil. On the diagonal row == col, so nothing changes.
        row, col = max_cs[:, None], max_cs[None, :]
        cs = torch.where(row < col, cs * row / col, cs)
        wv = (1.0 - cs.max(dim=1).values).clamp(0.0, 1.0)
        top = wv.max()
        if float(top) <= 0:  # the code would divide by 0 here (NaN for everyone)
            return torch.zeros_like(wv)
        wv = wv / top
        wv = torch.where(wv == 1.0, torch.full_like(wv, 0.99), wv)
        # Logit: log(wv / (1 - wv) + eps) + 0.5, inf or > 1 -> 1, < 0 -> 0 (as the code).
        wv = kappa * (torch.log(wv / (1.0 - wv) + eps) + 0.5)
        return wv.nan_to_num(nan=0.0, posinf=1.0).clamp(0.0, 1.0)

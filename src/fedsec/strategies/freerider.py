"""Free-rider detection in front of FedAvg: hospitals whose update is no real training are
left out of the sample-weighted mean and named in the round's ``defense.flagged``.

Three tests, one per kind of free-rider (fedsec.attacks.freeriders; Lin, Du & Liu 2019,
"Free-riders in Federated Learning: Attacks and Defenses", arXiv 1911.12560; Fraboni, Vidal
& Lorenzi 2021, "Free-rider Attacks on Model Aggregation in Federated Learning", AISTATS):

1. **zero**: the global model sent back (plain free-rider): ``||u_i|| <= zero_tol * median_j
   ||u_j||`` (the median over the round's updates; an absolute 0 when every update is 0).
2. **stale**: a replay. ``||u_i - r|| <= stale_tol * ||r||`` for r the hospital's own
   previous update (a replay of itself) or the last change of the global model (Lin et al.'s
   delta weights: ``G_t - G_{t-1}``). Honest hospitals never repeat themselves exactly:
   on heart-disease, the closest two consecutive honest updates of one hospital differ by
   3 % of their norm (Switzerland, 30 records), a replay by float32 rounding (~1e-6).
3. **noise**: an update whose direction looks random. For an isotropic random vector in d
   dimensions and any fixed reference r, ``cos^2(u, r) ~ Beta(1/2, (d - 1)/2)`` (the
   classical distribution of the angle to a random direction); the test flags u when none
   of its cosines to the references -- its own previous update, the last global change and
   the mean of the round's other updates -- is significant at level ``alpha``
   (``|cos| <= t`` with ``t^2`` the Beta's 1 - alpha quantile). Honest updates are
   structured: consistent with their own history, with the global model's motion, or with
   (or against) the other hospitals. This simple statistic stands in for the STD-DAGMM
   detector of Lin et al. (an autoencoder + Gaussian-mixture density on the updates and
   their standard deviation), which needs many clients to fit. A hospital is tested for
   noise only from its second update on (the first has no history: in its first round a
   disguised free-rider is only caught if it also fails the other references), and with
   small d the test has little power per round (d = 22 on heart: t = 0.54).

If every update is flagged the round's update is 0 (nothing trustworthy arrived).
Stateful: the last global model and each hospital's last update (keyed by
``RuleContext.client_ids``), in the checkpoint.
"""

from __future__ import annotations

import torch

from fedsec.registry import RULES
from fedsec.strategies.base import AggregationRule, RuleContext, RuleResult
from fedsec.strategies.fedavg import normalised_weights
from fedsec.strategies.geometry import row_norms

TESTS = ("zero", "stale", "noise")


def random_cosine_threshold(d: int, alpha: float) -> float:
    """t such that a uniformly random direction in d dimensions has ``|cos| > t`` with any
    fixed vector with probability alpha: ``t^2`` is the 1 - alpha quantile of
    Beta(1/2, (d - 1)/2). d = 1: every direction is +-1, the test is void (returns 1)."""
    if d <= 1:
        return 1.0
    from scipy.special import betaincinv

    return float(betaincinv(0.5, (d - 1) / 2.0, 1.0 - alpha)) ** 0.5


def _cos(a: torch.Tensor, b: torch.Tensor) -> float | None:
    na, nb = float(a.norm()), float(b.norm())
    if na == 0.0 or nb == 0.0:
        return None
    return float(a @ b) / (na * nb)


@RULES.register()
class FreeRiderFilter(AggregationRule):
    """Free-rider detection (zero / stale / noise updates, see the module), then the
    sample-weighted mean (FedAvg) of the updates that pass. Flags the free-riders;
    ``info`` counts each test's flags (``zero``, ``stale``, ``noise``)."""

    name = "freerider_filter"
    title = "free-rider detection + FedAvg"
    short_title = "Free-rider filter"
    stateful = True
    tolerates = "any number of free-riders (their updates are excluded, not bounded)"
    option_docs = {
        "zero_tol": "flag ||u|| <= zero_tol x the round's median norm (the global model sent back)",
        "stale_tol": "flag ||u - r|| <= stale_tol x ||r||, r = own last update or last global change",
        "alpha": "noise test: level of the random-direction test on the cosines (0 disables it)",
        "tests": "which tests run: zero, stale, noise",
    }

    def __init__(self, *, zero_tol: float = 1e-6, stale_tol: float = 1e-4, alpha: float = 0.01,
                 tests: list[str] = ("zero", "stale", "noise")):
        self.zero_tol = self.float_option("zero_tol", zero_tol)
        self.stale_tol = self.float_option("stale_tol", stale_tol)
        self.alpha = self.float_option("alpha", alpha)
        if self.alpha >= 1.0:
            raise self.option_fail("alpha", f"must be below 1, got {alpha!r}")
        tests = list(tests) if isinstance(tests, (list, tuple)) else tests
        if not isinstance(tests, list) or not tests or any(t not in TESTS for t in tests):
            raise self.option_fail("tests", f"must be a non-empty list of {', '.join(TESTS)}, got {tests!r}")
        self.tests = tuple(tests)
        self._previous_global: torch.Tensor | None = None
        self._last: dict = {}

    def reset(self) -> None:
        self._previous_global, self._last = None, {}

    def state_dict(self) -> dict:
        """{"previous_global": Tensor[d] | None, "last": {client id: Tensor[d]}}."""
        return {"previous_global": None if self._previous_global is None else self._previous_global.clone(),
                "last": {cid: u.clone() for cid, u in self._last.items()}}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"previous_global", "last"}:
            raise self.fail(f"checkpoint state must hold 'previous_global' and 'last', got {sorted(state)}")
        g = state["previous_global"]
        self._previous_global = None if g is None else g.clone()
        self._last = {cid: u.clone() for cid, u in state["last"].items()}

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor, ctx: RuleContext) -> RuleResult:
        n, d = updates.shape
        ids = list(ctx.client_ids) if ctx.client_ids is not None else list(range(n))
        if len(ids) != n or len(set(ids)) != n:
            raise self.fail(f"client_ids must be {n} distinct ids, one per update, got {ids}")
        u = updates.detach().double().cpu()
        norms = row_norms(u)
        delta = None
        if ctx.global_params is not None:
            g = ctx.global_params.detach().double().cpu()
            if self._previous_global is not None and self._previous_global.shape == g.shape:
                delta = g - self._previous_global
            self._previous_global = g.clone()
        t = random_cosine_threshold(d, self.alpha) if self.alpha > 0 else 0.0
        reason: dict[int, str] = {}
        median = float(norms.median())
        for i in range(n):
            last = self._last.get(ids[i])
            if "zero" in self.tests and float(norms[i]) <= self.zero_tol * median:
                reason[i] = "zero"
                continue
            if "stale" in self.tests:
                refs = [r for r in (last, delta) if r is not None and float(r.norm()) > 0]
                if any(float((u[i] - r).norm()) <= self.stale_tol * float(r.norm()) for r in refs):
                    reason[i] = "stale"
                    continue
            if "noise" in self.tests and t > 0 and last is not None:
                others = torch.cat([u[:i], u[i + 1:]]).mean(dim=0) if n > 1 else None
                cosines = [c for c in (_cos(u[i], r) for r in (last, delta, others) if r is not None)
                           if c is not None]
                if cosines and max(abs(c) for c in cosines) <= t:
                    reason[i] = "noise"
        for i in range(n):
            self._last[ids[i]] = u[i].clone()
        keep = [i for i in range(n) if i not in reason]
        if keep:
            coeffs = torch.zeros(n, dtype=torch.float64)
            idx = torch.tensor(keep)
            coeffs[idx] = normalised_weights(weights.detach().double().cpu()[idx])
            update = coeffs.to(updates.dtype).to(updates.device) @ updates
        else:
            update = torch.zeros_like(updates[0])
        flagged = sorted(reason)
        info = {k: sum(1 for r in reason.values() if r == k) for k in TESTS}
        info["noise_threshold"] = t
        info["reasons"] = {str(ids[i]): reason[i] for i in flagged}
        return RuleResult(update=update, flagged=flagged, info=info)

"""Attacks that adapt to the defense in force (``fedsec.attacks.defense``).

A defense is only as good as the best attack that knows it (Sun et al. 2019; Shejwalkar &
Houmansadr 2021). Each attack here reads the rule's declared parameters (its norm bound,
its trim, its f) and central DP's clipping norm, and declares in ``targets`` the defenses
it was built against.

Malicious hospitals (client side, ``poison_update``; knowledge: the hospital's own data and
the scenario, never another hospital's update nor any test split):

- ``bounded_*`` backdoors: the backdoor update scaled to exactly the largest norm the
  defense lets through in full (constrain-and-scale with the bound in force instead of a
  fixed boost). A bound that follows the round's median norm (FLAME, norm bounding without
  ``max_norm``) is estimated by the norm of the hospital's own honest update (it trains a
  second, clean copy on its own data).
- ``flame_evading_*`` backdoors: also cosine-constrained: the update sent is the mix
  ``(1 - a) h + a p`` of the honest update h and the backdoor update p with the largest a
  whose cosine to h is at least ``min_cosine``, then scaled to the bound.

Colluding coalitions (server side, ``collude``; knowledge: omniscient, every benign update
of the round, simulation only): a one-parameter family of forged updates whose scale is
searched against the rule in force, simulated on the benign rows plus the forged ones
(:meth:`fedsec.attacks.defense.Defense.simulate`); the scale that moves the simulated
aggregate farthest from the benign mean wins (Shejwalkar & Houmansadr 2021's AGR-tailored
attacks; Blades issue #73 for why the scale must be searched against the rule, not fixed):

- ``adaptive_alie``: ``mean + z * direction``, direction ``-std`` or ``-sign(mean) * std``
  (the sign form does not cancel on a two-logit softmax head), z searched.
- ``adaptive_ipm``: ``-eps * mean``, eps searched.
- ``adaptive_min_max`` / ``adaptive_min_sum``: ``mean + gamma * p``, gamma searched in
  ``[0, gamma_agnostic]`` (the AGR-agnostic attack's largest stealthy gamma) or, with
  ``stay_inside: false``, in ``[0, max_scale]``.
- ``adaptive_fang``: Fang et al. 2020's directed deviation, ``-lambda * sign(mean)`` (Krum
  form) or beyond the benign extremes by ``s * std`` (median form), its scale searched.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass as _dataclass
from typing import Callable

import numpy as np
import torch

from fedsec.attacks.backdoor import BadNets, EHRTrigger
from fedsec.attacks.base import AttackContext
from fedsec.attacks.collusion import Coalition, MinMax, MinSum, _dots, _std
from fedsec.attacks.defense import Defense, defense_from_context
from fedsec.attacks.poisoning import parse_factor
from fedsec.data.base import Split
from fedsec.registry import ATTACKS, option

# the rules whose norm bound (``AggregationRule.bound``) the bounded backdoors read
NORM_DEFENSES = ("norm_bounding", "flame", "centered_clipping", "central_dp")


# --- the scale search ------------------------------------------------------------------------
def search_scale(objective: Callable[[float], float], lo: float, hi: float, steps: int = 20,
                 refine: int = 2) -> tuple[float, float]:
    """The scale s in ``[lo, hi]`` with the largest ``objective(s)``: a grid of ``steps + 1``
    points (geometric from ``hi * 1e-3`` when ``lo`` is 0, so small scales are tried too; ``lo``
    and ``hi`` included), then ``refine`` finer grids between the best point's neighbours.
    Ties go to the smallest s (the least conspicuous of the equally harmful scales).
    -> (s, objective(s))."""
    if hi <= lo:
        return lo, objective(lo)
    if lo == 0:
        grid = [0.0] + list(np.geomspace(hi * 1e-3, hi, steps))
    else:
        grid = list(np.linspace(lo, hi, steps + 1))
    seen: dict[float, float] = {}

    def best_of(points):
        for s in points:
            if s not in seen:
                seen[s] = float(objective(float(s)))
        top = max(seen[s] for s in points)
        tol = 1e-9 * max(1.0, abs(top))
        return min(s for s in points if seen[s] >= top - tol)

    points = sorted(set(float(s) for s in grid))
    best = best_of(points)
    for _ in range(refine):
        i = points.index(best)
        left, right = points[max(i - 1, 0)], points[min(i + 1, len(points) - 1)]
        points = sorted(set(float(s) for s in np.linspace(left, right, steps + 1)) | {best})
        best = best_of(points)
    # the best over everything evaluated (a refinement never loses a better earlier point)
    top = max(seen.values())
    tol = 1e-9 * max(1.0, abs(top))
    best = min(s for s, v in seen.items() if v >= top - tol)
    return best, seen[best]


def deviation(aggregate: torch.Tensor, reference: torch.Tensor, objective: str = "distance") -> float:
    """How far ``aggregate`` moved from ``reference`` (Tensor[d] each). ``distance``: the L2
    distance; ``against``: the signed move opposite to the reference direction,
    ``-<aggregate - reference, reference> / ||reference||`` (what slows or reverses training)."""
    delta = (aggregate - reference).double()
    if objective == "against":
        norm = float(reference.double().norm())
        return -float(delta @ reference.double()) / norm if norm > 0 else 0.0
    return float(delta.norm())


# --- colluding coalitions that search their scale against the rule --------------------------
class _Searched(Coalition):
    """Shared: ``family(benign, n_malicious, ctx)`` gives ``forge(s) -> Tensor[d]`` (or
    ``[n_malicious, d]``) and the range of s; the scale that moves the rule's simulated
    aggregate farthest from the benign mean is sent. ``last_scale`` / ``last_deviation`` /
    ``last_rule`` record the choice."""

    targets = ("median", "trimmed_mean", "norm_bounding", "flame", "krum", "multi_krum", "bulyan",
               "geometric_median", "centered_clipping", "dnc", "fltrust", "central_dp")

    @_dataclass
    class Options:
        max_scale: float = option(10.0, "largest scale tried (units: see the attack)", gt=0.0)
        steps: int = option(20, "grid points per search level", min=2)
        objective: str = option("distance", "distance: L2 move of the aggregate from the benign mean; "
                                "against: its move opposite to the benign mean", choices=("distance", "against"))

    def __init__(self, **options):
        super().__init__(**options)
        self.last_scale: float | None = None
        self.last_deviation: float | None = None
        self.last_rule: str | None = None

    def family(self, benign: torch.Tensor, n_malicious: int, ctx: AttackContext):
        """-> (forge: s -> Tensor[d] | Tensor[n_malicious, d], lo, hi)."""
        raise NotImplementedError

    def craft(self, benign, n_malicious, ctx):
        defense: Defense = defense_from_context(ctx)
        if defense.num_malicious < n_malicious:  # e.g. attackers drawn by `fraction`: the server counts them
            defense = dataclasses.replace(defense, num_malicious=n_malicious)
        extra = (ctx.extra or {}) if ctx is not None else {}
        bw, mw = extra.get("benign_weights"), extra.get("malicious_weights")
        if bw is None or mw is None:
            weights = torch.ones(benign.shape[0] + n_malicious, dtype=torch.float64)
            bw = weights[:benign.shape[0]]
        else:
            weights = torch.cat([torch.as_tensor(bw), torch.as_tensor(mw)]).double()
        bw = torch.as_tensor(bw, dtype=torch.float64)
        reference = (bw / bw.sum()).to(benign.dtype) @ benign
        forge, lo, hi = self.family(benign, n_malicious, ctx)
        seed = int(getattr(ctx, "server_round", 0) or 0)

        def rows(s):
            out = forge(s)
            return out.unsqueeze(0).expand(n_malicious, -1) if out.dim() == 1 else out

        def objective(s):
            agg = defense.simulate(torch.cat([benign, rows(s).to(benign.dtype)]), weights, generator_seed=seed)
            return deviation(agg, reference, self.options["objective"])

        s, value = search_scale(objective, lo, hi, int(self.options["steps"]))
        self.last_scale, self.last_deviation, self.last_rule = s, value, defense.rule
        return rows(s)


@ATTACKS.register()
class AdaptiveALIE(_Searched):
    """ALIE (Baruch et al. 2019) with z searched against the rule in force: send
    ``mean + z * direction`` with z in ``[0, max_scale]``. direction ``std``: ``-std`` (the
    paper's); ``sign_std``: ``-sign(mean) * std``, which pushes each coordinate against the
    way it moves, so a two-logit softmax head's opposite logit updates do not cancel;
    ``sign``: ``-sign(mean)``. The paper's z_max is not used: with 4 hospitals and 1 attacker it
    is 0 (the benign mean)."""

    name = "adaptive_alie"
    verb = "sends updates just inside the others' spread, z tuned against the defense (adaptive ALIE)"

    @_dataclass
    class Options(_Searched.Options):
        direction: str = option("sign_std", "std: -std; sign_std: -sign(mean) * std; sign: -sign(mean)",
                                choices=("std", "sign_std", "sign"))

    def family(self, benign, n_malicious, ctx):
        mean, std = benign.mean(dim=0), _std(benign)
        kind = self.options["direction"]
        direction = -std if kind == "std" else -torch.sign(mean) * (std if kind == "sign_std" else 1.0)
        return (lambda z: mean + z * direction), 0.0, float(self.options["max_scale"])


@ATTACKS.register()
class AdaptiveIPM(_Searched):
    """Inner-product manipulation (Xie et al. 2020) with eps searched against the rule in
    force: send ``-eps * mean`` with eps in ``[0, max_scale]``."""

    name = "adaptive_ipm"
    verb = "sends updates against the others' mean, eps tuned against the defense (adaptive IPM)"

    def family(self, benign, n_malicious, ctx):
        mean = benign.mean(dim=0)
        return (lambda eps: -eps * mean), 0.0, float(self.options["max_scale"])


class _AdaptiveMinMaxBase(_Searched):
    """``mean + gamma * p`` (p as min-max's ``perturbation``), gamma searched against the rule
    in force within ``[0, gamma_agnostic]``, the largest gamma the AGR-agnostic attack allows
    (its distance constraint keeps the update inside the benign spread), or within
    ``[0, max_scale]`` (units of p) when ``stay_inside`` is false."""

    agnostic: type = MinMax

    @_dataclass
    class Options(_Searched.Options):
        perturbation: str = option("std", "direction of the perturbation", choices=("unit_vec", "std", "sign"))
        stay_inside: bool = option(True, "search gamma only where the AGR-agnostic constraint holds")
        gamma_init: float = option(10.0, "initial scale of the agnostic gamma search", gt=0.0)
        tolerance: float = option(1e-5, "precision of the agnostic gamma", gt=0.0)

    def __init__(self, **options):
        super().__init__(**options)
        self._agnostic = self.agnostic(perturbation=self.options["perturbation"],
                                       gamma_init=self.options["gamma_init"],
                                       tolerance=self.options["tolerance"])
        self.last_gamma_agnostic: float | None = None

    def family(self, benign, n_malicious, ctx):
        mean = benign.mean(dim=0)
        p = self._agnostic.perturbation(benign, mean)
        hi = float(self.options["max_scale"])
        if self.options["stay_inside"]:
            self._agnostic.craft(benign, n_malicious, ctx)
            hi = self.last_gamma_agnostic = float(self._agnostic.last_gamma)
        return (lambda g: mean + g * p), 0.0, hi


@ATTACKS.register()
class AdaptiveMinMax(_AdaptiveMinMaxBase):
    __doc__ = "Min-max (Shejwalkar & Houmansadr 2021) tailored to the rule in force: " + _AdaptiveMinMaxBase.__doc__
    name = "adaptive_min_max"
    verb = "sends crafted updates, gamma tuned against the defense (adaptive min-max)"
    agnostic = MinMax


@ATTACKS.register()
class AdaptiveMinSum(_AdaptiveMinMaxBase):
    __doc__ = "Min-sum (Shejwalkar & Houmansadr 2021) tailored to the rule in force: " + _AdaptiveMinMaxBase.__doc__
    name = "adaptive_min_sum"
    verb = "sends crafted updates, gamma tuned against the defense (adaptive min-sum)"
    agnostic = MinSum


@ATTACKS.register()
class AdaptiveFang(_Searched):
    """Fang et al. 2020's directed deviation with its scale searched against the rule in force.
    form ``krum``: every malicious hospital sends ``-lambda * sign(mean)`` with
    ``lambda = s * max_i ||b_i|| / sqrt(d)`` (the second term of the paper's upper bound as
    the unit), s in ``[0, max_scale]``. form ``median``: where ``mean > 0`` the benign
    minimum minus ``s * std``, elsewhere the benign maximum plus ``s * std`` (the paper's
    "beyond the extremes", deterministic)."""

    name = "adaptive_fang"
    verb = "sends updates crafted against the defense (adaptive Fang)"

    @_dataclass
    class Options(_Searched.Options):
        form: str = option("krum", "krum: -lambda * sign(mean); median: beyond the benign extremes",
                           choices=("krum", "median"))

    def family(self, benign, n_malicious, ctx):
        mean = benign.mean(dim=0)
        sign = torch.sign(mean)
        if self.options["form"] == "krum":
            d = benign.shape[1]
            unit = float(torch.diagonal(_dots(benign, benign)).max().sqrt()) / math.sqrt(d)
            return (lambda s: -(s * unit) * sign), 0.0, float(self.options["max_scale"])
        down = mean > 0
        std = _std(benign)
        low, high = benign.min(dim=0).values, benign.max(dim=0).values
        return (lambda s: torch.where(down, low - s * std, high + s * std)), 0.0, float(self.options["max_scale"])


# --- malicious hospitals: backdoors inside the defense's bounds ------------------------------
class _DefenseAwareBackdoor:
    """Mixin for a Backdoor class: keeps the hospital's clean training split (its own data,
    handed to ``poison_data``) to train an honest update, and scales the backdoor update to
    the bound in force. Never sees a test split."""

    targets = NORM_DEFENSES
    uses_honest_direction = False  # True: the update's direction is built from the honest update too

    @classmethod
    def threat_for(cls, options: dict) -> dict:
        return {"knowledge": "white_box"}  # it reads the defense's bound in force, whatever its boost

    def _init_adaptive(self):
        margin = self.options["margin"]
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 < margin <= 1:
            raise self.option_error("margin", "must be a number in (0, 1]")
        self._clean: dict = {}  # hospital id -> its clean training split
        self.last_bound: float | None = None
        self.last_scale: float | None = None

    def poison_data(self, data: Split, rng: np.random.Generator, ctx: AttackContext) -> Split:
        # the hospital's own clean rows, per hospital (several malicious hospitals may share this
        # instance in one process): a cache of their data, not state between rounds
        self._clean[getattr(ctx, "hospital", None)] = data
        return super().poison_data(data, rng, ctx)

    def honest_update(self, global_params: torch.Tensor, ctx: AttackContext) -> torch.Tensor | None:
        """The update this hospital would send honestly: a clean copy of the model trained on
        its own clean split with the scenario's local settings (Tensor[d]); None when the
        context lacks the task, the scenario or the data."""
        from fedsec.core.params import flatten_state, unflatten_state
        from fedsec.core.training import train_local

        scenario = (ctx.extra or {}).get("scenario") if ctx is not None else None
        task = getattr(ctx, "task", None)
        clean = self._clean.get(getattr(ctx, "hospital", None))
        if clean is None or task is None or scenario is None:
            return None
        model = task.make_model()
        template = model.state_dict()
        model.load_state_dict(unflatten_state(global_params, template))
        seed = int(ctx.generator.initial_seed()) + 1 if ctx.generator is not None else 0
        train_local(model, clean, task, scenario.federation.local, torch.Generator().manual_seed(seed))
        return flatten_state({k: v.detach().cpu() for k, v in model.state_dict().items()}) - global_params

    def resolve_bound(self, defense: Defense, honest: torch.Tensor | None) -> float | None:
        """The norm the update is scaled to: ``norm_bound`` when given, else the defense's
        bound (a "median" bound estimated by the honest update's norm), times ``margin``."""
        if self.options["norm_bound"] is not None:
            bound = float(self.options["norm_bound"])
        else:
            ref = float(honest.double().norm()) if honest is not None else None
            bound = defense.clip(ref)
        return None if bound is None else bound * float(self.options["margin"])

    def shape_update(self, update: torch.Tensor, honest: torch.Tensor | None) -> torch.Tensor:
        return update

    def poison_update(self, global_params, local_params, ctx):
        defense = defense_from_context(ctx)
        update = local_params - global_params
        needs_honest = (self.options["norm_bound"] is None and defense.norm_bound == "median") or \
            self.uses_honest_direction
        honest = self.honest_update(global_params, ctx) if needs_honest else None
        update = self.shape_update(update, honest)
        bound = self.resolve_bound(defense, honest)
        norm = float(update.double().norm())
        if bound is None:  # nothing bounds the norm: model replacement's boost
            scale = parse_factor(self, "boost", ctx)
        else:  # as large as the bound allows
            scale = bound / norm if norm > 0 else 0.0
        if self.options["max_boost"] is not None:
            scale = min(scale, float(self.options["max_boost"]))
        self.last_bound, self.last_scale = bound, scale
        return global_params + update * scale


def _bounded_options(base):
    @_dataclass
    class Options(base.Options):
        margin: float = option(0.99, "share of the bound used (keeps the update strictly inside)", gt=0.0, max=1.0)
        max_boost: float | None = option(None, "cap on the scale applied to the update (null: none)", gt=0.0)

    return Options


def _evading_options(base):
    @_dataclass
    class Options(_bounded_options(base)):
        min_cosine: float = option(0.9, "least cosine between the update sent and the honest update",
                                   min=-1.0, max=1.0)

    return Options


class _FlameEvading(_DefenseAwareBackdoor):
    """Cosine constraint on top of the bound: the update sent is ``(1 - a) h + a p`` (h: the
    honest update, p: the backdoor update) with the largest a in [0, 1] whose cosine to h is
    at least ``min_cosine`` (bisection), then scaled to the bound."""

    targets = ("flame", "norm_bounding", "central_dp")
    uses_honest_direction = True

    def shape_update(self, update, honest):
        self.last_mix = None
        if honest is None or float(honest.double().norm()) == 0:
            return update
        c = float(self.options["min_cosine"])
        h = honest.double()

        def cos(a):
            u = (1 - a) * h + a * update.double()
            nu = float(u.norm())
            return float(u @ h) / (nu * float(h.norm())) if nu > 0 else 1.0

        if cos(1.0) >= c:
            a = 1.0
        else:
            lo, hi = 0.0, 1.0
            for _ in range(40):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if cos(mid) >= c else (lo, mid)
            a = lo
        self.last_mix = a
        return ((1 - a) * h + a * update.double()).to(update.dtype)


def _check(self):
    self._init_adaptive()
    if self.options.get("max_boost") is not None and not self.options["max_boost"] > 0:
        raise self.option_error("max_boost", "must be a positive number or null")


@ATTACKS.register()
class BoundedEHRTrigger(_DefenseAwareBackdoor, EHRTrigger):
    """The EHR feature-trigger backdoor, its update scaled to the largest norm the defense in
    force lets through in full (norm bounding's max_norm or the round's median, FLAME's median,
    centered clipping's tau, central DP's clipping norm; ``boost`` when nothing bounds it)."""

    name = "bounded_ehr_trigger"
    Options = _bounded_options(EHRTrigger)

    def __init__(self, **options):
        super().__init__(**options)
        _check(self)


@ATTACKS.register()
class BoundedBadNets(_DefenseAwareBackdoor, BadNets):
    """The BadNets patch backdoor, its update scaled to the largest norm the defense in force
    lets through in full (as ``bounded_ehr_trigger``)."""

    name = "bounded_badnets"
    Options = _bounded_options(BadNets)

    def __init__(self, **options):
        super().__init__(**options)
        _check(self)


@ATTACKS.register()
class FlameEvadingEHRTrigger(_FlameEvading, EHRTrigger):
    """The EHR feature-trigger backdoor made to pass FLAME: its update keeps a cosine of at
    least ``min_cosine`` to the hospital's own honest update and the norm FLAME clips to."""

    name = "flame_evading_ehr_trigger"
    Options = _evading_options(EHRTrigger)

    def __init__(self, **options):
        super().__init__(**options)
        _check(self)


@ATTACKS.register()
class FlameEvadingBadNets(_FlameEvading, BadNets):
    """The BadNets backdoor made to pass FLAME (as ``flame_evading_ehr_trigger``)."""

    name = "flame_evading_badnets"
    Options = _evading_options(BadNets)

    def __init__(self, **options):
        super().__init__(**options)
        _check(self)

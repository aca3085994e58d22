"""The defense in force, as an attacker who knows it reads it: the aggregation rule's name and
its declared, resolved options, the norm bound it enforces, and central DP's clipping norm.

Everything comes from the scenario and from each rule's own declaration (its typed
constructor options and its :meth:`~fedsec.strategies.base.AggregationRule.bound`); no table
of rule names lives here. The same function serves both sides:

- server side, a colluding coalition's ``collude`` hook gets the scenario in
  ``ctx.extra["scenario"]`` (``fedsec.federation.adversary.forge_updates``);
- client side, a malicious hospital's ``poison_update`` gets it in ``ctx.extra["scenario"]``
  (the ClientApp has the resolved scenario).

``ctx.extra["defense"]`` (a :class:`Defense`) wins over the scenario: tests and callers that
have no scenario give the defense directly. :meth:`Defense.simulate` runs the rule in force
on a matrix of updates, which is how the adaptive coalitions tune their scale.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fedsec.errors import FedsecError


@dataclass(frozen=True)
class Defense:
    """rule: the aggregation rule's registry name ("fedavg" when none).
    options: its declared options with the scenario's values (defaults filled in).
    num_malicious: f, the number of Byzantine hospitals the rule is sized for.
    norm_bound: the rule's :meth:`bound`: a number, "median" (the round's median update
        norm) or None (no norm bound).
    central_dp_clip: ``privacy.central_dp.clipping_norm`` (the initial norm in adaptive
        mode), or None without central DP.
    central_dp_side: "server" or "client" (where central DP clips), or None.
    """

    rule: str = "fedavg"
    options: dict = field(default_factory=dict)
    num_malicious: int = 0
    norm_bound: float | str | None = None
    central_dp_clip: float | None = None
    central_dp_side: str | None = None

    @classmethod
    def of(cls, rule: str = "fedavg", *, num_malicious: int = 0, central_dp_clip: float | None = None,
           central_dp_side: str | None = "server", **options) -> "Defense":
        """The defense of rule ``rule`` with ``options`` (its declared bound read from a built
        instance), without a scenario: for tests and direct callers."""
        from fedsec.strategies.rules import make_rule

        bound = make_rule(rule, **options).bound()
        return cls(rule=rule, options=dict(options), num_malicious=num_malicious, norm_bound=bound,
                   central_dp_clip=central_dp_clip,
                   central_dp_side=central_dp_side if central_dp_clip is not None else None)

    @property
    def names(self) -> tuple[str, ...]:
        """The defenses in force by name: the rule, plus ``central_dp`` when it is on."""
        return (self.rule,) + (("central_dp",) if self.central_dp_clip is not None else ())

    def clip(self, reference_norm: float | None = None) -> float | None:
        """The L2 norm an update can have and still count in full: the smallest of the rule's
        bound and central DP's clipping norm. A "median" bound is resolved to
        ``reference_norm`` (the attacker's estimate of the round's median update norm); without
        it a "median" bound is left out. None: nothing bounds the norm."""
        bounds = []
        if isinstance(self.norm_bound, (int, float)):
            bounds.append(float(self.norm_bound))
        elif self.norm_bound == "median" and reference_norm is not None:
            bounds.append(float(reference_norm))
        if self.central_dp_clip is not None:
            bounds.append(float(self.central_dp_clip))
        return min(bounds) if bounds else None

    def make_rule(self):
        """A fresh instance of the rule in force (None for FedAvg: the weighted mean)."""
        if self.rule == "fedavg" and not self.options:
            return None
        from fedsec.strategies.rules import make_rule

        return make_rule(self.rule, **self.options)

    def simulate(self, updates: torch.Tensor, weights: torch.Tensor | None = None,
                 rule=None, generator_seed: int = 0) -> torch.Tensor:
        """The aggregate the server would compute from ``updates`` (Tensor[n, d]):
        central DP's server-side clipping, then the rule (a fresh instance unless ``rule`` is
        given). ``weights``: sample counts (None: equal). What the attacker cannot know is
        approximated and said here: central DP's noise is left out; FLTrust's root update is
        taken as the mean of the rows; a stateful rule starts from its empty state (centered
        clipping's center at 0) unless ``rule`` carries state. Returns Tensor[d]."""
        from fedsec.strategies.base import RuleContext
        from fedsec.strategies.fedavg import weighted_mean

        n = updates.shape[0]
        w = torch.ones(n, dtype=updates.dtype) if weights is None else weights.to(updates.dtype)
        x = updates
        if self.central_dp_clip is not None and self.central_dp_side == "server":
            norms = x.double().norm(dim=1)
            factors = torch.where(norms > self.central_dp_clip,
                                  self.central_dp_clip / norms.clamp_min(1e-300), torch.ones_like(norms))
            x = x * factors.to(x.dtype)[:, None]
        rule = rule if rule is not None else self.make_rule()
        if rule is None:
            return weighted_mean(x, w)
        ctx = RuleContext(generator=torch.Generator().manual_seed(generator_seed),
                          num_malicious=int(self.num_malicious), client_ids=list(range(n)),
                          root_update=x.mean(dim=0) if getattr(rule, "needs_root_data", False) else None)
        return rule(x, w, ctx).update


def defense_in_force(scenario, num_malicious: int | None = None) -> Defense:
    """The :class:`Defense` of ``scenario`` (a resolved :class:`fedsec.scenario.Scenario`).

    num_malicious: f when the scenario's strategy does not set it (default: the number of
    hospitals its attacks name, as the server counts them)."""
    from fedsec.registry import RULES, options_of
    from fedsec.scenario import STRATEGY_FRAMEWORK_KEYS
    from fedsec.strategies.rules import make_rule

    spec = scenario.strategy
    spec = dict(spec) if not isinstance(spec, str) else {"rule": spec}
    name = str(spec.get("rule") or "fedavg")
    given = {k: v for k, v in spec.items() if k not in STRATEGY_FRAMEWORK_KEYS}
    cls = RULES.get(name, key="strategy.rule")
    declared = {o.name: o.default for o in options_of(cls) or []}
    options = {**declared, **given}
    f = given.get("num_malicious")
    if f is None:
        f = num_malicious if num_malicious is not None else len(scenario.malicious_hospitals())
    rule = make_rule(name, **given)
    # the resolved option values as the rule holds them (e.g. a default it computed)
    for k in declared:
        if hasattr(rule, k) and not callable(getattr(rule, k)):
            options[k] = getattr(rule, k)
    clip, side = None, None
    dp = getattr(scenario.privacy, "central_dp", None)
    if dp:
        from fedsec.privacy.central_dp import CentralDPConfig

        cfg = CentralDPConfig.parse(dp)
        clip, side = float(cfg.clipping_norm), cfg.clipping
    return Defense(rule=name, options={k: v for k, v in options.items() if k in given or v is not None},
                   num_malicious=int(f), norm_bound=rule.bound(), central_dp_clip=clip, central_dp_side=side)


def defense_from_context(ctx) -> Defense:
    """The defense an attack hook sees: ``ctx.extra["defense"]``, else the one of
    ``ctx.extra["scenario"]``. A FedsecError when the context carries neither."""
    extra = (getattr(ctx, "extra", None) or {}) if ctx is not None else {}
    if isinstance(extra.get("defense"), Defense):
        return extra["defense"]
    scenario = extra.get("scenario")
    if scenario is None:
        raise FedsecError("this attack adapts to the defense in force, but its context carries neither "
                          "extra['defense'] nor extra['scenario']")
    return defense_in_force(scenario)


__all__ = ["Defense", "defense_from_context", "defense_in_force"]

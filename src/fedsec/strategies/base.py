"""The contract every robust aggregation rule follows.

A rule sees the stacked *updates* of one round (``local - global``, flattened over all
float entries of the model state), never Flower messages: that keeps each rule a small,
vectorised, unit-testable function of the paper's definition.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fedsec.errors import FedsecError, ScenarioError


@dataclass
class RuleContext:
    """What a rule may need beyond the updates.

    global_params: Tensor[d], the current global model (flattened like the updates).
    root_update: Tensor[d] | None, the server's update on its clean root set (FLTrust).
    generator: torch.Generator seeded per round (FLAME noise, random tie-breaks).
    server_round: 1-based round number.
    num_malicious: the number of Byzantine hospitals the rule should tolerate (f).
    client_ids: one stable id per row (e.g. the hospital's partition-id), so stateful rules
        (FoolsGold's history) follow a hospital across rounds even when the rows are sampled
        or reordered; None means row i is hospital i.
    """

    global_params: torch.Tensor | None = None
    root_update: torch.Tensor | None = None
    generator: torch.Generator | None = None
    server_round: int = 1
    num_malicious: int = 0
    client_ids: list | None = None


@dataclass(frozen=True)
class RuleSpec:
    """What the rest of fedsec needs to know about a rule, read from its class.

    needs_individual_updates: it must see each hospital's update (so secure aggregation,
      which shows the server only the sum, rules it out).
    mean_like: its output is a weighted mean of the updates (central DP's sensitivity
      analysis holds for it).
    needs_root_data: the server trains on a clean root set (FLTrust).
    stateful: it keeps state between rounds (saved in checkpoints).
    """

    name: str
    needs_individual_updates: bool
    mean_like: bool
    needs_root_data: bool
    stateful: bool
    tolerates: str


@dataclass
class RuleResult:
    """update: Tensor[d], the aggregated update added to the global model.

    flagged: indices (rows of the input) the rule excluded or down-weighted to zero.
    info: extra numbers worth logging (e.g. clipping norm, cluster sizes).
    """

    update: torch.Tensor
    flagged: list[int] = field(default_factory=list)
    info: dict = field(default_factory=dict)


class AggregationRule:
    """Base class. Subclasses take their options as keyword arguments (exactly their YAML)
    and implement ``aggregate``. Stateful rules (centered clipping, FoolsGold) keep their
    state on ``self`` between rounds.

    needs_individual_updates: False only for rules that work on the sum alone (FedAvg);
    such rules are the only ones compatible with secure aggregation.
    """

    name: str = "rule"
    title: str | None = None  # in sentences ("the coordinate-wise median"); default: the name
    short_title: str | None = None  # in table headers ("Median")
    needs_individual_updates: bool = True
    mean_like: bool = False
    needs_root_data: bool = False
    stateful: bool = False
    # how many Byzantine hospitals it tolerates, in words (docs/components.md)
    tolerates: str = "no explicit bound"
    # option name -> one-line doc (the options themselves are the keyword-only constructor
    # parameters, typed, as Flower documents its strategies)
    option_docs: dict = {}

    @classmethod
    def spec(cls) -> RuleSpec:
        return RuleSpec(name=getattr(cls, "registry_name", cls.name),
                        needs_individual_updates=cls.needs_individual_updates, mean_like=cls.mean_like,
                        needs_root_data=cls.needs_root_data, stateful=cls.stateful, tolerates=cls.tolerates)

    def min_updates(self, f: int) -> int:
        """The fewest updates this rule needs in a round to tolerate ``f`` Byzantine ones."""
        return 1

    def bound(self) -> float | str | None:
        """The largest L2 norm an update may have and still count in full under this rule: a
        number, ``"median"`` (the round's median update norm), or None (no norm bound). Read
        by the attacks that adapt to the defense in force (``fedsec.attacks.defense``)."""
        return None

    def check(self, f: int, per_round: int) -> None:
        """Raise a ScenarioError naming the option (``option_fail``) when the options cannot
        tolerate ``f`` Byzantine hospitals among ``per_round`` updates; run at load time."""

    def reset(self) -> None:
        """Forget the state kept between rounds (stateful rules override this)."""

    def state_dict(self) -> dict:
        """The state kept between rounds, for the run's checkpoint (tensors, numbers, dicts
        and lists of them). Stateless rules: {}. Stateful rules override this and
        :meth:`load_state_dict` so a resumed run aggregates exactly as an uninterrupted one."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
        if state:
            raise self.fail(f"keeps no state between rounds, but the checkpoint holds {sorted(state)}")

    def fail(self, message: str) -> FedsecError:
        """The error for an option or an input this rule cannot work with; names the rule."""
        return FedsecError(f"aggregation rule '{self.name}': {message}")

    def option_fail(self, key: str, message: str) -> ScenarioError:
        """The error for a bad option: names the rule and the option (as its key)."""
        return ScenarioError(f"aggregation rule '{self.name}': option '{key}' {message}", key=key)

    def int_option(self, key: str, value, minimum: int = 0, allow_none: bool = False):
        """Check an integer option (bools are not integers here) and return it."""
        if value is None and allow_none:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.option_fail(key, f"must be an integer >= {minimum}, got {value!r}")
        return value

    def float_option(self, key: str, value, minimum: float = 0.0, strict: bool = False, allow_none: bool = False):
        """Check a real-valued option (> minimum if strict, else >=) and return it as a float."""
        if value is None and allow_none:
            return None
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            ok = value > minimum if strict else value >= minimum
        if not ok:
            bound = f"> {minimum}" if strict else f">= {minimum}"
            raise self.option_fail(key, f"must be a number {bound}, got {value!r}")
        return float(value)

    def check_weights(self, weights: torch.Tensor, ctx: RuleContext | None) -> None:
        """Refuse sample counts that are NaN, infinite or negative, naming the hospital (its id
        from ``ctx.client_ids``, else its row): one NaN count would make a weighted mean NaN,
        a negative one would flip that hospital's update."""
        bad = (~torch.isfinite(weights) | (weights < 0)).nonzero().flatten().tolist()
        if not bad:
            return
        ids = ctx.client_ids if ctx is not None and ctx.client_ids is not None else None
        who = ", ".join(
            f"hospital {ids[i]!r} (row {i}): {float(weights[i])!r}" if ids is not None and len(ids) > i
            else f"row {i}: {float(weights[i])!r}"
            for i in bad
        )
        raise self.fail(f"sample counts must be finite and >= 0; got {who}")

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor, ctx: RuleContext) -> RuleResult:
        raise NotImplementedError

    def __call__(self, updates: torch.Tensor, weights: torch.Tensor, ctx: RuleContext | None = None) -> RuleResult:
        if updates.dim() != 2:
            raise ValueError(f"updates must be [n, d], got {tuple(updates.shape)}")
        if updates.shape[0] == 0:
            raise self.fail("no updates to aggregate (n = 0)")
        if weights.shape != (updates.shape[0],):
            raise ValueError(f"weights must be [n] = [{updates.shape[0]}], got {tuple(weights.shape)}")
        self.check_weights(weights, ctx)
        return self.aggregate(updates, weights.to(device=updates.device, dtype=updates.dtype), ctx or RuleContext())


class FaultTolerantRule(AggregationRule):
    """A rule sized by the number f of Byzantine hospitals it must tolerate.

    Option num_malicious: f; None (the default) defers to ``RuleContext.num_malicious``, which
    the scenario fills from its attacks.
    """

    def __init__(self, *, num_malicious: int | None = None):
        self.num_malicious = self.int_option("num_malicious", num_malicious, allow_none=True)

    def malicious(self, ctx: RuleContext) -> int:
        """f for this round."""
        f = self.num_malicious if self.num_malicious is not None else ctx.num_malicious
        return self.int_option("num_malicious", f)

    def sized_by_scenario(self) -> bool:
        """Whether what the rule computes depends on the scenario's count of attackers: f is left
        to the scenario (``num_malicious`` unset) and enters the aggregate (not only a check).
        Then a no-attack run (f = 0) and an attacked run (f = 2) of "the same" rule aggregate
        differently, and a sweep refuses to compare them (fedsec.sweep.check_same_defense)."""
        return self.num_malicious is None

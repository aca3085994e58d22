"""The contract every robust aggregation rule follows.

A rule sees the stacked *updates* of one round (``local - global``, flattened over all
float entries of the model state), never Flower messages: that keeps each rule a small,
vectorised, unit-testable function of the paper's definition.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fedsec.errors import FedsecError


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
    needs_individual_updates: bool = True

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

    def int_option(self, key: str, value, minimum: int = 0, allow_none: bool = False):
        """Check an integer option (bools are not integers here) and return it."""
        if value is None and allow_none:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.fail(f"option '{key}' must be an integer >= {minimum}, got {value!r}")
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
            raise self.fail(f"option '{key}' must be a number {bound}, got {value!r}")
        return float(value)

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor, ctx: RuleContext) -> RuleResult:
        raise NotImplementedError

    def __call__(self, updates: torch.Tensor, weights: torch.Tensor, ctx: RuleContext | None = None) -> RuleResult:
        if updates.dim() != 2:
            raise ValueError(f"updates must be [n, d], got {tuple(updates.shape)}")
        if updates.shape[0] == 0:
            raise self.fail("no updates to aggregate (n = 0)")
        if weights.shape != (updates.shape[0],):
            raise ValueError(f"weights must be [n] = [{updates.shape[0]}], got {tuple(weights.shape)}")
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

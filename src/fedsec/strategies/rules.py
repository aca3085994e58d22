"""Building a robust aggregation rule from a scenario's options.

Every rule registers itself in :data:`fedsec.registry.RULES` where it is defined
(``@RULES.register()``) and follows the contract in :mod:`fedsec.strategies.base`: it takes
``updates: Tensor[n, d]`` (one row per hospital, local minus global, flattened),
``weights: Tensor[n]`` (sample counts) and a :class:`RuleContext`, and returns a
:class:`RuleResult`. Its options are its typed keyword-only constructor parameters.
"""

from __future__ import annotations

from typing import Any

from fedsec.registry import RULES, check_options, options_of
from fedsec.strategies.base import AggregationRule, RuleContext, RuleResult


def rule_options(name_or_cls: str | type[AggregationRule]) -> dict[str, Any]:
    """The options a rule takes, with their defaults (its YAML keys)."""
    cls = RULES.get(name_or_cls) if isinstance(name_or_cls, str) else name_or_cls
    return {o.name: o.default for o in options_of(cls) or []}


def make_rule(name: str, **options: Any) -> AggregationRule:
    """Build the rule registered as ``name`` with ``options`` (keyword arguments = YAML keys).

    Raises ScenarioError for an unknown rule (with the closest known name), an unknown option
    (with the valid ones) or an option value the rule rejects (naming the option as its key).
    """
    cls = RULES.get(name)
    check_options(cls, options, "", f"aggregation rule '{name}'")
    return cls(**options)


__all__ = ["RULES", "make_rule", "rule_options", "AggregationRule", "RuleContext", "RuleResult"]

"""The registry of robust aggregation rules: name -> class, and ``make_rule`` to build one from
a scenario's options with errors a user can act on.

Every rule follows the contract in :mod:`fedsec.strategies.base`: it takes ``updates:
Tensor[n, d]`` (one row per hospital, local minus global, flattened), ``weights: Tensor[n]``
(sample counts) and a :class:`RuleContext`, and returns a :class:`RuleResult`.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any

from fedsec.errors import FedsecError
from fedsec.strategies.base import AggregationRule, RuleContext, RuleResult
from fedsec.strategies.clipping import CenteredClipping, NormBounding
from fedsec.strategies.coordinatewise import Median, TrimmedMean
from fedsec.strategies.dnc import DnC
from fedsec.strategies.fedavg import FedAvg
from fedsec.strategies.flame import Flame
from fedsec.strategies.geometric_median import GeometricMedian
from fedsec.strategies.krum import Bulyan, Krum, MultiKrum
from fedsec.strategies.trust import FLTrust, FoolsGold

RULES: dict[str, type[AggregationRule]] = {
    cls.name: cls
    for cls in (
        FedAvg,
        Krum,
        MultiKrum,
        Bulyan,
        Median,
        TrimmedMean,
        GeometricMedian,
        NormBounding,
        CenteredClipping,
        FLTrust,
        FoolsGold,
        Flame,
        DnC,
    )
}


def rule_options(name_or_cls: str | type[AggregationRule]) -> dict[str, Any]:
    """The options a rule takes, with their defaults (its YAML keys)."""
    cls = RULES[name_or_cls] if isinstance(name_or_cls, str) else name_or_cls
    if cls.__init__ is object.__init__:
        return {}
    params = inspect.signature(cls.__init__).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def make_rule(name: str, **options: Any) -> AggregationRule:
    """Build the rule registered as ``name`` with ``options`` (keyword arguments = YAML keys).

    Raises FedsecError for an unknown rule (with the closest known name), an unknown option
    (with the valid ones) or an option value the rule rejects.
    """
    cls = RULES.get(name)
    if cls is None:
        raise FedsecError(
            f"unknown aggregation rule '{name}'{_did_you_mean(name, RULES)} "
            f"(known rules: {', '.join(sorted(RULES))})"
        )
    valid = rule_options(cls)
    for key in options:
        if key not in valid:
            listing = ", ".join(f"{k} (default {v!r})" for k, v in valid.items()) if valid else "none"
            raise FedsecError(
                f"aggregation rule '{name}' has no option '{key}'{_did_you_mean(key, valid)}; "
                f"valid options: {listing}"
            )
    return cls(**options)


__all__ = ["RULES", "make_rule", "rule_options", "AggregationRule", "RuleContext", "RuleResult"]

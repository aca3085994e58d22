"""Checking a privacy defense's options (its YAML block) with errors that name the key.

Every defense is configured by one free-form mapping under ``privacy.<defense>``; this turns
it into a dataclass, rejecting unknown keys (with a "did you mean") and wrong types with a
:class:`~fedsec.errors.FedsecError` naming ``privacy.<defense>.<key>``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any, Mapping

from fedsec.errors import FedsecError


def option_error(section: str, key: str, message: str) -> FedsecError:
    return FedsecError(f"privacy.{section}.{key}: {message}")


def parse_options(cls, section: str, given: Mapping[str, Any] | None):
    """``given`` (a mapping, or None for all defaults) -> ``cls(**given)`` with unknown keys
    reported as ``privacy.<section>.<key>``."""
    if given is None:
        given = {}
    if not isinstance(given, Mapping):
        raise FedsecError(f"privacy.{section}: expected a mapping of options, got {given!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in given:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            listing = ", ".join(fields)
            raise FedsecError(f"privacy.{section}.{key}: unknown option{hint} (options: {listing})")
    return cls(**dict(given))


def number(section: str, key: str, value, *, minimum: float | None = None, maximum: float | None = None,
           strict_min: bool = False, strict_max: bool = False, allow_none: bool = False) -> float | None:
    """A finite real number within bounds (bools rejected), as float."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise option_error(section, key, f"expected a number, got {value!r}")
    low_bad = minimum is not None and (value <= minimum if strict_min else value < minimum)
    high_bad = maximum is not None and (value >= maximum if strict_max else value > maximum)
    if low_bad or high_bad:
        lo = "" if minimum is None else f"{minimum:g} {'<' if strict_min else '<='} "
        hi = "" if maximum is None else f" {'<' if strict_max else '<='} {maximum:g}"
        raise option_error(section, key, f"must satisfy {lo}value{hi}, got {value!r}")
    return float(value)


def choice(section: str, key: str, value, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise option_error(section, key, f"must be one of {', '.join(choices)}; got {value!r}")
    return str(value)


def flag(section: str, key: str, value) -> bool:
    if not isinstance(value, bool):
        raise option_error(section, key, f"expected true or false, got {value!r}")
    return value

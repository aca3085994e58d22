"""Attack implementations, one module per family; each class registers itself in
:data:`fedsec.registry.ATTACKS` with ``@ATTACKS.register()`` and declares its typed
``Options`` and capabilities (``spec()``) on the class.

Presets (``attacks/<preset>.yaml``) name a registered attack with ``attack:``; the rest of
their keys, except ``description`` and ``threat``, are the attack's options. Adding an attack
is one class (in a module of this package) and one preset file: nothing else is edited.
"""

from __future__ import annotations

from collections.abc import Mapping

from fedsec.errors import FedsecError
from fedsec.registry import ATTACKS, check_options, options_of

# keys of a preset file that are not options of the attack
PRESET_KEYS = ("attack", "description", "threat")


def register_attack(name: str, target: type) -> None:
    """Make the class ``target`` available to scenarios as ``name`` (a registered name only:
    no scenario value is ever imported as code)."""
    if isinstance(target, str):
        raise FedsecError("register_attack takes the class itself, not an import path")
    ATTACKS.register(name, target)


def get_attack_class(name: str) -> type:
    """The class behind ``name``; an unknown name is a ScenarioError with a "did you mean"."""
    return ATTACKS.get(name)


def option_names(cls: type) -> list[str] | None:
    """The options ``cls`` accepts (its declaration); None when it takes anything."""
    specs = options_of(cls)
    return None if specs is None else [s.name for s in specs]


def make_attack(name: str, **options):
    """An attack instance from its registry name and options (exactly its preset's keys),
    checked against the class's ``Options`` declaration first."""
    cls = get_attack_class(name)
    checked = check_options(cls, options, "", f"attack '{name}'")
    given = {k: v for k, v in checked.items() if k in options}
    return cls(**given)


def make_attack_from_preset(preset: Mapping, **overrides):
    """An attack from a loaded preset mapping (``{attack: name, <options>, description,
    threat}``), with ``overrides`` replacing options."""
    if "attack" not in preset:
        raise FedsecError("an attack preset needs the key 'attack' (a registry name)")
    options = {k: v for k, v in preset.items() if k not in PRESET_KEYS}
    options.update(overrides)
    return make_attack(preset["attack"], **options)


def attack_threat(entry: Mapping) -> dict:
    """An attack entry's threat tags: its preset's ``threat`` with what its options decide
    (``Attack.threat_for``: ``boost: auto`` knows the round's participants -> white box)."""
    threat = dict(entry.get("threat") or {})
    try:
        cls = get_attack_class(str(entry["attack"]))
    except (FedsecError, KeyError):
        return threat
    from fedsec.scenario import ATTACK_FRAMEWORK_KEYS

    options = {**cls.option_defaults(), **{k: v for k, v in entry.items() if k not in ATTACK_FRAMEWORK_KEYS}}
    threat.update(cls.threat_for(options) or {})
    return threat


__all__ = ["ATTACKS", "PRESET_KEYS", "attack_threat", "get_attack_class", "make_attack", "make_attack_from_preset",
           "option_names", "register_attack"]

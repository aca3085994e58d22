"""Attack implementations, one module per family, behind the registry :data:`ATTACKS`.

The registry maps a name to ``"module:Class"`` and imports the module only when the name
is looked up, so importing :mod:`fedsec.attacks` (or :mod:`fedsec.attacks.base`) stays
cheap and a family whose module is missing or broken does not stop the others. Presets
(``attacks/<preset>.yaml``) name an entry with ``attack:``; the rest of their keys, except
``description`` and ``threat``, are the attack's options.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterator, Mapping

from fedsec.errors import FedsecError

# name -> "module:Class". Privacy families (inversion, membership, ...) add their lines here.
_ATTACK_PATHS: dict[str, str] = {
    # poisoning.py: data poisoning and model poisoning by one hospital
    "label_flip": "fedsec.attacks.poisoning:LabelFlip",
    "scaling": "fedsec.attacks.poisoning:Scaling",
    "sign_flip": "fedsec.attacks.poisoning:SignFlip",
    "gaussian": "fedsec.attacks.poisoning:GaussianNoise",
    "constrain_and_scale": "fedsec.attacks.poisoning:ConstrainAndScale",
    # backdoor.py: triggers, with the attack success rate
    "badnets": "fedsec.attacks.backdoor:BadNets",
    "ehr_trigger": "fedsec.attacks.backdoor:EHRTrigger",
    "ehr_missing_trigger": "fedsec.attacks.backdoor:MissingValueTrigger",
    "dba": "fedsec.attacks.backdoor:DBA",
    # collusion.py: omniscient coalitions (simulation only)
    "alie": "fedsec.attacks.collusion:ALIE",
    "ipm": "fedsec.attacks.collusion:IPM",
    "min_max": "fedsec.attacks.collusion:MinMax",
    "min_sum": "fedsec.attacks.collusion:MinSum",
    "fang_krum": "fedsec.attacks.collusion:FangKrum",
    "fang_median": "fedsec.attacks.collusion:FangMedian",
    "fang_trimmed_mean": "fedsec.attacks.collusion:FangMedian",  # the same attack (Fang et al. 2020)
    # inversion.py: a curious server reconstructs training data from a hospital's update
    "dlg": "fedsec.attacks.inversion:DLGAttack",
    "idlg": "fedsec.attacks.inversion:IDLGAttack",
    "inverting_gradients": "fedsec.attacks.inversion:InvertingGradientsAttack",
    "tabular_inversion": "fedsec.attacks.inversion:TabularInversionAttack",
    # membership.py: membership inference on the global model
    "membership_loss": "fedsec.attacks.membership:LossThresholdMIA",
    "membership_calibrated": "fedsec.attacks.membership:CalibratedLossMIA",
}

# keys of a preset file that are not options of the attack
PRESET_KEYS = ("attack", "description", "threat")


class _LazyAttacks(Mapping):
    """``name -> Attack subclass``, each resolved from its ``"module:Class"`` path on first use."""

    def __init__(self, paths: dict[str, str]):
        self._paths = paths
        self._loaded: dict[str, type] = {}

    def __getitem__(self, name: str) -> type:
        if name not in self._paths:
            raise KeyError(name)
        if name not in self._loaded:
            module, _, cls = self._paths[name].partition(":")
            try:
                self._loaded[name] = getattr(importlib.import_module(module), cls)
            except (ImportError, AttributeError) as err:
                raise FedsecError(f"attack '{name}': cannot load {self._paths[name]} ({err})") from err
        return self._loaded[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._paths)

    def __len__(self) -> int:
        return len(self._paths)

    def __contains__(self, name) -> bool:
        return name in self._paths

    def register(self, name: str, target: str | type) -> None:
        """Add (or replace) an entry: a ``"module:Class"`` path or the class itself."""
        if isinstance(target, str):
            self._paths[name] = target
            self._loaded.pop(name, None)
        else:
            self._paths[name] = f"{target.__module__}:{target.__qualname__}"
            self._loaded[name] = target


ATTACKS: _LazyAttacks = _LazyAttacks(_ATTACK_PATHS)


def register_attack(name: str, target: str | type) -> None:
    """Make ``name`` available to scenarios (``"module:Class"`` or the class)."""
    ATTACKS.register(name, target)


def get_attack_class(name: str) -> type:
    """The class behind ``name``; an unknown name is a FedsecError with a "did you mean"."""
    if name not in ATTACKS:
        close = difflib.get_close_matches(str(name), list(ATTACKS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise FedsecError(f"unknown attack '{name}' (known: {', '.join(sorted(ATTACKS))}){hint}")
    return ATTACKS[name]


def option_names(cls: type) -> list[str] | None:
    """The options ``cls`` accepts: its ``defaults`` keys, else the keyword parameters of its
    ``__init__``; None when it takes ``**kwargs`` (anything goes)."""
    if getattr(cls, "defaults", None):
        return list(cls.defaults)
    import inspect

    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def make_attack(name: str, **options):
    """An attack instance from its registry name and options (exactly its preset's keys).
    An unknown option is a FedsecError naming it and the valid ones."""
    cls = get_attack_class(name)
    valid = option_names(cls)
    if valid is not None:
        from fedsec.attacks.base import resolve_options

        resolve_options(name, dict.fromkeys(valid), options)  # raises on an unknown option
    return cls(**options)


def make_attack_from_preset(preset: Mapping, **overrides):
    """An attack from a loaded preset mapping (``{attack: name, <options>, description,
    threat}``), with ``overrides`` replacing options."""
    if "attack" not in preset:
        raise FedsecError("an attack preset needs the key 'attack' (a registry name)")
    options = {k: v for k, v in preset.items() if k not in PRESET_KEYS}
    options.update(overrides)
    return make_attack(preset["attack"], **options)


__all__ = ["ATTACKS", "PRESET_KEYS", "get_attack_class", "make_attack", "make_attack_from_preset",
           "option_names", "register_attack"]

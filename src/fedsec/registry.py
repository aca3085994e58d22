"""One registry for every kind of component, one look-up, one "did you mean", one options check.

A component (task, model, partitioner, attack, aggregation rule, privacy defense) registers
itself where it is defined, as Opacus registers its grad samplers::

    @ATTACKS.register("alie")
    class ALIE(Attack):
        @dataclass
        class Options:
            z: Optional[float] = option(None, "the deviation in std units; null = z_max")

and declares on its class:

- its **options**: a nested ``Options`` dataclass (each field's type, default, range and
  one-line doc, see :func:`option`), or, for classes that take them as constructor keywords
  (aggregation rules, in Flower's style), annotated keyword-only ``__init__`` parameters;
- its **capabilities** (``spec``): what the rest of fedsec needs to know about it, e.g. an
  attack's hooks and whether it is simulation-only, or the number of Byzantine hospitals a
  rule tolerates for ``n``.

No other module keeps a list of names: ``fedsec list``, the option tables in
``docs/components.md``, scenario validation and the run all read these declarations.

Discovery: a registry knows which packages define its kind and imports them the first time a
name is looked up (``fedsec list`` and the Ray workers then import only what they use). A
name is only ever looked up among registered classes; no scenario value is imported or
called as code (docs/threat-model.md, "the scenario file").
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import math
import pkgutil
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from fedsec.errors import ScenarioError

# --------------------------------------------------------------------------------------
# "did you mean" and look-up: the one copy
# --------------------------------------------------------------------------------------


def did_you_mean(name, choices) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or an empty string."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def look_up(name, choices: Iterable[str], *, what: str, key: str | None = None):
    """``name`` if it is one of ``choices``; otherwise a ScenarioError naming ``key``, the
    closest choice and all of them (MONAI's ``look_up_option``, for fedsec)."""
    choices = list(choices)
    if isinstance(name, str) and name in choices:
        return name
    listing = ", ".join(sorted(str(c) for c in choices)) or "(none)"
    shown = repr(name) if not isinstance(name, str) else f"'{name}'"
    raise ScenarioError(f"unknown {what} {shown}{did_you_mean(name, choices)}; available: {listing}", key=key)


# --------------------------------------------------------------------------------------
# Options: declared once, checked before anything runs
# --------------------------------------------------------------------------------------

_NO_DEFAULT = dataclasses.MISSING


def option(default=_NO_DEFAULT, doc: str = "", *, min: float | None = None, max: float | None = None,
           gt: float | None = None, lt: float | None = None, choices: Iterable | None = None):
    """A dataclass field with its one-line doc and range: ``min``/``max`` inclusive,
    ``gt``/``lt`` exclusive, ``choices`` the allowed values. Mutable defaults (lists, dicts)
    are copied for each instance."""
    meta = {"doc": doc, "min": min, "max": max, "gt": gt, "lt": lt,
            "choices": tuple(choices) if choices is not None else None}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class OptionSpec:
    """One option of a component: what the docs table and the checker read."""

    name: str
    type: Any
    default: Any
    doc: str = ""
    min: float | None = None
    max: float | None = None
    gt: float | None = None
    lt: float | None = None
    choices: tuple | None = None

    @property
    def required(self) -> bool:
        return self.default is _NO_DEFAULT

    def type_name(self) -> str:
        return type_name(self.type)

    def range_text(self) -> str:
        parts = []
        if self.choices is not None:
            parts.append("one of " + ", ".join(map(str, self.choices)))
        if self.gt is not None:
            parts.append(f"> {self.gt:g}")
        if self.min is not None:
            parts.append(f">= {self.min:g}")
        if self.lt is not None:
            parts.append(f"< {self.lt:g}")
        if self.max is not None:
            parts.append(f"<= {self.max:g}")
        return ", ".join(parts)


def type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if tp is Any:
        return "any"
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner = " | ".join(type_name(a) for a in args)
        return f"{inner} | null" if len(args) < len(typing.get_args(tp)) else inner
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"list[{type_name(args[0])}]" if args else "list"
    if origin is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _docstring_options(cls) -> dict[str, str]:
    """``name: text`` lines of a class docstring (the Google-style "Args" of a config) ->
    {name: first sentence}: the docs of options declared without ``option(doc=...)``."""
    import re

    out = {}
    for line in (getattr(cls, "__doc__", None) or "").splitlines():
        m = re.match(r"^\s{0,8}([a-z_][a-z0-9_]*): (.+)$", line)
        if m and m.group(1) not in out:
            out[m.group(1)] = m.group(2).split(". ")[0].strip().rstrip(".")
    return out


def options_of(cls) -> list[OptionSpec] | None:
    """The declared options of ``cls``: its ``Options`` dataclass (or ``cls`` itself when it is
    a dataclass), else its annotated keyword-only constructor parameters; None when it
    declares none (takes anything)."""
    opts = getattr(cls, "Options", None)
    if opts is None and dataclasses.is_dataclass(cls):
        opts = cls
    if opts is not None and dataclasses.is_dataclass(opts):
        doc_lines = _docstring_options(opts)
        hints = typing.get_type_hints(opts)
        out = []
        for f in dataclasses.fields(opts):
            if not f.init:
                continue
            default = f.default if f.default is not _NO_DEFAULT else (
                f.default_factory() if f.default_factory is not _NO_DEFAULT else _NO_DEFAULT)
            m = f.metadata or {}
            out.append(OptionSpec(f.name, hints.get(f.name, Any), default, m.get("doc") or doc_lines.get(f.name, ""),
                                  m.get("min"),
                                  m.get("max"), m.get("gt"), m.get("lt"), m.get("choices")))
        return out
    init = cls.__init__ if isinstance(cls, type) else cls
    if init is object.__init__:
        return []
    sig = inspect.signature(init)
    try:
        hints = typing.get_type_hints(init)
    except Exception:  # pragma: no cover - unresolvable annotations: fall back to "any"
        hints = {}
    params = list(sig.parameters.values())
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    docs = {**_docstring_options(cls), **getattr(cls, "option_docs", {})}
    return [OptionSpec(p.name, hints.get(p.name, Any), p.default if p.default is not p.empty else _NO_DEFAULT,
                       docs.get(p.name, ""))
            for p in params
            if p.kind is p.KEYWORD_ONLY or (p.kind is p.POSITIONAL_OR_KEYWORD and p.default is not p.empty)]


def _matches(value, tp) -> tuple[bool, Any]:
    """(does ``value`` fit ``tp``, the value converted: ints are accepted for floats)."""
    if tp is Any or tp is object:
        return True, value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, conv = _matches(value, arg)
            if ok:
                return True, conv
        return False, value
    if tp is type(None):
        return value is None, value
    if origin is typing.Literal:
        return value in typing.get_args(tp) and not isinstance(value, bool) or (
            isinstance(value, bool) and any(a is value for a in typing.get_args(tp))), value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False, value
        return math.isfinite(value), float(value)
    if tp is str:
        return isinstance(value, str), value
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False, value
        args = typing.get_args(tp)
        if not args:
            return True, list(value)
        out = []
        for v in value:
            ok, conv = _matches(v, args[0])
            if not ok:
                return False, value
            out.append(conv)
        return True, out
    if origin is dict or tp is dict:
        return isinstance(value, Mapping), dict(value) if isinstance(value, Mapping) else value
    return isinstance(value, tp) if isinstance(tp, type) else True, value


def check_value(spec: OptionSpec, value, key: str):
    """``value`` checked against ``spec`` (type, finiteness, range, choices); returns it
    converted. Raises ScenarioError naming ``key``."""
    ok, conv = _matches(value, spec.type)
    if not ok:
        raise ScenarioError(f"expected {spec.type_name()}, got {value!r}", key=key)
    if spec.choices is not None and conv not in spec.choices:
        raise ScenarioError(f"must be one of {', '.join(map(str, spec.choices))}{did_you_mean(conv, spec.choices)}"
                            f", got {conv!r}", key=key)
    if isinstance(conv, (int, float)) and not isinstance(conv, bool):
        if ((spec.min is not None and conv < spec.min) or (spec.max is not None and conv > spec.max)
                or (spec.gt is not None and conv <= spec.gt) or (spec.lt is not None and conv >= spec.lt)):
            raise ScenarioError(f"must be {spec.range_text()}, got {conv!r}", key=key)
    return conv


def _plain(value):
    """OmegaConf containers -> plain dicts / lists (options may come from OmegaConf.load)."""
    if type(value).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(value, resolve=False)
    return value


def check_options(cls, given: Mapping | None, key: str, owner: str) -> dict:
    """The full option set of ``cls``: declared defaults updated with ``given``, every value
    checked. Unknown and missing options are ScenarioErrors naming ``key.<option>``."""
    given = {} if given is None else _plain(given)
    if not isinstance(given, Mapping):
        raise ScenarioError(f"expected a mapping of options, got {given!r}", key=key)
    given = {k: _plain(v) for k, v in given.items()}
    specs = options_of(cls)
    if specs is None:
        return dict(given)
    by_name = {s.name: s for s in specs}
    for k in given:
        if k not in by_name:
            valid = ", ".join(by_name) or "none"
            raise ScenarioError(f"{owner} has no option '{k}'{did_you_mean(k, by_name)}; options: {valid}",
                                key=f"{key}.{k}" if key else str(k))
    out = {}
    for s in specs:
        sub = f"{key}.{s.name}" if key else s.name
        if s.name in given:
            try:
                out[s.name] = check_value(s, given[s.name], sub)
            except ScenarioError as err:
                raise ScenarioError(f"{owner}: option '{s.name}' {err.detail}", key=sub) from None
        elif s.required:
            raise ScenarioError(f"{owner} needs option '{s.name}' ({s.doc or s.type_name()})", key=sub)
        else:
            out[s.name] = s.default
    return out


# --------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------


class Registry:
    """The components of one kind, by name.

    kind: the word used in messages ("attack", "aggregation rule").
    packages: modules or packages whose import registers this kind's components; a package
      has all its modules imported (so a new module needs no edit elsewhere).
    """

    def __init__(self, kind: str, packages: Iterable[str] = ()):
        self.kind = kind
        self.packages = tuple(packages)
        self._entries: dict[str, Any] = {}
        self._discovered = False

    def register(self, name: str | None = None, target: Any = None):
        """``@REG.register("name")`` on a class or function, or ``REG.register("name", obj)``.
        The object gets ``registry_name``; re-registering a name replaces the entry."""

        def add(obj):
            key = name or getattr(obj, "name", None) or obj.__name__
            self._entries[key] = obj
            try:
                obj.registry_name = key
            except (AttributeError, TypeError):  # pragma: no cover - builtins
                pass
            return obj

        return add(target) if target is not None else add

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def discover(self) -> None:
        """Import the kind's packages once (their modules register their components)."""
        if self._discovered:
            return
        self._discovered = True
        for pkg_name in self.packages:
            pkg = importlib.import_module(pkg_name)
            for mod in pkgutil.iter_modules(getattr(pkg, "__path__", []) or []):
                if not mod.name.startswith("_"):
                    importlib.import_module(f"{pkg_name}.{mod.name}")

    def names(self) -> list[str]:
        self.discover()
        return sorted(self._entries)

    def __contains__(self, name) -> bool:
        self.discover()
        return isinstance(name, str) and name in self._entries

    def __iter__(self):
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def items(self):
        return [(n, self._entries[n]) for n in self.names()]

    def get(self, name, key: str | None = None):
        """The component registered as ``name``; an unknown name is a ScenarioError naming
        ``key`` with the closest registered name."""
        self.discover()
        look_up(name, self._entries, what=self.kind, key=key)
        return self._entries[name]

    def options(self, name) -> list[OptionSpec] | None:
        return options_of(self.get(name))

    def check(self, name, given: Mapping | None, key: str) -> dict:
        """``given`` options of ``name`` checked against its declaration (see check_options)."""
        return check_options(self.get(name, key=f"{key}" if key else None), given, key,
                             f"{self.kind} '{name}'")


def spec_of(component) -> Any:
    """The capabilities a component declares (``spec``), or None."""
    return getattr(component, "spec", None)


def call_with_options(factory: Callable, options: Mapping) -> Any:
    """``factory(**options)``; helper kept for symmetry with ``check``."""
    return factory(**dict(options))


# The registries. Each names the packages whose modules register into it.
TASKS = Registry("task", ["fedsec.tasks"])
MODELS = Registry("model", ["fedsec.models"])
PARTITIONERS = Registry("partitioner", ["fedsec.data.partition"])
ATTACKS = Registry("attack", ["fedsec.attacks"])
RULES = Registry("aggregation rule", ["fedsec.strategies"])
PRIVACY = Registry("privacy defense", ["fedsec.privacy"])

REGISTRIES = {"tasks": TASKS, "models": MODELS, "partitioners": PARTITIONERS, "attacks": ATTACKS,
              "rules": RULES, "privacy": PRIVACY}

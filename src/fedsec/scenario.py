"""Scenario files: schema, loading, preset composition, overrides and validation.

Loading = read YAML with OmegaConf, merge it onto the typed schema below (unknown keys and
wrong types are caught there), apply ``key=value`` overrides, replace each preset name by
the preset file merged with its inline options, then check ranges and cross-field rules.
Every error is a :class:`ScenarioError` naming the file and the key path.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf  # noqa: F401
from omegaconf import errors as oc_errors

from fedsec.errors import FedsecError, ScenarioError
from fedsec.registry import did_you_mean

# --------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------


@dataclass
class TaskConfig:
    """What is learned: a dataset + model. ``path`` points at a user's own data file/folder;
    ``options`` are loader options (e.g. ``label_column`` for ehr_csv, ``image_size``)."""

    name: str = "heart_disease"
    model: str = "logistic"
    model_options: Dict[str, Any] = field(default_factory=dict)
    path: Optional[str] = None
    options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class LocalConfig:
    """Each hospital's local training per round.

    steps: if set, each round is exactly this many mini-batch steps (the data is reshuffled
      when it runs out) and ``epochs`` is ignored; ``steps: 1`` is FedSGD, the one-gradient-
      per-round setting of the distributed-SGD literature (e.g. Baruch et al. 2019).
    """

    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    optimizer: str = "sgd"
    steps: Optional[int] = None


@dataclass
class FederationConfig:
    """Who trains and how often.

    hospitals: number of hospitals (derived from ``sites`` for a natural split).
    sites: for a natural split, which sites become hospitals (default: all).
    partition: ``{name: natural|iid|dirichlet|quantity, ...options}``.
    min_hospitals: fewest successful replies a round may have; fewer fails the run
      (default: every sampled hospital must reply).
    acquisition_shift: imaging only, strength in [0, 1] of per-site scanner differences.
    participation: availability, simulated compute / network delay, deadline and policy
      (docs/scenarios.md, "Participation"; checked by fedsec.federation.participation).
    max_reply_mb: the largest training reply (MB of arrays) the server unpacks; null: no limit.
    """

    hospitals: Optional[int] = None
    sites: Optional[List[str]] = None
    partition: Dict[str, Any] = field(default_factory=lambda: {"name": "natural"})
    rounds: int = 5
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_hospitals: Optional[int] = None
    acquisition_shift: float = 0.0
    timeout_s: float = 900.0
    local: LocalConfig = field(default_factory=LocalConfig)
    # availability, stragglers, deadline, the server's policy (fedsec.federation.participation)
    participation: Optional[Dict[str, Any]] = None
    max_reply_mb: Optional[float] = None  # a larger training reply is dropped before it is unpacked


@dataclass
class PrivacyConfig:
    dp_sgd: Optional[Dict[str, Any]] = None
    central_dp: Optional[Dict[str, Any]] = None
    secure_aggregation: Any = False  # true, or options (see docs/privacy.md)
    compression: Optional[Dict[str, Any]] = None


@dataclass
class ThreatModel:
    """Tags after Chang et al., "SoK: Security and Privacy Risks of Healthcare AI" (2409.07415).
    Left out, they are derived from the task and the attacks."""

    domain: Optional[str] = None
    adversary: Optional[str] = None
    knowledge: Optional[str] = None
    phase: Optional[str] = None
    goal: Optional[str] = None


@dataclass
class EngineConfig:
    """name: ray (Flower's simulation engine) | deployment (SuperLink + SuperNodes).
    num_cpus / num_gpus: resources per simulated hospital (fractional GPUs pack several
    hospitals per GPU). address: an existing Ray cluster to join (``ray start --head``)."""

    name: str = "ray"
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    address: Optional[str] = None


@dataclass
class OutputConfig:
    dir: str = "runs"
    tensorboard: bool = False


@dataclass
class Scenario:
    name: str = "scenario"
    description: str = ""
    seed: int = 0
    task: TaskConfig = field(default_factory=TaskConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    strategy: Any = "fedavg"
    attacks: List[Any] = field(default_factory=list)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    threat_model: ThreatModel = field(default_factory=ThreatModel)
    engine: EngineConfig = field(default_factory=EngineConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    # ---- derived helpers -------------------------------------------------------------
    @property
    def num_rounds(self) -> int:
        return int(self.federation.rounds)

    def to_dict(self) -> dict:
        """Plain nested dicts and lists. ``dataclasses.asdict`` (tuples as lists), 60x faster
        than going through OmegaConf (~30 ms, several times a run); a test checks both give the
        same dict for every shipped scenario."""
        return _plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def digest(self) -> str:
        return hashlib.sha256(self.to_yaml().encode()).hexdigest()[:8]

    def malicious_hospitals(self) -> list[int]:
        out: set[int] = set()
        for a in self.attacks:
            out.update(int(h) for h in a.get("hospitals", []))
        return sorted(out)


# --------------------------------------------------------------------------------------
# Taxonomy (docs/threat-model.md)
# --------------------------------------------------------------------------------------

TAXONOMY: dict[str, tuple[str, ...]] = {
    "domain": (
        "image_classification", "image_detection", "image_segmentation", "electrogram",
        "multi_omics", "cross_modal", "ehr_prediction", "imaging",
    ),
    "adversary": ("patient", "clinician", "hospital_insider", "vendor", "curious_server", "external"),
    "knowledge": ("white_box", "gray_box", "black_box", "omniscient"),
    "phase": ("training", "inference"),
    "goal": ("integrity", "confidentiality", "availability"),
}

# Keys of an attack entry the framework itself interprets; everything else goes to the attack.
ATTACK_FRAMEWORK_KEYS = ("preset", "attack", "hospitals", "fraction", "rounds", "only_when_selected",
                         "description", "threat")
STRATEGY_FRAMEWORK_KEYS = ("preset", "rule", "description", "flower", "server_momentum", "server_lr")



# --------------------------------------------------------------------------------------
# Catalogue (presets)
# --------------------------------------------------------------------------------------


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def project_root() -> Path:
    """The source checkout holding ``scenarios/``, ``attacks/``, ``strategies/`` (in a wheel
    install, a folder without them: the packaged catalogue is ``fedsec/catalogue/``)."""
    return Path(__file__).resolve().parents[2]


def catalogue_dirs(kind: str, near: Path | None = None) -> list[Path]:
    """Where presets of ``kind`` ('attacks' | 'strategies' | 'scenarios') are looked up, in
    order: next to the scenario file (and its parents), the working directory, the project
    checkout, the catalogue shipped in the package (``fedsec/catalogue/<kind>``: symlinks to
    the checkout's folders, real copies in a wheel). A name found earlier wins."""
    dirs: list[Path] = []
    if near is not None:
        for parent in [near.resolve().parent, *near.resolve().parents]:
            if (parent / kind).is_dir():
                dirs.append(parent / kind)
                break
    for base in (Path.cwd(), project_root(), Path(__file__).resolve().parent / "catalogue"):
        if (base / kind).is_dir() and (base / kind).resolve() not in [d.resolve() for d in dirs]:
            dirs.append(base / kind)
    return dirs


def list_presets(kind: str, near: Path | None = None) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for d in catalogue_dirs(kind, near):
        for f in sorted(d.glob("*.yaml")):
            found.setdefault(f.stem, f)
    return found


_SINGULAR = {"attacks": "attack", "strategies": "strategy", "scenarios": "scenario"}


def load_preset(kind: str, name: str, key: str, file: str, near: Path | None) -> dict:
    presets = list_presets(kind, near)
    if name not in presets:
        raise ScenarioError(
            f"unknown {_SINGULAR.get(kind, kind)} preset '{name}'"
            f"{did_you_mean(name, presets)}; available: {', '.join(sorted(presets)) or '(none)'}",
            file=file, key=key,
        )
    path = presets[name]
    data = _read_yaml(path)
    return data


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


# A scenario file is untrusted input (docs/threat-model.md, "the scenario file"): it is read
# with bounds on size, aliases and nesting, decoded as UTF-8, and never interpolated.
MAX_SCENARIO_BYTES = 1 << 20  # 1 MiB: the largest shipped scenario is ~2 KB
MAX_YAML_ALIASES = 100
MAX_YAML_NODES = 20_000  # after aliases are expanded (an alias "bomb" stops here)

# YAML 1.1 (PyYAML) reads 1e30 as a string: scenarios read it as the number a user means.
_FLOAT_RE = r"""^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"""


class _ScenarioLoader(yaml.SafeLoader):
    """SafeLoader (no Python objects) that refuses duplicate keys and counts aliases."""

    def __init__(self, stream):
        super().__init__(stream)
        self.aliases = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_YAML_ALIASES:
                mark = self.peek_event().start_mark
                raise yaml.YAMLError(f"more than {MAX_YAML_ALIASES} aliases (line {mark.line + 1})")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:
                raise yaml.constructor.ConstructorError(
                    None, None, f"a key must be a plain value, got {key!r}", key_node.start_mark) from None
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}' (line {key_node.start_mark.line + 1}): "
                                "a key may appear once", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


import re as _re  # noqa: E402

_ScenarioLoader.add_implicit_resolver("tag:yaml.org,2002:float", _re.compile(_FLOAT_RE),
                                      list("-+0123456789"))


def parse_yaml_text(text: str, source: str):
    """YAML text -> plain data, with the bounds above; errors name ``source``."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_SCENARIO_BYTES:
        raise ScenarioError(f"larger than {MAX_SCENARIO_BYTES // 1024} KiB: not a scenario file", file=source)
    try:
        data = yaml.load(text, Loader=_ScenarioLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ScenarioError(f"not valid YAML{where}: {problem}", file=source) from None
    except RecursionError:
        raise ScenarioError("YAML nested too deeply", file=source) from None
    _check_plain(data, source)
    return data


def _check_plain(data, source: str) -> None:
    """Bounded size after alias expansion; no OmegaConf interpolation or missing markers;
    mapping keys are strings."""
    count = 0
    stack = [(data, "", 0)]
    while stack:
        node, key, depth = stack.pop()
        count += 1
        if count > MAX_YAML_NODES:
            raise ScenarioError(f"more than {MAX_YAML_NODES} values once aliases are expanded", file=source)
        if depth > 50:
            raise ScenarioError("nested more than 50 levels deep", file=source, key=key or None)
        if isinstance(node, dict):
            for k, v in node.items():
                if not isinstance(k, str):
                    raise ScenarioError(f"keys must be names, got {k!r}", file=source, key=key or None)
                stack.append((v, f"{key}.{k}" if key else k, depth + 1))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                stack.append((v, f"{key}[{i}]", depth + 1))
        elif isinstance(node, str):
            if "${" in node:
                raise ScenarioError(
                    f"interpolation ({node!r}) is not allowed: a scenario is data, it cannot read the "
                    "environment or other keys; write the value itself", file=source, key=key or None)
            if node == "???":
                raise ScenarioError("'???' is not a value (write the value, or null)", file=source, key=key or None)
        elif isinstance(node, float) and not math.isfinite(node):
            raise ScenarioError(f"must be a finite number, got {node}", file=source, key=key or None)
        elif not (node is None or isinstance(node, (bool, int, float))):
            raise ScenarioError(f"unsupported value {node!r} (YAML dates and binary are not scenario values)",
                                file=source, key=key or None)


def _read_yaml(path: Path) -> dict:
    source = str(path)
    try:
        st = path.stat()  # follows symlinks: what would be read
    except FileNotFoundError:
        raise ScenarioError("scenario file not found", file=source) from None
    except OSError as err:
        raise ScenarioError(f"cannot read: {err.strerror}", file=source) from None
    if stat.S_ISDIR(st.st_mode):
        raise ScenarioError("expected a scenario YAML file, got a directory", file=source)
    if not stat.S_ISREG(st.st_mode):
        raise ScenarioError("not a regular file (a device, pipe or socket is not a scenario)", file=source)
    if st.st_size > MAX_SCENARIO_BYTES:
        raise ScenarioError(f"{st.st_size} bytes, larger than {MAX_SCENARIO_BYTES // 1024} KiB: "
                            "not a scenario file", file=source)
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_SCENARIO_BYTES + 1)
    except OSError as err:
        raise ScenarioError(f"cannot read: {err.strerror}", file=source) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ScenarioError(f"not UTF-8 text (byte {err.start}: {raw[err.start:err.start + 1]!r})",
                            file=source) from None
    data = parse_yaml_text(text, source)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ScenarioError("a scenario file must be a mapping of keys", file=source)
    return data


def _schema_keys(node) -> list[str]:
    try:
        return list(node.keys())
    except Exception:  # pragma: no cover - defensive
        return []


def _oc_key(err) -> str:
    """OmegaConf's ``attacks.0.x`` -> fedsec's ``attacks[0].x``."""
    key = str(getattr(err, "full_key", None) or getattr(err, "key", None) or "")
    return format_key([int(t) if t.isdigit() else t for t in key.split(".")]) if key else ""


_SECTIONS = {"task": ("model_options", "options"), "federation": ("partition", "local", "participation"), "privacy": (),
             "threat_model": (), "engine": (), "output": ()}


def _check_shape(data, source: str) -> None:
    """Sections are mappings, ``attacks`` a list, ``strategy`` a name or a mapping: said with
    the key, before OmegaConf's own messages (which name neither)."""
    if not isinstance(data, dict):
        raise ScenarioError("a scenario must be a mapping of keys", file=source)
    for section, subs in _SECTIONS.items():
        value = data.get(section)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise ScenarioError(f"expected a mapping of keys, got {value!r}", file=source, key=section)
        for sub in subs:
            if value.get(sub) is not None and not isinstance(value[sub], dict):
                raise ScenarioError(f"expected a mapping of keys, got {value[sub]!r}", file=source,
                                    key=f"{section}.{sub}")
    if data.get("attacks") is not None and not isinstance(data["attacks"], list):
        raise ScenarioError(f"expected a list of attacks, got {data['attacks']!r}", file=source, key="attacks")
    if data.get("strategy") is not None and not isinstance(data["strategy"], (str, dict)):
        raise ScenarioError(f"expected a preset name or a mapping, got {data['strategy']!r}", file=source,
                            key="strategy")
    for k in ("name", "description"):
        if data.get(k) is not None and not isinstance(data[k], str):
            raise ScenarioError(f"expected text, got {data[k]!r}", file=source, key=k)


def _merge_checked(base: DictConfig, data, source: str) -> DictConfig:
    """Merge ``data`` onto the structured ``base``; turn OmegaConf errors into ScenarioErrors."""
    if isinstance(data, dict):
        _check_shape(data, source)
    try:
        return OmegaConf.merge(base, data)
    except oc_errors.ConfigKeyError as err:
        key = _oc_key(err)
        parent_key, _, leaf = str(err.full_key or err.key).rpartition(".")
        try:
            parent = OmegaConf.select(base, parent_key) if parent_key else base
        except Exception:  # noqa: BLE001 - only for the hint
            parent = None
        hint = did_you_mean(leaf, _schema_keys(parent)) if isinstance(parent, DictConfig) else ""
        raise ScenarioError(f"unknown key{hint}", file=source, key=key) from None
    except oc_errors.ValidationError as err:
        msg = str(getattr(err, "msg", None) or err).splitlines()[0]
        raise ScenarioError(f"wrong type: {msg}", file=source, key=_oc_key(err) or None) from None
    except oc_errors.OmegaConfBaseException as err:
        msg = str(getattr(err, "msg", None) or err).splitlines()[0]
        raise ScenarioError(f"wrong value or type: {msg}", file=source, key=_oc_key(err) or None) from None
    except (TypeError, ValueError, RecursionError) as err:
        raise ScenarioError(f"wrong value or type: {str(err).splitlines()[0] if str(err) else type(err).__name__}",
                            file=source) from None


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with a YAML value (``rounds=3``, ``sites=[cleveland,va]``); the key may
    address list items (``attacks[0].poison_fraction=0``, ``attacks.0.poison_fraction=0``)."""
    if "=" not in text:
        raise ScenarioError(f"expected key=value, got '{text}'", file="command line")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key:
        raise ScenarioError(f"empty key in '{text}'", file="command line")
    source = f"override '{text}'"
    if not raw.strip():
        return key, None
    try:
        value = parse_yaml_text(raw, source)
    except ScenarioError as err:
        if "not valid YAML" not in err.detail:
            sub = err.key or ""
            full = key + ("" if not sub else (sub if sub.startswith("[") else f".{sub}"))
            raise ScenarioError(err.detail, file=source, key=full) from None
        value = raw  # a plain string that happens not to be YAML (e.g. "a: b: c")
    return key, value


_TOKEN = _re.compile(r"([^.\[\]]+)|\[(-?\d+)\]")


def key_tokens(key: str, source: str) -> list:
    """``attacks[0].x`` / ``attacks.0.x`` -> ``['attacks', 0, 'x']``."""
    tokens: list = []
    pos = 0
    for m in _TOKEN.finditer(key):
        if m.start() != pos and key[pos:m.start()] != ".":
            raise ScenarioError(f"cannot read the key path '{key}'", file=source, key=key)
        pos = m.end()
        if m.group(2) is not None:
            tokens.append(int(m.group(2)))
        else:
            name = m.group(1)
            tokens.append(int(name) if name.isdigit() and tokens else name)
    if pos != len(key) or not tokens or not isinstance(tokens[0], str):
        raise ScenarioError(f"cannot read the key path '{key}'", file=source, key=key)
    return tokens


def format_key(tokens: list) -> str:
    out = ""
    for t in tokens:
        out += f"[{t}]" if isinstance(t, int) else (f".{t}" if out else t)
    return out


def _set_path(data: dict, tokens: list, value, source: str) -> None:
    """Set ``data[tokens...] = value``, creating mappings on the way; list indices must exist."""
    node = data
    for depth, tok in enumerate(tokens[:-1]):
        here = format_key(tokens[:depth + 1])
        nxt = tokens[depth + 1]
        if isinstance(tok, int):
            if not isinstance(node, list):
                raise ScenarioError(f"'{format_key(tokens[:depth])}' is not a list", file=source, key=here)
            if not -len(node) <= tok < len(node):
                raise ScenarioError(f"index {tok} out of range: '{format_key(tokens[:depth])}' has "
                                    f"{len(node)} item(s)", file=source, key=here)
            if isinstance(node[tok], str) and isinstance(nxt, str):
                node[tok] = {"preset": node[tok]}  # a preset name gains options
            node = node[tok]
        else:
            if not isinstance(node, dict):
                raise ScenarioError(f"'{format_key(tokens[:depth])}' is not a mapping", file=source, key=here)
            if node.get(tok) is None:
                node[tok] = [] if isinstance(nxt, int) else {}
            elif isinstance(node[tok], str) and isinstance(nxt, str):
                node[tok] = {"preset": node[tok]}  # `strategy: krum` + `strategy.num_malicious=1`
            node = node[tok]
    last = tokens[-1]
    if isinstance(last, int):
        if not isinstance(node, list) or not -len(node) <= last < len(node):
            size = len(node) if isinstance(node, list) else 0
            raise ScenarioError(f"index {last} out of range: '{format_key(tokens[:-1])}' has {size} item(s)",
                                file=source, key=format_key(tokens))
        node[last] = value
    else:
        if not isinstance(node, dict):
            raise ScenarioError(f"'{format_key(tokens[:-1])}' is not a mapping", file=source,
                                key=format_key(tokens))
        if isinstance(node.get(last), dict) and isinstance(value, dict):
            _deep_merge(node[last], value)  # `federation={rounds: 2}` changes rounds, keeps the rest
        else:
            node[last] = value


def _deep_merge(into: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(into.get(k), dict) and isinstance(v, dict):
            _deep_merge(into[k], v)
        else:
            into[k] = v


def _apply_override(data: dict, key: str, value: Any, text: str) -> dict:
    """Apply one ``key=value`` to the plain scenario data (before presets are resolved, so an
    attack's or strategy's option set here wins over its preset file)."""
    source = f"override '{text}'"
    # Shorthands: `attacks=alie` swaps the preset keeping who/when; `attacks=none` removes them.
    if key == "attacks" and (value is None or isinstance(value, str)):
        if value in (None, "none", "null", ""):
            data["attacks"] = []
        else:
            current = data.get("attacks") or [{}]
            first = current[0] if isinstance(current, list) and current and isinstance(current[0], dict) else {}
            keep = {k: first[k] for k in ("hospitals", "fraction", "rounds", "only_when_selected") if k in first}
            data["attacks"] = [{"preset": value, **keep}]
        return data
    tokens = key_tokens(key, source)
    top = tokens[0]
    schema = _schema_keys(OmegaConf.structured(Scenario))
    if top not in schema:
        raise ScenarioError(f"unknown key{did_you_mean(top, schema)}", file=source, key=format_key(tokens))
    _set_path(data, tokens, value, source)
    return data


def _container(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=False)


def load_scenario(source: str | os.PathLike | dict | Scenario,
                  overrides: list[str] | dict | None = None) -> Scenario:
    """Load, compose, override and validate a scenario. Raises ScenarioError."""
    if isinstance(source, Scenario):
        data, file, near = source.to_dict(), "<scenario>", None
    elif isinstance(source, dict):
        data, file, near = copy.deepcopy(source), "<dict>", None
        _check_plain(data, file)
    else:
        path = Path(source)
        data, file, near = _read_yaml(path), str(path), path
    base = OmegaConf.structured(Scenario)
    cfg = _merge_checked(base, data, file)

    if isinstance(overrides, dict):
        overrides = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}" if not isinstance(v, str)
                     else f"{k}={v}" for k, v in overrides.items()]
    for text in overrides or []:
        key, value = parse_override(text)
        plain_data = _apply_override(_container(cfg), key, value, text)
        cfg = _merge_checked(base, plain_data, f"override '{text}'")

    container = _container(cfg)
    container["strategy"] = _resolve_strategy(container["strategy"], file, near)
    container["attacks"] = _resolve_attacks(container["attacks"], file, near)
    cfg = _merge_checked(base, container, file)
    scenario: Scenario = OmegaConf.to_object(cfg)
    validate(scenario, file)
    return scenario


def _resolve_strategy(value: Any, file: str, near: Path | None) -> dict:
    if value is None:
        value = "fedavg"
    if isinstance(value, str):
        value = {"preset": value}
    if not isinstance(value, dict):
        raise ScenarioError("expected a preset name or a mapping with 'preset'", file=file, key="strategy")
    if "preset" in value:
        preset = load_preset("strategies", str(value["preset"]), "strategy.preset", file, near)
        merged = {**preset, **value}
    elif "rule" in value:
        merged = dict(value)
    else:
        raise ScenarioError("needs 'preset' (a file in strategies/) or 'rule'", file=file, key="strategy")
    if "rule" not in merged:
        raise ScenarioError("the strategy preset names no 'rule'", file=file, key="strategy")
    return merged


def _resolve_attacks(value: Any, file: str, near: Path | None) -> list[dict]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ScenarioError("expected a list of attacks", file=file, key="attacks")
    out = []
    for i, entry in enumerate(value):
        key = f"attacks[{i}]"
        if isinstance(entry, str):
            entry = {"preset": entry}
        if not isinstance(entry, dict):
            raise ScenarioError("expected a preset name or a mapping with 'preset'", file=file, key=key)
        if "preset" in entry:
            preset = load_preset("attacks", str(entry["preset"]), f"{key}.preset", file, near)
            merged = {**preset, **entry}
        elif "attack" in entry:
            merged = dict(entry)
        else:
            raise ScenarioError("needs 'preset' (a file in attacks/) or 'attack'", file=file, key=key)
        if "attack" not in merged:
            raise ScenarioError("the attack preset names no 'attack'", file=file, key=key)
        out.append(merged)
    return out


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------


def _task_spec(name: str):
    from fedsec.registry import TASKS

    return TASKS.get(name).spec if name in TASKS else None


def natural_sites(task_name: str) -> list[str] | None:
    """The natural hospitals of a task whose data names them (from its declaration)."""
    spec = _task_spec(task_name)
    return list(spec.sites) if spec is not None and spec.sites else None


def expected_hospitals(s: Scenario) -> int | None:
    """The number of hospitals when it can be known before loading data."""
    fed = s.federation
    if fed.sites:
        return len(fed.sites)
    if fed.hospitals is not None:
        return int(fed.hospitals)
    sites = natural_sites(s.task.name)
    if str(fed.partition.get("name", "natural")) == "natural" and sites:
        return len(sites)
    return None


def hospitals_per_round(s: Scenario, n: int) -> int:
    """How many hospitals train in a round (the server's selection: ceil(fraction * n))."""
    return min(n, max(1, math.ceil(s.federation.fraction_train * n)))


# Documented ranges of the scenario's numbers (docs/scenarios.md). Values outside are errors:
# a typo such as rounds: 1000000000000 must not start a run that never ends.
RANGES: dict[str, tuple[float | None, float | None]] = {
    "seed": (0, 2**32 - 1),
    "federation.hospitals": (1, 100_000),
    "federation.rounds": (1, 100_000),
    "federation.min_hospitals": (1, 100_000),
    "federation.acquisition_shift": (0.0, 1.0),
    "federation.timeout_s": (1e-3, 7 * 24 * 3600.0),
    "federation.max_reply_mb": (1e-6, 1e6),
    "federation.local.epochs": (1, 10_000),
    "federation.local.steps": (1, 10_000_000),
    "federation.local.batch_size": (1, 1_000_000),
    "federation.local.lr": (1e-12, 1e3),
    "federation.local.momentum": (0.0, 0.999999),
    "federation.local.weight_decay": (0.0, 10.0),
    "engine.num_cpus": (1e-3, 4096.0),
    "engine.num_gpus": (0.0, 1024.0),
}

NAME_RE = _re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


def _value_at(s: Scenario, key: str):
    node = s
    for part in key.split("."):
        node = getattr(node, part)
    return node


def validate(s: Scenario, file: str = "<scenario>") -> None:
    """Range and cross-field checks, then every component's options against its declaration
    (types and unknown keys of the scenario itself are checked by the schema)."""
    from fedsec.registry import MODELS, PARTITIONERS, TASKS, check_options

    def err(key: str, msg: str):
        raise ScenarioError(msg, file=file, key=key)

    def rekey(e: ScenarioError, prefix: str):
        key = f"{prefix}.{e.key}" if e.key and prefix else (e.key or prefix)
        raise ScenarioError(e.detail, file=file, key=key) from None

    if not NAME_RE.match(s.name) or ".." in s.name:
        err("name", f"must be a plain name (letters, digits, '_', '-', '.'; at most 100; no '..' or '/'), "
                    f"got {s.name!r}: it names the results folder")
    out_dir = Path(s.output.dir)
    if out_dir.is_absolute() or ".." in out_dir.parts or s.output.dir.startswith("~"):
        err("output.dir", f"must be a relative folder inside the working directory, got {s.output.dir!r} "
                          "(use --out to write elsewhere)")
    for key, (low, high) in RANGES.items():
        v = _value_at(s, key)
        if v is None:
            continue
        if isinstance(v, float) and not math.isfinite(v):
            err(key, f"must be a finite number, got {v}")
        if (low is not None and v < low) or (high is not None and v > high):
            err(key, f"must be between {low:g} and {high:g}, got {v!r}")

    fed = s.federation
    try:
        TASKS.get(s.task.name, key="task.name")
        MODELS.get(s.task.model, key="task.model")
    except ScenarioError as e:
        rekey(e, "")
    spec = _task_spec(s.task.name)
    from fedsec.tasks import _GENERIC_OPTIONS as generic

    for k in s.task.options or {}:
        if k not in spec.options and k not in generic:
            err(f"task.options.{k}", f"not an option of task '{s.task.name}'"
                                     f"{did_you_mean(k, list(spec.options) + list(generic))}; options: "
                                     f"{', '.join(sorted(spec.options)) or 'none'}, {', '.join(generic)}")
    vf = (s.task.options or {}).get("val_fraction")
    if vf is not None and (isinstance(vf, bool) or not isinstance(vf, (int, float)) or not 0 <= vf < 1):
        err("task.options.val_fraction", f"expected a number in [0, 1), got {vf!r}")
    try:
        check_options(MODELS.get(s.task.model), s.task.model_options, "task.model_options",
                      f"model '{s.task.model}'")
    except ScenarioError as e:
        rekey(e, "")
    if spec.needs_path and not s.task.path:
        err("task.path", f"task '{s.task.name}' reads your own data: give the path of its file or folder")
    if s.task.path is not None and not Path(os.path.expanduser(s.task.path)).exists():
        err("task.path", f"file or folder not found: {s.task.path}")
    for k in ("fraction_train", "fraction_evaluate"):
        v = getattr(fed, k)
        if not (math.isfinite(v) and 0.0 < v <= 1.0):
            err(f"federation.{k}", f"must be in (0, 1], got {v}")
    if "name" not in fed.partition:
        err("federation.partition.name", f"missing: one of {', '.join(PARTITIONERS.names())}")
    part = fed.partition.get("name")
    try:
        PARTITIONERS.get(part, key="federation.partition.name")
        check_options(PARTITIONERS.get(part), {k: v for k, v in fed.partition.items() if k != "name"},
                      "federation.partition", f"partition '{part}'")
    except ScenarioError as e:
        rekey(e, "")
    if part not in spec.splits:
        why = ("needs data that names its sites" if part == "natural"
               else "is not how this data is divided (it has its own hospitals)")
        err("federation.partition.name", f"'{part}' {why}; task {s.task.name} takes: {', '.join(spec.splits)}")
    loc = fed.local
    if loc.optimizer not in ("sgd", "adam"):
        err("federation.local.optimizer", f"must be 'sgd' or 'adam', got '{loc.optimizer}'")
    known = natural_sites(s.task.name)
    if fed.sites is not None:
        if not fed.sites:
            err("federation.sites", "is empty: name at least one site, or leave the key out for all sites")
        seen: set = set()
        for i, site in enumerate(fed.sites):
            if site in seen:
                err(f"federation.sites[{i}]", f"'{site}' is listed twice: each site is one hospital")
            seen.add(site)
            if known and site not in known:
                err(f"federation.sites[{i}]", f"unknown site '{site}'{did_you_mean(site, known)}; "
                                              f"{s.task.name} has {', '.join(known)}")
        if fed.hospitals is not None and fed.hospitals != len(fed.sites):
            err("federation.hospitals", f"is {fed.hospitals} but federation.sites names {len(fed.sites)}")
    elif known and part == "natural" and fed.hospitals is not None and fed.hospitals != len(known):
        err("federation.hospitals", f"is {fed.hospitals}, but {s.task.name}'s natural split has "
                                    f"{len(known)} hospitals ({', '.join(known)}); leave it out or pick sites")
    if s.engine.name not in ("ray", "inline", "deployment"):
        err("engine.name", f"must be 'ray', 'inline' or 'deployment', got '{s.engine.name}'")

    n = expected_hospitals(s)
    if n is not None and fed.min_hospitals is not None and not 1 <= fed.min_hospitals <= n:
        err("federation.min_hospitals", f"must be between 1 and the {n} hospitals, got {fed.min_hospitals}")
    _validate_participation(s, n, file)
    malicious = _validate_attacks(s, n, err, rekey)
    _validate_strategy(s, n, malicious, err, rekey)
    _validate_privacy(s, file)
    _validate_threat_model(s, err)


def _validate_participation(s: Scenario, n: int | None, file: str) -> None:
    """``federation.participation`` (fedsec.federation.participation.check_scenario)."""
    if s.federation.participation is None:
        return
    from fedsec.federation.participation import check_scenario

    names = list(s.federation.sites or natural_sites(s.task.name) or []) or None
    if str(s.federation.partition.get("name", "natural")) != "natural":
        names = None
    try:
        check_scenario(s, n, names)
    except ScenarioError as e:
        raise ScenarioError(e.detail, file=file, key=e.key) from None


def _validate_attacks(s: Scenario, n: int | None, err, rekey) -> int:
    """Each attack's entry and options; returns the number of malicious hospitals (f)."""
    from fedsec.attacks import make_attack
    from fedsec.registry import ATTACKS

    count_fraction = 0
    for i, a in enumerate(s.attacks):
        key = f"attacks[{i}]"
        try:
            cls = ATTACKS.get(a.get("attack"), key=f"{key}.attack")
        except ScenarioError as e:
            rekey(e, "")
        spec = cls.spec()
        hospitals = a.get("hospitals")
        frac = a.get("fraction")
        if hospitals is None and frac is None and not spec.server_only:
            err(f"{key}.hospitals", "say which hospitals are malicious: a list of ids, or 'fraction'")
        if hospitals is not None:
            if not isinstance(hospitals, list) or not all(
                    isinstance(h, int) and not isinstance(h, bool) for h in hospitals):
                err(f"{key}.hospitals", f"expected a list of hospital ids (integers), got {hospitals!r}")
            if len(set(hospitals)) != len(hospitals):
                err(f"{key}.hospitals", f"lists a hospital twice: {hospitals}")
            if n is not None:
                bad = [h for h in hospitals if not 0 <= h < n]
                if bad:
                    err(f"{key}.hospitals", f"ids {bad} out of range: there are {n} hospitals (0..{n - 1})")
                if len(set(hospitals)) >= n:
                    err(f"{key}.hospitals", f"{len(set(hospitals))} malicious hospitals out of {n}: "
                                            "at least one hospital must be benign")
        if frac is not None:
            if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 < frac < 1:
                err(f"{key}.fraction", f"must be in (0, 1), got {frac!r}")
            if n is not None:
                count_fraction = max(count_fraction, max(1, int(math.floor(float(frac) * n))))
        rounds = a.get("rounds")
        if rounds is not None:
            if (not isinstance(rounds, list) or len(rounds) != 2
                    or not all(isinstance(r, int) and not isinstance(r, bool) for r in rounds)):
                err(f"{key}.rounds", f"expected [first, last] round numbers, got {rounds!r}")
            if not 1 <= rounds[0] <= rounds[1] <= s.federation.rounds:
                err(f"{key}.rounds", f"window {rounds} must satisfy 1 <= first <= last <= "
                                     f"federation.rounds ({s.federation.rounds})")
        ows = a.get("only_when_selected")
        if ows is not None and not isinstance(ows, bool):
            err(f"{key}.only_when_selected", f"expected true or false, got {ows!r}")
        if spec.simulation_only and s.engine.name == "deployment":
            err(key, f"attack '{a['attack']}' is an omniscient coalition (server-side collusion): it exists "
                     "only in simulation; use engine.name=ray")
        options = {k: v for k, v in a.items() if k not in ATTACK_FRAMEWORK_KEYS}
        try:
            attack = make_attack(a["attack"], **options)
            attack.check(n, sorted(hospitals or []), "")
        except ScenarioError as e:
            rekey(e, key)
        except FedsecError as e:
            err(key, str(e))
    mal = s.malicious_hospitals()
    if n is not None and mal and len(mal) >= n:
        err("attacks", f"{len(mal)} malicious hospitals out of {n}: at least one must be benign")
    return max(len(mal), count_fraction)


def strategy_rule(strategy) -> tuple[str | None, dict, dict]:
    """A scenario's ``strategy`` -> (rule name, the rule's own options, the whole spec)."""
    spec = strategy if isinstance(strategy, dict) else {"rule": strategy}
    return spec.get("rule"), {k: v for k, v in spec.items() if k not in STRATEGY_FRAMEWORK_KEYS}, spec


def _validate_strategy(s: Scenario, n: int | None, malicious: int, err, rekey) -> None:
    from fedsec.registry import RULES
    from fedsec.strategies.rules import make_rule

    name, options, spec = strategy_rule(s.strategy)
    try:
        RULES.get(name, key="strategy.rule")
    except ScenarioError as e:
        rekey(e, "")
    try:
        from fedsec.strategies.server_momentum import ServerMomentum

        ServerMomentum.from_spec(spec)  # strategy.server_momentum / server_lr: the server's step
    except ScenarioError as e:
        err(e.key, e.detail)
    try:
        rule = make_rule(name, **options)
    except ScenarioError as e:
        rekey(e, "strategy")
    except FedsecError as e:
        err("strategy", str(e))
    f = options.get("num_malicious")
    f = malicious if f is None else int(f)
    if n is not None:
        if f >= n:
            err("strategy.num_malicious", f"{f} malicious hospitals out of {n}: must be fewer than the hospitals")
        m = hospitals_per_round(s, n)
        try:
            rule.check(f, m)
        except ScenarioError as e:
            rekey(e, "strategy")
        need = rule.min_updates(f)
        if m < need:
            key = "strategy.num_malicious" if options.get("num_malicious") is not None else "strategy"
            err(key, f"{name} tolerates {type(rule).tolerates}: with f = {f} it needs at least {need} "
                     f"hospitals per round, the scenario has {m}")


def _validate_privacy(s: Scenario, file: str) -> None:
    """The privacy block's options and combinations (fedsec.privacy.defenses.check_privacy)."""
    p = s.privacy
    if not (p.dp_sgd or p.central_dp or p.secure_aggregation or p.compression):
        return
    from fedsec.privacy.defenses import check_privacy
    from fedsec.registry import ATTACKS

    class _Plan:  # what check_privacy reads of an attack plan: its name and hooks
        def __init__(self, entry):
            self.name = str(entry.get("preset", entry["attack"]))
            self.hooks = ATTACKS.get(entry["attack"]).spec().hooks

        def has(self, hook: str) -> bool:
            return hook in self.hooks

    try:
        check_privacy(s, plans=[_Plan(a) for a in s.attacks])
    except ScenarioError as e:
        raise ScenarioError(e.detail, file=file, key=e.key) from None
    except FedsecError as e:
        text = str(e)
        head, sep, rest = text.partition(": ")
        if sep and head.startswith("privacy") and " " not in head:
            raise ScenarioError(rest, file=file, key=head) from None
        raise ScenarioError(text, file=file, key="privacy") from None


def derived_threat_model(s: Scenario) -> dict:
    """The scenario's tags, with the left-out ones derived from the task and the attacks (each
    attack's preset ``threat``, changed by its options: ``Attack.threat_for``)."""
    tags = {k: getattr(s.threat_model, k) for k in TAXONOMY}
    if tags["domain"] is None:
        spec = _task_spec(s.task.name)
        tags["domain"] = spec.domain if spec is not None else None
    from fedsec.attacks import attack_threat

    threats = [attack_threat(a) for a in s.attacks]  # the presets' tags, as the options in force decide
    for k in ("adversary", "knowledge", "phase", "goal"):
        if tags[k] is None and s.attacks:
            values = {str(t[k]) for t in threats if t.get(k)}
            tags[k] = values.pop() if len(values) == 1 else ("mixed" if values else None)
    return tags


def _validate_threat_model(s: Scenario, err) -> None:
    for k, allowed in TAXONOMY.items():
        v = getattr(s.threat_model, k)
        if v is not None and v not in allowed:
            err(f"threat_model.{k}", f"'{v}' is not a {k} tag{did_you_mean(v, allowed)}; "
                                     f"one of {', '.join(allowed)}")
    for i, a in enumerate(s.attacks):
        threat = a.get("threat") or {}
        for k in ("goal", "adversary", "phase"):
            declared = getattr(s.threat_model, k)
            if declared is not None and threat.get(k) is not None and threat[k] != declared:
                err(f"threat_model.{k}", f"is '{declared}' but attack '{a.get('preset', a.get('attack'))}' "
                                         f"(attacks[{i}]) has {k} '{threat[k]}'")
        if (a.get("threat") or {}).get("knowledge") == "omniscient" and s.engine.name == "deployment":
            err(f"attacks[{i}]", "an omniscient coalition (server-side collusion) exists only in simulation; "
                                 "use engine.name=ray")

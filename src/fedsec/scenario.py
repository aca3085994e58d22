"""Scenario files: schema, loading, preset composition, overrides and validation.

Loading = read YAML with OmegaConf, merge it onto the typed schema below (unknown keys and
wrong types are caught there), apply ``key=value`` overrides, replace each preset name by
the preset file merged with its inline options, then check ranges and cross-field rules.
Every error is a :class:`ScenarioError` naming the file and the key path.
"""

from __future__ import annotations

import copy
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf  # noqa: F401
from omegaconf import errors as oc_errors

from fedsec.errors import ScenarioError
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
        return OmegaConf.to_container(OmegaConf.structured(self), resolve=True)

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

TASK_DOMAIN = {
    "heart_disease": "ehr_prediction",
    "ehr_csv": "ehr_prediction",
    "pneumonia": "image_classification",
    "medmnist": "image_classification",
    "mednist": "image_classification",
}

# Keys of an attack entry the framework itself interprets; everything else goes to the attack.
ATTACK_FRAMEWORK_KEYS = ("preset", "attack", "hospitals", "fraction", "rounds", "only_when_selected",
                         "description", "threat")
STRATEGY_FRAMEWORK_KEYS = ("preset", "rule", "description", "flower")

NATURAL_SITES = {"heart_disease": ["cleveland", "hungary", "switzerland", "va"]}


# --------------------------------------------------------------------------------------
# Catalogue (presets)
# --------------------------------------------------------------------------------------


def project_root() -> Path:
    """The source checkout holding ``scenarios/``, ``attacks/``, ``strategies/``."""
    return Path(__file__).resolve().parents[2]


def catalogue_dirs(kind: str, near: Path | None = None) -> list[Path]:
    """Where presets of ``kind`` ('attacks' | 'strategies' | 'scenarios') are looked up, in
    order: next to the scenario file (and its parents), the working directory, the project."""
    dirs: list[Path] = []
    if near is not None:
        for parent in [near.resolve().parent, *near.resolve().parents]:
            if (parent / kind).is_dir():
                dirs.append(parent / kind)
                break
    for base in (Path.cwd(), project_root()):
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
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ScenarioError(f"preset file is not valid YAML: {err}", file=str(path)) from None
    if not isinstance(data, dict):
        raise ScenarioError("a preset file must be a mapping", file=str(path))
    return data


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def _read_yaml(path: Path) -> dict:
    if not path.exists():
        raise ScenarioError("scenario file not found", file=str(path))
    if path.is_dir():
        raise ScenarioError("expected a scenario YAML file, got a directory", file=str(path))
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ScenarioError(f"not valid YAML{where}: {problem}", file=str(path)) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ScenarioError("a scenario file must be a mapping of keys", file=str(path))
    return data


def _schema_keys(node) -> list[str]:
    try:
        return list(node.keys())
    except Exception:  # pragma: no cover - defensive
        return []


def _merge_checked(base: DictConfig, data, source: str) -> DictConfig:
    """Merge ``data`` onto the structured ``base``; turn OmegaConf errors into ScenarioErrors."""
    try:
        return OmegaConf.merge(base, data)
    except oc_errors.ConfigKeyError as err:
        key = err.full_key or str(err.key)
        parent_key, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(base, parent_key) if parent_key else base
        hint = did_you_mean(leaf, _schema_keys(parent)) if isinstance(parent, DictConfig) else ""
        raise ScenarioError(f"unknown key{hint}", file=source, key=key) from None
    except oc_errors.ValidationError as err:
        key = err.full_key or str(err.key)
        expected = getattr(err, "ref_type", None) or ""
        raise ScenarioError(f"wrong type: {err.msg.splitlines()[0]}", file=source, key=key) from None
    except oc_errors.OmegaConfBaseException as err:  # pragma: no cover - other OmegaConf errors
        raise ScenarioError(str(err).splitlines()[0], file=source,
                            key=getattr(err, "full_key", None)) from None


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with a YAML value (``rounds=3``, ``sites=[cleveland,va]``)."""
    if "=" not in text:
        raise ScenarioError(f"expected key=value, got '{text}'", file="command line")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key:
        raise ScenarioError(f"empty key in '{text}'", file="command line")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def _apply_override(cfg: DictConfig, key: str, value: Any, text: str) -> DictConfig:
    source = f"override '{text}'"
    # Shorthands: `attacks=alie` swaps the preset keeping who/when; `attacks=none` removes them.
    if key == "attacks" and (value is None or isinstance(value, str)):
        if value in (None, "none", "null", ""):
            cfg.attacks = []
        else:
            current = OmegaConf.to_container(cfg.attacks) or [{}]
            first = current[0] if isinstance(current[0], dict) else {}
            keep = {k: first[k] for k in ("hospitals", "fraction", "rounds", "only_when_selected") if k in first}
            cfg.attacks = [{"preset": value, **keep}]
        return cfg
    if key == "strategy" and isinstance(value, str):
        cfg.strategy = value
        return cfg
    top = key.split(".")[0]
    if top not in _schema_keys(cfg):
        raise ScenarioError(f"unknown key{did_you_mean(top, _schema_keys(cfg))}", file=source, key=key)
    dotted = OmegaConf.create({})
    try:
        OmegaConf.update(dotted, key, value, force_add=True)
    except oc_errors.OmegaConfBaseException as err:
        raise ScenarioError(str(err).splitlines()[0], file=source, key=key) from None
    return _merge_checked(cfg, dotted, source)


def load_scenario(source: str | os.PathLike | dict | Scenario,
                  overrides: list[str] | dict | None = None) -> Scenario:
    """Load, compose, override and validate a scenario. Raises ScenarioError."""
    if isinstance(source, Scenario):
        data, file, near = source.to_dict(), "<scenario>", None
    elif isinstance(source, dict):
        data, file, near = copy.deepcopy(source), "<dict>", None
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
        cfg = _apply_override(cfg, key, value, text)

    container = OmegaConf.to_container(cfg, resolve=True)
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


def expected_hospitals(s: Scenario) -> int | None:
    """The number of hospitals when it can be known before loading data."""
    fed = s.federation
    if fed.sites:
        return len(fed.sites)
    if fed.hospitals is not None:
        return int(fed.hospitals)
    if str(fed.partition.get("name", "natural")) == "natural" and s.task.name in NATURAL_SITES:
        return len(NATURAL_SITES[s.task.name])
    return None


def validate(s: Scenario, file: str = "<scenario>") -> None:
    """Range and cross-field checks (types and unknown keys are checked by the schema)."""
    from fedsec.registry import MODELS, TASKS

    def err(key: str, msg: str):
        raise ScenarioError(msg, file=file, key=key)

    fed = s.federation
    if s.task.name not in TASKS:
        err("task.name", f"unknown task '{s.task.name}'{did_you_mean(s.task.name, TASKS.names())}; "
                         f"available: {', '.join(TASKS.names())}")
    if s.task.model not in MODELS:
        err("task.model", f"unknown model '{s.task.model}'{did_you_mean(s.task.model, MODELS.names())}; "
                          f"available: {', '.join(MODELS.names())}")
    if s.task.path is not None and not Path(os.path.expanduser(s.task.path)).exists():
        err("task.path", f"file or folder not found: {s.task.path}")
    if fed.rounds <= 0:
        err("federation.rounds", f"must be > 0, got {fed.rounds}")
    for k in ("fraction_train", "fraction_evaluate"):
        v = getattr(fed, k)
        if not 0.0 < v <= 1.0:
            err(f"federation.{k}", f"must be in (0, 1], got {v}")
    if fed.hospitals is not None and fed.hospitals < 1:
        err("federation.hospitals", f"must be >= 1, got {fed.hospitals}")
    if not 0.0 <= fed.acquisition_shift <= 1.0:
        err("federation.acquisition_shift", f"must be in [0, 1], got {fed.acquisition_shift}")
    if fed.timeout_s <= 0:
        err("federation.timeout_s", f"must be > 0, got {fed.timeout_s}")
    if "name" not in fed.partition:
        err("federation.partition.name", "missing: one of natural, iid, dirichlet, quantity")
    if (fed.partition.get("name") == "natural" and s.task.name in ("pneumonia", "medmnist")):
        err("federation.partition.name", f"'natural' needs data that names its sites; {s.task.name} does not: "
                                         "use iid, dirichlet or quantity")
    loc = fed.local
    if loc.epochs < 1:
        err("federation.local.epochs", f"must be >= 1, got {loc.epochs}")
    if loc.steps is not None and loc.steps < 1:
        err("federation.local.steps", f"must be >= 1 (or null for full epochs), got {loc.steps}")
    if loc.batch_size < 1:
        err("federation.local.batch_size", f"must be >= 1, got {loc.batch_size}")
    if loc.lr <= 0:
        err("federation.local.lr", f"must be > 0, got {loc.lr}")
    if loc.optimizer not in ("sgd", "adam"):
        err("federation.local.optimizer", f"must be 'sgd' or 'adam', got '{loc.optimizer}'")
    if fed.sites is not None:
        known = NATURAL_SITES.get(s.task.name)
        if known:
            for i, site in enumerate(fed.sites):
                if site not in known:
                    err(f"federation.sites[{i}]", f"unknown site '{site}'{did_you_mean(site, known)}; "
                                                  f"{s.task.name} has {', '.join(known)}")
        if fed.hospitals is not None and fed.hospitals != len(fed.sites):
            err("federation.hospitals", f"is {fed.hospitals} but federation.sites names {len(fed.sites)}")
    if s.engine.name not in ("ray", "inline", "deployment"):
        err("engine.name", f"must be 'ray', 'inline' or 'deployment', got '{s.engine.name}'")
    if s.engine.num_cpus <= 0:
        err("engine.num_cpus", f"must be > 0, got {s.engine.num_cpus}")
    if s.engine.num_gpus < 0:
        err("engine.num_gpus", f"must be >= 0, got {s.engine.num_gpus}")

    n = expected_hospitals(s)
    if n is not None and fed.min_hospitals is not None and not 1 <= fed.min_hospitals <= n:
        err("federation.min_hospitals", f"must be between 1 and the {n} hospitals, got {fed.min_hospitals}")
    _validate_attacks(s, n, err)
    if isinstance(s.strategy, dict):
        f = s.strategy.get("num_malicious")
        if f is not None and n is not None and int(f) >= n:
            err("strategy.num_malicious", f"{f} malicious hospitals out of {n}: must be fewer than the hospitals")
    _validate_threat_model(s, err)


def _validate_attacks(s: Scenario, n: int | None, err) -> None:
    for i, a in enumerate(s.attacks):
        key = f"attacks[{i}]"
        hospitals = a.get("hospitals")
        frac = a.get("fraction")
        if hospitals is None and frac is None and a.get("attack") not in _SERVER_ONLY_ATTACKS:
            err(f"{key}.hospitals", "say which hospitals are malicious: a list of ids, or 'fraction'")
        if hospitals is not None:
            if not isinstance(hospitals, list) or not all(isinstance(h, int) for h in hospitals):
                err(f"{key}.hospitals", f"expected a list of hospital ids (integers), got {hospitals!r}")
            if n is not None:
                bad = [h for h in hospitals if not 0 <= h < n]
                if bad:
                    err(f"{key}.hospitals", f"ids {bad} out of range: there are {n} hospitals (0..{n - 1})")
                if len(set(hospitals)) >= n:
                    err(f"{key}.hospitals", f"{len(set(hospitals))} malicious hospitals out of {n}: "
                                            "at least one hospital must be benign")
        if frac is not None:
            if not isinstance(frac, (int, float)) or not 0 < frac < 1:
                err(f"{key}.fraction", f"must be in (0, 1), got {frac!r}")
        rounds = a.get("rounds")
        if rounds is not None:
            if (not isinstance(rounds, list) or len(rounds) != 2
                    or not all(isinstance(r, int) for r in rounds)):
                err(f"{key}.rounds", f"expected [first, last] round numbers, got {rounds!r}")
            if not 1 <= rounds[0] <= rounds[1] <= s.federation.rounds:
                err(f"{key}.rounds", f"window {rounds} must satisfy 1 <= first <= last <= "
                                     f"federation.rounds ({s.federation.rounds})")
    mal = s.malicious_hospitals()
    if n is not None and mal and len(mal) >= n:
        err("attacks", f"{len(mal)} malicious hospitals out of {n}: at least one must be benign")


# Attacks that act only on the server (observers): they need no malicious hospital.
_SERVER_ONLY_ATTACKS = {"dlg", "idlg", "inverting_gradients", "tabular_inversion", "membership_loss",
                        "membership_calibrated"}


def derived_threat_model(s: Scenario) -> dict:
    """The scenario's tags, with the left-out ones derived from the task and the attacks."""
    tags = {k: getattr(s.threat_model, k) for k in TAXONOMY}
    if tags["domain"] is None:
        tags["domain"] = TASK_DOMAIN.get(s.task.name)
    for k in ("adversary", "knowledge", "phase", "goal"):
        if tags[k] is None and s.attacks:
            values = {str((a.get("threat") or {}).get(k)) for a in s.attacks if (a.get("threat") or {}).get(k)}
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

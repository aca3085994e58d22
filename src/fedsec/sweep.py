"""``fedsec sweep``: a grid of scenario overrides x seeds, one run folder per cell.

    fedsec sweep scenarios/heart_sweep.yaml --grid attacks=none,label_flip,alie \\
        --grid strategy=fedavg,median,norm_bounding --seeds 0,1,2 --out runs/heart-sweep

Layout of the sweep folder (what ``fedsec report`` reads)::

    sweep.json             grid, seeds, command, every cell with its status
    cells/<cell-id>/       one ordinary run folder per cell (scenario.yaml, rounds.jsonl, summary.json, log.txt)
    sweep.csv              one row per cell: grid values, seed, status, error, final metrics, attack metrics, timing
    summary.csv            mean / std over seeds per (row, column) of the table
    summary.md             the same as a Markdown table (rows x columns chosen by --rows / --cols)

How it runs:

- Every cell's scenario is loaded and validated first; an invalid key or value stops the
  sweep before anything starts (exit 2), naming the cell and the key.
- Small cells run in-process (``engine.name=inline``, the same apps and bit-identical
  results, no Ray): ``--engine auto`` (default) picks it for cells of at most
  ``INLINE_MAX_HOSPITALS`` hospitals on CPU that name no Ray cluster; ``--engine ray`` /
  ``--engine inline`` force one. Each worker process imports torch/Flower once and runs its
  cells one after the other, so a small cell costs its training, not a process start.
- Cells on Ray share Ray starts: Ray starts once per worker slot, not once per cell: each
  slot is one Ray head (``ray.init`` in a holder process, loopback, private temp dir) and
  the slot's worker runs its cells with ``engine.address`` set to its head. Slots run side by
  side; Flower sizes its actor pool from the whole cluster, so two runs sharing one head
  would queue behind each other — hence one head per slot. No head starts when every
  pending cell runs in-process.
  Default ``--parallel``: as many slots as the CPUs hold cells (hospitals x engine.num_cpus
  per Ray cell, engine.num_cpus per in-process cell), at least 1.
- A backdoor cell's ``null_run`` (its ASR floor) is the no-attack cell of the same seed and
  other grid values when the grid has one (pair_nulls); that cell runs first and the
  backdoor cell waits for it (_next_ready), also with several slots.
- Resumable: re-running the same command skips cells whose summary.json says
  ``completed`` (and whose resolved scenario is unchanged). Failed, interrupted,
  SIGKILLed (summary still ``running``) and missing cells are run again **from scratch**:
  their folder is emptied first, so a resumed sweep's tables equal an uninterrupted one's.
- A failing cell is recorded (status + error in sweep.json and the tables) and the sweep
  goes on. Exit code: 0 all completed, 1 some cell failed, 2 invalid input, 130 Ctrl-C.
- Every process the sweep starts (Ray heads, workers) dies with it: Ctrl-C and errors stop
  them in order; if the sweep itself is killed, Linux's parent-death signal stops them.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import json
import math
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from fedsec.analysis.tables import FINISHED, METRIC_KEYS, write_tables
from fedsec.errors import FedsecError, ScenarioError

# --------------------------------------------------------------------------------------
# Grid
# --------------------------------------------------------------------------------------


def split_values(text: str) -> list[str]:
    """``a,b,[c,d],{x: 1, y: 2}`` -> ``['a', 'b', '[c,d]', '{x: 1, y: 2}']`` (commas inside
    brackets, braces or quotes belong to the value)."""
    out, depth, quote, cur = [], 0, None, []
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    out.append("".join(cur).strip())
    return out


def parse_grid(items: list[str] | dict | None) -> dict[str, list[str]]:
    """``["attacks=none,alie", "strategy=fedavg,krum"]`` -> ``{"attacks": [...], ...}`` (order kept)."""
    if not items:
        return {}
    if isinstance(items, dict):
        return {str(k): [str(v) for v in (vs if isinstance(vs, (list, tuple)) else [vs])] for k, vs in items.items()}
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ScenarioError(f"--grid expects key=v1,v2,..., got '{item}'", file="command line")
        values = split_values(raw)
        if any(v == "" for v in values):
            raise ScenarioError(f"--grid {key}: empty value in '{raw}'", file="command line", key=key)
        if key in grid:
            raise ScenarioError(f"--grid {key} given twice", file="command line", key=key)
        if len(set(values)) != len(values):
            raise ScenarioError(f"--grid {key}: repeated value in '{raw}'", file="command line", key=key)
        grid[key] = values
    return grid


def parse_seeds(text: str | list | None) -> list[int] | None:
    """``"0,1,2"`` or ``"0-4"`` (inclusive) -> list of ints; None keeps the scenario's seed."""
    if text is None or text == "":
        return None
    if isinstance(text, (list, tuple)):
        return [int(s) for s in text]
    seeds: list[int] = []
    try:
        for part in split_values(str(text)):
            if re.fullmatch(r"\d+-\d+", part):
                a, b = (int(x) for x in part.split("-"))
                seeds.extend(range(a, b + 1))
            else:
                seeds.append(int(part))
    except ValueError:
        raise ScenarioError(f"--seeds expects integers like 0,1,2 or 0-4, got '{text}'", file="command line",
                            key="seed") from None
    if len(set(seeds)) != len(seeds):
        raise ScenarioError(f"--seeds: repeated seed in '{text}'", file="command line", key="seed")
    return seeds


_SAFE = re.compile(r"[^A-Za-z0-9._=,+-]+")


@dataclass
class Cell:
    """One point of the grid: its values (grid key -> value text), its seed, its overrides."""

    values: dict[str, str]
    seed: int | None
    overrides: list[str]
    id: str = ""
    status: str = "pending"
    error: str | None = None
    wall_s: float | None = None
    digest: str | None = None
    engine: str = "ray"  # where it runs: ray | inline (see cell_engine)
    extra: dict = field(default_factory=dict)
    # a backdoor cell: what its ASR floor (null_run) is (see pair_nulls): the id of the sweep's
    # no-attack cell it waits for, or None, and the words the sweep's output uses for it
    null: str | None = None
    null_text: str | None = None

    @property
    def label(self) -> str:
        parts = [f"{k}={v}" for k, v in self.values.items()]
        if self.seed is not None:
            parts.append(f"seed={self.seed}")
        return ",".join(parts) or "base"

    def to_json(self) -> dict:
        out = {"id": self.id, "values": self.values, "seed": self.seed, "overrides": self.overrides,
               "status": self.status, "error": self.error, "wall_s": self.wall_s,
               "path": f"cells/{self.id}", "digest": self.digest, "engine": self.engine}
        if self.null_text is not None:
            out["null_run"] = f"cells/{self.null}" if self.null else None
            out["null"] = self.null_text
        return out


def cell_id(values: dict[str, str], seed: int | None, overrides: list[str]) -> str:
    """Readable and unique: ``attacks=alie,strategy=krum,seed=1-ab12cd``."""
    parts = [f"{k.split('.')[-1] if len(k) > 24 else k}={v}" for k, v in values.items()]
    if seed is not None:
        parts.append(f"seed={seed}")
    readable = _SAFE.sub("_", ",".join(parts) or "base").strip("_")[:96]
    h = hashlib.sha1(json.dumps([overrides, seed], sort_keys=True).encode()).hexdigest()[:6]
    return f"{readable}-{h}"


def override_text(key: str, value) -> str:
    """``key=value`` with the value written as one line of YAML (what parse_override reads back)."""
    import yaml

    if isinstance(value, str):
        return f"{key}={value}"
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30).strip()
    if text.endswith("\n..."):
        text = text[: -len("\n...")]
    elif text.endswith("..."):
        text = text[:-3].strip()
    return f"{key}={text}"


_LABEL = re.compile(r"^[A-Za-z0-9._+-]+$")


def normalize_grid(grid, source: str = "command line", where: str = "grid") -> dict[str, dict[str, list[str]]]:
    """Every grid axis as ``{label: [override, ...]}``.

    A plain value ``v`` of axis ``k`` is the label ``v`` standing for the one override ``k=v``.
    A *labelled* axis (a sweep file's mapping) gives each label its own overrides::

        grid:
          defense:
            median: {strategy: median}
            clipped: {strategy: norm_bounding, strategy.norm_bound: 1.0}

    Problems raise ScenarioError naming the key path (``grid.defense.clipped``), exit 2.
    """
    out: dict[str, dict[str, list[str]]] = {}
    if not grid:
        return out
    if not isinstance(grid, dict):
        raise ScenarioError(f"expected a mapping of axis: values, got {type(grid).__name__}", file=source, key=where)
    for axis, values in grid.items():
        path = f"{where}.{axis}"
        if not isinstance(axis, str) or not axis.strip() or "=" in axis or "," in axis:
            raise ScenarioError(f"a grid axis must be a name without '=' or ',', got {axis!r}", file=source, key=path)
        if isinstance(values, dict):
            if not values:
                raise ScenarioError("a labelled axis needs at least one label", file=source, key=path)
            axis_out: dict[str, list[str]] = {}
            for label, ovs in values.items():
                lpath = f"{path}.{label}"
                if isinstance(label, bool) or not isinstance(label, (str, int, float)) or not _LABEL.match(str(label)):
                    raise ScenarioError(f"a label must be a word of letters, digits, '.', '_', '+' or '-', got "
                                        f"{label!r}", file=source, key=lpath)
                if isinstance(ovs, dict):
                    if not ovs:
                        raise ScenarioError("a label needs at least one override (key: value)", file=source, key=lpath)
                    for k in ovs:
                        if not isinstance(k, str) or not k.strip() or "=" in k:
                            raise ScenarioError(f"an override key must be a key path like strategy.trim, got {k!r}",
                                                file=source, key=f"{lpath}.{k}")
                    axis_out[str(label)] = [override_text(k, v) for k, v in ovs.items()]
                elif isinstance(ovs, list) and ovs and all(isinstance(o, str) and "=" in o for o in ovs):
                    axis_out[str(label)] = list(ovs)
                else:
                    raise ScenarioError(f"expected the label's overrides as a mapping (e.g. {{strategy: median}}) or "
                                        f"a list of key=value, got {ovs!r}", file=source, key=lpath)
            out[axis] = axis_out
            continue
        vals = values if isinstance(values, (list, tuple)) else [values]
        if not vals:
            raise ScenarioError("an axis needs at least one value", file=source, key=path)
        axis_out = {}
        for i, v in enumerate(vals):
            if isinstance(v, (dict, list)) or v is None or str(v).strip() == "":
                raise ScenarioError(f"a plain grid value must be a word such as a preset name, got {v!r} (give "
                                    f"several overrides as a labelled value: {{label: {{key: value}}}})",
                                    file=source, key=f"{path}[{i}]")
            text = str(v).lower() if isinstance(v, bool) else str(v)
            if text in axis_out:
                raise ScenarioError(f"repeated value {text!r}", file=source, key=f"{path}[{i}]")
            axis_out[text] = [f"{axis}={text}"]
        out[axis] = axis_out
    return out


def _is_normalized(grid: dict) -> bool:
    return all(isinstance(v, dict) and all(isinstance(o, list) for o in v.values()) for v in grid.values())


def grid_labels(grid: dict) -> dict[str, list[str]]:
    """``{axis: [label, ...]}`` of a grid in either form."""
    return {k: list(v) for k, v in normalize_grid(grid).items()}


def expand(grid: dict, seeds: list[int] | None, base_overrides: list[str] | None = None) -> list[Cell]:
    """The cartesian product of the grid's values x seeds (seeds innermost). ``grid``: plain
    ``{axis: [value, ...]}`` or normalised ``{axis: {label: [override, ...]}}``."""
    if seeds is not None and "seed" in grid:
        raise ScenarioError("give seeds either with --seeds or with --grid seed=..., not both",
                            file="command line", key="seed")
    norm = grid if _is_normalized(grid) else normalize_grid(grid)
    keys = list(norm)
    seed_list: list[int | None] = list(seeds) if seeds is not None else [None]
    cells = []
    for combo in itertools.product(*(list(norm[k]) for k in keys)):
        for seed in seed_list:
            values = dict(zip(keys, combo))
            overrides = list(base_overrides or [])
            for k, label in values.items():
                overrides += norm[k][label]
            if seed is not None:
                overrides.append(f"seed={seed}")
            cell = Cell(values=values, seed=seed, overrides=overrides)
            cell.id = cell_id(values, seed, overrides)
            cells.append(cell)
    return cells


# --------------------------------------------------------------------------------------
# Sweep files
# --------------------------------------------------------------------------------------

SWEEP_FILE_KEYS = {
    "scenario": "the scenario file every cell starts from (relative to the sweep file)",
    "description": "one line on what the sweep measures",
    "overrides": "key: value overrides applied to every cell (a mapping, or a list of key=value)",
    "grid": "axis: [values] (plain) or axis: {label: {key: value, ...}} (labelled)",
    "seeds": "seeds, [0, 1, 2] or '0-4'",
    "engine": "auto | ray | inline",
    "parallel": "cells side by side",
    "out": "sweep folder (relative to the current directory)",
    "strongest": "true, or {attacks: AXIS, defenses: AXIS, no_attack: LABEL, selection_seeds: SEEDS, "
                 "allow_seed_overlap: false}: the strongest attack per defense",
    "table": "{rows: AXIS, cols: AXIS, metric: auroc}",
}
TABLE_KEYS = ("rows", "cols", "metric")


@dataclass
class SweepFile:
    """A sweep written down: ``fedsec sweep sweeps/heart_integrity.yaml`` runs it (docs/sweeps.md)."""

    path: str
    scenario: str
    overrides: list[str]
    grid: dict[str, dict[str, list[str]]]
    seeds: list[int] | None = None
    engine: str | None = None
    parallel: int | None = None
    out: str | None = None
    strongest: dict | None = None
    table: dict = field(default_factory=dict)


def is_sweep_file(path) -> bool:
    """A YAML mapping with a top-level ``scenario:`` key (a scenario file never has one)."""
    import yaml

    p = Path(str(path))
    if p.suffix not in (".yaml", ".yml") or not p.is_file():
        return False
    try:
        data = yaml.safe_load(p.read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and "scenario" in data


def load_sweep_file(path) -> SweepFile:
    """Read and check a sweep file; every problem is a ScenarioError naming the key (exit 2)."""
    import yaml

    from fedsec.registry import did_you_mean

    p = Path(str(path))
    src = str(p)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as err:
        raise ScenarioError(f"cannot read the sweep file: {err}", file=src) from None
    except yaml.YAMLError as err:
        raise ScenarioError(f"not valid YAML: {err}", file=src) from None
    if not isinstance(data, dict):
        raise ScenarioError("a sweep file is a mapping with scenario:, grid:, ...", file=src)
    for k in data:
        if k not in SWEEP_FILE_KEYS:
            raise ScenarioError(f"unknown key{did_you_mean(str(k), SWEEP_FILE_KEYS)}; keys: "
                                f"{', '.join(SWEEP_FILE_KEYS)}", file=src, key=str(k))
    scen = data.get("scenario")
    if not isinstance(scen, str) or not scen.strip():
        raise ScenarioError("expected the path of a scenario file", file=src, key="scenario")
    scen_path = Path(os.path.normpath(p.parent / scen)) if not Path(scen).is_absolute() else Path(scen)
    if not scen_path.is_file():
        raise ScenarioError(f"no such scenario file: {scen_path}", file=src, key="scenario")
    ovs = data.get("overrides") or []
    if isinstance(ovs, dict):
        overrides = [override_text(str(k), v) for k, v in ovs.items()]
    elif isinstance(ovs, list) and all(isinstance(o, str) and "=" in o for o in ovs):
        overrides = list(ovs)
    else:
        raise ScenarioError("expected a mapping of key: value or a list of key=value", file=src, key="overrides")
    grid = normalize_grid(data.get("grid") or {}, src, "grid")
    seeds = data.get("seeds")
    try:
        seeds = parse_seeds(seeds if not isinstance(seeds, int) or isinstance(seeds, bool) else [seeds])
    except (ScenarioError, TypeError, ValueError):
        raise ScenarioError(f"expected a list of integers or '0-4', got {seeds!r}", file=src, key="seeds") from None
    engine = data.get("engine")
    if engine is not None and engine not in ENGINES:
        raise ScenarioError(f"one of {', '.join(ENGINES)}, got {engine!r}", file=src, key="engine")
    parallel = data.get("parallel")
    if parallel is not None and (isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1):
        raise ScenarioError(f"expected an integer >= 1, got {parallel!r}", file=src, key="parallel")
    table = data.get("table") or {}
    if not isinstance(table, dict):
        raise ScenarioError("expected {rows: AXIS, cols: AXIS, metric: NAME}", file=src, key="table")
    for k in table:
        if k not in TABLE_KEYS:
            raise ScenarioError(f"unknown key{did_you_mean(str(k), TABLE_KEYS)}; keys: {', '.join(TABLE_KEYS)}",
                                file=src, key=f"table.{k}")
    if table.get("metric") is not None and table["metric"] not in METRIC_KEYS:
        raise ScenarioError(f"one of {', '.join(METRIC_KEYS)}, got {table['metric']!r}", file=src, key="table.metric")
    strongest = parse_strongest(data.get("strongest"), grid, src)
    out = data.get("out")
    return SweepFile(src, str(scen_path), overrides, grid, seeds, engine, parallel,
                     None if out is None else str(out), strongest, dict(table))


STRONGEST_KEYS = ("attacks", "defenses", "no_attack", "selection_seeds", "allow_seed_overlap")


def parse_strongest(value, grid: dict, source: str = "command line") -> dict | None:
    """``true`` or ``{attacks: AXIS, defenses: AXIS, no_attack: LABEL, selection_seeds: SEEDS,
    allow_seed_overlap: BOOL}`` -> the resolved dict (or None).

    attacks: the axis whose labels are the candidate attacks (default ``attacks``); null: its
    no-attack label (default ``none``); defenses: the axis of the defenses (default
    ``strategy`` when in the grid, else the first other axis; none: one column);
    selection_seeds: seeds that only select the winner (the sweep's ``seeds`` then only report
    it; default: the same seeds do both); allow_seed_overlap: accept selection seeds that are
    also reporting seeds (see resolve_strongest_seeds)."""
    from fedsec.registry import did_you_mean

    if value is None or value is False:
        return None
    if value is True:
        value = {}
    if not isinstance(value, dict):
        raise ScenarioError("expected true or {attacks: AXIS, defenses: AXIS, no_attack: LABEL, selection_seeds: "
                            "SEEDS}", file=source, key="strongest")
    for k in value:
        if k not in STRONGEST_KEYS:
            raise ScenarioError(f"unknown key{did_you_mean(str(k), STRONGEST_KEYS)}; keys: "
                                f"{', '.join(STRONGEST_KEYS)}", file=source, key=f"strongest.{k}")
    attacks = str(value.get("attacks", "attacks"))
    if attacks not in grid:
        raise ScenarioError(f"'{attacks}' is not a grid axis; axes: {', '.join(grid) or '(none)'}",
                            file=source, key="strongest.attacks")
    null = str(value.get("no_attack", "none"))
    labels = list(grid[attacks])
    if null not in labels:
        raise ScenarioError(f"the no-attack label '{null}' is not a value of the '{attacks}' axis ({', '.join(labels)});"
                            " the strongest attack is measured against it", file=source, key="strongest.no_attack")
    if len(labels) < 2:
        raise ScenarioError(f"the '{attacks}' axis has no candidate attack besides '{null}'", file=source,
                            key="strongest.attacks")
    defenses = value.get("defenses")
    if defenses is None:
        others = [k for k in grid if k != attacks]
        defenses = "strategy" if "strategy" in others else (others[0] if others else None)
    elif defenses not in grid or defenses == attacks:
        raise ScenarioError(f"'{defenses}' is not a grid axis other than '{attacks}'", file=source,
                            key="strongest.defenses")
    sel = value.get("selection_seeds")
    if sel is not None:
        try:
            sel = parse_seeds(sel if not isinstance(sel, int) or isinstance(sel, bool) else [sel])
        except (ScenarioError, TypeError, ValueError):
            raise ScenarioError(f"expected seeds like [0, 1, 2] or '0-2', got {sel!r}", file=source,
                                key="strongest.selection_seeds") from None
        if not sel:
            raise ScenarioError("give at least one selection seed", file=source, key="strongest.selection_seeds")
    overlap = value.get("allow_seed_overlap", False)
    if not isinstance(overlap, bool):
        raise ScenarioError(f"expected true or false, got {overlap!r}", file=source,
                            key="strongest.allow_seed_overlap")
    return {"attacks": attacks, "defenses": defenses, "no_attack": null, "selection_seeds": sel,
            "allow_seed_overlap": overlap}


def resolve_strongest_seeds(strongest: dict | None, seeds: list[int] | None) -> list[int] | None:
    """With selection seeds: check them against the reporting seeds (the sweep's ``seeds``),
    record both roles in the spec (``report_seeds``) and return the seeds the cells run with
    (selection seeds first, then the reporting seeds). Without: ``seeds`` unchanged.

    Overlapping sets are refused (exit 2) unless ``allow_seed_overlap``: a seed that both
    selects and reports brings back the selection bias the separate sets remove."""
    if not strongest or strongest.get("selection_seeds") is None:
        if strongest is not None:
            strongest["report_seeds"] = None
        return seeds
    sel = list(strongest["selection_seeds"])
    if seeds is None:
        raise ScenarioError("selection seeds need reporting seeds as well: give --seeds (or seeds: in the sweep "
                            "file), disjoint from the selection seeds", key="seeds")
    shared = [s for s in sel if s in seeds]
    if shared and not strongest.get("allow_seed_overlap"):
        raise ScenarioError(f"the selection seeds {sel} and the reporting seeds {list(seeds)} share seed(s) "
                            f"{shared}: a winner reported on the seeds that chose it carries selection bias. Give "
                            "disjoint sets, or pass --allow-seed-overlap (strongest.allow_seed_overlap: true) to "
                            "accept it", key="strongest.selection_seeds")
    strongest["report_seeds"] = list(seeds)
    return sel + [s for s in seeds if s not in sel]


def check_strongest_cells(strongest: dict, scenarios: list) -> None:
    """The selection reads a validation split, never the test split: every cell must set one aside."""
    for s in scenarios:
        frac = (s.task.options or {}).get("val_fraction")
        if not frac:
            raise ScenarioError("the strongest attack is selected on a validation split and this scenario has none: "
                                "set task.options.val_fraction (e.g. 0.2; the hospitals keep that share of their "
                                "training records aside)", key="task.options.val_fraction")


def _rule_sized_by_attackers(scenario) -> str | None:
    """The rule's name when it takes its f from the scenario's attackers (else None)."""
    from fedsec.scenario import strategy_rule
    from fedsec.strategies.rules import make_rule

    name, options, _ = strategy_rule(scenario.strategy)
    try:
        rule = make_rule(name, **options)
    except FedsecError:
        return None  # validation has already reported it
    sized = getattr(rule, "sized_by_scenario", None)
    return name if callable(sized) and sized() else None


def check_same_defense(cells: list[Cell], scenarios: list, grid: dict) -> None:
    """A sweep compares each attacked cell with the no-attack cell of the same defense and seed
    (paired differences, ASR floors, the strongest attack). A rule sized by f (Krum, Multi-Krum,
    Bulyan, DnC, size-aware, trimmed mean without trim) takes f from the scenario's attackers
    unless ``strategy.num_malicious`` is set: in the no-attack cell f = 0 (Multi-Krum then
    averages every update, i.e. it is FedAvg), in the attacked cells f = 2. The two cells
    would not run the same defense, so the sweep is refused, naming the key to set."""
    norm = normalize_grid(grid) if not _is_normalized(grid) else grid
    attack_axes = {k for k, labels in norm.items() if any(_touches_attacks(o) for ovs in labels.values() for o in ovs)}
    if not attack_axes:
        return
    groups: dict[tuple, dict[int, list[str]]] = {}
    names: dict[tuple, str] = {}
    for cell, s in zip(cells, scenarios):
        rule = _rule_sized_by_attackers(s)
        if rule is None:
            continue
        key = tuple((k, v) for k, v in cell.values.items() if k not in attack_axes)
        f = len(s.malicious_hospitals())
        labels = groups.setdefault(key, {}).setdefault(f, [])
        label = ", ".join(f"{k}={cell.values[k]}" for k in sorted(attack_axes) if k in cell.values)
        if label not in labels:
            labels.append(label)
        names[key] = rule
    for key, by_f in groups.items():
        if len(by_f) > 1:
            where = "; ".join(f"f = {f} in {', '.join(labels[:3])}{' ...' if len(labels) > 3 else ''}"
                              for f, labels in sorted(by_f.items()))
            defense = ", ".join(f"{k}={v}" for k, v in key) or "the scenario's strategy"
            raise ScenarioError(
                f"defense {defense}: rule '{names[key]}' takes f from each cell's attackers ({where}), so the "
                "no-attack and attacked cells would not run the same defense; set strategy.num_malicious "
                f"(e.g. {{strategy: {{rule: {names[key]}, num_malicious: {max(by_f)}}}}}) so that every cell "
                "tolerates the same f", key="strategy.num_malicious")


def _touches_attacks(override: str) -> bool:
    key = override.partition("=")[0].strip()
    return key == "attacks" or key.startswith(("attacks[", "attacks."))


def _backdoor_entries(scenario) -> list[int]:
    """Indices of the scenario's attacks that take a ``null_run`` (the backdoors)."""
    from fedsec.registry import ATTACKS

    out = []
    for i, entry in enumerate(scenario.attacks or []):
        try:
            specs = ATTACKS.options(entry.get("attack"))
        except FedsecError:
            continue
        if any(o.name == "null_run" for o in specs or []):
            out.append(i)
    return out


def pair_nulls(cells: list[Cell], scenarios: list, grid: dict, out: Path) -> dict[str, int]:
    """Give each backdoor cell the sweep's no-attack cell of the same seed and the same values
    on every axis that does not set ``attacks`` (same defense, same rounds, ...) as its
    ``null_run``: the no-attack model whose ASR is the backdoor's floor (docs/attacks.md,
    "Nulls"). The cell gets an ``attacks[i].null_run=<that cell's folder>`` override (after its
    id is made: the id does not depend on where the sweep folder is) and ``cell.null``, the
    cell it must wait for (_drive runs it only once that cell has completed).

    A backdoor whose ``null_run`` is already set keeps it; one without a no-attack cell in the
    grid keeps today's floor, the untrained model. ``cells`` and ``scenarios`` (validate_cells)
    are in the same order. Returns how many cells got each kind of null."""
    norm = grid if _is_normalized(grid) else normalize_grid(grid)
    attack_axes = {k for k, labels in norm.items() if any(_touches_attacks(o) for ovs in labels.values() for o in ovs)}

    def other_values(cell: Cell) -> tuple:
        return (cell.seed, tuple((k, v) for k, v in cell.values.items() if k not in attack_axes))

    nulls: dict[tuple, Cell] = {}
    for cell, s in zip(cells, scenarios):
        if not s.attacks:
            nulls.setdefault(other_values(cell), cell)
    counts = {"sweep_cell": 0, "explicit": 0, "untrained": 0}
    for cell, s in zip(cells, scenarios):
        entries = _backdoor_entries(s)
        if not entries:
            continue
        own = [s.attacks[i].get("null_run") for i in entries if s.attacks[i].get("null_run")]
        null = nulls.get(other_values(cell))
        if own:
            cell.null_text = f"its own null_run {own[0]}"
            counts["explicit"] += 1
        elif null is None:
            cell.null_text = "the untrained model (no no-attack cell with the same seed and other values in the grid)"
            counts["untrained"] += 1
        else:
            path = str((Path(out) / "cells" / null.id).resolve())
            d = s.to_dict()
            for i in entries:
                # JSON quoting is YAML: the folder name's '=' and ',' stay part of one string
                cell.overrides.append(f"attacks[{i}].null_run={json.dumps(path)}")
                d["attacks"][i]["null_run"] = path
            cell.digest = scenario_digest(d)  # what the cell's scenario.yaml will hold
            cell.null, cell.null_text = null.id, f"no-attack cell {null.label}"
            counts["sweep_cell"] += 1
    return counts


def scenario_digest(scenario_dict: dict) -> str:
    """Digest of a resolved scenario, ignoring where it ran (engine.address, and engine.name
    between ray and inline: same results) and output.dir."""
    import yaml

    d = json.loads(json.dumps(scenario_dict))
    d.get("engine", {}).pop("address", None)
    if d.get("engine", {}).get("name") in ("ray", "inline"):
        d["engine"].pop("name")
    d.get("output", {}).pop("dir", None)
    return hashlib.sha256(yaml.safe_dump(d, sort_keys=True).encode()).hexdigest()[:12]


INLINE_MAX_HOSPITALS = 10
ENGINES = ("auto", "ray", "inline")


def cell_engine(scenario, choice: str = "auto", address: str | None = None) -> str:
    """Where a cell runs: ``inline`` (in the worker process) or ``ray``. ``auto``: the
    scenario's own ``engine.name: inline``, else in-process for small cells (at most
    INLINE_MAX_HOSPITALS hospitals, no GPU, no Ray cluster named by the scenario or --address)."""
    if choice in ("ray", "inline"):
        return choice
    eng = scenario.engine
    if eng.name == "inline":
        return "inline"
    if address or eng.address or eng.num_gpus > 0:
        return "ray"
    from fedsec.scenario import expected_hospitals

    n = expected_hospitals(scenario)
    return "inline" if n is not None and n <= INLINE_MAX_HOSPITALS else "ray"


def validate_cells(scenario_path, cells: list[Cell], engine: str = "auto", address: str | None = None) -> list:
    """Load every cell's scenario (raises before anything runs); sets each cell's engine.
    Returns the Scenarios."""
    from fedsec.federation.engine import check_resources
    from fedsec.scenario import load_scenario

    loaded, problems = [], {}
    for cell in cells:
        try:
            s = load_scenario(scenario_path, cell.overrides)
            if s.engine.name not in ("ray", "inline"):
                raise ScenarioError("a sweep runs on a simulation engine: engine.name must be 'ray' or 'inline'",
                                    key="engine.name")
            cell.engine = cell_engine(s, engine, address)
            if cell.engine == "ray":
                check_resources(s)
        except FedsecError as err:
            # one line per distinct problem (a bad value repeats over seeds and other keys)
            problems.setdefault(str(err), cell.label)
            continue
        cell.digest = scenario_digest(s.to_dict())
        loaded.append(s)
    if problems:
        lines = [f"{msg} (first in cell {label})" for msg, label in problems.items()]
        raise ScenarioError("invalid sweep, nothing was run:\n  " + "\n  ".join(lines))
    return loaded


def cell_need(scenario, engine: str = "ray") -> float:
    """CPUs one cell occupies: its hospitals x engine.num_cpus on Ray; engine.num_cpus in-process
    (one hospital at a time)."""
    from fedsec.scenario import expected_hospitals

    n = 1 if engine == "inline" else (expected_hospitals(scenario) or 1)
    return n * float(scenario.engine.num_cpus)


def default_parallel(scenarios: list, cpus: int | None = None, engines: list[str] | None = None) -> int:
    cpus = cpus or os.cpu_count() or 1
    engines = engines or ["ray"] * len(scenarios)
    need = max((cell_need(s, e) for s, e in zip(scenarios, engines)), default=1.0)
    return max(1, int(cpus // max(need, 1e-9)))


def default_out(scenario_path, grid, seeds, base_overrides) -> Path:
    """Deterministic, so re-running the same command resumes the same sweep."""
    from fedsec.scenario import load_scenario

    name = load_scenario(scenario_path, base_overrides).name
    if _is_normalized(grid) and all(ovs == [f"{k}={label}"] for k, v in grid.items() for label, ovs in v.items()):
        grid = {k: list(v) for k, v in grid.items()}  # plain values: the same folder as before labels existed
    key = json.dumps([str(Path(scenario_path).resolve()), grid, seeds, base_overrides], sort_keys=True)
    return Path("runs") / "sweeps" / f"{name}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"


def cell_state(sweep_dir: Path, cell: Cell) -> tuple[str, str | None]:
    """(status, error) of a cell from its folder: completed | failed | interrupted | missing | stale."""
    from fedsec.results import read_json

    path = sweep_dir / "cells" / cell.id
    summary_file = path / "summary.json"
    if not summary_file.exists():
        return "missing", None
    try:
        summary = read_json(summary_file)
    except (OSError, ValueError):
        return "interrupted", "summary.json unreadable"
    status = summary.get("status")
    if status in ("completed_with_failures", "budget_exhausted"):  # finished (failures / DP budgets in summary.json)
        status = FINISHED
    if status == FINISHED and cell.digest:
        try:
            import yaml

            on_disk = scenario_digest(yaml.safe_load((path / "scenario.yaml").read_text()))
        except Exception:
            on_disk = None
        if on_disk != cell.digest:
            return "stale", "the scenario changed since this cell ran"
    if status == "running":
        return "interrupted", "the sweep was stopped while this cell ran"
    return status or "missing", summary.get("error")


# --------------------------------------------------------------------------------------
# Processes: Ray heads and cell workers
# --------------------------------------------------------------------------------------


def _die_with_parent(parent_pid: int, sig: int = signal.SIGTERM) -> None:
    """Linux: get ``sig`` when the sweep process dies (even by SIGKILL); no orphans."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, int(sig))  # PR_SET_PDEATHSIG
    except Exception:  # not Linux: Ctrl-C / errors still stop children in order
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _interrupt(signum, frame):
    # A second signal while cleaning up must not be ignored forever.
    signal.signal(signal.SIGTERM, lambda *a: os._exit(143))
    raise KeyboardInterrupt


def _ray_head_main(conn, parent_pid: int, num_cpus: float, num_gpus: int, temp_dir: str, log_file: str) -> None:
    """Holder process of one Ray head: ``ray.init`` here, hand out the address, wait, shut down,
    remove Ray's temp dir (also when the sweep was killed: the parent-death signal lands here)."""
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        _Redirect(Path(log_file)).__enter__()  # Ray's own messages go to the sweep's logs/, not the terminal
        _ray_head_serve(conn, num_cpus, num_gpus, temp_dir)
    except KeyboardInterrupt:
        pass
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


def _ray_head_serve(conn, num_cpus: float, num_gpus: int, temp_dir: str) -> None:
    import logging

    from fedsec.federation.engine import quiet

    quiet(False)
    try:
        import ray

        args = dict(num_cpus=num_cpus, _node_ip_address="127.0.0.1", _temp_dir=temp_dir, include_dashboard=False,
                    logging_level=logging.ERROR, log_to_driver=False)
        if num_gpus:
            args["num_gpus"] = num_gpus
        ctx = ray.init(**args)
        conn.send({"address": ctx.address_info["gcs_address"]})
    except BaseException as err:  # noqa: BLE001 - report anything to the sweep
        try:
            conn.send({"error": f"{type(err).__name__}: {err}"})
        finally:
            return
    try:
        conn.recv()  # "stop", or EOF when the sweep goes away
    except (EOFError, KeyboardInterrupt, OSError):
        pass
    finally:
        try:
            ray.shutdown()
        except BaseException:  # noqa: BLE001
            pass


class _Redirect:
    """Send this process's stdout/stderr (file descriptors 1 and 2, so Ray's and Flower's
    output too) to the cell's log.txt."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        sys.stdout.flush()
        sys.stderr.flush()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        return self

    def __exit__(self, *exc):
        sys.stdout.flush()
        sys.stderr.flush()
        return False


def worker_threads(slots: int, cpus: int | None = None) -> int:
    """torch threads for each of ``slots`` cell workers on ``cpus`` cores: an equal share, at
    least 1.

    A run's server side (evaluation, aggregation, a server-side attack such as gradient
    inversion) uses torch's default, one thread per core. With two workers on two cores that
    is four busy threads on two cores, and OpenMP's waiting threads spin: an inversion cell
    took 333 s at ``--parallel 2`` against 19 s alone (2026-12-02). The hospitals keep their
    own ``engine.num_cpus`` threads (fedsec.federation.inline.client_process_state)."""
    cpus = cpus or os.cpu_count() or 1  # the cores as default_parallel and the Ray heads count them
    return max(1, int(cpus) // max(1, int(slots)))


def _cell_worker_main(conn, parent_pid: int, address: str | None, scenario_path: str,
                      threads: int | None = None) -> None:
    """One worker slot: imports torch/Flower once, runs the cells it is sent, one at a time,
    with ``threads`` torch threads (:func:`worker_threads`).
    Exits with os._exit: Flower / Ray threads left behind by an interrupted run must not keep
    the process alive (the cell's summary is already written by then)."""
    try:
        if threads:
            import torch

            torch.set_num_threads(int(threads))
        _cell_worker_loop(conn, parent_pid, address, scenario_path)
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(0)


def _engine_overrides(engine: str, address: str | None) -> list[str]:
    if engine == "inline":
        return ["engine.name=inline"]
    if not address:
        raise FedsecError("a Ray cell was sent to a worker without a Ray head")
    return ["engine.name=ray", f"engine.address={address}"]


def _cell_worker_loop(conn, parent_pid: int, address: str | None, scenario_path: str) -> None:
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the sweep decides; it sends SIGTERM
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        import fedsec
        from fedsec.runner import RunFailed

        while True:
            try:
                msg = conn.recv()
            except EOFError:
                return
            if msg is None:
                return
            path = Path(msg["path"])
            if path.exists():
                shutil.rmtree(path)  # unfinished cells restart from scratch (see module doc)
            path.mkdir(parents=True)
            t0 = time.perf_counter()
            with _Redirect(path / "log.txt"):
                print(f"fedsec sweep cell {msg['id']}: fedsec run {scenario_path} {' '.join(msg['overrides'])}",
                      flush=True)
                try:
                    fedsec.run(scenario_path, overrides=msg["overrides"] + _engine_overrides(
                        msg.get("engine", "ray"), address), out=path, progress=True,
                               force=True)  # force: the folder holds log.txt
                    result = {"status": FINISHED, "error": None}
                except RunFailed as err:
                    result = {"status": err.summary.get("status", "failed"), "error": err.summary.get("error")}
                except KeyboardInterrupt:
                    conn.send({"status": "interrupted", "error": "interrupted", "wall_s": time.perf_counter() - t0})
                    return
                except BaseException as err:  # noqa: BLE001 - a cell's failure must not stop the sweep
                    import traceback

                    traceback.print_exc()
                    result = {"status": "failed", "error": f"{type(err).__name__}: {err}".strip()}
            result["wall_s"] = time.perf_counter() - t0
            conn.send(result)
    except KeyboardInterrupt:
        return


@dataclass
class _Slot:
    index: int
    head: object = None
    head_conn: object = None
    address: str | None = None
    worker: object = None
    conn: object = None
    cell: Cell | None = None
    started: float = 0.0
    temp_dir: str | None = None


class _Pool:
    """Ray heads + cell workers, one of each per slot. Stops them all on close()."""

    def __init__(self, slots: int, head_cpus: float, head_gpus: int, scenario_path: str,
                 address: str | None, log, log_dir: Path, need_ray: bool = True):
        import multiprocessing as mp

        self.need_ray = need_ray  # False: every cell runs in-process, no Ray head is started
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.ctx = mp.get_context("spawn")
        self.slots = [_Slot(i) for i in range(slots)]
        self.head_cpus, self.head_gpus = head_cpus, head_gpus
        self.scenario_path, self.external, self.log = scenario_path, address, log
        self.startup_s = 0.0

    def start(self) -> None:
        t0 = time.perf_counter()
        own_heads = self.need_ray and not self.external
        for slot in self.slots:  # start every head first: they boot side by side
            if own_heads:
                self._start_head(slot)
            else:
                slot.address = self.external
        for slot in self.slots:
            if own_heads:
                self._await_head(slot)
            self._start_worker(slot)
        self.startup_s = time.perf_counter() - t0

    def _start_head(self, slot: _Slot) -> None:
        slot.temp_dir = tempfile.mkdtemp(prefix="fsw-", dir="/tmp" if os.path.isdir("/tmp") else None)
        parent, child = self.ctx.Pipe()
        log_file = self.log_dir / f"ray-head-{slot.index}.log"
        slot.head = self.ctx.Process(target=_ray_head_main, name=f"fedsec-sweep-ray-{slot.index}",
                                     args=(child, os.getpid(), self.head_cpus, self.head_gpus, slot.temp_dir,
                                           str(log_file)))
        slot.head.start()
        child.close()
        slot.head_conn = parent

    def _await_head(self, slot: _Slot, timeout: float = 180.0) -> None:
        if not slot.head_conn.poll(timeout):
            raise FedsecError(f"the sweep's Ray head {slot.index} did not start within {timeout:.0f} s")
        try:
            msg = slot.head_conn.recv()
        except EOFError:
            raise FedsecError(f"the sweep's Ray head {slot.index} exited while starting "
                              f"(exit code {slot.head.exitcode})") from None
        if "error" in msg:
            raise FedsecError(f"the sweep's Ray head {slot.index} failed to start: {msg['error']}")
        slot.address = msg["address"]
        self.log(f"ray head {slot.index} at {slot.address}")

    def _start_worker(self, slot: _Slot) -> None:
        parent, child = self.ctx.Pipe()
        slot.worker = self.ctx.Process(target=_cell_worker_main, name=f"fedsec-sweep-worker-{slot.index}",
                                       args=(child, os.getpid(), slot.address, self.scenario_path,
                                             worker_threads(len(self.slots))))
        slot.worker.start()
        child.close()
        slot.conn = parent

    def restart_worker(self, slot: _Slot) -> None:
        """After a worker died (killed, out of memory): a fresh one, on a fresh head if needed."""
        self._stop_process(slot.worker, slot.conn, None)
        if self.need_ray and not self.external and (slot.head is None or not slot.head.is_alive()):
            self._stop_head(slot)
            self._start_head(slot)
            self._await_head(slot)
        self._start_worker(slot)

    @staticmethod
    def _stop_process(proc, conn, message, grace: float = 15.0) -> None:
        if proc is None:
            return
        if proc.is_alive() and conn is not None:
            try:
                conn.send(message)
            except (OSError, ValueError):
                pass
        proc.join(grace if message is not None or conn is None else 0.1)
        if proc.is_alive():
            proc.terminate()  # SIGTERM: a running cell writes its summary as interrupted
            proc.join(grace)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
        if conn is not None:
            conn.close()

    def _stop_head(self, slot: _Slot) -> None:
        if slot.head is not None:
            self._stop_process(slot.head, slot.head_conn, "stop", grace=30.0)
            slot.head, slot.head_conn = None, None
        if slot.temp_dir:
            shutil.rmtree(slot.temp_dir, ignore_errors=True)
            slot.temp_dir = None

    def close(self) -> None:
        for slot in self.slots:  # workers first: they are Ray drivers on the heads
            if slot.worker is not None:
                if slot.cell is not None and slot.worker.is_alive():
                    slot.worker.terminate()
                self._stop_process(slot.worker, slot.conn, None)
                slot.worker, slot.conn = None, None
        for slot in self.slots:
            self._stop_head(slot)


# --------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------


def _fmt_s(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    m, s = divmod(seconds, 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


def _rounds_done(path: Path) -> int:
    f = path / "rounds.jsonl"
    try:
        return sum(1 for line in f.read_text().splitlines() if line.strip())
    except OSError:
        return 0


class SweepRun:
    """State of one ``fedsec sweep`` invocation; writes sweep.json as cells change."""

    def __init__(self, scenario_path, cells, grid, seeds, out: Path, base_overrides, parallel, stream,
                 table_options: dict):
        self.scenario_path, self.cells, self.grid, self.seeds = str(scenario_path), cells, grid, seeds
        self.out, self.base_overrides, self.parallel, self.stream = out, base_overrides, parallel, stream
        self.table_options = table_options
        self.t0 = time.perf_counter()
        self.started_at = None
        self.ray_startup_s = None
        self.durations: list[float] = []
        self.strongest: dict | None = None
        self.sweep_file: str | None = None

    def log(self, text: str) -> None:
        if self.stream is not None:
            print(f"[sweep] {text}", file=self.stream, flush=True)

    def write(self, status: str) -> None:
        from fedsec.results import utc_now, write_json

        write_json(self.out / "sweep.json", {
            "kind": "fedsec-sweep",
            "status": status,
            "scenario": self.scenario_path,
            "overrides": self.base_overrides,
            "grid": {k: list(v) for k, v in self.grid.items()},
            "grid_overrides": self.grid,
            "seeds": self.seeds,
            "sweep_file": self.sweep_file,
            "strongest": self.strongest,
            "command": " ".join(sys.argv),
            "parallel": self.parallel,
            "table": self.table_options,
            "started_at": self.started_at,
            "updated_at": utc_now(),
            "wall_s": time.perf_counter() - self.t0,
            "ray_startup_s": self.ray_startup_s,
            "cells": [c.to_json() for c in self.cells],
        })

    def counts(self) -> tuple[int, int]:
        done = sum(c.status == FINISHED for c in self.cells)
        failed = sum(bool(c.status in ("failed", "interrupted") and c.extra.get("ran")) for c in self.cells)
        return done, failed

    def eta(self, remaining: int) -> float | None:
        if not self.durations:
            return None
        return statistics.fmean(self.durations) * math.ceil(remaining / max(self.parallel, 1))


SWEEP_NAMES = ("sweep.json", "sweep.csv", "summary.csv", "summary.md", "cells", "logs")


def check_sweep_out(out: Path, force: bool = False) -> None:
    """A sweep writes only into a new or empty folder or an earlier sweep's (it has sweep.json);
    ``--force`` allows another folder, but never one holding a file of the sweep's names."""
    from fedsec.results import check_out_folder

    check_out_folder(out, force, ours=lambda p: (p / "sweep.json").is_file(), names=SWEEP_NAMES,
                     kind="a fedsec sweep folder (no sweep.json)", writer="the sweep")


def run_sweep(scenario, grid=None, seeds=None, out=None, overrides=None, parallel: int | None = None,
              address: str | None = None, rows: str | None = None, cols: str | None = None,
              metric: str | None = None, stream=sys.stderr, dry_run: bool = False, force: bool = False,
              engine: str | None = None, strongest=None, selection_seeds=None,
              allow_seed_overlap: bool = False) -> dict:
    """Run (or resume) a sweep; returns sweep.json's dict (plus ``"tables"``: the written files).

    scenario: a scenario file. grid: ``{"attacks": ["none", "alie"], ...}`` or
    ``["attacks=none,alie", ...]``. seeds: list of ints, ``"0,1,2"``, or None (the
    scenario's seed). overrides: ``key=value`` applied to every cell before the grid's.
    engine: auto | ray | inline, where cells run (see cell_engine).
    scenario may be a sweep file (docs/sweeps.md): its keys are the defaults, the arguments
    given here win (``grid`` axes are added to the file's; ``overrides`` follow the file's).
    strongest: True or ``{attacks, defenses, no_attack, selection_seeds, allow_seed_overlap}``:
    select the strongest attack per defense on the cells' validation split
    (fedsec.analysis.strongest). selection_seeds (``"0,1,2"`` or a list; implies strongest):
    the seeds that select the winner, ``seeds`` then only report it; allow_seed_overlap: accept
    sets that share seeds (refused otherwise, exit 2).
    Raises ScenarioError (nothing runs) for an invalid cell.
    """
    from fedsec.federation.engine import quiet
    from fedsec.results import utc_now

    quiet(False)
    if isinstance(scenario, dict) or not Path(str(scenario)).is_file():
        raise ScenarioError("sweep needs a scenario file", file=str(scenario))
    sweep_file = None
    if is_sweep_file(scenario):
        sweep_file = load_sweep_file(scenario)
        scenario = sweep_file.scenario
    extra_grid = normalize_grid(parse_grid(grid) if not isinstance(grid, dict) else grid)
    grid = dict(sweep_file.grid) if sweep_file else {}
    for k, v in extra_grid.items():
        if k in grid:
            raise ScenarioError(f"--grid {k}: the sweep file already has this axis", file="command line", key=k)
        grid[k] = v
    seeds = parse_seeds(seeds) if seeds is not None else (sweep_file.seeds if sweep_file else None)
    base = (list(sweep_file.overrides) if sweep_file else []) + list(overrides or [])
    table_file = sweep_file.table if sweep_file else {}
    rows, cols = rows or table_file.get("rows"), cols or table_file.get("cols")
    metric = metric or table_file.get("metric") or "auroc"
    engine = engine or (sweep_file.engine if sweep_file else None) or "auto"
    parallel = parallel or (sweep_file.parallel if sweep_file else None)
    out = out or (sweep_file.out if sweep_file else None)
    if sweep_file and sweep_file.strongest and (strongest is None or strongest is True):
        strongest = dict(sweep_file.strongest)
    elif strongest is not None and strongest is not False:
        strongest = parse_strongest(strongest, grid)
    if selection_seeds is not None or allow_seed_overlap:
        strongest = dict(strongest or parse_strongest(True, grid))  # selection seeds imply --strongest
        if selection_seeds is not None:
            try:
                strongest["selection_seeds"] = parse_seeds(selection_seeds)
            except ScenarioError as err:
                raise ScenarioError(str(err).replace("--seeds", "--selection-seeds"), file="command line",
                                    key="--selection-seeds") from None
        strongest["allow_seed_overlap"] = bool(allow_seed_overlap or strongest.get("allow_seed_overlap"))
    seeds = resolve_strongest_seeds(strongest or None, seeds)
    cells = expand(grid, seeds, base)
    if engine not in ENGINES:
        raise ScenarioError(f"--engine must be one of {', '.join(ENGINES)}, got '{engine}'", file="command line")
    scenarios = validate_cells(scenario, cells, engine, address)
    check_same_defense(cells, scenarios, grid)
    if strongest:
        check_strongest_cells(strongest, scenarios)
    for key in (rows, cols):
        if key is not None and key not in grid and key != "seed":
            raise ScenarioError(f"--rows/--cols '{key}' is not a grid key; grid keys: {', '.join(grid) or '(none)'}",
                                file="command line")
    out = Path(out) if out else default_out(scenario, grid, seeds, base)
    check_sweep_out(out, force)
    null_counts = pair_nulls(cells, scenarios, grid, out)
    if parallel is not None and parallel < 1:
        raise ScenarioError(f"--parallel must be >= 1, got {parallel}", file="command line")
    parallel = parallel or default_parallel(scenarios, engines=[c.engine for c in cells])
    if address and any(c.engine == "ray" for c in cells):
        parallel = 1  # a shared cluster: Flower's actor pool takes the whole cluster per run
    table_options = {"rows": rows, "cols": cols, "metric": metric}
    state = SweepRun(scenario, cells, grid, seeds, out, base, parallel, stream, table_options)
    state.strongest = strongest or None
    state.sweep_file = sweep_file.path if sweep_file else None
    state.started_at = utc_now()

    pending = deque()
    for cell in cells:
        cell.status, cell.error = cell_state(out, cell)
        if cell.status != FINISHED:
            pending.append(cell)
    # the no-attack cells backdoor cells wait for run first (a finished one is reused as it is)
    needed = {c.null for c in pending if c.null}
    pending = deque(sorted(pending, key=lambda c: c.id not in needed))
    skipped = len(cells) - len(pending)
    state.parallel = parallel = max(1, min(parallel, len(pending) or 1))
    state.log(f"{len(cells)} cells ({' x '.join(f'{len(v)} {k}' for k, v in grid.items()) or '1'}"
              f"{f' x {len(seeds)} seed' + ('s' if len(seeds) > 1 else '') if seeds else ''}) -> {out}")
    if strongest and strongest.get("report_seeds") is not None:
        from fedsec.analysis.strongest import seeds_text

        state.log(f"strongest attack: selected on seeds {seeds_text(strongest['selection_seeds'])} (validation "
                  f"split), reported on seeds {seeds_text(strongest['report_seeds'])} (test split)")
    if null_counts["sweep_cell"]:
        state.log(f"{null_counts['sweep_cell']} backdoor cell(s): null_run (the ASR floor) = the no-attack cell of the "
                  "same seed and the same other grid values; each runs after its null")
    if null_counts["untrained"]:
        state.log(f"{null_counts['untrained']} backdoor cell(s) have no no-attack cell with the same seed and other "
                  "grid values: their ASR floor is the untrained model (add a no-attack value, e.g. attacks=none, "
                  "to the grid to measure it against a no-attack run)")
    if null_counts["explicit"]:
        state.log(f"{null_counts['explicit']} backdoor cell(s) keep the null_run their overrides set")
    if skipped:
        state.log(f"{skipped} already completed (skipped), {len(pending)} to run")
    if dry_run:
        for c in cells:
            print(f"{c.status:<11} {c.id}  ({' '.join(c.overrides)})", file=sys.stdout if stream else io.StringIO())
        return {"cells": [c.to_json() for c in cells], "out": str(out)}
    out.mkdir(parents=True, exist_ok=True)
    state.write("running")

    status = "completed"
    if pending:
        head_cpus = max(max(math.ceil(float(s.engine.num_cpus)) for s in scenarios),
                        (os.cpu_count() or 1) // parallel, 1)
        head_gpus = 0
        if any(s.engine.num_gpus > 0 for s in scenarios) and not address:
            import torch

            head_gpus = torch.cuda.device_count()
        need_ray = any(c.engine == "ray" for c in pending)
        inline = sum(c.engine == "inline" for c in pending)
        if inline:
            state.log(f"{inline} cell(s) in-process (engine inline), {len(pending) - inline} on Ray")
        pool = _Pool(parallel, head_cpus, head_gpus, str(scenario), address, state.log, out / "logs", need_ray)
        try:
            if need_ray:
                state.log(f"starting {parallel} Ray head(s) ({head_cpus:g} CPUs each)" if not address
                          else f"joining the Ray cluster at {address}")
            pool.start()
            if need_ray:
                state.ray_startup_s = pool.startup_s
                state.log(f"Ray ready in {pool.startup_s:.1f} s")
            _drive(state, pool, pending)
        except KeyboardInterrupt:
            status = "interrupted"
            state.log("interrupted: stopping the workers and Ray; re-run the same command to resume")
            raise
        except BaseException:
            status = "failed"
            raise
        finally:
            for slot in pool.slots:
                if slot.cell is not None:
                    slot.cell.status, slot.cell.error = "interrupted", "the sweep stopped while this cell ran"
            pool.close()
            state.write(status)
    tables = write_tables(out, rows=rows, cols=cols, metric=metric)
    if strongest:
        state.log(f"strongest attack per defense: {tables.get('strongest_md', '(not computed)')}")
    done, failed = state.counts()
    bad = [c for c in cells if c.status != FINISHED]
    state.log(f"finished: {len(cells) - len(bad)}/{len(cells)} completed, {len(bad)} not "
              f"in {_fmt_s(time.perf_counter() - state.t0)}; tables: {out / 'summary.md'}")
    state.write("completed" if not bad else "completed_with_failures")
    result = json.loads((out / "sweep.json").read_text())
    result["tables"] = {k: str(v) for k, v in tables.items()}
    result["out"] = str(out)
    return result


def _next_ready(state: SweepRun, pool: _Pool, pending: deque) -> Cell | None:
    """The first pending cell that can start now (removed from ``pending``): a backdoor cell
    only once its no-attack cell (``cell.null``) has completed. A backdoor cell whose null
    ended without completing is recorded as failed without running (a re-run retries both)."""
    by_id = {c.id: c for c in state.cells}
    waiting = {c.id for c in pending} | {s.cell.id for s in pool.slots if s.cell is not None}
    for cell in list(pending):
        dep = by_id.get(cell.null) if cell.null else None
        if dep is not None and dep.id in waiting:
            continue
        pending.remove(cell)
        # finished with a model (as cell_state counts it): hospital failures or a spent DP budget
        if dep is not None and dep.status not in (FINISHED, "completed_with_failures", "budget_exhausted"):
            cell.status = "failed"
            cell.error = (f"not run: its null_run, the no-attack cell {dep.id}, ended {dep.status}; re-run the "
                          "sweep to retry both")
            state.write("running")
            state.log(f"{cell.label} not run: its no-attack cell {dep.label} ended {dep.status}")
            continue
        return cell
    return None


def _drive(state: SweepRun, pool: _Pool, pending: deque) -> None:
    from multiprocessing.connection import wait

    total = len(state.cells)
    last_print = time.perf_counter()

    def progress_line(prefix: str) -> str:
        done = sum(c.status == FINISHED for c in state.cells)
        failed = sum(bool(c.status in ("failed", "interrupted") and c.extra.get("ran")) for c in state.cells)
        remaining = len(pending) + sum(s.cell is not None for s in pool.slots)
        eta = state.eta(remaining)
        return (f"{done}/{total} done" + (f", {failed} failed" if failed else "")
                + f" | {prefix}" + (f" | eta {_fmt_s(eta)}" if eta is not None and remaining else ""))

    while pending or any(s.cell is not None for s in pool.slots):
        for slot in pool.slots:
            if slot.cell is None and pending:
                cell = _next_ready(state, pool, pending)
                if cell is None:
                    break  # every pending cell waits for a running no-attack cell
                slot.cell, slot.started = cell, time.perf_counter()
                cell.status, cell.error = "running", None
                slot.conn.send({"id": cell.id, "overrides": cell.overrides, "engine": cell.engine,
                                "path": str(state.out / "cells" / cell.id)})
                state.write("running")
                null = f" (null: {cell.null_text})" if cell.null_text else ""
                state.log(progress_line(f"running {cell.label}{null}"))
                last_print = time.perf_counter()
        busy = [s for s in pool.slots if s.cell is not None]
        if not busy:
            if pending:  # cannot happen: a cell waits only for a pending or running one
                raise FedsecError(f"sweep: {len(pending)} cell(s) wait for cells that will not run")
            break
        ready = wait([s.conn for s in busy] + [s.worker.sentinel for s in busy], timeout=30.0)
        for slot in busy:
            cell = slot.cell
            result = None
            if slot.conn in ready or slot.conn.poll():
                try:
                    result = slot.conn.recv()
                except (EOFError, OSError):
                    result = None
            if result is None and slot.worker.sentinel not in ready and slot.worker.is_alive():
                continue
            if result is None:  # the worker died mid-cell (killed, out of memory, crash)
                code = slot.worker.exitcode
                result = {"status": "failed", "wall_s": time.perf_counter() - slot.started,
                          "error": f"the cell's worker process died (exit code {code}); see "
                                   f"cells/{cell.id}/log.txt"}
                pool.restart_worker(slot)
            cell.status, cell.error, cell.wall_s = result["status"], result.get("error"), result.get("wall_s")
            cell.extra["ran"] = True
            if cell.status == "interrupted":
                raise KeyboardInterrupt
            state.durations.append(cell.wall_s or 0.0)
            slot.cell = None
            state.write("running")
            verdict = "completed" if cell.status == FINISHED else f"FAILED: {(cell.error or '').splitlines()[0][:160]}"
            state.log(progress_line(f"{cell.label} {verdict} in {_fmt_s(cell.wall_s)}"))
            last_print = time.perf_counter()
        if time.perf_counter() - last_print >= 30.0:
            running = [s for s in pool.slots if s.cell is not None]
            desc = ", ".join(f"{s.cell.label} (round {_rounds_done(state.out / 'cells' / s.cell.id)})"
                             for s in running)
            state.log(progress_line(f"running {desc}"))
            last_print = time.perf_counter()


# --------------------------------------------------------------------------------------
# Command line (the lead wires add_sweep_parser into fedsec.cli)
# --------------------------------------------------------------------------------------


def add_sweep_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "sweep", help="run a grid of overrides x seeds (resumable), then tables of mean ± std",
        description="Cartesian product of --grid values x --seeds, one run folder per cell under OUT/cells/. "
                    "Re-running the same command resumes: completed cells are skipped.")
    p.add_argument("items", nargs="+", metavar="SCENARIO|key=value",
                   help="the scenario file, then key=value overrides applied to every cell")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="a grid axis (repeatable), e.g. attacks=none,alie or strategy=fedavg,krum")
    p.add_argument("--seeds", metavar="0,1,2", help="seeds to repeat every cell with (default: the scenario's)")
    p.add_argument("--out", help="sweep folder (default runs/sweeps/<name>-<hash of the command>)")
    p.add_argument("--parallel", type=int, metavar="N",
                   help="cells side by side (default: as many as the CPUs hold, at least 1)")
    p.add_argument("--address", metavar="RAY_ADDRESS", help="use this Ray cluster instead of starting one")
    p.add_argument("--engine", choices=ENGINES, default=None,
                   help="where cells run: auto (default: small cells in-process, the rest on Ray), ray, inline")
    p.add_argument("--rows", metavar="KEY", help="grid key of the table's rows (default: attacks)")
    p.add_argument("--cols", metavar="KEY", help="grid key of the table's columns (default: strategy)")
    p.add_argument("--metric", default=None, choices=METRIC_KEYS, help="utility metric of the tables (default auroc)")
    p.add_argument("--strongest", action="store_true",
                   help="per defense, select the attack with the largest effect over the no-attack cell on the "
                        "validation split (task.options.val_fraction), and report its test metric")
    p.add_argument("--selection-seeds", metavar="0,1,2",
                   help="with --strongest (implied): the seeds whose validation splits select the winner; --seeds "
                        "are then the reporting seeds, the only ones its test effect is computed from")
    p.add_argument("--allow-seed-overlap", action="store_true",
                   help="accept --selection-seeds that share seeds with --seeds (refused otherwise: those seeds "
                        "would both select and report)")
    p.add_argument("--dry-run", action="store_true", help="validate and list the cells, run nothing")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out folder that is not a sweep "
                                                       "(nothing already there is removed or overwritten)")
    p.set_defaults(fn=cmd_sweep)
    return p


def cmd_sweep(args) -> int:
    """SIGTERM is handled like Ctrl-C: the workers and Ray heads stop in order; exit 130."""
    try:
        previous = signal.signal(signal.SIGTERM, _interrupt)
    except ValueError:  # not the main thread: leave signals alone
        previous = None
    try:
        return _cmd_sweep(args)
    except KeyboardInterrupt:
        print("fedsec: sweep interrupted; re-run the same command to resume (completed cells are kept)",
              file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _cmd_sweep(args) -> int:
    from fedsec.cli import _split_args

    paths, overrides = _split_args(args.items)
    if len(paths) != 1:
        raise FedsecError(f"give exactly one scenario file, got {len(paths)}: {' '.join(paths) or '(none)'}")
    result = run_sweep(paths[0], grid=args.grid, seeds=args.seeds, out=args.out, overrides=overrides,
                       parallel=args.parallel, address=args.address, rows=args.rows, cols=args.cols,
                       metric=args.metric, dry_run=args.dry_run, force=args.force, engine=args.engine,
                       strongest=True if args.strongest else None, selection_seeds=args.selection_seeds,
                       allow_seed_overlap=args.allow_seed_overlap)
    if args.dry_run:
        return 0
    print(Path(result["tables"]["summary_md"]).read_text())
    print(f"sweep folder: {result['out']} (fedsec report {result['out']})")
    bad = [c for c in result["cells"] if c["status"] != FINISHED]
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    """``python -m fedsec.sweep ...`` = ``fedsec sweep ...``."""
    from fedsec.cli import main as cli_main

    return cli_main(["sweep", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())

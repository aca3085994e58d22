"""Reading results folders: a run's records, its scenario, its task's class and hospital names.

The analysis package reads results folders and never imports the engines."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

NO_ATTACK = {"none", "null", "", "[]", "~"}
REFERENCE_DEFENSE = "fedavg"
CHANCE = {"auroc": 0.5, "balanced_accuracy": 0.5, "accuracy": 0.5, "sensitivity": 0.0, "specificity": 0.0}
# Display names, verbs, class names and modalities come from the components' declarations
# (fedsec.registry): this module keeps no list of component names.


def _rule_cls(name):
    from fedsec.registry import RULES

    return RULES.get(name) if name in RULES else None


def _attack_cls(name):
    from fedsec.registry import ATTACKS

    return ATTACKS.get(name) if name in ATTACKS else None


def _task_spec(name):
    from fedsec.registry import TASKS

    return TASKS.get(name).spec if name in TASKS else None


ADVERSARY_NOUNS = {"curious_server": "a curious server", "external": "an outside attacker",
                   "vendor": "a compromised third-party vendor", "patient": "a malicious patient",
                   "clinician": "a malicious clinician"}


# --------------------------------------------------------------------------------------
# Reading results folders
# --------------------------------------------------------------------------------------


def _read_json(path: Path):
    import json

    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _num(v):
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v) else None


@dataclass
class RunInfo:
    """One run folder: scenario, round records, summary, figures written by attacks."""

    path: Path
    label: str
    scenario: dict
    rounds: list[dict]
    summary: dict
    figures: list[Path] = field(default_factory=list)

    @classmethod
    def load(cls, path, label: str | None = None) -> "RunInfo":
        path = Path(path)
        try:
            scenario = yaml.safe_load((path / "scenario.yaml").read_text()) or {}
        except (OSError, yaml.YAMLError):
            scenario = {}
        rounds = []
        try:
            import json

            for line in (path / "rounds.jsonl").read_text().splitlines():
                try:
                    rounds.append(json.loads(line))
                except ValueError:
                    break
        except OSError:
            pass
        summary = _read_json(path / "summary.json") or {}
        figures = sorted((path / "figures").glob("*.png")) if (path / "figures").is_dir() else []
        return cls(path, label or path.name, scenario, rounds, summary, figures)

    @property
    def planned_rounds(self) -> int:
        return int((self.scenario.get("federation") or {}).get("rounds") or len(self.rounds) or 1)

    def attack_windows(self) -> list[tuple[int, int, str]]:
        """(first, last, name) of every attack; default window: all rounds."""
        out = []
        for a in self.scenario.get("attacks") or []:
            r = a.get("rounds") or [1, self.planned_rounds]
            out.append((int(r[0]), int(r[1]), str(a.get("preset") or a.get("attack"))))
        return out

    def malicious(self) -> list[int]:
        ids: set[int] = set()
        for a in self.scenario.get("attacks") or []:
            ids.update(int(h) for h in a.get("hospitals") or [])
        return sorted(ids)


def _class_info(scenario: dict, _cache: dict = {}) -> tuple[list[str], list[str]]:  # noqa: B006 - a cache
    """(class names, hospital names) of the scenario's dataset; the known names when the data
    cannot be loaded here."""
    task = scenario.get("task") or {}
    fed = scenario.get("federation") or {}
    key = repr((task, fed.get("sites"), fed.get("hospitals"), fed.get("partition")))
    if key not in _cache:
        spec = _task_spec(task.get("name"))
        classes, hospitals = list(spec.class_names if spec else []), []
        try:
            from fedsec.scenario import load_scenario
            from fedsec.tasks import build_task

            s = copy.deepcopy(scenario)
            if isinstance(s.get("engine"), dict):
                s["engine"]["address"] = None
            data = build_task(load_scenario(s)).data
            classes, hospitals = list(data.class_names) or classes, list(data.hospitals)
        except Exception:  # a report must not need the data; fall back to the known names
            pass
        _cache[key] = (classes, hospitals)
    return _cache[key]

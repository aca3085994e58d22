"""The deployment ServerApp's lifecycle (``runner.run_on_grid``) holds no patient data.

Run on the in-process engine's grid, the ServerApp's body must never build the task (only
the hospitals' ClientApps do), take the
hospitals' names and the model's input from their introductions, compute a backdoor's
success on the hospitals' own test records, and end with the same numbers as the
simulation of the same scenario.
"""

from __future__ import annotations

import inspect
import json

import pytest

import fedsec.tasks
from fedsec.errors import FedsecError
from fedsec.federation.adversary import server_data_needs
from fedsec.federation.inline import run_inline
from fedsec.runner import run, run_on_grid
from fedsec.scenario import load_scenario, parse_yaml_text

HEART = """\
name: server_without_data
seed: 3
task: {name: heart_disease, model: logistic}
federation:
  partition: {name: natural}
  rounds: 2
  local: {epochs: 1, batch_size: 8, lr: 0.05}
strategy: median
attacks:
  - {preset: ehr_trigger, hospitals: [3]}
engine: {name: inline}
"""


def _load(text: str, overrides=None):
    return load_scenario(parse_yaml_text(text, "test scenario"), overrides)


def test_deployment_lifecycle_builds_no_task_on_the_server_and_equals_simulation(tmp_path, monkeypatch):
    builders: list[str] = []
    real = fedsec.tasks.build_task

    def recording(scenario, *args, **kwargs):  # who asked for the task: the name of the calling function
        builders.append(inspect.stack()[1].function)
        return real(scenario, *args, **kwargs)

    monkeypatch.setattr(fedsec.tasks, "build_task", recording)
    scenario = _load(HEART)
    summary = run_inline(scenario, lambda grid: run_on_grid(grid, HEART, "", str(tmp_path / "dep")), 4)
    assert builders and set(builders) == {"load_context"}, builders  # only the hospitals' ClientApps
    assert summary["status"] == "completed"
    assert list(summary["per_hospital"]) == ["cleveland", "hungary", "switzerland", "va"]  # from the nodes

    builders.clear()
    sim = run(_load(HEART), out=tmp_path / "sim", progress=False)
    assert summary["final"] == sim["final"]
    assert summary["per_hospital"] == sim["per_hospital"]
    assert summary["attack"] == sim["attack"] and 0.0 <= summary["attack"]["asr"] <= 1.0


def test_what_needs_data_on_the_server_is_named():
    base = _load(HEART)
    assert server_data_needs(base) == []  # a backdoor's success is computed on the hospitals
    fl = _load(HEART, ["strategy=fltrust", "attacks=[]"])
    assert any("fltrust" in n and "root set" in n for n in server_data_needs(fl))
    mia = _load(HEART, ["attacks=[{preset: membership_loss}]"])
    assert any("attacks[0]" in n for n in server_data_needs(mia))


def test_nodes_describing_different_inputs_are_refused():
    scenario = _load(HEART)
    intro = {0: {"name": "a", "input-shape": [13], "num-classes": 2, "multilabel": False, "num-train": 10},
             1: {"name": "b", "input-shape": [12], "num-classes": 2, "multilabel": False, "num-train": 9}}
    with pytest.raises(FedsecError, match="hospitals a and b describe different data"):
        fedsec.tasks.NodesTask.from_introductions(scenario, intro)
    intro[1]["input-shape"] = [13]
    t = fedsec.tasks.NodesTask.from_introductions(scenario, intro)
    assert t.hospitals == ["a", "b"] and t.train_sizes() == {"a": 10, "b": 9}
    assert sum(p.numel() for p in t.make_model(seed=0).parameters()) == 13 * 2 + 2


def test_deployment_lifecycle_resumes_from_its_checkpoint(tmp_path):
    """run config ``resume = true``: the ServerApp continues the run in ``out`` from its
    checkpoint and ends where an uninterrupted run ends."""
    out = tmp_path / "dep"
    first = run_inline(_load(HEART), lambda g: run_on_grid(g, HEART, "federation.rounds=1", str(out)), 4)
    assert first["rounds"] == 1
    resumed = run_inline(_load(HEART), lambda g: run_on_grid(g, "", "federation.rounds=2", str(out), resume=True), 4)
    whole = run_inline(_load(HEART), lambda g: run_on_grid(g, HEART, "", str(tmp_path / "whole")), 4)
    assert resumed["rounds"] == 2 and resumed["status"] == "completed"
    assert resumed["final"] == whole["final"] and resumed["attack"] == whole["attack"]
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]

"""summary.json and the report say, without opening code, who attacked, each hospital's
sizes, which metrics are undefined for a hospital and why (docs/results.md)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import fedsec
from fedsec.metrics import classification_metrics, undefined_reasons
from fedsec.runner import hospital_sizes, hospitals_block
from fedsec.scenario import load_scenario
from fedsec.tasks import NodesTask, build_task

ROOT = Path(__file__).resolve().parents[2]
HEART = ROOT / "scenarios" / "heart_fedavg.yaml"
LABEL_FLIP = ["engine.name=inline", "federation.rounds=2", "attacks=[{preset: label_flip, hospitals: [3]}]"]


@pytest.fixture(scope="module")
def label_flip_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lf") / "run"
    return out, fedsec.run(HEART, overrides=LABEL_FLIP, out=out, progress=False)


def test_summary_names_the_attackers_and_each_hospitals_sizes(label_flip_run):
    _, s = label_flip_run
    task = build_task(load_scenario(HEART, LABEL_FLIP))
    hosp = s["hospitals"]
    assert list(hosp) == list(task.data.hospitals) == ["cleveland", "hungary", "switzerland", "va"]
    for name, tr, te in zip(task.data.hospitals, task.data.train, task.data.test):
        assert hosp[name]["train_n"] == len(tr) and hosp[name]["test_n"] == len(te)
    assert hosp["switzerland"]["test_n"] == 16
    assert hosp["va"]["malicious"] is True and hosp["va"]["attacks"] == ["label_flip"]
    assert [h for h, v in hosp.items() if v["malicious"]] == ["va"]
    assert s["attackers"] == [{"attack": "label_flip", "class": "label_flip", "hospitals": ["va"], "rounds": [1, 2]}]


def test_attackers_chosen_by_fraction_and_windows():
    sc = load_scenario(HEART, ["engine.name=inline", "federation.rounds=5",
                               "attacks=[{preset: label_flip, fraction: 0.5, rounds: [2, 4]}]"])
    block = hospitals_block(sc, ["a", "b", "c", "d"], {"a": {"train_n": 3, "test_n": 1}})
    bad = [h for h, v in block.items() if v["malicious"]]
    assert len(bad) == 2  # floor(0.5 * 4) hospitals, drawn from the seed as the server draws them
    from fedsec.federation.adversary import build_plans

    assert bad == [["a", "b", "c", "d"][h] for h in build_plans(sc, 4)[0].hospitals]
    assert block["a"]["train_n"] == 3 and block["b"]["train_n"] is None


def test_deployment_sizes_come_from_the_introductions():
    """A deployment's server has no data: the hospitals' introductions give both sizes."""
    sc = load_scenario(HEART, ["engine.name=inline"])
    intro = {h: {"name": n, "num-train": 10 + h, "num-test": 5 + h, "num-classes": 2, "multilabel": False,
                 "input-shape": [13]} for h, n in enumerate(["x", "y"])}
    task = NodesTask.from_introductions(sc, intro)
    assert hospital_sizes(task) == {"x": {"train_n": 10, "test_n": 5}, "y": {"train_n": 11, "test_n": 6}}


def test_undefined_metric_is_recorded_with_its_reason(label_flip_run):
    _, s = label_flip_run
    assert s["per_hospital"]["switzerland"]["auroc"] is None  # its 16 test records are all positive
    why = s["per_hospital_undefined"]["switzerland"]
    assert why["auroc"] == "its 16 test records are all one class (1)"
    assert why["specificity"].startswith("its 16 test records are all one class (1): no negative")
    assert set(why) == {"auroc", "specificity", "balanced_accuracy"}
    assert "cleveland" not in s["per_hospital_undefined"]


def test_undefined_reasons_of_metrics():
    scores = torch.tensor([[0.3, 0.7], [0.6, 0.4], [0.2, 0.8]])
    m = classification_metrics(scores, torch.tensor([0, 0, 0]))
    assert math.isnan(m["auroc"]) and math.isnan(m["sensitivity"])
    why = undefined_reasons(torch.tensor([0, 0, 0]), m)
    assert why["auroc"] == "its 3 test records are all one class (0)"
    assert "no positive record" in why["sensitivity"] and "specificity" not in why
    both = torch.tensor([0, 1, 1])
    assert undefined_reasons(both, classification_metrics(scores, both)) == {}
    assert undefined_reasons(torch.tensor([], dtype=torch.long), {"auroc": float("nan")}) == {
        "auroc": "it has no test records"}

"""summary.json and the report say, without opening code, who attacked, each hospital's
sizes, which metrics are undefined for a hospital and why (docs/results.md)."""

from __future__ import annotations

import math
import re
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


def test_report_shows_undefined_metrics_roles_and_what_moves(label_flip_run, tmp_path):
    from fedsec.analysis.report import report_run

    run_dir, _ = label_flip_run
    page = report_run(run_dir, out=tmp_path / "report").read_text()
    assert "undefined (its 16 test records are all one class (1))" in page
    assert "malicious (label_flip)" in page and "attack label_flip by va in rounds 1-2" in page
    # a label flip: balanced accuracy and accuracy beside AUROC, in the matrix cell and as curves
    assert re.search(r"AUROC 0\.\d{3} · balanced accuracy 0\.\d{3} · accuracy 0\.\d{3}", page)
    assert (tmp_path / "report" / f"curves_{run_dir.name}_balanced_accuracy.png").exists()


def _row(privacy: dict, summary_privacy: dict, defense="fedavg") -> dict:
    sc = {"name": "x", "strategy": defense, "attacks": [], "privacy": privacy}
    return {"status": "completed", "auroc": 0.8, "accuracy": 0.7, "balanced_accuracy": 0.7, "attack_metric": None,
            "attack_value": None, "_summary": {"privacy": summary_privacy, "final": {}}, "_scenario": sc}


@pytest.mark.parametrize("privacy, spent, title", [
    ({"dp_sgd": {"noise_multiplier": 1.0}}, {"dp_sgd": {"epsilon_max": 2.36, "epsilon": {"a": 2.36}}},
     "FedAvg + DP-SGD ε=2.36"),
    ({"central_dp": {"noise_multiplier": 1.0}}, {"central_dp": {"epsilon": 4.5, "delta": 1e-5}},
     "FedAvg + central DP ε=4.5"),
    ({"secure_aggregation": True}, {}, "FedAvg + SecAgg"),
    ({"compression": {"keep_ratio": 0.1, "bits": 8}}, {}, "FedAvg + compression (top 10%, 8-bit)"),
    ({}, {}, "FedAvg"),
])
def test_matrix_column_names_the_privacy_defense(privacy, spent, title):
    from fedsec.analysis.matrix import build_matrix
    from fedsec.analysis.report import risk_matrix_html

    m = build_matrix([_row(privacy, spent)], [], None, None, "auroc")
    assert m.column_title("fedavg") == title
    assert f"<th>{title}<br>" in risk_matrix_html(m)
    if privacy:
        assert f"with {title.removeprefix('FedAvg + ')}" in m.cells[("none", "fedavg")].reading


@pytest.mark.parametrize("entry, knowledge", [
    ("preset: badnets", "black_box"),
    ("preset: badnets, boost: auto", "white_box"),  # n_hospitals / n_malicious: knows the round's participants
    ("preset: model_replacement", "white_box"),
    ("preset: model_replacement, boost: 2.0", "black_box"),
    ("preset: scaling", "white_box"),
    ("preset: scaling, gamma: 3", "black_box"),
    ("preset: bounded_badnets, boost: 1.0", "white_box"),  # reads the defense's bound in force
    ("preset: label_flip", "black_box"),
])
def test_threat_tags_follow_the_options_in_force(entry, knowledge):
    from fedsec.scenario import derived_threat_model

    sc = load_scenario(HEART, ["engine.name=inline", f"attacks=[{{{entry}, hospitals: [3]}}]"])
    assert derived_threat_model(sc)["knowledge"] == knowledge


def test_every_preset_declares_the_knowledge_its_options_imply():
    """A preset's ``threat`` agrees with what its own options decide (Attack.threat_for)."""
    import yaml

    from fedsec.attacks import attack_threat

    for f in sorted((ROOT / "attacks").glob("*.yaml")):
        preset = yaml.safe_load(f.read_text())
        assert attack_threat(preset) == preset["threat"], f.name


def test_deployment_summary_has_the_same_hospitals_block(label_flip_run, tmp_path):
    """The deployment ServerApp (no data on the server, run here on the in-process grid): the
    sizes come from the hospitals' introductions and equal the simulation's."""
    from fedsec.federation.inline import run_inline
    from fedsec.runner import run_on_grid

    _, sim = label_flip_run
    # the run config's overrides are split on spaces: the same attack, written without any
    overrides = 'engine.name=inline federation.rounds=2 attacks=[{"preset":"label_flip","hospitals":[3]}]'
    dep = run_inline(load_scenario(HEART, LABEL_FLIP),
                     lambda grid: run_on_grid(grid, str(HEART), overrides, str(tmp_path / "dep")), 4)
    assert dep["hospitals"] == sim["hospitals"] and dep["attackers"] == sim["attackers"]
    assert dep["per_hospital_undefined"] == sim["per_hospital_undefined"]

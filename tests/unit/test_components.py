"""Components are declared once (registry + typed options + spec on the class) and every
option is checked when the scenario is loaded: exit 2 naming the key path, before any
process starts, from `validate`, `run` and `sweep`."""

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from fedsec.attacks.base import Attack
from fedsec.cli import main
from fedsec.errors import ScenarioError
from fedsec.registry import ATTACKS, MODELS, PARTITIONERS, REGISTRIES, RULES, TASKS, look_up, option, options_of
from fedsec.scenario import load_scenario

ROOT = Path(__file__).resolve().parents[2]
HEART = ROOT / "scenarios" / "heart_fedavg.yaml"

# one bad option per component kind: (overrides, the key path the message must name)
BAD_OPTIONS = {
    "task": (["task.options.normalise=true"], "task.options.normalise"),
    "model": (["task.model=mlp", "task.model_options.hiden=[8]"], "task.model_options.hiden"),
    "partitioner": (["task.name=pneumonia", "task.model=small_cnn", "federation.hospitals=4",
                     "federation.partition={name: dirichlet, alhpa: 0.5}"], "federation.partition.alhpa"),
    "attack": (["attacks=alie", "attacks[0].hospitals=[1]", "attacks[0].zz=3"], "attacks[0].zz"),
    "attack value": (["attacks=gaussian", "attacks[0].hospitals=[1]", "attacks[0].sigma=-1"], "attacks[0].sigma"),
    "observer": (["attacks=dlg", "attacks[0].iteratons=3"], "attacks[0].iteratons"),
    "rule": (["strategy=krum", "strategy.nonsense=1"], "strategy.nonsense"),
    "rule value": (["strategy=trimmed_mean", "strategy.beta=abc"], "strategy.beta"),
    "rule vs hospitals": (["strategy=krum", "attacks=alie", "attacks[0].hospitals=[1]"], "strategy"),
    "privacy": (["privacy.dp_sgd={noise_multiplyer: 1.0}"], "privacy.dp_sgd.noise_multiplyer"),
}


@pytest.mark.parametrize("kind", sorted(BAD_OPTIONS))
def test_bad_option_of_each_kind_names_its_key(kind):
    overrides, key = BAD_OPTIONS[kind]
    with pytest.raises(ScenarioError) as info:
        load_scenario(HEART, overrides)
    assert info.value.key == key, str(info.value)
    assert f"key '{key}'" in str(info.value)


@pytest.mark.parametrize("command", ["validate", "run", "sweep"])
@pytest.mark.parametrize("kind", ["attack", "rule", "privacy", "partitioner"])
def test_bad_option_exits_2_from_every_command(kind, command, tmp_path, capsys, monkeypatch):
    # nothing may start: an engine start would fail this test loudly
    import fedsec.federation.engine as engine

    monkeypatch.setattr(engine, "run_ray", lambda *a, **k: pytest.fail("the engine started"))
    overrides, key = BAD_OPTIONS[kind]
    argv = {"validate": ["validate", str(HEART), *overrides],
            "run": ["run", str(HEART), *overrides, "--out", str(tmp_path / "r")],
            "sweep": ["sweep", str(HEART), *overrides, "--seeds", "0,1", "--out", str(tmp_path / "s")]}[command]
    assert main(argv) == 2
    out = capsys.readouterr()
    assert key in out.out + out.err
    assert "Traceback" not in out.out + out.err
    assert not (tmp_path / "r").exists()


def test_did_you_mean_is_one_look_up():
    with pytest.raises(ScenarioError) as info:
        look_up("krun", RULES.names(), what="aggregation rule", key="strategy.rule")
    assert "did you mean 'krum'" in str(info.value) and info.value.key == "strategy.rule"
    with pytest.raises(ScenarioError) as info:
        load_scenario(HEART, ["task.model=logistc"])
    assert info.value.key == "task.model" and "did you mean 'logistic'" in str(info.value)


def test_every_component_declares_typed_options_and_a_spec():
    for kind, reg in REGISTRIES.items():
        for name, obj in reg.items():
            assert (obj.__doc__ or "").strip(), f"{kind} '{name}' has no docstring (docs/components.md reads it)"
            specs = options_of(obj)
            if kind == "models" and specs is None:
                continue  # MONAI factories pass keyword options through to MONAI
            assert specs is not None, f"{kind} '{name}' declares no options"
            for s in specs:
                assert s.type is not None
    for name, cls in ATTACKS.items():
        spec = cls.spec()
        assert spec.hooks, f"attack {name} implements no hook"
        assert spec.goal in ("integrity", "confidentiality", "availability")
    for name, cls in RULES.items():
        assert cls.spec().name == name or name == cls.spec().name
    for name, fn in TASKS.items():
        assert fn.spec.domain and fn.spec.splits


def test_rule_specs_drive_the_byzantine_bound():
    krum, bulyan, median = RULES.get("krum")(), RULES.get("bulyan")(), RULES.get("median")()
    assert [krum.min_updates(f) for f in (0, 1, 2)] == [3, 5, 7]
    assert [bulyan.min_updates(f) for f in (0, 1, 2)] == [3, 7, 11]
    assert median.min_updates(2) == 5
    # 8 hospitals, 2 attackers: Krum fits (8 > 2*2+2), Bulyan does not (8 < 4*2+3)
    cxr = ["task.name=pneumonia", "task.model=small_cnn", "federation.hospitals=8",
           "federation.partition={name: iid}", "attacks=gaussian", "attacks[0].hospitals=[0,1]"]
    assert load_scenario(HEART, cxr + ["strategy=krum"]).strategy["rule"] == "krum"
    with pytest.raises(ScenarioError, match="at least 11 hospitals per round"):
        load_scenario(HEART, cxr + ["strategy=bulyan"])
    # an explicit f is checked too, and named
    with pytest.raises(ScenarioError) as info:
        load_scenario(HEART, cxr + ["strategy=krum", "strategy.num_malicious=3"])
    assert info.value.key == "strategy.num_malicious"


def test_a_new_attack_is_one_class_and_one_preset(tmp_path):
    """docs/design.md's recipe: a class registered where it is defined, a preset file next
    to the scenario; nothing else edited, and `validate` already checks its options."""

    @ATTACKS.register("throwaway")
    class Throwaway(Attack):
        name = "throwaway"

        @dataclass
        class Options:
            scale: float = option(2.0, "how much to scale the update", gt=0.0)

        def poison_update(self, global_params, local_params, ctx):
            return global_params + self.options["scale"] * (local_params - global_params)

    try:
        (tmp_path / "attacks").mkdir()
        (tmp_path / "attacks" / "throwaway.yaml").write_text("attack: throwaway\nscale: 3.0\n")
        scenario = tmp_path / "s.yaml"
        scenario.write_text(HEART.read_text())
        s = load_scenario(scenario, ["attacks=throwaway", "attacks[0].hospitals=[2]"])
        assert s.attacks[0]["scale"] == 3.0 and s.malicious_hospitals() == [2]
        with pytest.raises(ScenarioError) as info:
            load_scenario(scenario, ["attacks=throwaway", "attacks[0].hospitals=[2]", "attacks[0].scale=-1"])
        assert info.value.key == "attacks[0].scale"
        from fedsec.federation.adversary import build_plans

        plan = build_plans(s, 4)[0]
        assert plan.has("poison_update") and plan.attack.spec().hooks == ("poison_update",)
        g, local = torch.zeros(3), torch.ones(3)
        assert torch.equal(plan.attack.poison_update(g, local, None), torch.full((3,), 3.0))
    finally:
        ATTACKS.unregister("throwaway")


def test_partitioner_and_model_registries():
    assert set(PARTITIONERS.names()) == {"iid", "dirichlet", "quantity", "natural"}
    assert {o.name for o in options_of(PARTITIONERS.get("dirichlet"))} == {"alpha"}
    assert "small_cnn" in MODELS and "hidden" in {o.name for o in options_of(MODELS.get("mlp"))}


def test_components_doc_is_generated_from_the_declarations():
    from fedsec.components_doc import components_markdown

    doc = ROOT / "docs" / "components.md"
    assert doc.read_text() == components_markdown(), (
        "docs/components.md is out of date: run `python -m fedsec.components_doc docs/components.md`")
    assert "| `z` | float / null | null |" in doc.read_text()  # ALIE's typed option, from its class


@pytest.mark.parametrize("overrides,words", [
    (["privacy.secure_aggregation=true", "strategy=median"], "'median' needs each hospital's update"),
    (["privacy.secure_aggregation=true", "attacks=ipm", "attacks[0].hospitals=[1]"], "attack 'ipm' rewrites"),
    (["privacy.central_dp={noise_multiplier: 1.0}", "strategy=median"], "strategy 'median' with privacy.central_dp"),
])
def test_impossible_combinations_are_refused_at_load(overrides, words):
    with pytest.raises(ScenarioError) as info:
        load_scenario(HEART, overrides)
    assert info.value.key == "privacy" and words in str(info.value)

"""Scenario loading: every kind of bad input gives one error naming the file and the key."""

from pathlib import Path

import pytest
import yaml

from fedsec.cli import main
from fedsec.errors import ScenarioError
from fedsec.scenario import load_scenario

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "scenarios" / "quickstart.yaml"


def write(tmp_path, text, name="s.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def error_of(source, overrides=None) -> ScenarioError:
    with pytest.raises(ScenarioError) as info:
        load_scenario(source, overrides)
    return info.value


def test_quickstart_loads_with_resolved_strategy():
    s = load_scenario(QUICKSTART)
    assert s.federation.sites == ["cleveland", "hungary"]
    assert s.strategy["rule"] == "fedavg" and s.strategy["preset"] == "fedavg"
    assert s.threat_model.domain is None  # derived, not written


def test_unknown_key_names_path_and_suggests(tmp_path):
    p = write(tmp_path, "federation:\n  roundz: 3\n")
    err = error_of(p)
    assert err.key == "federation.roundz"
    assert str(p) in str(err) and "did you mean 'rounds'" in str(err)


def test_wrong_type_names_key(tmp_path):
    err = error_of(write(tmp_path, "federation:\n  rounds: many\n"))
    assert err.key == "federation.rounds" and "wrong type" in str(err)


@pytest.mark.parametrize("text,key", [
    ("federation: {rounds: 0}", "federation.rounds"),
    ("federation: {fraction_train: 1.5}", "federation.fraction_train"),
    ("federation: {local: {lr: -1}}", "federation.local.lr"),
    ("engine: {num_gpus: -1}", "engine.num_gpus"),
    ("federation: {acquisition_shift: 2}", "federation.acquisition_shift"),
])
def test_out_of_range_values(tmp_path, text, key):
    err = error_of(write(tmp_path, text))
    assert err.key == key


def test_more_malicious_than_hospitals(tmp_path):
    p = write(tmp_path, "federation: {sites: [cleveland, hungary]}\n"
                        "attacks: [{attack: sign_flip, hospitals: [0, 1]}]\n")
    err = error_of(p)
    assert err.key == "attacks[0].hospitals" and "at least one hospital must be benign" in str(err)


def test_hospital_id_out_of_range(tmp_path):
    err = error_of(write(tmp_path, "attacks: [{attack: sign_flip, hospitals: [7]}]\n"))
    assert err.key == "attacks[0].hospitals" and "out of range" in str(err)


def test_attack_window_outside_rounds(tmp_path):
    err = error_of(write(tmp_path, "federation: {rounds: 3}\nattacks: [{attack: sign_flip, hospitals: [0], "
                                   "rounds: [2, 9]}]\n"))
    assert err.key == "attacks[0].rounds"


def test_missing_file():
    err = error_of("/nonexistent/scenario.yaml")
    assert "not found" in str(err) and "/nonexistent/scenario.yaml" in str(err)


def test_invalid_yaml_names_line(tmp_path):
    err = error_of(write(tmp_path, "federation:\n  rounds: [1,\n"))
    assert "not valid YAML" in str(err) and "line" in str(err)


def test_unknown_strategy_preset(tmp_path):
    err = error_of(write(tmp_path, "strategy: fedavgg\n"))
    assert err.key == "strategy.preset" and "did you mean 'fedavg'" in str(err)


def test_unknown_attack_preset(tmp_path):
    err = error_of(write(tmp_path, "attacks: [{preset: no_such_attack, hospitals: [0]}]\n"))
    assert err.key == "attacks[0].preset" and "unknown attack preset" in str(err)


def test_unknown_site_and_model(tmp_path):
    assert error_of(write(tmp_path, "federation: {sites: [clevland]}\n")).key == "federation.sites[0]"
    assert error_of(write(tmp_path, "task: {model: resnet99}\n")).key == "task.model"


def test_missing_data_path(tmp_path):
    err = error_of(write(tmp_path, "task: {name: ehr_csv, path: /no/such.csv}\n"))
    assert err.key == "task.path" and "/no/such.csv" in str(err)


def test_overrides_apply_and_are_checked():
    s = load_scenario(QUICKSTART, ["federation.rounds=2", "seed=7", "federation.local.lr=0.5"])
    assert (s.federation.rounds, s.seed, s.federation.local.lr) == (2, 7, 0.5)
    err = error_of(QUICKSTART, ["federation.rouns=2"])
    assert err.key == "federation.rouns" and "override" in str(err)
    assert error_of(QUICKSTART, ["federation.rounds=-1"]).key == "federation.rounds"


def test_threat_tag_validated(tmp_path):
    err = error_of(write(tmp_path, "threat_model: {goal: integrityy}\n"))
    assert err.key == "threat_model.goal" and "did you mean 'integrity'" in str(err)


def test_resolved_scenario_reloads_identically(tmp_path):
    s = load_scenario(QUICKSTART, ["federation.rounds=3"])
    again = load_scenario(write(tmp_path, s.to_yaml(), "resolved.yaml"))
    assert again.to_dict() == s.to_dict()


def test_cli_exit_code_2_without_traceback(tmp_path, capsys):
    p = write(tmp_path, "federation: {rounds: 0}\n")
    assert main(["validate", str(p)]) == 2
    assert main(["run", str(p)]) == 2
    err = capsys.readouterr().err
    assert "federation.rounds" in err and "Traceback" not in err
    assert main(["validate", str(QUICKSTART)]) == 0


def test_to_dict_equals_omegaconfs_conversion_for_every_shipped_scenario():
    """Scenario.to_dict uses dataclasses.asdict (fast); it must give what OmegaConf's
    structured conversion gives; tuples become lists, so the YAML dump always works."""
    import glob

    from omegaconf import OmegaConf

    checked = 0
    for path in sorted(glob.glob(str(ROOT / "scenarios" / "*.yaml"))):
        s = load_scenario(path)
        via_omegaconf = OmegaConf.to_container(OmegaConf.structured(s), resolve=True)
        assert s.to_dict() == via_omegaconf, path
        # the same text too (key order): digests and run-folder names do not change
        assert s.to_yaml() == yaml.safe_dump(via_omegaconf, sort_keys=False), path
        checked += 1
    assert checked >= 10
    s = load_scenario(QUICKSTART)
    s.task.options = {"feature_stats": {"mean": (0.5, 1.5)}}
    s.federation.sites = ("cleveland", "hungary")
    d = s.to_dict()
    assert d["task"]["options"]["feature_stats"]["mean"] == [0.5, 1.5] and d["federation"]["sites"] == ["cleveland", "hungary"]
    # (OmegaConf keeps a tuple inside an untyped option as a tuple, which yaml.safe_dump refuses)
    assert yaml.safe_load(s.to_yaml()) == d

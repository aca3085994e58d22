"""A scenario file is untrusted input (docs/threat-model.md, "The scenario file"): no code
execution, no reads without bounds, no interpolation, every bad value exit 2 with its key."""

import os
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedsec.cli import main
from fedsec.errors import ScenarioError
from fedsec.scenario import MAX_SCENARIO_BYTES, load_scenario

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "scenarios" / "quickstart.yaml"
HEART = ROOT / "scenarios" / "heart_fedavg.yaml"


def write(tmp_path, text, name="s.yaml"):
    p = tmp_path / name
    p.write_text(text) if isinstance(text, str) else p.write_bytes(text)
    return p


def error_of(source, overrides=None) -> ScenarioError:
    with pytest.raises(ScenarioError) as info:
        load_scenario(source, overrides)
    return info.value


# --- no code execution ---------------------------------------------------------------------

def test_an_import_path_is_not_an_attack(tmp_path):
    marker = tmp_path / "pwned"
    p = write(tmp_path, QUICKSTART.read_text() + f"\nattacks:\n  - {{attack: 'os:system', hospitals: [1], "
                                                 f"command: 'touch {marker}'}}\n")
    err = error_of(p)
    assert err.key == "attacks[0].attack" and "unknown attack 'os:system'" in str(err)
    from fedsec.federation.adversary import build_plans

    s = load_scenario(QUICKSTART)
    s.attacks = [{"attack": "os:system", "hospitals": [1], "command": f"touch {marker}"}]
    with pytest.raises(ScenarioError):
        build_plans(s, 2)  # the ClientApp's path: still only registered names
    assert not marker.exists()


@pytest.mark.parametrize("value", ["${oc.env:HOME}", "${oc.env:SECRET_TOKEN}", "${name}", "${a.b}x", "???"])
def test_no_interpolation_and_no_secrets(tmp_path, value, monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "hunter2")
    p = write(tmp_path, QUICKSTART.read_text().replace("name: quickstart", f"name: '{value}'"))
    err = error_of(p)
    assert err.key == "name" and "hunter2" not in str(err)
    err = error_of(QUICKSTART, [f"description={value}"])
    assert "hunter2" not in str(err)


def test_recursive_interpolation_is_an_error_not_a_hang(tmp_path):
    p = write(tmp_path, "name: '${description}'\ndescription: '${name}'\n")
    assert "interpolation" in str(error_of(p))


# --- writes only under the results folder -----------------------------------------------------

@pytest.mark.parametrize("name", ["../../x", "/tmp/abs", "a/b", "..", ".hidden", "", "x" * 101, "a b"])
def test_name_is_a_plain_identifier(name):
    assert error_of(QUICKSTART, [f"name='{name}'"]).key == "name"


@pytest.mark.parametrize("folder", ["/tmp/elsewhere", "../up", "~/home"])
def test_output_dir_stays_inside(folder):
    assert error_of(QUICKSTART, [f"output.dir={folder}"]).key == "output.dir"


# --- bounded input ---------------------------------------------------------------------------

def test_device_files_and_fifos_are_refused_without_reading(tmp_path):
    link = tmp_path / "zero.yaml"
    link.symlink_to("/dev/zero")
    t0 = time.monotonic()
    assert "not a regular file" in str(error_of(link))
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    assert "not a regular file" in str(error_of(fifo))
    assert time.monotonic() - t0 < 5


def test_size_limit(tmp_path):
    p = write(tmp_path, "description: '" + "x" * (MAX_SCENARIO_BYTES + 10) + "'\n")
    assert "larger than" in str(error_of(p))


def test_alias_bomb_stops_fast(tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 10):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    p = write(tmp_path, "\n".join(lines) + "\n")
    t0 = time.monotonic()
    assert "aliases" in str(error_of(p))
    assert time.monotonic() - t0 < 5
    # fewer aliases, but too many values once expanded
    lines = ["a0: &a0 [" + ", ".join(["x"] * 200) + "]", "b: [" + ", ".join(["*a0"] * 99) + "]"]
    assert "values once aliases are expanded" in str(error_of(write(tmp_path, "\n".join(lines), "b.yaml")))


def test_non_utf8_and_duplicate_keys(tmp_path):
    err = error_of(write(tmp_path, b"name: caf\xe9\n"))
    assert "not UTF-8" in str(err) and "byte 9" in str(err)
    err = error_of(write(tmp_path, "seed: 1\nseed: 2\n", "d.yaml"))
    assert "duplicate key 'seed'" in str(err) and "line 2" in str(err)


def test_exponent_numbers_are_numbers(tmp_path):
    s = load_scenario(QUICKSTART, ["federation.local.lr=1e-2"])
    assert s.federation.local.lr == 0.01
    err = error_of(write(tmp_path, QUICKSTART.read_text() + "\nfederation: {rounds: 1e30}\n"))
    assert err.key in ("federation.rounds", None) and "1e+30" in str(err) or "duplicate" in str(err)
    err = error_of(QUICKSTART, ["federation.local.lr=1e30"])
    assert err.key == "federation.local.lr"


@pytest.mark.parametrize("override,key", [
    ("task=heart_disease", "task"),
    ("attacks={a: 1}", "attacks"),
    ("seed=-5", "seed"),
    ("seed=1.5", "seed"),
    ("federation.rounds=1000000000000", "federation.rounds"),
    ("federation.rounds=0", "federation.rounds"),
    ("federation.local.lr=.inf", "federation.local.lr"),
    ("federation.local.lr=.nan", "federation.local.lr"),
    ("federation.fraction_train=.nan", "federation.fraction_train"),
    ("federation.sites=[]", "federation.sites"),
    ("federation.sites=[cleveland,cleveland]", "federation.sites[1]"),
    ("federation.hospitals=10", "federation.hospitals"),
    ("engine.num_gpus=-1", "engine.num_gpus"),
    ("federation.local=3", "federation.local"),
    ("strategy=[1]", "strategy"),
    ("name=5", "name"),
])
def test_bad_values_name_their_key(override, key):
    assert error_of(HEART, [override]).key == key


def test_membership_target_out_of_range_is_an_error():
    err = error_of(HEART, ["attacks=membership_loss", "attacks[0].target_hospital=9"])
    assert err.key == "attacks[0].target_hospital" and "0..3" in str(err)


# --- overrides address list items ---------------------------------------------------------------

def test_overrides_address_one_option_of_one_attack():
    s = load_scenario(HEART, ["attacks=ehr_trigger", "attacks[0].hospitals=[1]", "attacks[0].poison_fraction=0"])
    assert s.attacks[0]["poison_fraction"] == 0 and s.attacks[0]["hospitals"] == [1]
    s = load_scenario(HEART, ["attacks=ehr_trigger", "attacks.0.hospitals=[2]", "attacks.0.boost=2.0"])
    assert s.attacks[0]["boost"] == 2.0 and s.attacks[0]["hospitals"] == [2]
    s = load_scenario(HEART, ["strategy=trimmed_mean", "strategy.trim=1"])
    assert s.strategy["trim"] == 1
    s = load_scenario(HEART, ["federation.sites=[cleveland,va]", "federation.sites[1]=hungary"])
    assert s.federation.sites == ["cleveland", "hungary"]
    err = error_of(HEART, ["attacks.0.x=1"])
    assert err.key == "attacks[0]" and "out of range" in str(err)


# --- the fuzz test ------------------------------------------------------------------------------

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**15, 10**15),
                     st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                     st.sampled_from(["fedavg", "krum", "alie", "natural", "${oc.env:HOME}", "../x", "1e30",
                                      "cleveland", "???", "heart_disease", "pneumonia"]))
_values = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)
_KEYS = ["name", "seed", "task", "task.name", "task.model", "task.options", "federation", "federation.rounds",
         "federation.sites", "federation.hospitals", "federation.partition", "federation.local.lr",
         "federation.local", "strategy", "attacks", "attacks[0]", "attacks[0].hospitals", "privacy.dp_sgd",
         "privacy", "engine", "engine.num_cpus", "threat_model.goal", "output.dir", "zz"]


def _base():
    return yaml.safe_load(HEART.read_text())


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(mutations=st.lists(st.tuples(st.sampled_from(_KEYS), _values), min_size=1, max_size=3),
       as_text=st.booleans())
def test_fuzz_validate_exits_0_or_2_never_a_traceback(mutations, as_text, tmp_path_factory, capsys):
    """Random values at random keys of a real scenario: `validate` answers 0 or 2 with one
    line, within a bounded time, and writes nothing."""
    work = tmp_path_factory.mktemp("fuzz")
    data = _base()
    overrides = []
    for key, value in mutations:
        if as_text:
            overrides.append(f"{key}={yaml.safe_dump(value, default_flow_style=True).strip()}")
        else:
            node, parts = data, key.replace("[0]", "").split(".")
            for part in parts[:-1]:
                node = node.setdefault(part, {}) if isinstance(node, dict) else {}
            if isinstance(node, dict):
                node[parts[-1]] = value
    path = work / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    before = sorted(p.name for p in work.iterdir())
    cwd = os.getcwd()
    os.chdir(work)
    try:
        t0 = time.monotonic()
        code = main(["validate", str(path), *overrides])
        elapsed = time.monotonic() - t0
    finally:
        os.chdir(cwd)
    out = capsys.readouterr()
    assert code in (0, 2)
    assert "Traceback" not in out.out + out.err
    assert elapsed < 20
    assert sorted(p.name for p in work.iterdir()) == before


def test_fuzz_random_bytes_never_crash(tmp_path, capsys):
    import random

    rng = random.Random(0)
    text = QUICKSTART.read_bytes()
    for i in range(60):
        b = bytearray(text)
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        p = write(tmp_path, bytes(b), f"m{i}.yaml")
        assert main(["validate", str(p)]) in (0, 2)
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err


def test_grid_values_can_address_list_items():
    """`--grid attacks[0].poison_fraction=0,0.5`: one cell per value, each loading to its option."""
    from fedsec import sweep as sw

    grid = sw.parse_grid(["attacks[0].poison_fraction=0,0.5", "strategy=fedavg,median"])
    cells = sw.expand(grid, [0])
    assert len(cells) == 4
    got = sorted((load_scenario(ROOT / "scenarios" / "integrity_heart.yaml", c.overrides).attacks[0]["poison_fraction"],
                  c.values["strategy"]) for c in cells)
    assert got == [(0, "fedavg"), (0, "median"), (0.5, "fedavg"), (0.5, "median")]

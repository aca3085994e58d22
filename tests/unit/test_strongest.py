"""Sweep files with labelled grid values, the strongest attack per defense (selected on the
validation split, never the test split), harm per hospital, and the size-aware rule."""

import json
from pathlib import Path

import pytest
import torch

from fedsec import sweep as sw
from fedsec.analysis import hospitals as hp
from fedsec.analysis import strongest as st
from fedsec.errors import ScenarioError

ROOT = Path(__file__).resolve().parents[2]
HEART_SWEEP = ROOT / "scenarios" / "heart_sweep.yaml"


# --------------------------------------------------------------------------------------
# Labelled grid values and sweep files
# --------------------------------------------------------------------------------------


def test_labelled_grid_values_expand_to_their_overrides():
    grid = sw.normalize_grid({
        "attacks": ["none", "alie"],
        "defense": {"median": {"strategy": "median"},
                    "clipped": {"strategy": "norm_bounding", "strategy.max_norm": 1.0},
                    "tm": {"strategy": {"rule": "trimmed_mean", "trim": 1}}},
    })
    assert grid["attacks"] == {"none": ["attacks=none"], "alie": ["attacks=alie"]}
    assert grid["defense"]["clipped"] == ["strategy=norm_bounding", "strategy.max_norm=1.0"]
    assert grid["defense"]["tm"] == ["strategy={rule: trimmed_mean, trim: 1}"]
    cells = sw.expand(grid, [0, 1], ["federation.rounds=2"])
    assert len(cells) == 2 * 3 * 2
    c = next(c for c in cells if c.values == {"attacks": "alie", "defense": "clipped"} and c.seed == 1)
    assert c.overrides == ["federation.rounds=2", "attacks=alie", "strategy=norm_bounding", "strategy.max_norm=1.0",
                           "seed=1"]
    assert c.id.startswith("attacks=alie,defense=clipped,seed=1-")
    # plain values keep the ids (and resume) of sweeps made before labels existed
    assert [c.id for c in sw.expand({"attacks": ["none", "alie"]}, [0])] == \
        [c.id for c in sw.expand(sw.normalize_grid({"attacks": ["none", "alie"]}), [0])]


@pytest.mark.parametrize("grid, key", [
    ({"defense": {"clipped": "norm_bounding"}}, "grid.defense.clipped"),
    ({"defense": {"clipped": {}}}, "grid.defense.clipped"),
    ({"defense": {"bad label": {"strategy": "median"}}}, "grid.defense.bad label"),
    ({"defense": {"m": {"strategy=x": 1}}}, "grid.defense.m.strategy=x"),
    ({"attacks": ["none", {"preset": "alie"}]}, "grid.attacks[1]"),
    ({"attacks": []}, "grid.attacks"),
    ({"attacks": ["alie", "alie"]}, "grid.attacks[1]"),
])
def test_bad_labelled_grid_values_name_the_key_path(grid, key):
    with pytest.raises(ScenarioError) as e:
        sw.normalize_grid(grid, "s.yaml")
    assert e.value.key == key


def _sweep_file(tmp_path, body: str) -> Path:
    f = tmp_path / "s.yaml"
    f.write_text(f"scenario: {HEART_SWEEP}\n" + body)
    return f


def test_sweep_file_runs_through_the_cli_and_bad_ones_exit_2(tmp_path, capsys):
    from fedsec.cli import main

    good = _sweep_file(tmp_path, "overrides: {federation.rounds: 2, task.options.val_fraction: 0.2}\n"
                                 "grid:\n  attacks: [none, sign_flip]\n"
                                 "  defense:\n    tm: {strategy: {rule: trimmed_mean, trim: 1}}\n"
                                 "    clip: {strategy: norm_bounding, strategy.max_norm: 1.0}\n"
                                 "seeds: 0-1\nstrongest: {attacks: attacks, defenses: defense}\n")
    assert main(["sweep", str(good), "--dry-run", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert out.count("missing") == 8
    assert "strategy=norm_bounding strategy.max_norm=1.0 seed=1" in out
    bad = {
        "grid:\n  defense:\n    clipped: norm_bounding\n": "grid.defense.clipped",
        "grid:\n  attacks: [none]\nseedz: [0]\n": "seedz",
        "grid:\n  attacks: [none, alie]\nstrongest: {attacks: defense}\n": "strongest.attacks",
        "grid:\n  attacks: [alie, sign_flip]\nstrongest: true\n": "strongest.no_attack",
        # a label's override the scenario rejects: named with the cell, exit 2 before anything runs
        "grid:\n  defense:\n    clip: {strategy: norm_bounding, strategy.max_nrom: 1.0}\n": "strategy.max_nrom",
        # the selection needs a validation split
        "grid:\n  attacks: [none, alie]\nstrongest: true\n": "task.options.val_fraction",
    }
    for body, key in bad.items():
        f = _sweep_file(tmp_path, body)
        assert main(["sweep", str(f), "--dry-run", "--out", str(tmp_path / "out2")]) == 2, body
        assert key in capsys.readouterr().err, body


# --------------------------------------------------------------------------------------
# The strongest attack: a fake sweep whose validation and test numbers disagree
# --------------------------------------------------------------------------------------

# test AUROC per (attack, seed); validation AUROC per (attack, seed) - "quiet" hurts the test
# split more, "loud" hurts the validation split more: selection must follow validation.
TEST = {"none": [0.80, 0.82], "loud": [0.78, 0.80], "quiet": [0.60, 0.62], "backdoor": [0.79, 0.81]}
VAL = {"none": [0.90, 0.88], "loud": [0.60, 0.58], "quiet": [0.85, 0.84], "backdoor": [0.89, 0.87]}
ASR_TEST, ASR_VAL, ASR_FLOOR_VAL = [0.50, 0.70], [0.20, 0.30], [0.05, 0.05]


def make_fake_strongest(root: Path) -> Path:
    grid = {"attacks": ["none", "loud", "quiet", "backdoor"], "strategy": ["median"]}
    cells = sw.expand(grid, [0, 1])
    meta_cells = []
    for c in cells:
        a, s = c.values["attacks"], c.seed
        path = root / "cells" / c.id
        path.mkdir(parents=True)
        (path / "scenario.yaml").write_text("task: {name: heart_disease}\n")
        attack = {"asr": ASR_TEST[s]} if a == "backdoor" else {}
        (path / "summary.json").write_text(json.dumps({"status": "completed", "seed": s, "final": {"auroc": TEST[a][s]},
                                                       "attack": attack}))
        val = {"utility/auroc": VAL[a][s], f"asr/{path.name}": ASR_VAL[s] if a == "backdoor" else None}
        if a == "none":  # the clean model with each candidate's trigger
            for other in cells:
                if other.seed == s and other.values["attacks"] != "none":
                    val[f"asr/{other.id}"] = ASR_FLOOR_VAL[s] if other.values["attacks"] == "backdoor" else None
                    val[f"test_asr/{other.id}"] = 0.10 if other.values["attacks"] == "backdoor" else None
        (path / "validation.json").write_text(json.dumps(val))
        meta_cells.append({**c.to_json(), "status": "completed"})
    (root / "sweep.json").write_text(json.dumps({
        "kind": "fedsec-sweep", "status": "completed", "scenario": str(HEART_SWEEP), "grid": grid, "seeds": [0, 1],
        "cells": meta_cells, "strongest": {"attacks": "attacks", "defenses": "strategy", "no_attack": "none"}}))
    return root


def test_strongest_is_selected_on_validation_and_reported_on_test(tmp_path, monkeypatch):
    sweep_dir = make_fake_strongest(tmp_path)
    # nothing may build a task: every number comes from the cells' validation.json / summaries
    monkeypatch.setattr(st, "_task", lambda *a, **k: pytest.fail("the selection built a task"))
    res = st.strongest(sweep_dir, "auroc")
    e = res["by_defense"]["median"]
    val = {a: v["mean"] for a, v in e["validation"].items()}
    # damage = (U_clean - U) / (U_clean - 0.5) on validation
    assert val["loud"] == pytest.approx(((0.90 - 0.60) / 0.40 + (0.88 - 0.58) / 0.38) / 2)
    assert val["quiet"] == pytest.approx(((0.90 - 0.85) / 0.40 + (0.88 - 0.84) / 0.38) / 2)
    assert val["backdoor"] == pytest.approx(((0.20 - 0.05) + (0.30 - 0.05)) / 2)
    # "quiet" does more damage on the test split (0.2/0.3 vs 0.02/0.02) but less on validation
    assert e["winner"] == "loud"
    t = e["test"]
    assert t["kind"] == "damage"
    assert t["effects"] == pytest.approx([(0.80 - 0.78) / 0.30, (0.82 - 0.80) / 0.32])
    assert t["low"] is not None and t["utility"] == pytest.approx(0.79)
    assert "median: strongest of 3 candidate(s) on validation is loud" in st.describe("median", e)


def test_strongest_backdoor_effect_is_asr_over_the_clean_floor(tmp_path, monkeypatch):
    sweep_dir = make_fake_strongest(tmp_path)
    # make the backdoor win on validation by raising its validation ASR
    for cell in (sweep_dir / "cells").iterdir():
        if cell.name.startswith("attacks=backdoor"):
            v = json.loads((cell / "validation.json").read_text())
            v[f"asr/{cell.name}"] = 0.95
            (cell / "validation.json").write_text(json.dumps(v))
    monkeypatch.setattr(st, "_task", lambda *a, **k: pytest.fail("the selection built a task"))
    e = st.strongest(sweep_dir, "auroc")["by_defense"]["median"]
    assert e["winner"] == "backdoor"
    assert e["validation"]["backdoor"]["effects"] == pytest.approx([0.90, 0.90])
    assert e["test"]["kind"] == "asr"
    assert e["test"]["effects"] == pytest.approx([0.50 - 0.10, 0.70 - 0.10])  # test ASR - clean-model test floor


def test_each_family_gets_its_own_winner_and_test_effect(tmp_path, monkeypatch):
    """The cross-family winner is an untargeted attack ("loud"), but the backdoor still gets its
    own row: selected among the backdoors on validation, reported on test against its floor."""
    sweep_dir = make_fake_strongest(tmp_path)
    monkeypatch.setattr(st, "_task", lambda *a, **k: pytest.fail("the selection built a task"))
    res = st.strongest(sweep_dir, "auroc")
    e = res["by_defense"]["median"]
    assert e["winner"] == "loud"
    assert {a: v["family"] for a, v in e["validation"].items()} == {
        "loud": "damage", "quiet": "damage", "backdoor": "asr"}
    fams = e["families"]
    assert fams["damage"]["winner"] == "loud" and fams["damage"]["test"] == e["test"]
    assert fams["asr"]["winner"] == "backdoor"
    assert fams["asr"]["validation_mean"] == pytest.approx(((0.20 - 0.05) + (0.30 - 0.05)) / 2)
    assert fams["asr"]["test"]["kind"] == "asr"
    assert fams["asr"]["test"]["effects"] == pytest.approx([0.40, 0.60])
    md = st.strongest_markdown(res)
    assert "## Per family" in md
    row = next(line for line in md.splitlines() if line.startswith("| median | backdoor"))
    assert "+0.500 [" in row and "| loud |" in row


def test_select_picks_the_largest_mean_first_on_ties():
    assert st.select({"a": [0.1, 0.3], "b": [0.2, 0.2], "c": []}) == ("a", {"a": 0.2, "b": 0.2})
    assert st.select({"a": [], "b": []})[0] is None


# --------------------------------------------------------------------------------------
# Separate selection and reporting seeds: a fake sweep where the two sets disagree
# --------------------------------------------------------------------------------------

# seeds 0, 1 select, seeds 2, 3 report. On validation, the selection seeds favour "alpha"
# (damage 0.75, 0.50 vs 0.25, 0.25) while the reporting seeds would favour "beta" (0.05, 0.10
# vs 1.0, 1.0: over all four seeds beta would win). On test, alpha's selection seeds would
# add a large damage (0.55 vs 0.80) that the report must not include.
SEP_VAL = {"none": [0.90, 0.90, 0.90, 0.90], "alpha": [0.60, 0.70, 0.88, 0.86], "beta": [0.80, 0.80, 0.50, 0.50]}
SEP_TEST = {"none": [0.80, 0.80, 0.82, 0.84], "alpha": [0.55, 0.55, 0.78, 0.76], "beta": [0.60, 0.60, 0.60, 0.60]}


def make_fake_separate_seeds(root: Path) -> Path:
    grid = {"attacks": ["none", "alpha", "beta"], "strategy": ["median"]}
    cells = sw.expand(grid, [0, 1, 2, 3])
    for c in cells:
        a, s = c.values["attacks"], c.seed
        path = root / "cells" / c.id
        path.mkdir(parents=True)
        (path / "scenario.yaml").write_text("task: {name: heart_disease}\n")
        (path / "summary.json").write_text(json.dumps({"status": "completed", "seed": s,
                                                       "final": {"auroc": SEP_TEST[a][s]}, "attack": {}}))
        val = {"utility/auroc": SEP_VAL[a][s], f"asr/{path.name}": None}
        if a == "none":
            val.update({f"asr/{o.id}": None for o in cells if o.seed == s})
        (path / "validation.json").write_text(json.dumps(val))
    (root / "sweep.json").write_text(json.dumps({
        "kind": "fedsec-sweep", "status": "completed", "scenario": str(HEART_SWEEP), "grid": grid,
        "seeds": [0, 1, 2, 3], "cells": [{**c.to_json(), "status": "completed"} for c in cells],
        "strongest": {"attacks": "attacks", "defenses": "strategy", "no_attack": "none",
                      "selection_seeds": [0, 1], "report_seeds": [2, 3]}}))
    return root


def test_separate_seeds_select_on_selection_seeds_and_report_on_reporting_seeds(tmp_path, monkeypatch):
    from scipy.stats import t as student

    sweep_dir = make_fake_separate_seeds(tmp_path)
    monkeypatch.setattr(st, "_task", lambda *a, **k: pytest.fail("the selection built a task"))
    read = []
    real = st.validation_numbers
    monkeypatch.setattr(st, "validation_numbers",
                        lambda cell_dir, *a, **k: read.append(Path(cell_dir).name) or real(cell_dir, *a, **k))
    res = st.strongest(sweep_dir, "auroc")
    # the selection read the validation numbers of seeds 0 and 1 only
    assert read and all(",seed=0-" in n or ",seed=1-" in n for n in read)
    e = res["by_defense"]["median"]
    assert e["validation"]["alpha"]["effects"] == pytest.approx([0.30 / 0.40, 0.20 / 0.40])
    assert e["validation"]["beta"]["effects"] == pytest.approx([0.10 / 0.40, 0.10 / 0.40])
    assert e["validation"]["alpha"]["seeds"] == [0, 1]
    assert e["winner"] == "alpha"  # over all four seeds beta would win (0.625 vs 0.35)
    t = e["test"]
    effects = [(0.82 - 0.78) / (0.82 - 0.5), (0.84 - 0.76) / (0.84 - 0.5)]  # 0.125, 0.2353: seeds 2, 3 only
    assert t["seeds"] == [2, 3] and t["n"] == 2
    assert t["effects"] == pytest.approx(effects)
    assert t["mean"] == pytest.approx(0.18014706, abs=1e-7)
    half = student.ppf(0.975, 1) * abs(effects[0] - effects[1]) / 2 ** 0.5 / 2 ** 0.5
    assert (t["low"], t["high"]) == pytest.approx((0.18014706 - half, 0.18014706 + half), abs=1e-7)
    assert t["utility"] == pytest.approx(0.77)
    assert res["selection_seeds"] == [0, 1] and res["report_seeds"] == [2, 3]
    md = st.strongest_markdown(res)
    assert "selected on seeds 0, 1" in md and "come from seeds 2, 3 only" in md and "disjoint" in md
    assert "on validation (seeds 0, 1) is alpha" in md and "on test (seeds 2, 3)" in md


def test_strongest_row_of_the_risk_matrix_uses_the_reporting_seeds_only(tmp_path, monkeypatch):
    from fedsec.analysis.matrix import STRONGEST_ROW, add_strongest_row, build_matrix
    from fedsec.analysis.tables import collect_rows

    sweep_dir = make_fake_separate_seeds(tmp_path)
    monkeypatch.setattr(st, "_task", lambda *a, **k: pytest.fail("the selection built a task"))
    res = st.strongest(sweep_dir, "auroc")
    rows, keys = collect_rows(sweep_dir)
    m = build_matrix(rows, keys, "attacks", "strategy", "auroc")
    assert m.cells[("alpha", "median")].utility == pytest.approx((0.55 + 0.55 + 0.78 + 0.76) / 4)  # all seeds
    add_strongest_row(m, res, rows, keys)
    c = m.cells[(STRONGEST_ROW, "median")]
    assert c.winner == "alpha" and c.n == 2
    assert c.utility == pytest.approx((0.78 + 0.76) / 2)  # seeds 2 and 3 only
    assert c.clean_utility == pytest.approx((0.82 + 0.84) / 2)
    assert c.effect["n"] == 2 and c.effect["mean"] == pytest.approx(0.18014706, abs=1e-7)
    assert "seeds 0, 1" in m.groups[-1][0] and "seeds 2, 3" in m.groups[-1][0]


def test_selection_seeds_resolve_and_overlap_is_refused():
    spec = {"selection_seeds": [0, 1, 2], "allow_seed_overlap": False}
    assert sw.resolve_strongest_seeds(spec, [10, 11]) == [0, 1, 2, 10, 11]
    assert spec["report_seeds"] == [10, 11]
    with pytest.raises(ScenarioError) as e:
        sw.resolve_strongest_seeds({"selection_seeds": [0, 1, 2], "allow_seed_overlap": False}, [2, 3])
    assert e.value.key == "strongest.selection_seeds" and "[2]" in str(e.value)
    allowed = {"selection_seeds": [0, 1, 2], "allow_seed_overlap": True}
    assert sw.resolve_strongest_seeds(allowed, [2, 3]) == [0, 1, 2, 3] and allowed["report_seeds"] == [2, 3]
    with pytest.raises(ScenarioError) as e:
        sw.resolve_strongest_seeds({"selection_seeds": [0], "allow_seed_overlap": False}, None)
    assert e.value.key == "seeds"
    plain = {"selection_seeds": None}
    assert sw.resolve_strongest_seeds(plain, [0, 1]) == [0, 1] and plain["report_seeds"] is None


def test_selection_seeds_on_the_command_line_and_in_sweep_files(tmp_path, capsys):
    from fedsec.cli import main

    base = ["sweep", str(HEART_SWEEP), "task.options.val_fraction=0.2", "--grid", "attacks=none,sign_flip",
            "--dry-run"]
    # overlapping sets: refused, exit 2, naming the shared seed and the flag that accepts it
    assert main(base + ["--seeds", "1-3", "--selection-seeds", "0,1", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "share seed(s) [1]" in err and "--allow-seed-overlap" in err
    assert main(base + ["--seeds", "1-3", "--selection-seeds", "0,1", "--allow-seed-overlap",
                        "--out", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert out.count("missing") == 2 * 4  # seeds 0, 1, 2, 3 (1 once)
    # disjoint: every cell runs with the selection seeds first, then the reporting seeds
    assert main(base + ["--seeds", "10-11", "--selection-seeds", "0-1", "--out", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert [int(x) for x in __import__("re").findall(r",seed=(\d+)-", out)] == [0, 1, 10, 11] * 2
    assert main(base + ["--selection-seeds", "0,1", "--out", str(tmp_path / "d")]) == 2  # no reporting seeds
    assert "--seeds" in capsys.readouterr().err
    assert main(base + ["--seeds", "2", "--selection-seeds", "0,x", "--out", str(tmp_path / "e")]) == 2
    assert "--selection-seeds" in capsys.readouterr().err
    body = ("overrides: {task.options.val_fraction: 0.2}\ngrid:\n  attacks: [none, sign_flip]\nseeds: [5, 6]\n"
            "strongest: {selection_seeds: [0, 5]}\n")
    assert main(["sweep", str(_sweep_file(tmp_path, body)), "--dry-run", "--out", str(tmp_path / "f")]) == 2
    assert "strongest.selection_seeds" in capsys.readouterr().err
    body = body.replace("[0, 5]}", "'0-1'}")
    assert main(["sweep", str(_sweep_file(tmp_path, body)), "--dry-run", "--out", str(tmp_path / "g")]) == 0
    assert capsys.readouterr().out.count("missing") == 2 * 4
    bad = body.replace("'0-1'}", "'0-1', allow_seed_overlap: maybe}")
    assert main(["sweep", str(_sweep_file(tmp_path, bad)), "--dry-run", "--out", str(tmp_path / "h")]) == 2
    assert "strongest.allow_seed_overlap" in capsys.readouterr().err


def test_sweep_json_records_the_selection_and_reporting_seeds(tmp_path, monkeypatch):
    ran = []

    class _NoPool:
        def __init__(self, *a, **k):
            self.slots, self.startup_s = [], 0.0

        def start(self):
            pass

        def close(self):
            pass

    monkeypatch.setattr(sw, "_Pool", _NoPool)
    monkeypatch.setattr(sw, "_drive", lambda state, pool, pending: ran.extend(c.seed for c in pending) or
                        pending.clear())
    sw.run_sweep(str(HEART_SWEEP), grid=["attacks=none,sign_flip"], seeds="7,8", selection_seeds="0-1",
                 overrides=["task.options.val_fraction=0.2"], out=tmp_path / "s", stream=None)
    meta = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert meta["seeds"] == [0, 1, 7, 8] and sorted(ran) == [0, 0, 1, 1, 7, 7, 8, 8]
    assert meta["strongest"]["selection_seeds"] == [0, 1] and meta["strongest"]["report_seeds"] == [7, 8]
    assert meta["strongest"]["attacks"] == "attacks"  # --selection-seeds implies --strongest


def test_validation_numbers_never_read_the_test_split(tmp_path, monkeypatch):
    """A real one-round run with a backdoor; its validation numbers are the same when every
    test record is poisoned (labels flipped, features scaled x100)."""
    import fedsec
    from fedsec import tasks

    run = tmp_path / "run"
    fedsec.run(str(HEART_SWEEP), overrides=["federation.rounds=1", "engine.name=inline",
                                            "task.options.val_fraction=0.2"], out=run, progress=False)
    st._TASKS.clear()
    clean = st.validation_numbers(run, "auroc")
    assert 0.0 <= clean["asr"] <= 1.0 and 0.5 < clean["utility"] <= 1.0
    real_build = tasks.build_task

    def poisoned(scenario):
        task = real_build(scenario)
        for s in task.data.test:
            s.x.mul_(100.0)
            s.y.copy_(1 - s.y)
        return task

    monkeypatch.setattr(tasks, "build_task", poisoned)
    st._TASKS.clear()
    (run / st.VALIDATION_FILE).unlink()
    assert st.validation_numbers(run, "auroc") == clean
    # the report's test floor does read the test split: the poisoning shows there
    st._TASKS.clear()
    assert st.test_floor(run, run) is not None


# --------------------------------------------------------------------------------------
# Harm per hospital: a hand-computed fixture
# --------------------------------------------------------------------------------------

SIZES = {"big": 200, "mid": 100, "tiny": 30, "bad": 120}
PER = {  # accuracy per hospital, seeds 0 and 1
    ("none", "fedavg"): [{"big": 0.80, "mid": 0.70, "tiny": 0.90, "bad": 0.60},
                         {"big": 0.82, "mid": 0.72, "tiny": 0.88, "bad": 0.62}],
    ("none", "median"): [{"big": 0.81, "mid": 0.69, "tiny": 0.70, "bad": 0.60},
                         {"big": 0.80, "mid": 0.71, "tiny": 0.72, "bad": 0.61}],
    ("alie", "median"): [{"big": 0.79, "mid": 0.65, "tiny": 0.50, "bad": 0.10},
                         {"big": 0.78, "mid": 0.69, "tiny": 0.60, "bad": 0.10}],
}


def _harm_rows():
    rows = []
    for (a, d), seeds in PER.items():
        for s, per in enumerate(seeds):
            attacks = [] if a == "none" else [{"preset": a, "hospitals": [3]}]
            rows.append({"attacks": a, "strategy": d, "seed": s, "status": "completed",
                         "_scenario": {"attacks": attacks},
                         "_summary": {"per_hospital": {h: {"accuracy": v} for h, v in per.items()},
                                      "hospital_sizes": SIZES}})
    return rows


def test_harm_per_hospital_against_hand_computed_numbers():
    table = hp.harm_table(_harm_rows(), ["attacks", "strategy"], "attacks", "strategy", "accuracy")
    by = {(e["row"], e["col"]): e for e in table}
    # no attack, fedavg: 'bad' is benign here -> worst is 'bad' (0.60, 0.62); smallest 'tiny'
    e = by[("none", "fedavg")]
    assert e["worst"]["hospitals"] == ["bad"] and e["worst"]["mean"] == pytest.approx(0.61)
    assert e["smallest"]["hospitals"] == ["tiny"] and e["smallest"]["mean"] == pytest.approx(0.89)
    assert e["against"] is None
    # no attack, median vs FedAvg: the smallest hospital loses 0.20 and 0.16
    e = by[("none", "median")]
    assert e["against"] == "FedAvg without attack"
    assert e["smallest"]["diff"]["mean"] == pytest.approx((-0.20 - 0.16) / 2)
    # two seeds: t(0.975, 1) = 12.7 widens the interval past 0
    assert e["smallest"]["diff"]["detectable"] is False and e["smallest"]["diff"]["high"] > 0
    # ALIE from 'bad' under the median: benign = big, mid, tiny; worst = tiny (0.50) / tiny (0.60);
    # the reference (no attack, median) over the same benign hospitals: worst mid 0.69 / tiny 0.71 ... min
    e = by[("alie", "median")]
    assert e["worst"]["hospitals"] == ["tiny"]
    assert e["worst"]["mean"] == pytest.approx(0.55)
    assert e["worst"]["diff"]["mean"] == pytest.approx(((0.50 - 0.69) + (0.60 - 0.71)) / 2)
    assert e["smallest"]["diff"]["mean"] == pytest.approx(((0.50 - 0.70) + (0.60 - 0.72)) / 2)
    from scipy.stats import t as student

    diffs = [0.50 - 0.69, 0.60 - 0.71]
    half = student.ppf(0.975, 1) * abs(diffs[0] - diffs[1]) / 2 ** 0.5 / 2 ** 0.5
    assert e["worst"]["diff"]["low"] == pytest.approx(sum(diffs) / 2 - half)
    md = hp.harm_markdown(table, "attacks", "strategy", "accuracy")
    assert "| alie | median | 2 | tiny | 0.550" in md


# --------------------------------------------------------------------------------------
# The size-aware rule
# --------------------------------------------------------------------------------------


def test_capped_weights_water_fill():
    from fedsec.strategies.size_aware import capped_weights

    assert capped_weights(torch.tensor([30.0, 100, 100, 100]), 0.3).tolist() == pytest.approx([0.1, 0.3, 0.3, 0.3])
    # under the cap: plain sample shares
    assert capped_weights(torch.tensor([1.0, 1, 2]), 0.5).tolist() == pytest.approx([0.25, 0.25, 0.5])
    # two over the cap: both capped, the rest keep their proportion 1:3
    assert capped_weights(torch.tensor([10.0, 10, 1, 3]), 0.3).tolist() == pytest.approx([0.3, 0.3, 0.1, 0.3])
    with pytest.raises(ValueError):
        capped_weights(torch.tensor([1.0, 1.0]), 0.4)


def test_size_aware_rule_trims_weight_and_bounds_one_hospital():
    from fedsec.strategies.base import RuleContext
    from fedsec.strategies.rules import make_rule

    rule = make_rule("size_aware", trim_share=0.3, max_share=0.3)
    counts = torch.tensor([30.0, 100, 100, 100])
    ctx = RuleContext(num_malicious=1)
    # weights 0.1, 0.3, 0.3, 0.3; keep the weight in [0.3, 0.7]: 0.1 of value 1 and 0.3 of value 2
    for attacker in (100.0, 1e6, 1e30):
        res = rule(torch.tensor([[0.0], [1.0], [2.0], [attacker]]), counts, ctx)
        assert res.update.tolist() == pytest.approx([(0.1 * 1 + 0.3 * 2) / 0.4])
    assert res.info["weights"] == pytest.approx([0.1, 0.3, 0.3, 0.3])
    # sample counts matter (the median of 0, 1, 2, 3 is 1.5 whatever the counts):
    # weights .1 .3 .3 .3 keep 0.1 of value 1 and 0.3 of value 2; weights .3 .3 .3 .1 keep 0.3 of 1, 0.1 of 2
    values = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    assert rule(values, torch.tensor([30.0, 100, 100, 100]), ctx).update.item() == pytest.approx(0.7 / 0.4)
    assert rule(values, torch.tensor([100.0, 100, 100, 30]), ctx).update.item() == pytest.approx(0.5 / 0.4)
    # no trimming and no cap: FedAvg
    plain = make_rule("size_aware", trim_share=0.0, max_share=1.0)
    u = torch.randn(5, 7, dtype=torch.float64)
    w = torch.tensor([1.0, 2, 3, 4, 5], dtype=torch.float64)
    assert torch.allclose(plain(u, w, RuleContext()).update, (w / w.sum()) @ u)


def test_size_aware_refuses_a_cap_the_trimming_cannot_absorb():
    from fedsec.strategies.rules import make_rule

    with pytest.raises(ScenarioError) as e:
        make_rule("size_aware", trim_share=0.2, max_share=0.3).check(1, 4)
    assert e.value.key == "max_share"
    with pytest.raises(ScenarioError) as e:
        make_rule("size_aware", trim_share=0.45, max_share=0.2).check(1, 4)
    assert e.value.key == "max_share"  # 4 x 0.2 < 1
    with pytest.raises(ScenarioError):
        make_rule("size_aware", trim_share=0.5)
    make_rule("size_aware").check(1, 4)


def test_influence_of_one_scaled_hospital_is_bounded_by_the_size_aware_rule():
    from fedsec.analysis.influence import moves

    fed_small, fed_large = (moves("fedavg", 10, 0.05, [s], draws=1)[0] for s in (10.0, 1000.0))
    sa_small, sa_large = (moves("size_aware", 10, 0.05, [s], draws=1)[0] for s in (10.0, 1000.0))
    assert fed_large > 50 * fed_small / 10  # FedAvg: grows with the scale
    assert sa_large < 1.1 * sa_small  # trimmed away: a 100x larger scale barely matters
    assert sa_large < 0.2


def test_risk_matrix_gains_a_strongest_row_naming_the_winner(tmp_path, monkeypatch):
    from fedsec.analysis.matrix import STRONGEST_ROW, add_strongest_row, build_matrix
    from fedsec.analysis.tables import collect_rows

    sweep_dir = make_fake_strongest(tmp_path)
    monkeypatch.setattr(st, "_task", lambda *a, **k: pytest.fail("the selection built a task"))
    res = st.strongest(sweep_dir, "auroc")
    rows, keys = collect_rows(sweep_dir)
    m = build_matrix(rows, keys, "attacks", "strategy", "auroc")
    add_strongest_row(m, res)
    assert m.attacks[-1] == STRONGEST_ROW and m.groups[-1][1] == [STRONGEST_ROW]
    c = m.cells[(STRONGEST_ROW, "median")]
    assert c.winner == "loud"
    assert c.utility == pytest.approx(0.79)  # the winner's test numbers
    assert c.effect["low"] is not None and c.effect["kind"] == "damage"
    assert c.reading.startswith("The coordinate-wise median: strongest of 3 candidate(s) on validation is loud")


def test_val_fraction_holds_out_a_stratified_disjoint_share_of_each_hospital():
    from fedsec.scenario import load_scenario
    from fedsec.tasks import build_task

    plain = build_task(load_scenario(HEART_SWEEP)).data
    data = build_task(load_scenario(HEART_SWEEP, ["task.options.val_fraction=0.2"])).data
    again = build_task(load_scenario(HEART_SWEEP, ["task.options.val_fraction=0.2"])).data
    other_seed = build_task(load_scenario(HEART_SWEEP, ["task.options.val_fraction=0.2", "seed=1"])).data
    for h in range(4):
        full, tr, va = plain.train[h], data.train[h], data.val[h]
        assert len(tr) + len(va) == len(full)
        for c in (0, 1):  # stratified: round(0.2 x the class's records) per class
            assert int((va.y == c).sum()) == round(0.2 * int((full.y == c).sum()))
        rows = {tuple(r) for r in full.x.tolist()}
        assert {tuple(r) for r in tr.x.tolist()} | {tuple(r) for r in va.x.tolist()} <= rows
        assert not ({tuple(r) for r in tr.x.tolist()} & {tuple(r) for r in va.x.tolist()})
        assert torch.equal(va.x, again.val[h].x)  # the same records for the same seed
        assert torch.equal(data.test[h].x, plain.test[h].x)  # the test split is untouched
    assert any(not torch.equal(data.val[h].x, other_seed.val[h].x) for h in range(4))
    assert [len(v) for v in data.val] == [40, 35, 6, 17]

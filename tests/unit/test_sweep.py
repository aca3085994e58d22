"""fedsec sweep without Ray: grid expansion, validation before anything runs, resume
decisions, and the tables against hand-computed means / standard deviations."""

import csv
import json
from pathlib import Path

import pytest

from fedsec import sweep as sw
from fedsec.analysis import tables as tb
from fedsec.errors import ScenarioError
from fedsec.scenario import load_scenario

ROOT = Path(__file__).resolve().parents[2]
HEART_SWEEP = ROOT / "scenarios" / "heart_sweep.yaml"
QUICKSTART = ROOT / "scenarios" / "quickstart.yaml"

# The fake sweep: final AUROC per (attack, defense) for seeds 0, 1, 2 and the backdoor's ASR.
AUROC = {
    ("none", "fedavg"): [0.80, 0.82, 0.84],
    ("none", "flame"): [0.78, 0.78, 0.81],
    ("ehr_trigger", "fedavg"): [0.79, 0.80, 0.81],
    ("ehr_trigger", "flame"): [0.77, 0.77, 0.77],
    ("sign_flip", "fedavg"): [0.60, 0.62, 0.64],
    ("sign_flip", "flame"): [0.78, 0.79, 0.80],
}
ASR = {("ehr_trigger", "fedavg"): [0.90, 0.95, 1.00], ("ehr_trigger", "flame"): [0.05, 0.10, 0.15]}


def make_fake_sweep(root: Path, failed: tuple | None = ("sign_flip", "flame", 2), privacy: bool = False) -> Path:
    """A finished sweep folder as fedsec sweep writes it (sweep.json + cells/*/{scenario.yaml,
    summary.json, rounds.jsonl}), with known numbers; one cell failed (its seed has no metrics)."""
    grid = {"attacks": ["none", "ehr_trigger", "sign_flip"], "strategy": ["fedavg", "flame"]}
    if privacy:
        grid = {"attacks": ["ehr_trigger"], "privacy.central_dp.noise_multiplier": ["0.0", "0.5", "1.0"]}
    cells = sw.expand(grid, [0, 1, 2], ["federation.rounds=3"])
    meta_cells = []
    for cell in cells:
        a = cell.values["attacks"]
        d = cell.values.get("strategy", "fedavg")
        s = load_scenario(HEART_SWEEP, [o for o in cell.overrides if not o.startswith("privacy.")])
        path = root / "cells" / cell.id
        path.mkdir(parents=True)
        (path / "scenario.yaml").write_text(s.to_yaml())
        if privacy:
            z = float(cell.values["privacy.central_dp.noise_multiplier"])
            auroc = [0.84 - 0.1 * z, 0.85 - 0.1 * z, 0.86 - 0.1 * z][cell.seed]
            asr = [0.9 - 0.5 * z] * 3
            asr = asr[cell.seed]
        else:
            auroc = AUROC[(a, d)][cell.seed]
            asr = ASR.get((a, d), [None] * 3)[cell.seed]
        status = "failed" if failed and (a, d, cell.seed) == failed else "completed"
        rounds = []
        for r in (1, 2, 3):
            g = {"loss": 0.6, "accuracy": 0.7, "auroc": auroc - 0.01 * (3 - r), "sensitivity": 0.7,
                 "specificity": 0.7, "balanced_accuracy": 0.7}
            ph = {h: dict(g) for h in ("cleveland", "hungary", "switzerland", "va")}
            rec = {"round": r, "time_s": 0.1, "global": g, "per_hospital": ph, "train": {}, "selected": [],
                   "failures": [], "attack": {"asr": asr} if asr is not None else {}, "defense": {"flagged": ["va"]}}
            rounds.append(rec)
        if status == "failed":
            rounds = rounds[:1]
        (path / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))
        final = rounds[-1]["global"] if status == "completed" else {}
        summary = {"status": status, "scenario": s.name, "seed": cell.seed, "rounds": len(rounds), "final": final,
                   "per_hospital": rounds[-1]["per_hospital"], "attack": rounds[-1]["attack"],
                   "defense": rounds[-1]["defense"],
                   "threat_model": {"domain": "ehr_prediction",
                                    "adversary": None if a == "none" else "hospital_insider",
                                    "knowledge": None if a == "none" else "black_box", "phase": "training",
                                    "goal": {"none": None, "ehr_trigger": "integrity", "sign_flip": "availability"}[a]},
                   "timing": {"wall_s": 10.0, "startup_s": 8.0, "rounds_s": 2.0},
                   "error": "round 2: va: disk full" if status == "failed" else None, "path": str(path)}
        (path / "summary.json").write_text(json.dumps(summary))
        cell.status = status
        meta_cells.append(cell.to_json())
    meta = {"kind": "fedsec-sweep", "status": "completed", "scenario": str(HEART_SWEEP),
            "overrides": ["federation.rounds=3"],
            "grid": grid, "seeds": [0, 1, 2], "command": "fedsec sweep (fake)", "parallel": 1,
            "table": {"rows": None, "cols": None, "metric": "auroc"}, "cells": meta_cells}
    (root / "sweep.json").write_text(json.dumps(meta))
    return root


# ---- grid -------------------------------------------------------------------------------


def test_split_values_keeps_brackets_together():
    assert sw.split_values("a,b") == ["a", "b"]
    assert sw.split_values("[cleveland,va],[hungary]") == ["[cleveland,va]", "[hungary]"]
    assert sw.split_values("{noise_multiplier: 1.0, clip: 2},null") == ["{noise_multiplier: 1.0, clip: 2}", "null"]
    assert sw.split_values("'a,b',c") == ["'a,b'", "c"]


def test_parse_grid_and_seeds():
    grid = sw.parse_grid(["attacks=none,alie", "strategy=fedavg,krum,median"])
    assert grid == {"attacks": ["none", "alie"], "strategy": ["fedavg", "krum", "median"]}
    assert sw.parse_seeds("0,1,2") == [0, 1, 2]
    assert sw.parse_seeds("3-5") == [3, 4, 5]
    assert sw.parse_seeds(None) is None
    for bad in (["attacks"], ["=a,b"], ["attacks=a,,b"], ["attacks=a", "attacks=b"], ["attacks=a,a"]):
        with pytest.raises(ScenarioError):
            sw.parse_grid(bad)
    with pytest.raises(ScenarioError, match="integers"):
        sw.parse_seeds("0,x")


def test_expand_is_the_cartesian_product_times_seeds():
    grid = {"attacks": ["none", "alie", "sign_flip"], "strategy": ["fedavg", "flame"]}
    cells = sw.expand(grid, [0, 1, 2], ["federation.rounds=2"])
    assert len(cells) == 3 * 2 * 3
    assert len({c.id for c in cells}) == len(cells)
    combos = {(c.values["attacks"], c.values["strategy"], c.seed) for c in cells}
    assert combos == {(a, s, k) for a in grid["attacks"] for s in grid["strategy"] for k in (0, 1, 2)}
    first = cells[0]
    assert first.overrides == ["federation.rounds=2", "attacks=none", "strategy=fedavg", "seed=0"]
    assert [c.seed for c in cells[:3]] == [0, 1, 2]  # seeds innermost
    assert first.id.startswith("attacks=none,strategy=fedavg,seed=0-") and len(first.id.rsplit("-", 1)[1]) == 6
    # no --seeds: the scenario's own seed, no seed override
    plain = sw.expand({"strategy": ["fedavg", "krum"]}, None)
    assert [c.overrides for c in plain] == [["strategy=fedavg"], ["strategy=krum"]]
    with pytest.raises(ScenarioError, match="not both"):
        sw.expand({"seed": ["1", "2"]}, [0])


def test_cell_ids_are_stable_and_safe():
    a = sw.expand({"federation.sites": ["[cleveland,va]", "[hungary,va]"]}, [0])
    b = sw.expand({"federation.sites": ["[cleveland,va]", "[hungary,va]"]}, [0])
    assert [c.id for c in a] == [c.id for c in b]
    assert all("/" not in c.id and "[" not in c.id and " " not in c.id for c in a)
    assert a[0].id != a[1].id


def test_invalid_key_is_a_clear_error_before_anything_runs(tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(sw, "_Pool", lambda *a, **k: started.append(a))
    out = tmp_path / "sweep"
    with pytest.raises(ScenarioError) as info:
        sw.run_sweep(str(HEART_SWEEP), grid=["federation.roundz=2,3", "strategy=fedavg,flame"], seeds="0,1", out=out,
                     stream=None)
    msg = str(info.value)
    assert "federation.roundz" in msg and "did you mean 'rounds'" in msg and "nothing was run" in msg
    assert not started and not out.exists()


def test_invalid_value_names_the_cell(tmp_path, monkeypatch):
    monkeypatch.setattr(sw, "_Pool", lambda *a, **k: pytest.fail("must not start"))
    with pytest.raises(ScenarioError) as info:
        sw.run_sweep(str(HEART_SWEEP), grid=["strategy=fedavg,krumm"], seeds="0", out=tmp_path / "s", stream=None)
    msg = str(info.value)
    assert "preset 'krumm'" in msg and "did you mean 'krum'" in msg
    assert "strategy=krumm,seed=0" in msg
    with pytest.raises(ScenarioError, match="federation.rounds"):
        sw.run_sweep(str(HEART_SWEEP), grid=["federation.rounds=0,2"], out=tmp_path / "s", stream=None)


def test_cli_exit_code_2_for_invalid_grid(tmp_path, capsys):
    code = sw.main([str(HEART_SWEEP), "--grid", "attacks=none,labelflip", "--out", str(tmp_path / "s")])
    assert code == 2
    err = capsys.readouterr().err
    assert "unknown attack preset 'labelflip'" in err and "label_flip" in err
    assert not (tmp_path / "s").exists()


def test_dry_run_lists_cells(tmp_path, capsys):
    res = sw.run_sweep(str(QUICKSTART), grid=["strategy=fedavg,median"], seeds="0,1", out=tmp_path / "s",
                       dry_run=True, stream=None)
    assert len(res["cells"]) == 4 and all(c["status"] == "missing" for c in res["cells"])
    assert not (tmp_path / "s").exists()  # a dry run writes nothing


# ---- one defense per column: a rule sized by f gets the same f in every attack row -----------


@pytest.mark.parametrize("strategy,refused", [
    ("dnc", True),                                         # f from the attackers: 0 vs 1
    ("{rule: trimmed_mean}", True),                        # trim = f: 0 vs 1
    ("{rule: dnc, num_malicious: 1}", False),
    ("{rule: trimmed_mean, trim: 1}", False),              # k fixed; f only checks it
    ("median", False),                                     # not sized by f
])
def test_a_rule_sized_by_the_attackers_must_have_one_f_across_the_attack_rows(tmp_path, strategy, refused):
    grid = {"attacks": {"none": {"attacks": []}, "flip": {"attacks": "sign_flip"}},
            "strategy": {"rule": {"strategy": strategy}}}
    run = lambda: sw.run_sweep(str(HEART_SWEEP), grid=grid, seeds="0", out=tmp_path / "s", dry_run=True,  # noqa: E731
                               stream=None)
    if not refused:
        assert len(run()["cells"]) == 2
        return
    with pytest.raises(ScenarioError) as info:
        run()
    msg = str(info.value)
    assert info.value.key == "strategy.num_malicious"
    assert "f = 0 in attacks=none" in msg and "f = 1 in attacks=flip" in msg and "num_malicious: 1" in msg
    assert not (tmp_path / "s").exists()


def test_without_an_attack_axis_the_scenarios_own_f_is_kept(tmp_path):
    res = sw.run_sweep(str(HEART_SWEEP), grid=["strategy=fedavg,dnc"], seeds="0", out=tmp_path / "s", dry_run=True,
                       stream=None)
    assert len(res["cells"]) == 2


# ---- a backdoor's null_run: the same seed's no-attack cell ---------------------------------


def test_backdoor_cells_get_the_same_seeds_no_attack_cell_as_null_run(tmp_path):
    out = tmp_path / "s"
    # a labelled no-attack value (the empty list), two defenses, two seeds
    grid = {"attacks": {"clean": {"attacks": []}, "bd": {"attacks": "ehr_trigger"}, "flip": {"attacks": "sign_flip"}},
            "strategy": ["fedavg", "median"]}
    cells = sw.expand(sw.normalize_grid(grid), [0, 1])
    scenarios = sw.validate_cells(HEART_SWEEP, cells, "inline")
    ids_before = [c.id for c in cells]
    counts = sw.pair_nulls(cells, scenarios, grid, out)
    assert counts == {"sweep_cell": 4, "explicit": 0, "untrained": 0}
    assert [c.id for c in cells] == ids_before  # ids do not depend on the sweep folder
    by = {(c.values["attacks"], c.values["strategy"], c.seed): c for c in cells}
    for d in ("fedavg", "median"):
        for seed in (0, 1):
            bd, null = by[("bd", d, seed)], by[("clean", d, seed)]
            assert bd.null == null.id
            assert bd.overrides[-1] == f'attacks[0].null_run="{(out / "cells" / null.id).resolve()}"'
            assert bd.to_json()["null_run"] == f"cells/{null.id}"
            assert by[("flip", d, seed)].null is None and by[("clean", d, seed)].null is None
    # the cell's digest is the one of the scenario it will run (null_run included), so a
    # finished backdoor cell is reused on resume
    bd = by[("bd", "median", 1)]
    nd = out / "cells" / bd.null
    nd.mkdir(parents=True)
    (nd / "summary.json").write_text("{}")
    (nd / "checkpoint.pt").write_text("")
    assert load_scenario(HEART_SWEEP, bd.overrides).attacks[0]["null_run"] == str(nd.resolve())
    assert sw.scenario_digest(load_scenario(HEART_SWEEP, bd.overrides).to_dict()) == bd.digest
    # no no-attack value in the grid: the untrained model, as before; an explicit null_run is kept
    only = sw.expand({"attacks": ["ehr_trigger"]}, [0])
    assert sw.pair_nulls(only, sw.validate_cells(HEART_SWEEP, only, "inline"), {"attacks": ["ehr_trigger"]},
                         out) == {"sweep_cell": 0, "explicit": 0, "untrained": 1}
    assert only[0].null is None and "untrained" in only[0].null_text and "null_run" not in " ".join(only[0].overrides)
    own = {"attacks": {"none": {"attacks": "none"}, "own": {"attacks": "ehr_trigger", "attacks[0].null_run": str(nd)}}}
    mine = sw.expand(sw.normalize_grid(own), [0])
    assert sw.pair_nulls(mine, sw.validate_cells(HEART_SWEEP, mine, "inline"), own, out)["explicit"] == 1
    mine = [c for c in mine if c.values["attacks"] == "own"]
    assert mine[0].null is None and str(nd) in mine[0].null_text


def test_a_backdoor_cell_waits_for_its_null_even_with_a_free_slot():
    from types import SimpleNamespace
    from collections import deque

    cells = sw.expand({"attacks": ["none", "ehr_trigger", "sign_flip"]}, [0])
    null, bd, flip = cells
    bd.null = null.id
    logged = []
    state = SimpleNamespace(cells=cells, write=lambda status: None, log=logged.append)
    slots = [SimpleNamespace(cell=None), SimpleNamespace(cell=None)]
    pool = SimpleNamespace(slots=slots)
    pending = deque([null, bd, flip])
    slots[0].cell = sw._next_ready(state, pool, pending)
    assert slots[0].cell is null
    null.status = "running"
    assert sw._next_ready(state, pool, pending) is flip  # the backdoor waits: its null runs in slot 0
    assert sw._next_ready(state, pool, pending) is None and list(pending) == [bd]
    null.status, slots[0].cell = "completed", None
    assert sw._next_ready(state, pool, pending) is bd and not pending
    # a null that failed: the backdoor cell is recorded as failed without running
    null.status, bd.status, pending = "failed", "missing", deque([bd])
    assert sw._next_ready(state, pool, pending) is None and not pending
    assert bd.status == "failed" and null.id in bd.error and "not run" in logged[-1]


def test_sweep_runs_the_null_first_and_the_backdoor_measures_its_floor_on_it(tmp_path):
    """A real sweep (inline engine, 2 rounds): the no-attack cell runs first although the grid
    lists the backdoor first, the backdoor cell names it as its null_run, and its ASR floor
    (asr@null) is what that cell's final model gives; a re-run reuses both cells."""
    import io

    from fedsec.analysis import strongest as st

    out = tmp_path / "s"
    log = io.StringIO()
    args = dict(grid=["attacks=ehr_trigger,none"], seeds="0", out=out, overrides=["federation.rounds=2"],
                engine="inline", parallel=1, stream=log)
    res = sw.run_sweep(str(HEART_SWEEP), **args)
    assert [c["status"] for c in res["cells"]] == ["completed", "completed"]
    bd, null = res["cells"]
    assert bd["values"]["attacks"] == "ehr_trigger" and bd["null_run"] == f"cells/{null['id']}"
    text = log.getvalue()
    assert "1 backdoor cell(s): null_run (the ASR floor) = the no-attack cell of the same seed" in text
    assert text.index("running attacks=none,seed=0") < text.index("attacks=none,seed=0 completed") < \
        text.index("running attacks=ehr_trigger,seed=0 (null: no-attack cell attacks=none,seed=0)")
    bd_dir, null_dir = out / bd["path"], out / null["path"]
    summary = json.loads((bd_dir / "summary.json").read_text())
    assert summary["attack"]["main_task_cost"]["null_run"] == str(null_dir.resolve())
    stats = summary["attack"]["stats"]["asr"]
    assert stats["null_kind"] == "no_attack_run"
    # the floor: the backdoor's trigger on the no-attack cell's final model, all hospitals' test records
    st._TASKS.clear()
    task = st._task(st._scenario_obj(null_dir), "test")
    floor = st._asr(bd_dir, st._model(null_dir, task), task, st._records(task, "test"))
    assert stats["null"] == pytest.approx(floor, abs=1e-9)
    untrained = st._asr(bd_dir, task.make_model(seed=0).eval(), task, st._records(task, "test"))
    assert floor != pytest.approx(untrained)  # (the untrained floor would differ: the test can tell)
    log2 = io.StringIO()
    again = sw.run_sweep(str(HEART_SWEEP), **{**args, "stream": log2})
    assert [c["status"] for c in again["cells"]] == ["completed", "completed"]
    assert [c["id"] for c in again["cells"]] == [bd["id"], null["id"]]
    assert "2 already completed (skipped), 0 to run" in log2.getvalue()
    assert json.loads((bd_dir / "summary.json").read_text()) == summary


def test_default_parallel_fits_cells_to_cpus():
    s4 = load_scenario(HEART_SWEEP)  # 4 hospitals x 1 CPU
    assert sw.default_parallel([s4], cpus=2) == 1
    assert sw.default_parallel([s4], cpus=8) == 2
    assert sw.default_parallel([s4], cpus=16) == 4
    q = load_scenario(QUICKSTART, ["engine.num_cpus=0.5"])  # 2 hospitals x 0.5
    assert sw.default_parallel([q], cpus=2) == 2


# ---- resume -----------------------------------------------------------------------------


def _cell_with_status(root, status, scenario_overrides=()):
    cell = sw.expand({"strategy": ["fedavg"]}, [0])[0]
    s = load_scenario(QUICKSTART, cell.overrides)
    cell.digest = sw.scenario_digest(s.to_dict())
    path = root / "cells" / cell.id
    path.mkdir(parents=True, exist_ok=True)
    (path / "scenario.yaml").write_text(load_scenario(QUICKSTART, [*cell.overrides, *scenario_overrides]).to_yaml())
    (path / "summary.json").write_text(json.dumps({"status": status, "error": "boom" if status == "failed" else None}))
    return cell


def test_cell_state(tmp_path):
    assert sw.cell_state(tmp_path / "a", _cell_with_status(tmp_path / "a", "completed"))[0] == "completed"
    assert sw.cell_state(tmp_path / "b", _cell_with_status(tmp_path / "b", "running"))[0] == "interrupted"
    assert sw.cell_state(tmp_path / "c", _cell_with_status(tmp_path / "c", "failed")) == ("failed", "boom")
    # where the cell ran (engine.address) does not matter; what it ran does
    moved = _cell_with_status(tmp_path / "d", "completed", ["engine.address=127.0.0.1:1234"])
    assert sw.cell_state(tmp_path / "d", moved)[0] == "completed"
    changed = _cell_with_status(tmp_path / "e", "completed", ["federation.rounds=7"])
    assert sw.cell_state(tmp_path / "e", changed)[0] == "stale"
    empty = sw.expand({"strategy": ["krum"]}, [0])[0]
    assert sw.cell_state(tmp_path / "e", empty)[0] == "missing"


class _FakePool:
    def __init__(self, *args, **kwargs):
        self.slots, self.startup_s = [], 0.0

    def start(self):
        pass

    def close(self):
        pass


def test_rerun_runs_only_unfinished_cells(tmp_path, monkeypatch):
    """Completed cells are skipped; failed, interrupted (summary still 'running') and missing ones run."""
    out = tmp_path / "sweep"
    ran: list[list[str]] = []

    def fake_drive(state, pool, pending):
        ran.append([c.id for c in pending])
        for cell in list(pending):
            path = out / "cells" / cell.id
            path.mkdir(parents=True, exist_ok=True)
            s = load_scenario(QUICKSTART, cell.overrides)
            (path / "scenario.yaml").write_text(s.to_yaml())
            status = "failed" if cell.values["strategy"] == "flame" and len(ran) == 1 else "completed"
            (path / "summary.json").write_text(json.dumps(
                {"status": status, "seed": cell.seed, "final": {"auroc": 0.8 + 0.01 * cell.seed},
                 "attack": {}, "timing": {"wall_s": 1.0}, "error": "boom" if status == "failed" else None}))
            cell.status, cell.error = status, ("boom" if status == "failed" else None)
        pending.clear()

    monkeypatch.setattr(sw, "_Pool", _FakePool)
    monkeypatch.setattr(sw, "_drive", fake_drive)
    args = dict(grid=["strategy=fedavg,flame,median"], seeds="0,1", out=out, stream=None)
    first = sw.run_sweep(str(QUICKSTART), **args)
    assert len(ran[0]) == 6
    assert sorted(c["status"] for c in first["cells"]).count("failed") == 2
    # a SIGKILLed cell: its summary still says running
    median0 = next(c for c in first["cells"] if c["values"]["strategy"] == "median" and c["seed"] == 0)
    (out / median0["path"] / "summary.json").write_text(json.dumps({"status": "running"}))
    fedavg1 = next(c for c in first["cells"] if c["values"]["strategy"] == "fedavg" and c["seed"] == 1)
    import shutil

    shutil.rmtree(out / fedavg1["path"])  # a missing cell
    second = sw.run_sweep(str(QUICKSTART), **args)
    flame = {c["id"] for c in first["cells"] if c["values"]["strategy"] == "flame"}
    assert set(ran[1]) == flame | {median0["id"], fedavg1["id"]}
    assert all(c["status"] == "completed" for c in second["cells"])
    third = sw.run_sweep(str(QUICKSTART), **args)
    assert len(ran) == 2  # nothing left to run: no pool started, only the tables
    assert third["cells"] == second["cells"]
    meta = json.loads((out / "sweep.json").read_text())
    assert meta["grid"] == {"strategy": ["fedavg", "flame", "median"]} and meta["seeds"] == [0, 1]


# ---- tables -----------------------------------------------------------------------------


def _read_csv(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_tables_match_hand_computed_means_and_stds(tmp_path):
    root = make_fake_sweep(tmp_path / "sw")
    paths = tb.write_tables(root)
    rows = _read_csv(paths["sweep_csv"])
    assert len(rows) == 18  # one per cell and seed
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["attacks"] == "sign_flip" and failed[0]["strategy"] == "flame"
    assert failed[0]["seed"] == "2" and "disk full" in failed[0]["error"] and failed[0]["auroc"] == ""
    ok = next(r for r in rows if r["attacks"] == "ehr_trigger" and r["strategy"] == "fedavg" and r["seed"] == "1")
    assert float(ok["auroc"]) == pytest.approx(0.80) and float(ok["attack.asr"]) == pytest.approx(0.95)
    assert ok["attack_metric"] == "asr" and float(ok["timing.wall_s"]) == 10.0

    summary = {(r["attacks"], r["strategy"]): r for r in _read_csv(paths["summary_csv"])}
    assert set(summary) == set(AUROC)
    # by hand: mean(0.80, 0.82, 0.84) = 0.82, sample std = 0.02
    assert float(summary[("none", "fedavg")]["mean"]) == pytest.approx(0.82)
    assert float(summary[("none", "fedavg")]["std"]) == pytest.approx(0.02)
    # mean(0.78, 0.78, 0.81) = 0.79, std = sqrt(((-.01)^2 * 2 + .02^2) / 2) = sqrt(0.0003)
    assert float(summary[("none", "flame")]["mean"]) == pytest.approx(0.79)
    assert float(summary[("none", "flame")]["std"]) == pytest.approx(0.0003 ** 0.5, abs=1e-6)
    # all equal: std 0
    assert float(summary[("ehr_trigger", "flame")]["std"]) == pytest.approx(0.0, abs=1e-12)
    # ASR: mean(0.9, 0.95, 1.0) = 0.95, std 0.05; mean(0.05, 0.1, 0.15) = 0.1, std 0.05
    assert summary[("ehr_trigger", "fedavg")]["attack_metric"] == "asr"
    assert float(summary[("ehr_trigger", "fedavg")]["attack_mean"]) == pytest.approx(0.95)
    assert float(summary[("ehr_trigger", "fedavg")]["attack_std"]) == pytest.approx(0.05)
    assert float(summary[("ehr_trigger", "flame")]["attack_mean"]) == pytest.approx(0.1)
    assert float(summary[("ehr_trigger", "flame")]["attack_std"]) == pytest.approx(0.05)
    # the failed seed is left out: mean(0.78, 0.79) = 0.785, std = 0.01 / sqrt(2)
    sk = summary[("sign_flip", "flame")]
    assert sk["n"] == "2" and sk["not_completed"] == "1"
    assert float(sk["mean"]) == pytest.approx(0.785) and float(sk["std"]) == pytest.approx(0.01 / 2 ** 0.5, abs=1e-6)

    md = paths["summary_md"].read_text()
    assert "| attacks \\ strategy | strategy=fedavg | strategy=flame |" in md
    assert "| none | 0.820 ± 0.020 | 0.790 ± 0.017 |" in md
    assert "0.800 ± 0.010 · asr 0.95 ± 0.05" in md
    assert "(1 of 3 not completed)" in md and "disk full" in md


def test_tables_rows_cols_and_metric_are_user_choices(tmp_path):
    root = make_fake_sweep(tmp_path / "sw", failed=None)
    paths = tb.write_tables(root, rows="strategy", cols="attacks", metric="accuracy")
    md = paths["summary_md"].read_text()
    assert "| strategy \\ attacks | attacks=none | attacks=ehr_trigger | attacks=sign_flip |" in md
    assert "**accuracy**" in md and "| fedavg | 0.700 ± 0.000 |" in md
    with pytest.raises(Exception, match="metric"):
        tb.write_tables(root, metric="f1")


def test_default_axes():
    assert tb.default_axes(["strategy", "attacks"]) == ("attacks", "strategy")
    assert tb.default_axes(["federation.local.lr", "federation.rounds"]) == ("federation.local.lr", "federation.rounds")
    assert tb.default_axes(["strategy"]) == ("strategy", None)
    assert tb.default_axes(["attacks", "strategy"], rows="strategy") == ("strategy", "attacks")
    assert tb.default_axes([]) == (None, None)


def test_attack_metric_priority():
    assert tb.attack_metric_of({"asr": 0.5, "psnr": 20.0}) == ("asr", 0.5)
    assert tb.attack_metric_of({"psnr": 20.0, "ssim": 0.5, "seconds": 3.0}) == ("psnr", 20.0)
    assert tb.attack_metric_of({"h0/psnr": 10.0, "h1/psnr": 20.0}) == ("psnr", 15.0)
    assert tb.attack_metric_of({"auroc_mean": 0.6}) == ("auroc_mean", 0.6)
    assert tb.attack_metric_of({}) == (None, None)


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[2] / "sweeps").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_shipped_sweep_file_loads_and_each_grid_cell_validates(path):
    """What `fedsec sweep FILE --dry-run` checks, for one seed of every shipped sweep file: a
    typo in a preset, an option or a rule fails here, not hours into a sweep."""
    import math

    from fedsec.sweep import check_same_defense, expand, load_sweep_file, validate_cells

    sf = load_sweep_file(path)
    cells = expand(sf.grid, (sf.seeds or [0])[:1], list(sf.overrides))
    scenarios = validate_cells(sf.scenario, cells, sf.engine or "auto")
    assert len(scenarios) == len(cells) == math.prod(len(v) for v in sf.grid.values())
    check_same_defense(cells, scenarios, sf.grid)  # every defense column is one defense

"""The results folder is the only place a run writes: --out into someone else's folder is
refused, --force never removes or overwrites what was there, a re-run into an earlier
run's folder removes that run's files and nothing else, and a scenario's name cannot lead
the default path out of output.dir."""

import json
import os
import time
from pathlib import Path

import pytest

import fedsec.sweep  # noqa: F401 - imported first here: run_sweep binds sys.stderr as its default stream
from fedsec.cli import main
from fedsec.errors import FedsecError
from fedsec.results import RunDir, check_out_folder, is_results_folder, new_manifest, safe_name
from fedsec.scenario import load_scenario

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = str(ROOT / "scenarios" / "quickstart.yaml")


def paper_folder(tmp_path: Path) -> Path:
    """A user's folder: a figure they keep and their hand-written scenario."""
    paper = tmp_path / "paper"
    paper.mkdir()
    (paper / "figure1.png").write_bytes(b"\x89PNG mine")
    (paper / "scenario.yaml").write_text("# my hand-written scenario\nname: mine\n")
    return paper


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_out_into_a_foreign_folder_is_refused_with_exit_2(tmp_path, capsys):
    paper = paper_folder(tmp_path)
    before = snapshot(paper)
    code = main(["run", str(paper / "scenario.yaml"), "--out", str(paper)])
    err = capsys.readouterr().err
    assert code == 2
    assert f"--out {paper}" in err and "not a fedsec results folder" in err and "--force" in err
    assert "Traceback" not in err
    assert snapshot(paper) == before and sorted(os.listdir(paper)) == ["figure1.png", "scenario.yaml"]


def test_force_never_overwrites_a_file_fedsec_did_not_write(tmp_path):
    paper = paper_folder(tmp_path)
    before = snapshot(paper)
    with pytest.raises(FedsecError, match=r"scenario.yaml, which a run would overwrite"):
        check_out_folder(paper, force=True)
    assert snapshot(paper) == before
    # without the clashing name, --force lets the run write next to the user's files
    (paper / "scenario.yaml").unlink()
    check_out_folder(paper, force=True)
    with pytest.raises(FedsecError, match="not a fedsec results folder"):
        check_out_folder(paper, force=False)


def fake_run(folder: Path, scenario, figure: str = "figures/inversion_round1.png") -> RunDir:
    """What a run leaves: its files, listed in its manifest."""
    d = RunDir(folder)
    d.begin()
    d.write_scenario(scenario)
    d.append_round({"round": 1})
    d.write_summary({"status": "completed"})
    (folder / figure).parent.mkdir(parents=True, exist_ok=True)
    (folder / figure).write_bytes(b"run figure")
    manifest = new_manifest(scenario, d)
    manifest["files"] = d.created_files()
    d.write_manifest(manifest)
    return d


def test_a_new_run_into_an_earlier_runs_folder_removes_only_that_runs_files(tmp_path, capsys):
    s = load_scenario(QUICKSTART)
    folder = paper_folder(tmp_path)
    (folder / "scenario.yaml").unlink()
    (folder / "figures").mkdir()
    (folder / "figures" / "kept-by-me.png").write_bytes(b"mine")
    fake_run(folder, s)
    assert is_results_folder(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert "figures/inversion_round1.png" in manifest["files"] and "figure1.png" not in manifest["files"]
    assert "figures/kept-by-me.png" not in manifest["files"]

    d = RunDir.for_scenario(s, folder)  # a fresh run into it (no --force needed: it is a run folder)
    assert "replacing the earlier run" in capsys.readouterr().err
    assert d.read_rounds() == []
    assert sorted(snapshot(folder)) == ["figure1.png", "figures/kept-by-me.png"]


def test_a_killed_run_without_a_file_list_loses_only_fedsec_names_and_newer_subfolder_files(tmp_path):
    s = load_scenario(QUICKSTART)
    folder = tmp_path / "killed"
    folder.mkdir()
    (folder / "figures").mkdir()
    old = folder / "figures" / "from-before.png"
    old.write_bytes(b"older than the run")
    past = time.time() - 3600
    os.utime(old, (past, past))
    fake_run(folder, s)
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["files"]  # SIGKILLed before it could list its files
    (folder / "manifest.json").write_text(json.dumps(manifest))
    RunDir(folder).clear()
    assert sorted(snapshot(folder)) == ["figures/from-before.png"]


def test_default_path_stays_inside_output_dir_whatever_the_name(tmp_path):
    """Defence in depth: the schema refuses such names and absolute output.dir values
    (tests/unit/test_scenario_untrusted.py); RunDir itself never leaves output.dir either."""
    s = load_scenario(QUICKSTART)
    s.output.dir = str(tmp_path / "runs")
    for name in ("../../escape", "/etc/x", "..", "a/../../b", "ok_name"):
        s.name = name
        d = RunDir.for_scenario(s)
        assert d.path.resolve().is_relative_to((tmp_path / "runs").resolve()), name
        assert d.path.parent.parent == tmp_path / "runs"
    assert safe_name("..") == "scenario" and safe_name("heart-2024.v1") == "heart-2024.v1"
    assert not (tmp_path / "escape").exists()


def test_baseline_writes_a_results_folder_with_out(tmp_path, capsys):
    out = tmp_path / "base"
    assert main(["baseline", QUICKSTART, "--epochs", "1", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kind"] == "baseline" and summary["status"] == "completed" and summary["epochs"] == 1
    assert 0.5 < summary["final"]["auroc"] <= 1.0
    assert is_results_folder(out) and (out / "scenario.yaml").is_file()
    assert f"results: {out}" in capsys.readouterr().out
    # into a user's folder: refused before any training
    paper = paper_folder(tmp_path)
    assert main(["baseline", QUICKSTART, "--out", str(paper)]) == 2
    assert "not a fedsec results folder" in capsys.readouterr().err


def test_sweep_out_into_a_foreign_folder_is_refused_unless_force(tmp_path, capsys):
    paper = paper_folder(tmp_path)
    (paper / "scenario.yaml").unlink()
    before = snapshot(paper)
    cmd = ["sweep", QUICKSTART, "--grid", "strategy=fedavg,median", "--out", str(paper), "--dry-run"]
    assert main(cmd) == 2
    assert "not a fedsec sweep folder" in capsys.readouterr().err
    assert main(cmd + ["--force"]) == 0
    (paper / "summary.md").write_text("my notes")
    assert main(cmd + ["--force"]) == 2
    assert "summary.md, which the sweep would overwrite" in capsys.readouterr().err
    assert snapshot(paper) == {**before, "summary.md": b"my notes"}

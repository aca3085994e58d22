"""The hospital-side tools that need no Docker engine: the data check a hospital runs on its
own node, and the FAB hash it pins."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fedsec.errors import FedsecError
from fedsec.federation.deployment import fab_hash
from fedsec.federation.docker_deploy import _main as docker_main
from fedsec.federation.docker_deploy import check_data

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "scenarios" / "quickstart.yaml"
HEART_FILES = ROOT / "src" / "fedsec" / "data" / "files" / "heart_disease"


def test_check_data_reports_the_hospitals_records(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(HEART_FILES, data)
    msg = check_data(QUICKSTART, data, "hungary")
    assert msg.startswith(f"heart_disease data in {data}: OK for hospital hungary (")
    assert "training and" in msg and "cleveland, hungary" in msg
    # a hospital's folder holding its own file only: read as its ClientApp reads it
    own = tmp_path / "own"
    own.mkdir()
    shutil.copyfile(HEART_FILES / "processed.hungarian.data", own / "processed.hungarian.data")
    assert check_data(QUICKSTART, own, "hungary").startswith(
        f"heart_disease data in {own}: OK for hospital hungary (172 training and 89 test records)")
    with pytest.raises(FedsecError, match=r"processed\.cleveland\.data: heart-disease file not found"):
        check_data(QUICKSTART, own, "cleveland")


def test_check_data_names_the_missing_file_and_exits_2(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    with pytest.raises(FedsecError, match=r"processed\.cleveland\.data: heart-disease file not found"):
        check_data(QUICKSTART, tmp_path / "data", "cleveland")
    assert docker_main(["check-data", str(QUICKSTART), "--data", str(tmp_path / "data")]) == 2
    assert "heart-disease file not found" in capsys.readouterr().err


def test_check_data_refuses_a_hospital_not_in_the_scenario():
    with pytest.raises(FedsecError, match="hospital 'va' is not in the scenario's hospitals"):
        check_data(QUICKSTART, HEART_FILES, "va")


def test_fab_hash_is_reproducible_and_follows_the_app(tmp_path):
    app = tmp_path / "app"
    (app / "pkg").mkdir(parents=True)
    (app / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n\n'
        '[project]\nname = "toy"\nversion = "1.0.0"\ndependencies = ["flwr==1.41.0"]\n\n'
        '[tool.flwr.app]\npublisher = "fedsec"\n\n[tool.flwr.app.components]\n'
        'serverapp = "pkg.s:app"\nclientapp = "pkg.c:app"\n')
    (app / "pkg" / "c.py").write_text("x = 1\n")
    first = fab_hash(app)
    assert len(first) == 64 and fab_hash(app) == first
    (app / "pkg" / "c.py").write_text("x = 2\n")
    assert fab_hash(app) != first


def test_errors_that_reach_the_operator_name_the_hospital_not_a_bare_node_id(tmp_path):
    from fedsec.federation.deployment import NodeSpec
    from fedsec.federation.docker_deploy import DockerDeployment

    dep = DockerDeployment.__new__(DockerDeployment)  # no engine needed: only the id -> name map
    dep.nodes, dep.node_ids = [NodeSpec(0, "cleveland"), NodeSpec(1, "hungary")], {0: "123", 1: "4567"}
    text = dep.name_nodes("hospital nodes failed to start:\n  node 123: x\n  node 4567: y; node 1234 unknown")
    assert text == ("hospital nodes failed to start:\n  hospital cleveland (node 123): x\n"
                    "  hospital hungary (node 4567): y; node 1234 unknown")

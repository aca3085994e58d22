"""The presets and scenarios ship inside the package: a wheel holds every file of
scenarios/, attacks/ and strategies/ (under fedsec/catalogue/), and the look-up finds the
packaged catalogue when neither the working directory nor a checkout has one; a local
folder still overrides it."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from fedsec import scenario as sc

ROOT = Path(__file__).resolve().parents[2]
KINDS = ("scenarios", "attacks", "strategies")


def test_wheel_contains_the_catalogue(tmp_path):
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          str(ROOT), "-w", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    (wheel,) = tmp_path.glob("fedsec-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for kind in KINDS:
        expected = {f"fedsec/catalogue/{kind}/{p.name}" for p in (ROOT / kind).glob("*.yaml")}
        assert expected and expected <= names, kind
    assert "fedsec/catalogue/scenarios/quickstart.yaml" in names
    # real files, not links: the wheel's copy has the checkout's content
    data = zipfile.ZipFile(wheel).read("fedsec/catalogue/scenarios/quickstart.yaml")
    assert data == (ROOT / "scenarios" / "quickstart.yaml").read_bytes()


def test_packaged_catalogue_is_found_without_a_checkout(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sc, "project_root", lambda: tmp_path / "site-packages-parent")  # as in a wheel install
    for kind in KINDS:
        dirs = sc.catalogue_dirs(kind)
        assert dirs and dirs[-1].parent.name == "catalogue", kind
    assert "fedavg" in sc.list_presets("strategies") and "quickstart" in sc.list_presets("scenarios")
    s = sc.load_scenario(str(sc.list_presets("scenarios")["quickstart"]), ["strategy=median"])
    assert s.strategy["rule"] == "median"

    from fedsec.cli import default_scenario

    assert default_scenario().read_text() == (ROOT / "scenarios" / "quickstart.yaml").read_text()


def test_a_local_folder_overrides_the_packaged_one(tmp_path, monkeypatch):
    (tmp_path / "strategies").mkdir()
    (tmp_path / "strategies" / "fedavg.yaml").write_text("rule: median\ndescription: mine\n")
    monkeypatch.chdir(tmp_path)
    assert sc.list_presets("strategies")["fedavg"] == tmp_path / "strategies" / "fedavg.yaml"
    (tmp_path / "ci.yaml").write_text((ROOT / "docs" / "ci" / "two_hospitals.yaml").read_text())
    assert sc.load_scenario(str(tmp_path / "ci.yaml")).strategy["rule"] == "median"


@pytest.mark.parametrize("kind", KINDS)
def test_the_package_links_point_at_the_checkouts_folders(kind):
    link = ROOT / "src" / "fedsec" / "catalogue" / kind
    assert link.is_symlink() and link.resolve() == (ROOT / kind).resolve()

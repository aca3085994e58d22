"""Engine checks that must fail fast, before Ray starts, and the clean-up after killed runs."""

import pytest
import torch

from fedsec.errors import FedsecError
from fedsec.federation.engine import check_resources, ray_init_args
from fedsec.scenario import load_scenario

from .test_scenario import QUICKSTART


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_gpu_request_on_cpu_machine_is_a_clear_error():
    s = load_scenario(QUICKSTART, ["engine.num_gpus=0.25"])
    with pytest.raises(FedsecError, match=r"engine.num_gpus=0.25 .* no CUDA GPU"):
        check_resources(s)


def test_gpu_request_error_comes_before_ray(tmp_path):
    import fedsec

    if torch.cuda.is_available():
        pytest.skip("machine has a GPU")
    with pytest.raises(FedsecError, match="no CUDA GPU"):
        fedsec.run(QUICKSTART, overrides=["engine.num_gpus=0.5"], out=tmp_path, progress=False)


def test_more_cpus_than_the_machine_is_an_error():
    s = load_scenario(QUICKSTART, ["engine.num_cpus=4096"])
    with pytest.raises(FedsecError, match="engine.num_cpus=4096"):
        check_resources(s)


def test_ray_stays_on_loopback_or_joins_the_given_cluster():
    s = load_scenario(QUICKSTART)
    args = ray_init_args(s, verbose=False, temp_dir="/tmp/fedsec-ray-x")
    assert args["_node_ip_address"] == "127.0.0.1" and args["_temp_dir"] == "/tmp/fedsec-ray-x"
    joined = ray_init_args(load_scenario(QUICKSTART, ["engine.address=10.0.0.5:6379"]), False, None)
    assert joined["address"] == "10.0.0.5:6379" and "_temp_dir" not in joined and "num_cpus" not in joined


def test_fresh_run_into_used_folder_starts_clean(tmp_path):
    """A new run with --out pointing at an earlier run's folder must not append to its
    rounds.jsonl (it did: summaries then counted both runs' rounds)."""
    from fedsec.results import RunDir

    (tmp_path / "notes.txt").write_text("mine")
    d = RunDir(tmp_path)
    d.begin()
    d.append_round({"round": 1})
    d.write_summary({"status": "completed"})
    (tmp_path / "figures" / "old.png").write_bytes(b"x")
    d.write_manifest({"fedsec_results": 1, "status": "completed", "files": d.created_files()})
    assert d.has_results()
    d.clear()
    assert d.read_rounds() == [] and not (tmp_path / "summary.json").exists()
    assert not (tmp_path / "figures" / "old.png").exists() and (tmp_path / "figures").is_dir()
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_stale_ray_dirs_of_dead_runs_are_removed(tmp_path):
    import os
    import subprocess
    import sys

    from fedsec.federation.engine import remove_stale_ray_dirs

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid is now free (a recycled pid would only keep the dir: the safe side)
    for name, owner in [("fedsec-ray-dead", dead.pid), ("fedsec-ray-live", os.getpid()), ("fedsec-ray-new", None),
                        ("other-dead", dead.pid)]:
        (tmp_path / name).mkdir()
        if owner is not None:
            (tmp_path / name / "fedsec-owner").write_text(f"{owner}\n")
    assert remove_stale_ray_dirs(str(tmp_path)) == [str(tmp_path / "fedsec-ray-dead")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fedsec-ray-live", "fedsec-ray-new", "other-dead"]

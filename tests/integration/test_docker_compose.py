"""The per-role compose files a real consortium uses (docker/compose.operator.yaml at the
operator, docker/compose.hospital.yaml at each hospital): each stands alone, the SuperLink
address is a variable, a hospital mounts only its own data (read-only) and key, opens no
port, and the operator holds no patient data. No Docker engine needed; the schema check
uses docker-compose when installed (`.ci/run` installs Debian's)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
OPERATOR = ROOT / "docker" / "compose.operator.yaml"
HOSPITAL = ROOT / "docker" / "compose.hospital.yaml"
HOSPITAL_ENV = {"FEDSEC_IMAGE": "fedsec:test", "FEDSEC_SUPERLINK": "fl.example.org:8000", "FEDSEC_HOSPITAL": "va",
                "FEDSEC_PARTITION_ID": "3", "FEDSEC_NUM_PARTITIONS": "4", "FEDSEC_CERTS": "/srv/node",
                "FEDSEC_DATA": "/srv/data"}
OPERATOR_ENV = {"FEDSEC_IMAGE": "fedsec:test", "FEDSEC_CERTS": "/srv/op", "FEDSEC_RESULTS": "/srv/results"}


def _env(extra: dict) -> dict:
    # A clean environment: Debian's docker-compose is a system-Python script, and variables a
    # Ray run leaves in this process (PYTHONPATH) would make it import the venv's packages.
    keep = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
    return {**keep, **extra}


def _config(path: Path, env: dict) -> dict:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose not installed (apt-get install docker-compose)")
    res = subprocess.run([exe, "-f", str(path), "--profile", "check", "config"], capture_output=True, text=True,
                         env=_env(env), cwd=path.parent)
    assert res.returncode == 0, res.stderr
    return yaml.safe_load(res.stdout)


def test_hospital_file_stands_alone_with_its_own_data_key_and_no_port():
    doc = _config(HOSPITAL, HOSPITAL_ENV)
    node = doc["services"]["supernode"]
    assert "ports" not in node and "depends_on" not in node
    assert sorted(node["volumes"]) == ["/srv/data:/data:ro", "/srv/node:/certs:ro"]
    assert node["environment"]["SUPERLINK"] == "fl.example.org:8000"
    assert "partition-id=3 num-partitions=4" in node["environment"]["NODE_CONFIG"]
    script = node["command"][-1]
    for flag in ("--root-certificates /certs/ca.crt", "--auth-supernode-private-key /certs/node.key",
                 "clientapp-worker", "--pin-fab"):
        assert flag in script, flag
    check = doc["services"]["check-data"]
    assert check["network_mode"] == "none" and check["volumes"] == ["/srv/data:/data:ro"]
    assert "check-data" in check["command"] and "--hospital=va" in check["command"]


def test_hospital_file_refuses_to_start_without_the_superlink_address():
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose not installed")
    env = {k: v for k, v in HOSPITAL_ENV.items() if k != "FEDSEC_SUPERLINK"}
    res = subprocess.run([exe, "-f", str(HOSPITAL), "config"], capture_output=True, text=True,
                         env=_env(env))
    assert res.returncode != 0 and "FEDSEC_SUPERLINK" in res.stderr


def test_operator_file_publishes_one_port_and_holds_no_patient_data():
    doc = _config(OPERATOR, OPERATOR_ENV)
    assert list(doc["services"]) == ["superlink"]
    link = doc["services"]["superlink"]
    assert [str(p["target"]) if isinstance(p, dict) else str(p).split(":")[-1] for p in link["ports"]] == ["8000"]
    assert sorted(link["volumes"]) == ["/srv/op:/certs:ro", "/srv/results:/results:rw"]
    cmd = " ".join(link["command"])
    for flag in ("--ssl-certfile", "--ssl-keyfile", "--ssl-ca-certfile", "--enable-supernode-auth"):
        assert flag in cmd
    assert "--insecure" not in cmd

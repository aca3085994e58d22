"""One Ray run per task where an attack measurably changes the attack success rate, and a
robust rule reporting the hospitals it excluded."""

import json
from pathlib import Path

import pytest

import fedsec

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[2]


def rounds_of(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]


def test_cxr_model_replacement_plants_a_backdoor(tmp_path):
    fedsec.run(str(ROOT / "scenarios" / "integrity_cxr.yaml"),
               overrides=["federation.hospitals=4", "federation.rounds=3",
                          "attacks=[{preset: model_replacement, hospitals: [0], rounds: [3, 3]}]"],
               out=tmp_path, progress=False)
    asr = [r["attack"]["asr"] for r in rounds_of(tmp_path)]
    assert asr[1] < 0.2, "before the attack the trigger does nothing"
    assert asr[2] > 0.5 and asr[2] - asr[1] > 0.4, asr


def test_heart_ehr_backdoor_changes_asr(tmp_path):
    out = tmp_path / "fedavg"
    fedsec.run(str(ROOT / "scenarios" / "integrity_heart.yaml"),
               overrides=["federation.rounds=4",
                          "attacks=[{preset: ehr_trigger, hospitals: [3], boost: auto, rounds: [4, 4]}]"],
               out=out, progress=False)
    asr = [r["attack"]["asr"] for r in rounds_of(out)]
    assert asr[3] - asr[2] > 0.3, asr


def test_multi_krum_flags_the_byzantine_hospital_by_name(tmp_path):
    # Not FLAME on the 4 heart hospitals: HDBSCAN over 4 points is fragile and flagged the
    # small benign Switzerland site (30 patients) instead of the Gaussian one in round 1.
    fedsec.run(str(ROOT / "scenarios" / "integrity_cxr.yaml"),
               overrides=["federation.hospitals=6", "federation.rounds=1", "strategy=multi_krum",
                          "attacks=[{preset: gaussian, hospitals: [2]}]"],
               out=tmp_path, progress=False)
    assert [r["defense"]["flagged"] for r in rounds_of(tmp_path)] == [["hospital_2"]]

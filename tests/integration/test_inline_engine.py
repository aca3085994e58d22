"""The in-process engine gives bit-identical results to the Ray engine: every shipped scenario
(small enough with few rounds / hospitals via overrides), run on both, must write the same
rounds.jsonl (every metric, per hospital, attack and defense figures; only wall times may
differ) and the same final model, tensor for tensor."""

import json
from pathlib import Path

import pytest
import torch

import fedsec
from fedsec.results import RunDir

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[2]

# (shipped scenario, overrides that keep it small). Together they cover Flower's own FedAvg,
# robust rules with a colluding coalition (ALIE vs median), data / model poisoning with attack
# evaluation on the server, an observing server (gradient inversion), images and EHR.
CASES = [
    ("quickstart", ["federation.rounds=3"]),
    ("heart_fedavg", ["federation.rounds=2"]),
    ("heart_sweep", ["federation.rounds=2", "strategy=median"]),
    ("integrity_heart", ["federation.rounds=2", "attacks=[{preset: ehr_trigger, hospitals: [3], rounds: [1, 2]}]"]),
    ("cxr_fedavg", ["federation.hospitals=2", "federation.rounds=2"]),
    ("integrity_cxr", ["federation.hospitals=4", "federation.rounds=2",
                       "attacks=[{preset: model_replacement, hospitals: [0, 1], rounds: [1, 2]}]"]),
    ("integrity_cxr_fedsgd", ["federation.rounds=2"]),
    ("inversion_cxr", ["attacks=[{preset: inverting_gradients, target_hospital: 0, target_round: 1, iterations: 30}]"]),
    # simulated time, a stalling hospital waited for (its reply's simulated arrival comes from
    # its ClientApp), a maintenance window
    ("availability_heart", ["federation.rounds=2", "federation.participation.policy=wait",
                            "federation.participation.hospitals={hungary: {maintenance: [[2, 2]]}}"]),
]


def _records(out: Path) -> list[dict]:
    text = (out / "rounds.jsonl").read_text().replace(str(out), "<run>")
    rounds = [json.loads(line, parse_constant=str) for line in text.splitlines()]  # NaN == NaN as "NaN"
    for r in rounds:
        r.pop("time_s")
        for h in r.get("train", {}).values():
            h.pop("seconds")
        r.get("attack", {}).pop("seconds", None)  # the attack's own wall time (gradient inversion)
    return rounds


@pytest.mark.parametrize("name,overrides", CASES, ids=[c[0] for c in CASES])
def test_inline_engine_matches_ray_bit_for_bit(tmp_path, name, overrides):
    scenario = str(ROOT / "scenarios" / f"{name}.yaml")
    runs = {}
    for engine in ("ray", "inline"):
        out = tmp_path / engine
        summary = fedsec.run(scenario, overrides=overrides + [f"engine.name={engine}"], out=out, progress=False)
        assert summary["status"] == "completed", summary["error"]
        runs[engine] = (summary, _records(out), RunDir(out).load_checkpoint())
    (s_ray, r_ray, c_ray), (s_inl, r_inl, c_inl) = runs["ray"], runs["inline"]
    assert len(r_ray) == s_ray["rounds_planned"] >= 1
    assert r_inl == r_ray  # == on floats: bit-identical, not approximately equal
    same = lambda x: json.loads(json.dumps(x), parse_constant=str)  # noqa: E731
    attack = lambda s: same({k: v for k, v in s["attack"].items() if k != "seconds"})  # noqa: E731
    assert same(s_inl["final"]) == same(s_ray["final"]) and attack(s_inl) == attack(s_ray)
    assert c_inl["state"].keys() == c_ray["state"].keys()
    for k, v in c_ray["state"].items():
        assert torch.equal(c_inl["state"][k], v), k

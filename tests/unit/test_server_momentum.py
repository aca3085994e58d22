"""Server momentum (``strategy.server_momentum`` / ``server_lr``, FedAvgM's step after any rule)
and the round record's ``drift`` (the aggregate's shift along ALIE's -std direction), driven
through FedsecStrategy's round with hand-made replies as in test_server_strategy.py."""

import math

import numpy as np
import pytest
import torch

from fedsec.attacks import make_attack
from fedsec.errors import FedsecError, ScenarioError
from fedsec.scenario import load_scenario
from fedsec.strategies.drift import drift_along_minus_std

from .test_server_strategy import BENIGN, D, HEART, flat, make_strategy, plan, train_round
from .test_server_strategy import task_identity  # noqa: F401 - the autouse fixture

ROUNDS = [[np.random.default_rng([r, h]).normal(0.1 * (r + 1), 0.2, D) for h in range(4)] for r in range(3)]


def run(strategy, rounds=ROUNDS, start=1, g=None):
    """Chained rounds: each starts from the previous round's global model. -> the globals."""
    g = np.zeros(D, dtype=np.float32) if g is None else g
    out = []
    for r, updates in enumerate(rounds, start=start):
        arrays, _ = train_round(strategy, r, updates, g=g)
        g = flat(arrays)
        out.append(g)
    return out


@pytest.mark.parametrize("rule", ["fedavg", "median"])
def test_momentum_zero_and_lr_one_give_bit_identical_models(rule):
    plain = run(make_strategy(strategy={"rule": rule}))
    explicit = make_strategy(strategy={"rule": rule, "server_momentum": 0.0, "server_lr": 1.0})
    assert explicit.server_momentum is not None  # the step runs, and changes nothing
    for a, b in zip(plain, run(explicit)):
        assert np.array_equal(a, b)
    assert make_strategy(strategy={"rule": rule}).server_momentum is None


@pytest.mark.parametrize("lr", [1.0, 0.5])
def test_applied_step_is_eta_times_beta_delta1_plus_delta2(lr):
    beta = 0.9
    s = make_strategy(strategy={"rule": "fedavg", "server_momentum": beta, "server_lr": lr})
    g1, g2 = run(s, ROUNDS[:2])
    d1, d2 = np.mean(ROUNDS[0], axis=0), np.mean(ROUNDS[1], axis=0)  # FedAvg, equal sample counts
    np.testing.assert_allclose(g1, lr * d1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g2 - g1, lr * (beta * d1 + d2), rtol=1e-5, atol=1e-6)
    assert s._train_info["update_norm"] == pytest.approx(np.linalg.norm((g2 - g1).astype(np.float64)), rel=1e-6)
    # the same rule without momentum applies d2 alone in round 2
    plain = run(make_strategy(strategy={"rule": "fedavg"}), ROUNDS[:2])
    np.testing.assert_allclose(plain[1] - plain[0], d2, rtol=1e-5, atol=1e-6)


def test_velocity_is_in_the_server_state_so_a_resumed_run_matches():
    spec = {"rule": "median", "server_momentum": 0.9}
    ref = run(make_strategy(strategy=spec))
    first = make_strategy(strategy=spec)
    g = run(first, ROUNDS[:2])[-1]
    state = first.state_dict()
    assert torch.is_tensor(state["server_momentum"]["velocity"])
    resumed = make_strategy(strategy=spec)
    resumed.load_state_dict(state)
    assert np.array_equal(run(resumed, ROUNDS[2:], start=3, g=g)[0], ref[2])
    fresh = make_strategy(strategy=spec)  # without the velocity the third round differs
    assert not np.array_equal(run(fresh, ROUNDS[2:], start=3, g=g)[0], ref[2])
    with pytest.raises(FedsecError, match="checkpoint: written with strategy.server_momentum"):
        make_strategy(strategy={"rule": "median"}).load_state_dict(state)
    with pytest.raises(FedsecError, match="server_momentum 0.9 and server_lr 1.0, this scenario has 0.5"):
        make_strategy(strategy={"rule": "median", "server_momentum": 0.5}).load_state_dict(state)


@pytest.mark.parametrize("key, value, message", [
    ("server_momentum", 1.0, r"strategy.server_momentum': must be in \[0, 1\)"),
    ("server_momentum", -0.1, r"strategy.server_momentum': must be in \[0, 1\)"),
    ("server_lr", 0.0, "strategy.server_lr': must be positive"),
    ("server_momentum", "fast", "strategy.server_momentum': must be a number"),
])
def test_bad_values_name_the_key(key, value, message):
    with pytest.raises(ScenarioError, match=message):
        load_scenario(str(HEART), {"strategy": {"rule": "krum", key: value}})
    # valid values go to the server, not to the rule (krum has no such option)
    s = load_scenario(str(HEART), {"strategy": {"rule": "krum", "server_momentum": 0.9, "server_lr": 0.5}})
    assert s.strategy["server_momentum"] == 0.9


# ---- drift along -std ------------------------------------------------------------------------

def test_drift_of_a_hand_built_round():
    # benign rows 0 and 1: mean (1, 2), unbiased std (sqrt 2, 2 sqrt 2), ||s|| = sqrt 10;
    # row 2 (malicious) is left out of the statistics. aggregate (0, 1): e = (-1, -1),
    # <e, -s> = 3 sqrt 2, so along = 3 sqrt 2 / sqrt 10 = 3 / sqrt 5.
    updates = torch.tensor([[0.0, 0.0], [2.0, 4.0], [-50.0, 7.0]])
    out = drift_along_minus_std(updates, [0, 1], torch.tensor([0.0, 1.0]))
    assert out["along_minus_std"] == pytest.approx(3 / math.sqrt(5))
    assert out["std_units"] == pytest.approx(3 * math.sqrt(2) / 10)
    assert out["cosine"] == pytest.approx(3 / math.sqrt(10))
    assert out["deviation_norm"] == pytest.approx(math.sqrt(2)) and out["std_norm"] == pytest.approx(math.sqrt(10))
    assert out["benign"] == 2
    assert drift_along_minus_std(updates, [0], torch.zeros(2)) is None  # one benign row: no spread


def test_round_record_drift_under_alie_and_its_running_sum():
    """ALIE from hospital 3 under FedAvg: the aggregate is the benign mean minus z std / 4, so
    the drift is z / 4 in std units, along -std exactly (cosine 1), and adds up over rounds."""
    z = 1.5
    s = make_strategy([plan(make_attack("alie", z=z), [3])], strategy={"rule": "fedavg"})
    total = 0.0
    for r, updates in enumerate(ROUNDS[:2], start=1):
        train_round(s, r, updates)
        drift = s._train_info["drift"]
        benign = np.array(updates[:3], dtype=np.float32).astype(np.float64)
        std = benign.std(axis=0, ddof=1)
        assert drift["std_units"] == pytest.approx(z / 4, rel=1e-4)
        assert drift["cosine"] == pytest.approx(1.0, rel=1e-5)
        assert drift["along_minus_std"] == pytest.approx(z / 4 * np.linalg.norm(std), rel=1e-4)
        assert drift["benign"] == 3
        total += drift["along_minus_std"]
        assert drift["cumulative"] == pytest.approx(total)
    assert s.state_dict()["drift"]["cumulative"] == pytest.approx(total)
    # without an attack every row is benign, and FedAvg's aggregate is their mean: no drift
    clean = make_strategy(strategy={"rule": "fedavg"})
    train_round(clean, 1, BENIGN)
    assert clean._train_info["drift"]["benign"] == 4
    assert abs(clean._train_info["drift"]["along_minus_std"]) < 1e-6

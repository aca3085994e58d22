"""Free-riders send what they declare (update 0, a replay, noise of the declared sigma);
the free-rider filter flags them and leaves honest updates in the mean; Sybils send one
update under k identities, which FoolsGold zeroes and FedAvg does not."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from fedsec.attacks import make_attack
from fedsec.attacks.base import AttackContext
from fedsec.errors import ScenarioError
from fedsec.federation.adversary import AttackPlan, forge_updates
from fedsec.strategies.base import RuleContext
from fedsec.strategies.freerider import random_cosine_threshold
from fedsec.strategies.rules import make_rule

HEART = Path(__file__).resolve().parents[2] / "scenarios" / "heart_fedavg.yaml"


def _ctx(r=1, seed=0, **kw):
    return AttackContext(server_round=r, hospital=0, malicious=[0], num_hospitals=4,
                         generator=torch.Generator().manual_seed(seed), **kw)


# ---- what each free-rider sends ------------------------------------------------------------

def test_plain_free_rider_sends_the_global_model_unchanged():
    g, local = torch.randn(1000), torch.randn(1000)
    sent = make_attack("free_rider").poison_update(g, local, _ctx())
    assert torch.equal(sent, g) and float((sent - g).norm()) == 0.0


@pytest.mark.parametrize("r,decay", [(1, 0.0), (9, 0.5), (16, 1.0)])
def test_disguised_free_rider_sends_noise_of_the_declared_sigma(r, decay):
    g, local = torch.randn(200_000), torch.randn(200_000)
    attack = make_attack("free_rider", mode="disguised", sigma=0.05, decay=decay)
    update = attack.poison_update(g, local, _ctx(r)) - g
    expected = 0.05 * r ** -decay
    assert attack.sigma_at(r) == pytest.approx(expected)
    # the sample std of 200,000 draws is within 1 % of sigma (its sd is sigma / sqrt(2n) ~ 0.16 %)
    assert float(update.double().std()) == pytest.approx(expected, rel=0.01)
    assert abs(float(update.double().mean())) < 5 * expected / math.sqrt(200_000)
    assert abs(float(torch.nn.functional.cosine_similarity(update, local - g, dim=0))) < 0.02  # not its training
    again = attack.poison_update(g, local, _ctx(r)) - g
    assert torch.equal(update, again)  # seeded by (seed, round, hospital)


def _plan(attack, hospitals):
    return AttackPlan(index=0, name=attack.name, attack=attack, hospitals=hospitals, first_round=1, last_round=99,
                      only_when_selected=False, entry={})


def test_stale_free_rider_sends_the_last_global_change():
    attack = make_attack("stale_free_rider", source="global_delta")
    plan = _plan(attack, [2])
    g = [torch.randn(50, dtype=torch.float64) for _ in range(3)]
    sent = []
    for r, gr in enumerate(g, start=1):
        updates = torch.randn(4, 50, dtype=torch.float64)
        honest = updates[2].clone()
        forge_updates([plan], r, [0, 1, 2, 3], updates, num_hospitals=4, extra={"global_params": gr})
        assert not torch.equal(updates[2], honest)
        sent.append(updates[2].clone())
    assert float(sent[0].norm()) == 0.0  # round 1: no change known yet, the global model back
    torch.testing.assert_close(sent[1], g[1] - g[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(sent[2], g[2] - g[1], rtol=0, atol=1e-12)
    # the memory is in the checkpoint: a restored attack continues exactly
    restored = make_attack("stale_free_rider", source="global_delta")
    restored.load_state_dict(attack.state_dict())
    u = torch.zeros(4, 50, dtype=torch.float64)
    forge_updates([_plan(restored, [2])], 4, [0, 1, 2, 3], u, num_hospitals=4, extra={"global_params": g[0]})
    torch.testing.assert_close(u[2], g[0] - g[2], rtol=0, atol=1e-12)


def test_stale_free_rider_with_noise_adds_the_declared_sigma():
    attack = make_attack("stale_free_rider", source="global_delta", noise=0.01)
    plan = _plan(attack, [1])
    g0, g1 = torch.zeros(100_000, dtype=torch.float64), torch.full((100_000,), 0.5, dtype=torch.float64)
    for r, gr in ((1, g0), (2, g1)):
        u = torch.zeros(3, 100_000, dtype=torch.float64)
        forge_updates([plan], r, [0, 1, 2], u, num_hospitals=3, generator=torch.Generator().manual_seed(r),
                      extra={"global_params": gr})
    assert float((u[1] - 0.5).std()) == pytest.approx(0.01, rel=0.02)


def test_own_stale_free_rider_replays_its_first_update():
    attack = make_attack("stale_free_rider", source="own")
    plan = _plan(attack, [0, 3])
    first = None
    for r in (1, 2, 3):
        updates = torch.randn(4, 20, generator=torch.Generator().manual_seed(r))
        honest = updates.clone()
        forge_updates([plan], r, [0, 1, 2, 3], updates, num_hospitals=4, extra={"global_params": torch.zeros(20)})
        if first is None:
            first = honest[[0, 3]].clone()
            assert torch.equal(updates, honest)  # round 1: its own honest update
        assert torch.equal(updates[[0, 3]], first)  # each identity its own first update
        assert torch.equal(updates[[1, 2]], honest[[1, 2]])


def test_free_rider_options_are_checked():
    with pytest.raises(ScenarioError, match="mode"):
        make_attack("free_rider", mode="lazy")
    with pytest.raises(ScenarioError, match="sigma"):
        make_attack("free_rider", mode="disguised", sigma=-1.0)
    with pytest.raises(ScenarioError, match="source"):
        make_attack("stale_free_rider", source="yesterday")


# ---- Sybils ----------------------------------------------------------------------------------

def test_sybils_send_one_update_and_foolsgold_zeroes_them_where_fedavg_does_not():
    g = torch.Generator().manual_seed(3)
    d = 500
    honest = torch.randn(4, d, generator=g, dtype=torch.float64)
    flip = -honest.mean(0) + 0.3 * torch.randn(3, d, generator=g, dtype=torch.float64)  # 3 poisoned identities
    updates = torch.cat([honest, flip])
    ids = list(range(7))
    sybil = make_attack("sybil")
    forge_updates([_plan(sybil, [4, 5, 6])], 1, ids, updates, num_hospitals=7)
    assert torch.equal(updates[4], updates[5]) and torch.equal(updates[5], updates[6])
    torch.testing.assert_close(updates[4], flip.mean(0))
    weights = torch.ones(7, dtype=torch.float64)
    fg = make_rule("foolsgold")(updates, weights, RuleContext(client_ids=ids))
    w = fg.info["weights"]
    assert w[4:] == [0.0, 0.0, 0.0] and min(w[:4]) > 0.5
    assert sorted(fg.flagged) == [4, 5, 6]
    assert make_rule("fedavg")(updates, weights, RuleContext()).flagged == []  # FedAvg: 3/7 of the mean

    # near-identical copies (noise 5 % of the norm): still zeroed by FoolsGold
    updates = torch.cat([honest, flip])
    near = make_attack("sybil", noise=0.05)
    forge_updates([_plan(near, [4, 5, 6])], 1, ids, updates, num_hospitals=7, generator=torch.Generator().manual_seed(1))
    rel = float((updates[4] - updates[5]).norm() / updates[4].norm())
    assert 0.05 < rel < 0.1  # two independent 5 % perturbations: ~7 % apart
    w = make_rule("foolsgold")(updates, weights, RuleContext(client_ids=ids)).info["weights"]
    assert max(w[4:]) == 0.0 and min(w[:4]) > 0.5


# ---- the free-rider filter ---------------------------------------------------------------------

def test_random_cosine_threshold_has_the_stated_level():
    d, alpha = 22, 0.01
    t = random_cosine_threshold(d, alpha)
    x = torch.randn(200_000, d, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    cos = x[:, 0] / x.norm(dim=1)  # cosine of a random direction with e_1
    assert float((cos.abs() > t).double().mean()) == pytest.approx(alpha, abs=0.0015)
    assert random_cosine_threshold(10_000, 0.01) == pytest.approx(2.576 / 100, rel=0.01)


def test_filter_flags_zero_stale_and_noise_updates_and_averages_the_rest():
    gen = torch.Generator().manual_seed(7)
    d = 400
    rule = make_rule("freerider_filter")
    direction = torch.randn(d, generator=gen, dtype=torch.float64)
    g = torch.zeros(d, dtype=torch.float64)
    weights = torch.tensor([100.0, 50.0, 30.0, 20.0, 10.0, 40.0], dtype=torch.float64)
    ids = [0, 1, 2, 3, 4, 5]
    prev_delta, replay = None, None
    for r in range(1, 6):
        honest = direction + 0.5 * torch.randn(3, d, generator=gen, dtype=torch.float64)
        rows = [honest[0], honest[1], honest[2],
                torch.zeros(d, dtype=torch.float64),  # plain free-rider
                prev_delta if prev_delta is not None else torch.zeros(d, dtype=torch.float64),  # delta weights
                0.05 * torch.randn(d, generator=gen, dtype=torch.float64)]  # disguised
        updates = torch.stack(rows)
        res = rule(updates, weights, RuleContext(global_params=g, client_ids=ids, server_round=r))
        expected_flags = [3, 4] + ([5] if r > 1 else [])  # noise is judged from a hospital's 2nd update
        assert res.flagged == expected_flags, r
        keep = [0, 1, 2] + ([] if r > 1 else [5])
        w = weights[keep] / weights[keep].sum()
        torch.testing.assert_close(res.update, w @ updates[keep])
        assert res.info["zero"] == 1 + (r == 1) and res.info["stale"] == (r > 1) and res.info["noise"] == (r > 1)
        prev_delta = res.update.clone()
        g = g + res.update
    # a replay of its own earlier update is stale as well
    state = rule.state_dict()
    replay = state["last"][1].clone()
    updates = torch.stack([direction + 0.5 * torch.randn(d, generator=gen, dtype=torch.float64), replay])
    res = rule(updates, weights[:2], RuleContext(global_params=g, client_ids=[0, 1], server_round=6))
    assert res.flagged == [1] and res.info["stale"] == 1
    # the checkpointed state gives the same decisions
    twin = make_rule("freerider_filter")
    twin.load_state_dict(state)
    again = twin(updates, weights[:2], RuleContext(global_params=g, client_ids=[0, 1], server_round=6))
    assert again.flagged == [1] and torch.equal(again.update, res.update)


def test_filter_options_are_checked():
    with pytest.raises(ScenarioError, match="alpha"):
        make_rule("freerider_filter", alpha=1.5)
    with pytest.raises(ScenarioError, match="tests"):
        make_rule("freerider_filter", tests=["zero", "lazy"])
    rule = make_rule("freerider_filter", tests=["zero"])
    updates = torch.stack([torch.ones(5), torch.zeros(5)])
    assert rule(updates, torch.ones(2), RuleContext()).flagged == [1]


# ---- on heart-disease, in process ----------------------------------------------------------------

def test_free_riders_on_heart_are_flagged_and_honest_hospitals_are_not(tmp_path):
    """Hungary returns the global model, Switzerland the last global change (delta weights),
    VA noise (sigma 0.05 / sqrt(round)); Cleveland trains. 8 rounds, seed 0, inline engine."""
    import fedsec

    attacks = ("[{preset: free_rider, hospitals: [1]}, {preset: free_rider_stale, hospitals: [2]}, "
               "{preset: free_rider_noise, hospitals: [3]}]")
    fedsec.run(str(HEART), overrides=["engine.name=inline", "federation.rounds=8", "strategy=freerider_filter",
                                      f"attacks={attacks}"], out=tmp_path, progress=False)
    rounds = [json.loads(line) for line in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    flagged = [set(r["defense"]["flagged"]) for r in rounds]
    assert all("cleveland" not in f for f in flagged)  # the honest hospital is never flagged
    assert all({"hungary", "switzerland"} <= f for f in flagged)  # every round, from round 1
    assert sum("va" in f for f in flagged[1:]) >= 6  # noise: from its 2nd round, 6 of 7 at least
    # free-riders still report their sample counts (FedAvg would weight them)
    assert {h: rounds[0]["train"][h]["num_examples"] for h in ("hungary", "switzerland", "va")} == \
        {"hungary": 172, "switzerland": 30, "va": 85}
    assert rounds[0]["defense"]["zero"] == 2  # round 1: hungary, and switzerland (no change known yet)
    assert all(r["defense"]["stale"] == 1 for r in rounds[1:])

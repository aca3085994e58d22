"""FedsecStrategy's round, step by step, driven as Flower tests its own strategies: call
``configure_train`` / ``aggregate_train`` with hand-made ``Message`` replies (no Ray, no
Grid). Covers selection, dropped replies, the coalition, the order clipping -> observers ->
rule -> noise (docs/design.md, "The server's round"), ``update_norm`` and the state a
checkpoint carries."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from fedsec.attacks import make_attack
from fedsec.attacks.base import Attack
from fedsec.errors import FedsecError
from fedsec.federation.adversary import AttackPlan
from fedsec.federation.server_app import FedsecStrategy, ServerTask
from fedsec.privacy.central_dp import wrap_central_dp
from fedsec.scenario import load_scenario

ROOT = Path(__file__).resolve().parents[2]
HEART = ROOT / "scenarios" / "heart_fedavg.yaml"
NAMES = ["cleveland", "hungary", "switzerland", "va"]
D = 7  # "w" (6) + "b" (1)


@pytest.fixture(autouse=True)
def task_identity():
    """Flower stamps instruction messages with the running task's identity (the ServerApp
    process sets it); set one for messages built outside a run."""
    from flwr.supercore.task_identity import TaskIdentity

    old = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = old


class Recorder(Attack):
    """A curious server: records what ``observe`` is shown."""

    name = "recorder"
    goal = "confidentiality"
    kind = "inversion"

    def __init__(self, **options):
        super().__init__(**options)
        self.seen = []

    def observe(self, server_round, updates, aggregate, global_params, ctx):
        self.seen.append((server_round, None if updates is None else {h: u.clone() for h, u in updates.items()},
                          aggregate.clone()))
        return {"observed": 1.0}


def plan(attack, hospitals, rounds=(1, 100), index=0):
    return AttackPlan(index=index, name=attack.name, attack=attack, hospitals=list(hospitals),
                      first_round=rounds[0], last_round=rounds[1], only_when_selected=False, entry={})


def make_strategy(plans=(), run_dir=None, **overrides):
    scenario = load_scenario(str(HEART), overrides or None)
    s = FedsecStrategy(scenario, NAMES, list(plans), ServerTask(scenario, None), run_dir=run_dir)
    s.bind_nodes({100 + h: h for h in range(4)})  # node id -> hospital
    return s


def global_arrays(values=None):
    v = np.zeros(D, dtype=np.float32) if values is None else np.asarray(values, dtype=np.float32)
    return ArrayRecord({"w": Array(v[:-1].copy()), "b": Array(v[-1:].copy())})


def reply(msg, update, g=None, examples=10, hospital=None):
    """What a hospital sends back: global + update, with fedsec's metrics."""
    h = msg.metadata.dst_node_id - 100 if hospital is None else hospital
    local = (np.zeros(D) if g is None else np.asarray(g)) + np.asarray(update, dtype=np.float64)
    metrics = MetricRecord({"num-examples": examples, "hospital": h, "train_loss": 0.5, "seconds": 0.1})
    return Message(RecordDict({"arrays": global_arrays(local), "metrics": metrics}), reply_to=msg)


def flat(record):
    return np.concatenate([np.asarray(a).ravel() for a in record.to_numpy_ndarrays()])


def train_round(strategy, rnd, updates, g=None, examples=(10, 10, 10, 10), outer=None):
    """One training round: configure, one reply per selected hospital, aggregate.
    updates: {hospital: update} (or a list indexed by hospital) -> (new global, messages)."""
    outer = outer or strategy
    msgs = list(outer.configure_train(rnd, global_arrays(g), ConfigRecord({}), None))
    replies = [reply(m, updates[m.metadata.dst_node_id - 100], g, examples[m.metadata.dst_node_id - 100])
               for m in msgs]
    arrays, _ = outer.aggregate_train(rnd, replies)
    return arrays, msgs


BENIGN = [np.random.default_rng(h).normal(0.2, 0.1, D) for h in range(4)]


# ---- selection ----------------------------------------------------------------------------

def test_selection_is_seeded_by_round_and_attackers_join_every_active_round():
    def selected(seed, rnd, plans=()):
        s = make_strategy(plans, seed=seed, federation={"fraction_train": 0.5})
        msgs = s.configure_train(rnd, global_arrays(), ConfigRecord({}), None)
        return sorted(m.metadata.dst_node_id - 100 for m in msgs)

    picks = [selected(0, r) for r in range(1, 9)]
    assert all(len(p) == 2 for p in picks)
    assert picks == [selected(0, r) for r in range(1, 9)]  # same seed, same rounds: same hospitals
    assert len({tuple(p) for p in picks}) > 1  # the round changes the draw
    assert [selected(1, r) for r in range(1, 9)] != picks  # so does the seed
    # a coalition of hospitals 2 and 3 active in rounds 3-4 is added to the draw there only
    ipm = plan(make_attack("ipm"), [2, 3], rounds=(3, 4))
    with_attack = [selected(0, r, [ipm]) for r in range(1, 9)]
    for r, (p, q) in enumerate(zip(picks, with_attack), start=1):
        assert q == (sorted(set(p) | {2, 3}) if r in (3, 4) else p)


# ---- dropped replies ---------------------------------------------------------------------

def test_failed_and_non_finite_replies_are_dropped_and_named():
    s = make_strategy(federation={"min_hospitals": 2})
    msgs = list(s.configure_train(1, global_arrays(), ConfigRecord({}), None))
    nan = BENIGN[2].copy()
    nan[3] = np.nan
    replies = [reply(msgs[0], BENIGN[0]), reply(msgs[1], BENIGN[1]), reply(msgs[2], nan),
               Message(Error(code=0, reason="disk full"), reply_to=msgs[3])]
    arrays, _ = s.aggregate_train(1, replies)
    failures = s._train_info["failures"]
    assert "va: disk full" in failures
    assert any(f.startswith("switzerland: its update has NaN or infinite values") for f in failures)
    assert sorted(s._train_info["train"]) == ["cleveland", "hungary"]
    np.testing.assert_allclose(flat(arrays), (BENIGN[0] + BENIGN[1]) / 2, rtol=1e-6)

    # a hospital that does not answer is named too; below min_hospitals the run fails, naming all
    strict = make_strategy(federation={"min_hospitals": 3})
    msgs = list(strict.configure_train(1, global_arrays(), ConfigRecord({}), None))
    with pytest.raises(FedsecError, match=r"(?s)round 1: 2 of 4 hospitals failed during training.*"
                                          r"va: no reply within.*switzerland: its update has NaN"):
        strict.aggregate_train(1, [reply(msgs[0], BENIGN[0]), reply(msgs[1], BENIGN[1]), reply(msgs[2], nan)])


# ---- the coalition and what follows it ------------------------------------------------------

def test_collusion_rewrites_exactly_the_malicious_replies():
    rec = Recorder()
    s = make_strategy([plan(make_attack("ipm", eps=2.0), [2, 3]), plan(rec, [], index=1)])
    arrays, _ = train_round(s, 1, BENIGN)
    _, seen, _ = rec.seen[0]
    forged = -2.0 * (BENIGN[0] + BENIGN[1]) / 2
    for h in (0, 1):  # benign rows untouched
        np.testing.assert_allclose(seen[h].numpy(), BENIGN[h], rtol=1e-6)
    for h in (2, 3):  # malicious rows forged from the benign ones, their own updates dropped
        np.testing.assert_allclose(seen[h].numpy(), forged, rtol=1e-5)
    np.testing.assert_allclose(flat(arrays), (BENIGN[0] + BENIGN[1] + 2 * forged) / 4, rtol=1e-5, atol=1e-7)
    # outside the coalition's window nothing is forged
    late = make_strategy([plan(make_attack("ipm", eps=2.0), [2, 3], rounds=(1, 1))])
    arrays, _ = train_round(late, 2, BENIGN)
    np.testing.assert_allclose(flat(arrays), np.mean(BENIGN, axis=0), rtol=1e-6)


def test_clipping_happens_after_collusion_ipm_update_norm_at_most_the_clipping_norm():
    """The required test: IPM from 2 colluding hospitals, central DP with fixed clipping 1.0
    and no noise: every round's applied update has norm <= 1.0."""
    big = [u * 30 for u in BENIGN]  # benign updates well above the clipping norm

    def rounds(dp: bool):
        s = make_strategy([plan(make_attack("ipm", eps=10.0), [2, 3])])
        outer = wrap_central_dp(s, {"noise_multiplier": 0.0, "clipping_norm": 1.0}, 4) if dp else s
        g, norms = np.zeros(D), []
        for r in range(1, 6):
            arrays, _ = train_round(s, r, big, g, outer=outer)
            new = flat(arrays)
            norms.append(s._train_info["update_norm"])
            assert norms[-1] == pytest.approx(np.linalg.norm(new.astype(np.float64) - g), rel=1e-6)
            g = new.astype(np.float64)
        return s, norms

    s, clipped = rounds(dp=True)
    assert all(n <= 1.0 + 1e-6 for n in clipped), clipped
    info = s._train_info["privacy"]["central_dp"]
    assert sorted(info["clipped"]) == NAMES  # the forged updates (norm ~ 10 x mean) were clipped too
    assert info["update_norms"]["va"] > 50
    _, unclipped = rounds(dp=False)
    assert min(unclipped) > 50  # without clipping the coalition moves the model far


def test_observers_see_the_received_updates_before_clipping():
    rec = Recorder()
    s = make_strategy([plan(make_attack("ipm", eps=10.0), [3]), plan(rec, [], index=1)])
    wrap_central_dp(s, {"noise_multiplier": 0.0, "clipping_norm": 0.5}, 4)
    big = [u * 10 for u in BENIGN]
    train_round(s, 1, big)
    _, seen, aggregate = rec.seen[0]
    for h in (0, 1, 2):
        np.testing.assert_allclose(seen[h].numpy(), big[h], rtol=1e-6)  # not clipped to 0.5
    forged = -10.0 * np.mean(big[:3], axis=0)
    np.testing.assert_allclose(seen[3].numpy(), forged, rtol=1e-5)  # the forged update, as received
    np.testing.assert_allclose(aggregate.numpy(), (sum(big[:3]) + forged) / 4, rtol=1e-5, atol=1e-6)
    assert s._train_info["attack"] == {"observed": 1.0}


def test_under_secure_aggregation_observers_see_only_the_aggregate():
    """SecAggPlusStrategy hands FedsecStrategy one reply per hospital carrying the aggregate
    and marks the strategy: observers get no per-hospital update, the aggregate is applied as
    is (see test_secagg.py for the protocol itself)."""
    from fedsec.privacy.secagg import wrap_secagg

    rec = Recorder()
    s = make_strategy([plan(rec, [])])
    wrap_secagg(s, True, max_weight=10)
    assert s.sees_individual_updates is False
    msgs = list(s.configure_train(1, global_arrays(), ConfigRecord({}), None))
    aggregate = np.mean(BENIGN, axis=0)
    arrays, _ = s.aggregate_train(1, [reply(m, aggregate) for m in msgs])
    _, seen, agg = rec.seen[0]
    assert seen is None
    np.testing.assert_allclose(agg.numpy(), aggregate, rtol=1e-6)
    np.testing.assert_array_equal(flat(arrays), flat(global_arrays(aggregate)))


def test_noise_is_added_after_the_rule_and_recorded():
    s = make_strategy()
    wrap_central_dp(s, {"noise_multiplier": 1.0, "clipping_norm": 1.0}, 4, seed=3)
    arrays, _ = train_round(s, 1, BENIGN)
    info = s._train_info["privacy"]["central_dp"]
    assert info["noise_std"] == pytest.approx(1.0 * 1.0 / 4)
    clean = np.mean([u * min(1.0, 1.0 / np.linalg.norm(u)) for u in BENIGN], axis=0)
    noise = flat(arrays) - clean
    assert np.abs(noise).max() > 1e-3  # noisy
    assert s._train_info["update_norm"] == pytest.approx(np.linalg.norm(flat(arrays).astype(np.float64)), rel=1e-6)


# ---- state that carries over (checkpoint) -----------------------------------------------------

@pytest.mark.parametrize("rule", [{"rule": "centered_clipping", "tau": 0.1}, {"rule": "foolsgold"}])
def test_rule_state_round_trips_so_the_next_round_matches(rule):
    rounds = [[np.random.default_rng([r, h]).normal(0.0, 0.2, D) for h in range(4)] for r in range(4)]
    for r in (0, 1):  # two sybils in the first rounds: FoolsGold's history remembers them
        rounds[r][2] = rounds[r][3] = 5 * rounds[r][2]
    ref = make_strategy(strategy=rule)
    out = [flat(train_round(ref, r + 1, rounds[r])[0]) for r in range(4)]

    first = make_strategy(strategy=rule)
    for r in range(2):
        train_round(first, r + 1, rounds[r])
    state = first.state_dict()
    assert state["rule"]["name"] == rule["rule"] and state["rule"]["state"]
    resumed = make_strategy(strategy=rule)
    resumed.load_state_dict(state)
    for r in range(2, 4):
        np.testing.assert_array_equal(flat(train_round(resumed, r + 1, rounds[r])[0]), out[r])
    fresh = make_strategy(strategy=rule)  # without the state the third round differs
    assert not np.array_equal(flat(train_round(fresh, 3, rounds[2])[0]), out[2])


def test_state_from_another_scenario_is_refused():
    state = make_strategy(strategy={"rule": "foolsgold"}).state_dict()
    with pytest.raises(FedsecError, match="checkpoint: written with aggregation rule 'foolsgold'"):
        make_strategy(strategy={"rule": "centered_clipping"}).load_state_dict(state)
    with pytest.raises(FedsecError, match=r"checkpoint: written with attacks \[\]"):
        make_strategy([plan(make_attack("ipm"), [3])]).load_state_dict(make_strategy().state_dict())


def test_central_dp_state_round_trips():
    cfg = {"mode": "adaptive", "noise_multiplier": 0.0, "clipping_norm": 0.1, "clip_norm_lr": 0.5}
    s = make_strategy()
    wrap_central_dp(s, cfg, 4)
    for r in range(1, 4):
        train_round(s, r, BENIGN)
    state = s.state_dict()["central_dp"]
    assert state["clipping_norm"] != 0.1 and len(state["history"]) == 3
    t = make_strategy()
    dp = wrap_central_dp(t, cfg, 4)
    t.load_state_dict(json.loads(json.dumps(s.state_dict(), default=float)) | {"rule": s.state_dict()["rule"]})
    assert dp.clipping_norm == s.central_dp.clipping_norm and dp.privacy_spent() == s.central_dp.privacy_spent()


def test_checkpoint_holds_the_server_state(tmp_path):
    from fedsec.results import RunDir

    run_dir = RunDir(tmp_path)
    center = torch.arange(3.0)
    run_dir.save_checkpoint(4, {"w": torch.zeros(2)}, {"rule": {"name": "centered_clipping",
                                                                "state": {"center": center}}})
    ckpt = run_dir.load_checkpoint()
    assert ckpt["round"] == 4 and ckpt["format"] == 2
    assert torch.equal(ckpt["server"]["rule"]["state"]["center"], center)
    torch.save({"round": 1, "state": {}}, tmp_path / "checkpoint.pt")  # written before the server state
    assert run_dir.load_checkpoint()["server"] is None
    torch.save([1, 2], tmp_path / "checkpoint.pt")
    with pytest.raises(FedsecError, match="not a fedsec checkpoint"):
        run_dir.load_checkpoint()


# ---- the same on Ray ------------------------------------------------------------------------

@pytest.mark.ray
def test_ipm_under_central_dp_clipping_on_ray(tmp_path):
    """The required property on the real engine: 2 colluding hospitals (IPM, eps 10), central
    DP fixed clipping 1.0, no noise -> every applied update has norm <= 1.0."""
    import fedsec

    overrides = ["federation.rounds=2", "attacks=[{attack: ipm, eps: 10.0, hospitals: [2, 3]}]",
                 "privacy.central_dp={noise_multiplier: 0.0, clipping_norm: 1.0}"]
    fedsec.run(str(HEART), overrides=overrides, out=tmp_path, progress=False)
    rounds = [json.loads(x) for x in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(0 < r["update_norm"] <= 1.0 + 1e-6 for r in rounds), [r["update_norm"] for r in rounds]
    assert all({"switzerland", "va"} <= set(r["privacy"]["central_dp"]["clipped"]) for r in rounds)

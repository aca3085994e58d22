"""Central (hospital-level) DP: Flower's DP wrappers around fedsec's FedsecStrategy, driven
with fake Flower Messages (an instruction per hospital, then ``Message(content, reply_to=...)``
as a ClientApp would answer) -- no Ray, no Grid."""

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from opacus.accountants import RDPAccountant

from fedsec.errors import FedsecError
from fedsec.federation.server_app import FedsecStrategy, ServerTask
from fedsec.privacy.central_dp import CentralDPConfig, clipping_mod, num_sampled, wrap_central_dp
from fedsec.scenario import load_scenario

ROOT = Path(__file__).resolve().parents[2]
HEART = ROOT / "scenarios" / "heart_fedavg.yaml"
NAMES = ["cleveland", "hungary", "switzerland", "va"]


@pytest.fixture(autouse=True)
def task_identity():
    """Flower stamps instruction messages with the running task's identity (the ServerApp
    process sets it); set one for messages built outside a run."""
    from flwr.supercore.task_identity import TaskIdentity

    old = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = old


class RecordingStrategy(FedsecStrategy):
    """FedsecStrategy with the ``add_round_info`` hook the wiring adds (collects, no files)."""

    def add_round_info(self, section, info):
        self._train_info.setdefault(section, {}).update(info)


def make_strategy(strategy=None, **fed):
    overrides = {"federation": fed} if fed else {}
    if strategy is not None:
        overrides["strategy"] = strategy
    scenario = load_scenario(str(HEART), overrides or None)
    s = RecordingStrategy(scenario, NAMES, [], ServerTask(scenario, None))
    s.bind_nodes({100 + h: h for h in range(4)})  # node id -> hospital
    return s


def global_arrays(d=6):
    return ArrayRecord({"w": Array(np.zeros(d, dtype=np.float32)), "b": Array(np.zeros(1, dtype=np.float32))})


def replies_for(instructions, updates, examples=(10, 10, 10, 10)):
    """One reply per instruction: global (zeros) + update, as a hospital would send back."""
    out = []
    for i, msg in enumerate(instructions):
        h = msg.metadata.dst_node_id - 100
        u = np.asarray(updates[h], dtype=np.float32)
        arrays = ArrayRecord({"w": Array(u[:-1].copy()), "b": Array(u[-1:].copy())})
        metrics = MetricRecord({"num-examples": examples[h], "hospital": h, "train_loss": 0.5, "seconds": 0.1})
        out.append(Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg))
    return out


def run_round(wrapper, rnd, updates, examples=(10, 10, 10, 10), d=6):
    msgs = list(wrapper.configure_train(rnd, global_arrays(d), ConfigRecord({}), None))
    replies = replies_for(msgs, updates, examples)
    arrays, _ = wrapper.aggregate_train(rnd, replies)
    return arrays, replies


def flat(record):
    return np.concatenate([np.asarray(a).ravel() for a in record.to_numpy_ndarrays()])


def test_options_are_checked_and_named():
    with pytest.raises(FedsecError,
                       match=r"privacy\.central_dp\.clipping_nrom: unknown option; did you mean 'clipping_norm'"):
        CentralDPConfig.parse({"noise_multiplier": 1.0, "clipping_nrom": 1.0})
    with pytest.raises(FedsecError, match="exactly one of noise_multiplier or target_epsilon"):
        CentralDPConfig.parse({"clipping_norm": 1.0})
    with pytest.raises(FedsecError, match=r"privacy\.central_dp\.mode"):
        CentralDPConfig.parse({"noise_multiplier": 1.0, "mode": "sometimes"})
    assert num_sampled(0.5, 4) == 2 and num_sampled(1.0, 4) == 4 and num_sampled(0.01, 4) == 1


def test_server_side_clipping_bounds_each_update_and_the_mean_is_of_clipped_updates():
    strategy = make_strategy()
    wrapper = wrap_central_dp(strategy, {"noise_multiplier": 0.0, "clipping_norm": 1.0}, 4, seed=0)
    rng = np.random.default_rng(0)
    updates = [rng.normal(size=7) * s for s in (0.1, 1.0, 3.0, 10.0)]
    seen = []
    clip = strategy.central_dp.clip_updates
    strategy.central_dp.clip_updates = lambda u, names: seen.append(clip(u, names)) or seen[-1]
    arrays, replies = run_round(wrapper, 1, updates)
    # the replies are left as received; the round aggregates clipped copies of the updates
    np.testing.assert_allclose(flat(replies[3].content["arrays"]), updates[3], rtol=1e-6)
    clipped = seen[0].numpy()
    for u, c in zip(updates, clipped):
        norm = np.linalg.norm(u)
        assert np.linalg.norm(c) <= 1.0 + 1e-5
        expect = u if norm <= 1.0 else u / norm
        np.testing.assert_allclose(c, expect, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(flat(arrays), np.mean(clipped, axis=0), atol=1e-6)
    info = strategy._train_info["privacy"]["central_dp"]
    assert set(info["clipped"]) == {NAMES[h] for h, u in enumerate(updates) if np.linalg.norm(u) > 1.0}
    assert info["update_norms"]["va"] == pytest.approx(np.linalg.norm(updates[3]), rel=1e-6)
    assert info["epsilon"] == float("inf")  # z = 0: clipping only


def test_noise_has_the_configured_std_and_repeats_with_the_seed():
    z, c, m, d = 1.2, 0.5, 4, 40_000
    updates = [np.zeros(d + 1)] * 4
    noisy = []
    for _ in range(2):
        wrapper = wrap_central_dp(make_strategy(), {"noise_multiplier": z, "clipping_norm": c}, m, seed=7)
        arrays, _ = run_round(wrapper, 1, updates, d=d)
        noisy.append(flat(arrays))
    expected = z * c / m
    assert abs(noisy[0].std() / expected - 1) < 0.02
    assert abs(noisy[0].mean()) < 4 * expected / np.sqrt(d)
    np.testing.assert_array_equal(noisy[0], noisy[1])  # seeded: same run, same noise
    assert wrapper.last_info["noise_std"] == pytest.approx(expected)


def test_epsilon_matches_opacus_rdp_accountant_equal_and_sample_weights():
    z, rounds = 1.1, 5
    strategy = make_strategy()
    wrapper = wrap_central_dp(strategy, {"noise_multiplier": z, "clipping_norm": 1.0, "delta": 1e-3}, 4)
    for r in range(1, rounds + 1):
        run_round(wrapper, r, [np.full(7, 0.01)] * 4)
    acc = RDPAccountant()
    acc.history = [(z, 1.0, rounds)]
    assert wrapper.privacy_spent()["epsilon"] == pytest.approx(acc.get_epsilon(delta=1e-3), rel=1e-9)
    assert strategy._train_info["privacy"]["central_dp"]["epsilon"] == pytest.approx(acc.get_epsilon(delta=1e-3))

    # sample-count weights: the largest hospital (199 of 486 records) moves the mean by
    # C * 199/486 > C / 4, so the effective multiplier is z / (4 * 199/486)
    examples = (199, 172, 30, 85)
    weighted = wrap_central_dp(make_strategy(), {"noise_multiplier": z, "clipping_norm": 1.0, "delta": 1e-3}, 4)
    run_round(weighted, 1, [np.full(7, 0.01)] * 4, examples)
    z_eff = z / (4 * 199 / 486)
    assert weighted.last_info["noise_multiplier_effective"] == pytest.approx(z_eff)
    acc = RDPAccountant()
    acc.history = [(z_eff, 1.0, 1)]
    assert weighted.privacy_spent()["epsilon"] == pytest.approx(acc.get_epsilon(delta=1e-3))


def test_amplification_and_target_epsilon():
    strategy = make_strategy(fraction_train=0.5)
    wrapper = wrap_central_dp(strategy, {"target_epsilon": 2.0, "clipping_norm": 1.0, "amplification": True,
                                         "delta": 1e-3}, num_sampled(0.5, 4), num_hospitals=4, rounds=10)
    assert wrapper.sample_rate == 0.5
    acc = RDPAccountant()
    acc.history = [(wrapper.noise_multiplier, 0.5, 10)]
    assert acc.get_epsilon(delta=1e-3) == pytest.approx(2.0, abs=0.02)  # z was searched for this budget


def test_adaptive_clipping_follows_the_quantile_and_noises_at_the_applied_norm():
    strategy = make_strategy()
    cfg = {"mode": "adaptive", "noise_multiplier": 0.0, "clipping_norm": 0.1, "clip_norm_lr": 0.5}
    wrapper = wrap_central_dp(strategy, cfg, 4)
    norms = []
    for r in range(1, 16):
        norms.append(wrapper.clipping_norm)
        run_round(wrapper, r, [np.full(7, s / np.sqrt(7)) for s in (1.0, 2.0, 3.0, 4.0)])
    # the norm climbs from 0.1 towards the median update norm (between 2 and 3)
    assert norms[0] == 0.1 and 1.5 < wrapper.clipping_norm < 3.5
    info = strategy._train_info["privacy"]["central_dp"]
    assert info["clipping_norm"] == pytest.approx(norms[-1]) and info["next_clipping_norm"] == wrapper.clipping_norm


def test_error_reply_reaches_fedsec_failure_policy():
    """Flower's wrapper alone would skip the round silently; fedsec fails it, naming the hospital."""
    wrapper = wrap_central_dp(make_strategy(), {"noise_multiplier": 1.0}, 4)
    msgs = list(wrapper.configure_train(1, global_arrays(), ConfigRecord({}), None))
    replies = replies_for(msgs[:3], [np.zeros(7)] * 4)
    replies.append(Message(Error(code=0, reason="disk full"), reply_to=msgs[3]))
    with pytest.raises(FedsecError, match="va: disk full"):
        wrapper.aggregate_train(1, replies)


def test_robust_rules_are_refused():
    with pytest.raises(FedsecError, match="strategy 'krum' with privacy.central_dp"):
        wrap_central_dp(make_strategy({"rule": "krum"}), {"noise_multiplier": 1.0}, 4)


def test_client_side_clipping_mod_and_wrapper():
    gl = global_arrays(3)
    cfg = ConfigRecord({"clipping_norm": 0.5})
    instr = Message(RecordDict({"arrays": gl, "config": cfg}), dst_node_id=101, message_type=MessageType.TRAIN)

    def handler(msg, ctx):
        arrays = ArrayRecord({"w": Array(np.full(3, 2.0, dtype=np.float32)), "b": Array(np.ones(1, dtype=np.float32))})
        return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 5})}), reply_to=msg)

    out = clipping_mod(instr, None, handler)
    assert np.linalg.norm(flat(out.content["arrays"])) == pytest.approx(0.5, rel=1e-5)
    assert out.content["metrics"]["norm_bit"] == 1
    plain = Message(RecordDict({"arrays": gl, "config": ConfigRecord({})}), dst_node_id=101,
                    message_type=MessageType.TRAIN)
    assert np.linalg.norm(flat(clipping_mod(plain, None, handler).content["arrays"])) > 3  # untouched

    # the client-side wrapper sends the norm and does not clip again on the server
    strategy = make_strategy()
    wrapper = wrap_central_dp(strategy, {"noise_multiplier": 0.0, "clipping": "client", "clipping_norm": 0.5}, 4)
    msgs = list(wrapper.configure_train(1, global_arrays(), ConfigRecord({}), None))
    assert all(m.content["config"]["clipping_norm"] == 0.5 for m in msgs)
    replies = replies_for(msgs, [np.full(7, 3.0)] * 4)
    arrays, _ = wrapper.aggregate_train(1, replies)
    np.testing.assert_allclose(flat(arrays), np.full(7, 3.0))  # nothing clipped server-side


def test_adaptive_noise_split_is_checked_before_the_run():
    with pytest.raises(FedsecError, match=r"noise_multiplier \(0.5\) must be below 2 x clipped_count_stddev \(0.4"):
        wrap_central_dp(make_strategy(), {"mode": "adaptive", "noise_multiplier": 0.5}, 4)
    wrap_central_dp(make_strategy(), {"mode": "adaptive", "noise_multiplier": 0.5, "clipped_count_stddev": 1.0}, 4)


def test_check_privacy_refuses_contradictions_before_the_engine_starts():
    from fedsec.privacy.defenses import central_dp_history, check_privacy
    from fedsec.tasks import build_task

    def scenario(privacy, strategy=None):
        over = {"privacy": privacy}
        if strategy:
            over["strategy"] = strategy
        s = load_scenario(str(HEART), over)
        return s, build_task(s)

    check_privacy(*scenario({"dp_sgd": {"noise_multiplier": 1.0}, "central_dp": {"noise_multiplier": 1.0},
                             "compression": {"keep_ratio": 0.5}}))
    with pytest.raises(FedsecError, match=r"privacy\.dp_sgd\.noise'?: unknown option"):
        check_privacy(*scenario({"dp_sgd": {"noise": 1.0}}))
    with pytest.raises(FedsecError, match="strategy 'median' with privacy.central_dp"):
        check_privacy(*scenario({"central_dp": {"noise_multiplier": 1.0}}, {"rule": "median"}))
    with pytest.raises(FedsecError, match="adaptive clipping spends part of the noise"):
        check_privacy(*scenario({"central_dp": {"target_epsilon": 5.0, "mode": "adaptive"}}))
    with pytest.raises(FedsecError, match="cannot clip updates it cannot see"):
        check_privacy(*scenario({"central_dp": {"noise_multiplier": 1.0}, "secure_aggregation": True}))
    with pytest.raises(FedsecError, match="'krum' needs each hospital's update"):
        check_privacy(*scenario({"secure_aggregation": True}, "krum"))
    # resuming: the accountant continues from the finished rounds' records
    records = [{"privacy": {"central_dp": {"noise_multiplier_effective": 0.9, "sample_rate": 1.0}}}] * 2
    assert central_dp_history(records) == [(0.9, 1.0, 1), (0.9, 1.0, 1)]

"""The participation model (fedsec/federation/participation.py): seeded availability and
maintenance windows, simulated compute / network time, the server's wait / proceed policy
against hand-computed figures, the reply screen (size limit, malformed replies), the
availability attacks (stall, strategic dropout, oversized reply), summary.json's
``availability`` block, load-time errors naming the key (exit 2), and one short run on the
inline engine whose rounds.jsonl names the hospital that missed its deadline."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ConfigRecord, Message, MetricRecord, RecordDict

import fedsec
from fedsec.attacks import make_attack
from fedsec.attacks.base import AttackContext
from fedsec.cli import main
from fedsec.data.base import Split
from fedsec.errors import FedsecError, ScenarioError
from fedsec.federation import participation as part
from fedsec.scenario import load_scenario

from .test_server_strategy import BENIGN, HEART, NAMES, flat, global_arrays, make_strategy, plan
from .test_server_strategy import task_identity  # noqa: F401 - the autouse fixture

ROOT = Path(__file__).resolve().parents[2]


def _model(**block):
    scenario = load_scenario(str(HEART), {"federation": {"participation": block}})
    return part.ParticipationModel.from_scenario(scenario, NAMES)


# ---- availability -----------------------------------------------------------------------------

def test_availability_is_a_function_of_seed_round_and_hospital_only():
    m = _model(default={"miss_probability": 0.3})
    grid = [[m.unavailable(r, h) is None for h in range(4)] for r in range(1, 401)]
    # asked in another order, one hospital at a time, or by a fresh model: the same draws
    again = _model(default={"miss_probability": 0.3})
    assert grid == [[again.unavailable(r, h) is None for h in (0, 1, 2, 3)] for r in range(1, 401)]
    assert [m.available(r, [3, 1]) for r in range(1, 50)] == [
        [h for h in (3, 1) if grid[r - 1][h]] for r in range(1, 50)]
    share = 1 - np.mean(grid)
    assert 0.25 < share < 0.35  # about miss_probability of the hospital-rounds are missed
    other_seed = part.ParticipationModel(**{**m.__dict__, "seed": 1})
    assert [[other_seed.unavailable(r, h) is None for h in range(4)] for r in range(1, 401)] != grid
    # the reason is said; probability 0 never misses, 1 always does
    missed = next(m.unavailable(r, 0) for r in range(1, 50) if m.unavailable(r, 0))
    assert missed == "missed the round (miss_probability 0.3)"
    never, always = _model(), _model(default={"miss_probability": 1.0})
    assert all(never.unavailable(r, h) is None for r in range(1, 30) for h in range(4))
    assert all(always.unavailable(r, 2) for r in range(1, 30))


def test_maintenance_window_is_respected_by_the_server_selection():
    # hungary is an attacker (attackers join every active round) but not during its maintenance window
    s = make_strategy([plan(make_attack("sign_flip"), [1])], federation={"fraction_train": 0.25, "participation": {
        "hospitals": {"hungary": {"maintenance": [[2, 3]]}, "0": {"maintenance": [[3, 3], [5, 5]]}}}})
    chosen = {}
    for r in range(1, 7):
        msgs = s.configure_train(r, global_arrays(), ConfigRecord({}), None)
        chosen[r] = sorted(m.metadata.dst_node_id - 100 for m in msgs)
    assert all(1 in chosen[r] for r in (1, 4, 5, 6)) and all(1 not in chosen[r] for r in (2, 3))
    assert all(0 not in chosen[r] for r in (3, 5))
    assert all(len(chosen[r]) in (1, 2) for r in chosen)  # one drawn (fraction 0.25) + the attacker
    assert s._unavailable == {}  # round 6: everyone available


# ---- simulated time: hand-computed figures ---------------------------------------------------------

def test_compute_network_and_straggler_times():
    prof = {**part._profile({}, "x"), "seconds_per_example": 0.1, "seconds_per_round": 3.0, "latency_s": 2.0,
            "bandwidth_mbps": 8.0}
    assert part.compute_s(prof, 0, 1, 0, 100) == pytest.approx(13.0)  # 3 + 0.1 x 100
    assert part.network_s(prof, 1.0, 3.0) == pytest.approx(6.0)  # 2 + (1 + 3) MB x 8 bit / 8 Mbit/s
    slow = {**prof, "straggle_probability": 0.5, "straggle_factor": 4.0}
    times = [part.compute_s(slow, 0, r, 0, 100) for r in range(1, 201)]
    assert set(times) == {13.0, 52.0} and 0.35 < times.count(52.0) / 200 < 0.65
    assert times == [part.compute_s(slow, 0, r, 0, 100) for r in range(1, 201)]
    loc = load_scenario(str(HEART), ["federation.local.epochs=3"]).federation.local
    assert part.examples_per_round(loc, 50) == 150
    loc = load_scenario(str(HEART), ["federation.local.steps=5"]).federation.local
    assert part.examples_per_round(loc, 50) == 5 * loc.batch_size
    assert part.round_duration({0: 12.0, 1: 7.0}, 30.0) == ([], 12.0)
    assert part.round_duration({0: 12.0, 1: 31.0, 2: math.inf}, 30.0) == ([1, 2], 30.0)


def _reply(msg, update, examples, **metrics):
    h = msg.metadata.dst_node_id - 100
    m = MetricRecord({"num-examples": examples, "hospital": h, "train_loss": 0.5, "seconds": 0.1, **metrics})
    return Message(RecordDict({"arrays": global_arrays(np.asarray(update, dtype=np.float64)), "metrics": m}),
                   reply_to=msg)


EXAMPLES = {0: 100, 1: 50, 2: 20, 3: 40}


def _round(s, r, stall=None, extra=None):
    msgs = list(s.configure_train(r, global_arrays(), ConfigRecord({}), None))
    replies = []
    for m in msgs:
        h = m.metadata.dst_node_id - 100
        metrics = {part.ARRIVAL_KEY: stall} if (h == 3 and stall is not None) else {}
        metrics.update((extra or {}).get(h, {}))
        replies.append(_reply(m, BENIGN[h], EXAMPLES[h], **metrics))
    arrays, _ = s.aggregate_train(r, replies)
    return arrays


@pytest.mark.parametrize("policy", ["wait", "proceed"])
def test_wait_and_proceed_round_durations_match_hand_computed_figures(policy):
    """0.1 s per example + 2 s latency: cleveland 100 examples -> 12 s, hungary 50 -> 7 s,
    switzerland 20 -> 4 s; va stalls to 31 s. wait: the round lasts 31 s and va is aggregated;
    proceed with a 30 s deadline: the round lasts 30 s and va is left out and named."""
    s = make_strategy(federation={"min_hospitals": 2, "participation": {
        "policy": policy, "deadline_s": 30, "default": {"seconds_per_example": 0.1, "latency_s": 2}}})
    arrays = _round(s, 1, stall=31.0)
    info = s._train_info
    assert info["participation"]["arrival_s"] == pytest.approx(
        {"cleveland": 12.0, "hungary": 7.0, "switzerland": 4.0, "va": 31.0})
    if policy == "wait":
        assert info["participation"]["simulated_s"] == pytest.approx(31.0)
        assert info["participation"]["late"] == [] and info["failures"] == []
        assert sorted(info["train"]) == sorted(NAMES)
    else:
        assert info["participation"]["simulated_s"] == pytest.approx(30.0)
        assert info["participation"]["late"] == ["va"]
        assert info["failures"] == ["va: replied at 31 s simulated, after deadline_s (30 s); left out of the "
                                    "aggregate"]
        assert sorted(info["train"]) == ["cleveland", "hungary", "switzerland"]
        w = np.array([100, 50, 20]) / 170
        np.testing.assert_allclose(flat(arrays), w @ np.array(BENIGN[:3]), rtol=1e-5)
    _round(s, 2)  # nobody stalls: the slowest is cleveland, 12 s
    assert s._train_info["participation"]["simulated_s"] == pytest.approx(12.0)
    assert s._train_info["simulated_time_s"] == pytest.approx((31.0 if policy == "wait" else 30.0) + 12.0)


def test_a_dropout_costs_the_cut_off_and_min_hospitals_still_fails_the_run():
    drop = {3: {part.DROPPED_KEY: 1}}
    s = make_strategy(federation={"min_hospitals": 3, "timeout_s": 100, "participation": {"policy": "wait"}})
    _round(s, 1, extra=drop)
    p = s._train_info["participation"]
    assert p["dropped_out"] == ["va"] and p["simulated_s"] == 100.0  # waited until federation.timeout_s
    assert s._train_info["failures"][0].startswith("va: no reply (dropped out)")
    s = make_strategy(federation={"min_hospitals": 4, "participation": {"policy": "proceed", "deadline_s": 5}})
    with pytest.raises(FedsecError, match=r"(?s)round 1: 1 of 4 hospitals failed.*va: no reply \(dropped out\)"):
        _round(s, 1, extra=drop)


def test_a_round_with_nobody_available_keeps_the_global_model():
    s = make_strategy(federation={"min_hospitals": 1, "participation": {"default": {"maintenance": [[2, 2]]}}})
    assert s.configure_train(2, global_arrays(), ConfigRecord({}), None) == []
    arrays, metrics = s.aggregate_train(2, [])
    assert arrays is None and metrics is None  # Flower keeps the current global model
    assert sorted(s._train_info["participation"]["unavailable"]) == sorted(NAMES)
    assert s._train_info["train"] == {}


# ---- the reply screen: size limit, malformed replies ------------------------------------------------

def _padded(msg, mb):
    h = msg.metadata.dst_node_id - 100
    arrays = global_arrays(BENIGN[h])
    arrays["padding.0"] = Array(np.zeros(int(mb * 1e6 / 4), dtype=np.float32))
    m = MetricRecord({"num-examples": 10, "hospital": h, "train_loss": 0.5, "seconds": 0.1})
    return Message(RecordDict({"arrays": arrays, "metrics": m}), reply_to=msg)


@pytest.mark.parametrize("limit", [None, 1.0])
def test_oversized_and_malformed_replies_are_dropped_and_named(limit):
    fed = {"min_hospitals": 2} if limit is None else {"min_hospitals": 2, "max_reply_mb": limit}
    s = make_strategy(federation=fed)
    msgs = list(s.configure_train(1, global_arrays(), ConfigRecord({}), None))
    replies = [_reply(m, BENIGN[i], 10) for i, m in enumerate(msgs[:2])] + [_padded(msgs[2], 2.0)]
    wrong = global_arrays(BENIGN[3])
    wrong["w"] = Array(np.zeros(4, dtype=np.float32))  # a shape the global model does not have
    replies.append(Message(RecordDict({"arrays": wrong, "metrics": MetricRecord(
        {"num-examples": 10, "hospital": 3, "train_loss": 0.5, "seconds": 0.1})}), reply_to=msgs[3]))
    arrays, _ = s.aggregate_train(1, replies)
    failures = s._train_info["failures"]
    if limit is None:
        assert failures[0].startswith("switzerland: malformed reply (arrays differ from the global model's: "
                                      "extra ['padding.0']")
    else:
        assert failures[0] == ("switzerland: its reply is 2 MB, over federation.max_reply_mb (1 MB); dropped "
                               "before it was unpacked")
    assert failures[1].startswith("va: malformed reply") and "other shapes ['w']" in failures[1]
    assert sorted(s._train_info["train"]) == ["cleveland", "hungary"]
    np.testing.assert_allclose(flat(arrays), (BENIGN[0] + BENIGN[1]) / 2, rtol=1e-6)


# ---- the availability attacks -------------------------------------------------------------------

_SCENARIOS: dict = {}


def _ctx(r=1, hospital=3, y=None, **fed):
    key = json.dumps(fed, sort_keys=True)
    if key not in _SCENARIOS:
        _SCENARIOS[key] = load_scenario(str(HEART), {"federation": fed} if fed else None)
    scenario = _SCENARIOS[key]
    data = Split(torch.zeros(len(y), 2), torch.as_tensor(y)) if y is not None else None
    return AttackContext(r, hospital, [hospital], 4, None, None, extra={"scenario": scenario, "data": data})


def test_stall_reports_just_past_the_deadline():
    stall = make_attack("stall", margin_s=0.5)
    _, m = stall.poison_reply({}, {}, _ctx(participation={"deadline_s": 30}))
    assert m == {part.ARRIVAL_KEY: 30.5}
    _, m = stall.poison_reply({}, {}, _ctx(timeout_s=60))  # no deadline: past the server's give-up time
    assert m == {part.ARRIVAL_KEY: 60.5}
    _, m = make_attack("stall", arrival_s=7.0).poison_reply({}, {}, _ctx())
    assert m == {part.ARRIVAL_KEY: 7.0}


def test_strategic_dropout_rounds_probability_and_rare_label():
    y = [1, 1, 1, 0]  # 75% positive
    listed = make_attack("strategic_dropout", drop_rounds=[2, 5])
    assert [listed.drops(_ctx(r, y=y)) for r in range(1, 7)] == [False, True, False, False, True, False]
    rare = make_attack("strategic_dropout", rare_label=1, min_share=0.7)
    assert rare.drops(_ctx(y=y)) and not rare.drops(_ctx(y=[1, 0, 0, 0]))
    _, m = rare.poison_reply({}, {"hospital": 3}, _ctx(y=y))
    assert m[part.DROPPED_KEY] == 1
    coin = make_attack("strategic_dropout", probability=0.5)
    draws = [coin.drops(_ctx(r, y=y)) for r in range(1, 201)]
    assert draws == [coin.drops(_ctx(r, y=y)) for r in range(1, 201)] and 0.35 < np.mean(draws) < 0.65
    with pytest.raises(ScenarioError, match="drop_rounds"):
        load_scenario(str(HEART), ["attacks=[{preset: strategic_dropout, hospitals: [3], drop_rounds: [0]}]"])


def test_oversized_reply_adds_the_megabytes_it_declares():
    state = {"w": torch.zeros(6), "b": torch.zeros(1)}
    out, _ = make_attack("oversized_reply", extra_mb=2.0, arrays=2).poison_reply(state, {}, _ctx())
    assert sorted(out) == ["b", "padding.0", "padding.1", "w"]
    assert sum(t.numel() * 4 for k, t in out.items() if k.startswith("padding")) == 2_000_000
    assert sorted(state) == ["b", "w"]  # the hospital's own state is not changed in place


# ---- summary.json's availability block ------------------------------------------------------------

def test_availability_summary_counts_rounds_lost_and_time_to_target():
    scenario = load_scenario(str(HEART), ["federation.rounds=4", "federation.participation={target_value: 0.8}"])
    rounds = [
        {"round": 1, "time_s": 2.0, "global": {"auroc": 0.7}, "selected": ["a", "b"], "train": {"a": {}, "b": {}},
         "failures": [], "participation": {"unavailable": {"c": "maintenance"}}, "simulated_time_s": 10.0},
        {"round": 2, "time_s": 1.0, "global": {"auroc": 0.85}, "selected": ["a", "b", "c"], "train": {"a": {}},
         "failures": ["b: replied at 40 s", "c: disk full"], "participation": {"late": ["b"]},
         "simulated_time_s": 40.0},
        {"round": 3, "time_s": 1.0, "global": {"auroc": 0.9}, "selected": ["a"], "train": {"a": {}},
         "failures": [], "participation": {}, "simulated_time_s": 50.0},
    ]
    out = part.availability_summary(scenario, rounds)
    assert (out["rounds_degraded"], out["rounds_failed"], out["rounds_lost"], out["rounds_short"]) == (1, 1, 2, 2)
    assert out["target"] == {"metric": "auroc", "value": 0.8,
                             "reached": {"round": 2, "simulated_s": 40.0, "wall_s": 3.0}}
    assert out["simulated_time_s"] == 50.0
    assert out["hospitals"]["b"] == {"selected": 2, "aggregated": 1, "late": 1, "dropped_out": 0, "stale": 0,
                                     "unavailable": 0, "failed": 0}
    assert out["hospitals"]["c"]["unavailable"] == 1 and out["hospitals"]["c"]["failed"] == 1


# ---- bad input: exit 2 naming the key ------------------------------------------------------------------

@pytest.mark.parametrize("override,key,says", [
    ("federation.participation={polcy: wait}", "federation.participation.polcy", "did you mean 'policy'"),
    ("federation.participation={policy: later}", "federation.participation.policy",
     "one of wait, proceed, buffered"),
    ("federation.participation={policy: proceed}", "federation.participation.deadline_s", "set deadline_s"),
    ("federation.participation={deadline_s: -1}", "federation.participation.deadline_s", "> 0"),
    ("federation.participation={default: {miss_probability: 1.5}}",
     "federation.participation.default.miss_probability", "<= 1"),
    ("federation.participation={default: {latency_s: fast}}", "federation.participation.default.latency_s",
     "expected float"),
    ("federation.participation={hospitals: {vaa: {latency_s: 1}}}", "federation.participation.hospitals.vaa",
     "did you mean 'va'"),
    ("federation.participation={hospitals: {'9': {latency_s: 1}}}", "federation.participation.hospitals.9",
     "out of range"),
    ("federation.participation={hospitals: {va: {speed: 1}}}", "federation.participation.hospitals.va.speed",
     "no option 'speed'"),
    ("federation.participation={hospitals: {va: {maintenance: [[4, 2]]}}}",
     "federation.participation.hospitals.va.maintenance[0]", "first <= last"),
    ("federation.participation=[1]", "federation.participation", "mapping"),
    ("federation.max_reply_mb=0", "federation.max_reply_mb", "between"),
    ("federation.participation={policy: buffered}", "federation.participation.buffer_size", "set buffer_size"),
    ("federation.participation={policy: buffered, buffer_size: 0}", "federation.participation.buffer_size",
     ">= 1"),
    ("federation.participation={policy: buffered, buffer_size: 5}", "federation.participation.buffer_size",
     "can never fill: at most 4 hospitals"),
    ("federation.participation={policy: buffered, buffer_size: 2, max_staleness: -1}",
     "federation.participation.max_staleness", ">= 0"),
    ("federation.participation={policy: buffered, buffer_size: 2, staleness_weight: hinge}",
     "federation.participation.staleness_weight", "one of constant, polynomial"),
    ("federation.participation={policy: buffered, buffer_size: 2, staleness_exponent: -0.5}",
     "federation.participation.staleness_exponent", ">= 0"),
    ("federation.participation={policy: wait, buffer_size: 2}", "federation.participation.buffer_size",
     "read only by policy 'buffered'"),
    ("federation.participation={policy: buffered, buffer_size: 2, max_stalenes: 1}",
     "federation.participation.max_stalenes", "did you mean 'max_staleness'"),
])
def test_bad_participation_keys_exit_2_naming_the_key(override, key, says, capsys):
    with pytest.raises(ScenarioError) as err:
        load_scenario(str(HEART), [override])
    assert err.value.key == key and says in str(err.value)
    assert main(["validate", str(HEART), override]) == 2
    said = capsys.readouterr()
    assert f"'{key}'" in said.out + said.err


# ---- a real run on the inline engine ---------------------------------------------------------------

def test_a_hospital_that_misses_its_deadline_is_left_out_and_named_in_rounds_jsonl(tmp_path):
    out = tmp_path / "run"
    summary = fedsec.run(str(HEART), overrides=[
        "engine.name=inline", "federation.rounds=3", "federation.min_hospitals=2",
        "federation.participation={policy: proceed, deadline_s: 20, default: {seconds_per_example: 0.05}, "
        "hospitals: {hungary: {maintenance: [[2, 2]]}}, target_value: 0.5}",
        "attacks=[{preset: stall, hospitals: [3], rounds: [2, 3]}]"], out=out, progress=False)
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    # cleveland trains on 199 examples: 0.05 s each = 9.95 s; va stalls to 21 s in rounds 2-3
    assert [r["participation"]["simulated_s"] for r in rounds] == pytest.approx([9.95, 20.0, 20.0])
    assert [r["simulated_time_s"] for r in rounds] == pytest.approx([9.95, 29.95, 49.95])
    assert [r["participation"]["late"] for r in rounds] == [[], ["va"], ["va"]]
    assert [sorted(r["train"]) for r in rounds] == [sorted(NAMES), ["cleveland", "switzerland"],
                                                    ["cleveland", "hungary", "switzerland"]]
    assert rounds[1]["participation"]["unavailable"] == {"hungary": "maintenance window [2, 2]"}
    assert rounds[2]["failures"] == ["va: replied at 21 s simulated, after deadline_s (20 s); left out of the "
                                     "aggregate"]
    assert summary["status"] == "completed_with_failures"
    a = summary["availability"]
    assert (a["rounds_lost"], a["rounds_short"], a["simulated_time_s"]) == (2, 2, pytest.approx(49.95))
    assert a["hospitals"]["va"] == {"selected": 3, "aggregated": 1, "late": 2, "dropped_out": 0, "stale": 0,
                                    "unavailable": 0, "failed": 0}
    assert a["target"]["reached"]["round"] == 1 and a["target"]["reached"]["simulated_s"] == pytest.approx(9.95)


def test_a_resumed_server_continues_the_simulated_clock():
    from fedsec.federation.server_app import FedsecStrategy, ServerTask

    class Finished:  # the results folder of a run killed after round 2
        def read_rounds(self):
            return [{"round": 1, "simulated_time_s": 12.0}, {"round": 2, "simulated_time_s": 24.0}]

    scenario = load_scenario(str(HEART), {"federation": {"participation": {
        "default": {"seconds_per_example": 0.1, "latency_s": 2}}}})
    s = FedsecStrategy(scenario, NAMES, [], ServerTask(scenario, None), run_dir=Finished(), round_offset=2)
    s.bind_nodes({100 + h: h for h in range(4)})
    _round(s, 1)  # Flower's round 1 is the run's round 3
    assert s._train_info["simulated_time_s"] == pytest.approx(24.0 + 12.0)


# ---- policy 'buffered': FedBuff in simulated time -------------------------------------------------

def _buffered(seed=0, min_hospitals=2, **opts):
    block = {"policy": "buffered", "buffer_size": 2, "default": {"seconds_per_example": 0.1, "latency_s": 2}, **opts}
    return make_strategy(seed=seed, federation={"min_hospitals": min_hospitals, "participation": block})


def _async_rounds(s, rounds, stall=31.0):
    """Rounds of a buffered server whose hospitals reply with (the model they were sent) +
    BENIGN[h]; va (3) stalls to ``stall`` s after it was sent the model. -> [(global before,
    global after, the round's record)]."""
    g = global_arrays()
    out = []
    for r in range(1, rounds + 1):
        msgs = list(s.configure_train(r, g, ConfigRecord({}), None))
        replies = []
        for m in msgs:
            h = m.metadata.dst_node_id - 100
            metrics = {part.ARRIVAL_KEY: stall} if (h == 3 and stall is not None) else {}
            replies.append(_reply(m, flat(m.content["arrays"]) + BENIGN[h], EXAMPLES[h], **metrics))
        new, _ = s.aggregate_train(r, replies)
        out.append((flat(g), flat(new) if new is not None else flat(g), json.loads(json.dumps(s._train_info))))
        g = new if new is not None else g
    return out


def test_fill_buffer_takes_replies_in_arrival_order_and_discards_stale_ones():
    F = part.InFlight
    flight = {0: F(0, 0.0, 12.0), 1: F(2, 5.0, 7.0), 2: F(1, 3.0, 9.0), 3: F(2, 5.0, 8.0, dropped=True),
              4: F(2, 6.0, 30.0)}
    # version 2, max_staleness 1: 1 (staleness 0) at 7 s, 3 dropped at 8 s, 2 (staleness 1) at 9 s: full
    assert part.fill_buffer(flight, 2, 2, 1, 6.0) == ([1, 2], [], [3], 9.0)
    # buffer of 3: 0 (staleness 2) is discarded on its way to 4 at 30 s
    assert part.fill_buffer(flight, 2, 3, 1, 6.0) == ([1, 2, 4], [0], [3], 30.0)
    assert part.fill_buffer(flight, 2, 3, None, 6.0) == ([1, 2, 0], [], [3], 12.0)  # no bound
    # fewer usable than the buffer: all are reached; the clock never goes back
    assert part.fill_buffer({0: F(0, 0.0, 4.0)}, 1, 2, 0, 10.0) == ([], [0], [], 10.0)
    assert part.staleness_factor(3, "polynomial", 0.5) == pytest.approx(0.5)  # (1 + 3)^-0.5
    assert part.staleness_factor(3, "constant", 0.5) == 1.0 and part.staleness_factor(0, "polynomial", 2) == 1.0


def test_buffered_rounds_match_hand_computed_arrivals_and_the_staleness_bound():
    """0.1 s per example + 2 s latency: cleveland takes 12 s, hungary 7 s, switzerland 4 s, va
    stalls to 31 s. Buffer of 2, max_staleness 1. Round 1 (t=0, version 0): switzerland (4 s)
    and hungary (7 s). Round 2 (t=7): switzerland again at 11 s, cleveland (trained on version 0:
    staleness 1) at 12 s. Round 3 (t=12): hungary (version 1) at 14 s, switzerland at 16 s.
    Round 4 (t=16): switzerland 20 s, hungary 23 s. Round 5 (t=23): cleveland (version 2,
    staleness 2) at 24 s is discarded; switzerland 27 s, hungary 30 s. Round 6 (t=30): va
    (version 0, staleness 5) at 31 s is discarded; switzerland 34 s, hungary 37 s."""
    rounds = _async_rounds(_buffered(max_staleness=1), 6)
    recs = [rec for _, _, rec in rounds]
    buffers = [rec["participation"]["buffer"] for rec in recs]
    assert buffers == [{"switzerland": 0, "hungary": 0}, {"switzerland": 0, "cleveland": 1},
                       {"hungary": 1, "switzerland": 0}, {"switzerland": 0, "hungary": 0},
                       {"switzerland": 0, "hungary": 0}, {"switzerland": 0, "hungary": 0}]
    assert [len(b) for b in buffers] == [2] * 6  # K updates per server update
    assert [rec["simulated_time_s"] for rec in recs] == pytest.approx([7, 12, 16, 23, 30, 37])
    assert [rec["participation"]["simulated_s"] for rec in recs] == pytest.approx([7, 5, 4, 7, 7, 7])
    assert [rec["participation"]["stale"] for rec in recs] == [[], [], [], [], ["cleveland"], ["va"]]
    assert [rec["participation"]["dispatched"] for rec in recs][:3] == [
        NAMES, ["hungary", "switzerland"], ["cleveland", "switzerland"]]
    assert recs[5]["participation"]["in_flight"] == ["cleveland"]
    assert recs[4]["failures"] == ["cleveland: its update was computed on global model version 2, 2 updates old "
                                   "(over max_staleness 1); discarded"]
    assert [sorted(rec["train"]) for rec in recs] == [sorted(b) for b in buffers]
    assert recs[4]["selected"] == ["cleveland", "hungary", "switzerland"]  # the replies the server reached
    assert [rec["participation"]["version"] for rec in recs] == [1, 2, 3, 4, 5, 6]
    # each update is its hospital's own (local - the model it was sent), stale or not, applied to
    # the current model: round 2 = cleveland's update on version 0 + switzerland's on version 1
    for (before, after, rec), buf in zip(rounds, buffers):
        ids = [NAMES.index(n) for n in buf]
        w = np.array([EXAMPLES[h] for h in ids], dtype=float)
        np.testing.assert_allclose(after - before, w @ np.array([BENIGN[h] for h in ids]) / w.sum(), atol=1e-5)
    # only the global models that held replies were trained on are kept (max_staleness + 1 at most)
    s = _buffered(max_staleness=1)
    _async_rounds(s, 3)
    assert len(s._bases) <= 2


def test_buffered_polynomial_weight_scales_stale_updates():
    rounds = _async_rounds(_buffered(staleness_weight="polynomial", staleness_exponent=2.0), 2)
    before, after, rec = rounds[1]
    assert rec["participation"]["buffer"] == {"switzerland": 0, "cleveland": 1}
    assert rec["participation"]["weights"] == {"switzerland": 1.0, "cleveland": pytest.approx(0.25)}
    # (20 x switzerland's + 100 x 0.25 x cleveland's) / (20 + 100): FedBuff's s(staleness) x update
    expected = (20 * BENIGN[2] + 100 * 0.25 * BENIGN[0]) / 120
    np.testing.assert_allclose(after - before, expected, atol=1e-5)


def test_buffered_without_a_bound_aggregates_the_staller_late_and_same_seed_same_records():
    def records(seed):
        s = _buffered(seed=seed, default={"seconds_per_example": 0.1, "latency_s": 2, "straggle_probability": 0.5,
                                          "straggle_factor": 3})
        return [rec for _, _, rec in _async_rounds(s, 8, stall=None)]

    a, b, other = records(0), records(0), records(1)
    assert a == b and a != other  # the straggler draws are seeded; nothing else is random
    unbounded = [rec for _, _, rec in _async_rounds(_buffered(), 8)]
    va = [rec["participation"]["buffer"]["va"] for rec in unbounded if "va" in rec["participation"]["buffer"]]
    assert va and min(va) >= 2  # the staller's updates arrive, stale, and are aggregated (no bound)
    assert all(rec["participation"]["stale"] == [] for rec in unbounded)


def test_a_buffered_dropout_is_given_up_at_the_timeout_and_sent_the_model_again():
    s = make_strategy(federation={"min_hospitals": 1, "timeout_s": 20, "participation": {
        "policy": "buffered", "buffer_size": 3, "default": {"seconds_per_example": 0.1, "latency_s": 2}}})
    g = global_arrays()
    recs = []
    for r in range(1, 4):
        msgs = list(s.configure_train(r, g, ConfigRecord({}), None))
        replies = [_reply(m, flat(m.content["arrays"]) + BENIGN[m.metadata.dst_node_id - 100],
                          EXAMPLES[m.metadata.dst_node_id - 100],
                          **({part.DROPPED_KEY: 1} if m.metadata.dst_node_id == 103 and r == 1 else {}))
                   for m in msgs]
        g, _ = s.aggregate_train(r, replies)
        recs.append(s._train_info["participation"])
    # round 1: switzerland 4, hungary 7, cleveland 12; round 2 (t=12): switzerland 16, va gives up at 20,
    # hungary 19, ... the buffer of 3 reaches va's give-up time
    assert recs[0]["buffer"] == {"switzerland": 0, "hungary": 0, "cleveland": 0}
    assert recs[1]["dropped_out"] == ["va"] and recs[1]["arrival_s"]["va"] == pytest.approx(20.0)
    assert "va" in recs[2]["dispatched"]  # idle again: sent the current model


def test_a_buffered_run_names_stale_updates_in_rounds_jsonl(tmp_path):
    out = tmp_path / "run"
    summary = fedsec.run(str(HEART), overrides=[
        "engine.name=inline", "federation.rounds=5", "federation.min_hospitals=2",
        "federation.participation={policy: buffered, buffer_size: 2, max_staleness: 1, "
        "default: {seconds_per_example: 0.05, latency_s: 1}}",
        "attacks=[{preset: stall, hospitals: [3], arrival_s: 25}]"], out=out, progress=False)
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    parts = [r["participation"] for r in rounds]
    assert [len(p["buffer"]) for p in parts] == [2] * 5  # buffer_size updates per server update
    assert all(s <= 1 for p in parts for s in p["buffer"].values())  # the staleness bound
    assert any(p["buffer"].get("cleveland") == 1 for p in parts)  # slower hospitals do arrive one version late
    assert all("va" not in p["buffer"] for p in parts)  # the staller never makes it in time ...
    stale = [p["stale"] for p in parts]
    assert ["va"] in stale  # ... and is discarded when its reply arrives
    assert any(f.startswith("va: its update was computed on global model version 0") and "discarded" in f
               for r in rounds for f in r.get("failures", []))
    times = [r["simulated_time_s"] for r in rounds]
    assert times == sorted(times) and times[-1] < 25 * 5
    assert [sorted(r["train"]) for r in rounds] == [sorted(p["buffer"]) for p in parts]
    assert summary["availability"]["hospitals"]["va"]["stale"] == stale.count(["va"]) >= 1
    assert summary["availability"]["hospitals"]["va"]["aggregated"] == 0


def test_buffered_refuses_privacy_mechanisms():
    block = "federation.participation={policy: buffered, buffer_size: 2}"
    with pytest.raises(ScenarioError, match="not supported with privacy.secure_aggregation") as err:
        load_scenario(str(HEART), [block, "privacy.secure_aggregation=true"])
    assert err.value.key == "federation.participation.policy"
    assert main(["validate", str(HEART), block, "privacy.secure_aggregation=true"]) == 2


def test_a_resumed_buffered_server_holds_the_same_replies_in_flight():
    """The checkpoint holds the replies in flight and the models they trained on: a server
    restored from round 3's state goes on exactly as the uninterrupted one."""
    first = _buffered(max_staleness=3)
    rounds = _async_rounds(first, 3)
    assert first._in_flight and first._held  # va (and one other) are still training
    import io

    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    resumed = _buffered(max_staleness=3)
    resumed.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=False))
    resumed.simulated_time_s = first.simulated_time_s  # a resumed run reads it from rounds.jsonl
    g = global_arrays(rounds[-1][1])
    records = []
    for r in (4, 5, 6):
        outs = []
        for s in (first, resumed):
            msgs = list(s.configure_train(r, g, ConfigRecord({}), None))
            replies = [_reply(m, flat(m.content["arrays"]) + BENIGN[m.metadata.dst_node_id - 100],
                              EXAMPLES[m.metadata.dst_node_id - 100],
                              **({part.ARRIVAL_KEY: 31.0} if m.metadata.dst_node_id == 103 else {})) for m in msgs]
            new, _ = s.aggregate_train(r, replies)
            outs.append((flat(new), json.loads(json.dumps(s._train_info))))
        np.testing.assert_array_equal(outs[0][0], outs[1][0])
        assert outs[0][1] == outs[1][1]
        records.append(outs[1][1])
        g = global_arrays(outs[0][0])
    # round 5 takes cleveland's reply, trained on version 2 before the checkpoint (round 3)
    assert records[1]["participation"]["buffer"] == {"cleveland": 2, "switzerland": 0}
    with pytest.raises(FedsecError, match="checkpoint: written under .*'buffered', this scenario does not use it"):
        make_strategy().load_state_dict(first.state_dict())


def test_buffered_keeps_at_most_the_concurrency_in_flight():
    s = make_strategy(federation={"fraction_train": 0.5, "participation": {
        "policy": "buffered", "buffer_size": 1, "default": {"seconds_per_example": 0.1, "latency_s": 2}}})
    recs = [rec for _, _, rec in _async_rounds(s, 4, stall=None)]
    # ceil(0.5 x 4) = 2 hospitals train at once: 2 sent the model in round 1, then 1 per round
    assert [len(r["participation"]["dispatched"]) for r in recs] == [2, 1, 1, 1]
    assert all(len(r["participation"]["in_flight"]) == 1 for r in recs)
    assert all(len(r["participation"]["buffer"]) == 1 for r in recs)
    with pytest.raises(ScenarioError, match="at most 2 hospitals train at once") as err:
        load_scenario(str(HEART), ["federation.fraction_train=0.5",
                                   "federation.participation={policy: buffered, buffer_size: 3}"])
    assert err.value.key == "federation.participation.buffer_size"

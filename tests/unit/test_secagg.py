"""Secure aggregation: Flower's SecAgg+ (workflow + secaggplus_mod) driven from fedsec's
Message-API strategy and ClientApp.

The unit tests run the real protocol (keys, Shamir shares, masks) in-process: a loopback
Grid hands each message to a ClientApp with one Context per hospital, as Flower's runtime
does. The test marked ``ray`` runs it on Flower's simulation engine with fedsec's own train
handler (the ClientApp wiring proposed for client_app.py)."""

import copy
from pathlib import Path
from uuid import uuid4

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid

from fedsec.errors import FedsecError
from fedsec.federation.server_app import FedsecStrategy, ServerTask
from fedsec.privacy.central_dp import clipping_mod, wrap_central_dp
from fedsec.privacy.secagg import (
    SecAggConfig,
    add_to_floats,
    check_secagg_compatible,
    float_vector,
    quantisation_bound,
    secagg_mod,
    wrap_secagg,
)
from fedsec.scenario import load_scenario
from fedsec.strategies.rules import make_rule

ROOT = Path(__file__).resolve().parents[2]
HEART = ROOT / "scenarios" / "heart_fedavg.yaml"
NAMES = ["cleveland", "hungary", "switzerland", "va"]
EXAMPLES = [199, 172, 30, 85]
D = 50
UPDATES = [np.random.default_rng(h).normal(0, 0.05, D + 1) for h in range(4)]
FAIL = set()  # hospitals whose training raises (dropout test)


@pytest.fixture(autouse=True)
def task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    old = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = old
    FAIL.clear()


# ---- a hospital: the fedsec message layout, a fixed update per hospital -----------------
app = ClientApp()


@app.train(mods=[secagg_mod, clipping_mod])
def train(msg: Message, context: Context) -> Message:
    h = int(context.node_config["partition-id"])
    if h in FAIL:
        raise RuntimeError(f"disk full at hospital {h}")
    local = add_to_floats(msg.content["arrays"], UPDATES[h])
    metrics = MetricRecord({"num-examples": EXAMPLES[h], "hospital": h, "train_loss": 0.1 * h, "seconds": 0.0})
    return Message(RecordDict({"arrays": local, "metrics": metrics}), reply_to=msg)


class LoopbackGrid(Grid):
    """Delivers each message to ``app`` at once, one persistent Context per node (as Flower's
    simulation keeps them), and records every reply the server receives."""

    def __init__(self, client_app, n):
        self.app = client_app
        self.contexts = {100 + h: Context(run_id=1, node_id=100 + h, node_config={"partition-id": h,
                                                                                   "num-partitions": n},
                                          state=RecordDict(), run_config={}) for h in range(n)}
        self.pending: dict[str, Message] = {}
        self.seen: list[Message] = []

    def set_run(self, run):
        pass

    @property
    def run(self):
        raise RuntimeError("no run")

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self):
        return list(self.contexts)

    def get_nodes(self):
        return []

    def push_messages(self, messages):
        ids = []
        for m in messages:
            mid = str(uuid4())
            m.metadata.__dict__["_message_id"] = mid
            # each node gets its own copy, as after serialisation (Flower's SecAgg+ workflow
            # sends one RecordDict object to every node and the mod pops keys from it)
            m = Message(content=copy.deepcopy(m.content), metadata=copy.deepcopy(m.metadata))
            try:
                reply = self.app(m, self.contexts[m.metadata.dst_node_id])
            except Exception as err:  # the runtime turns a raising ClientApp into an error reply
                reply = Message(Error(code=1, reason=str(err)), reply_to=m)
            self.pending[mid] = reply
            self.seen.append(reply)
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids):
        return [self.pending.pop(i) for i in list(message_ids) if i in self.pending]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))


class RecordingStrategy(FedsecStrategy):
    def add_round_info(self, section, info):
        self._train_info.setdefault(section, {}).update(info)


def make_strategy(overrides=None):
    scenario = load_scenario(str(HEART), overrides)
    s = RecordingStrategy(scenario, NAMES, [], ServerTask(scenario, None))
    s.bind_nodes({100 + h: h for h in range(4)})
    return s


def global_arrays():
    return ArrayRecord({"w": Array(np.linspace(-1, 1, D).astype(np.float32)), "b": Array(np.zeros(1, np.float32))})


def weighted_mean(rows, weights):
    w = np.asarray(weights, dtype=np.float64)
    return (w[:, None] * np.stack(rows)).sum(0) / w.sum()


def one_round(outer, grid, rnd=1):
    gl = global_arrays()
    msgs = list(outer.configure_train(rnd, gl, ConfigRecord({}), grid))
    assert msgs == []  # the round went through SecAgg+ inside configure_train
    arrays, metrics = outer.aggregate_train(rnd, grid.send_and_receive(msgs))
    return gl, arrays


def test_secagg_sum_equals_the_plain_weighted_mean_within_quantisation():
    strategy = make_strategy()
    outer = wrap_secagg(strategy, True, max_weight=max(EXAMPLES))
    grid = LoopbackGrid(app, 4)
    gl, arrays = one_round(outer, grid)
    got = float_vector(arrays) - float_vector(gl)
    exact = weighted_mean(UPDATES, EXAMPLES)
    bound = quantisation_bound(EXAMPLES, max_weight=max(EXAMPLES))
    assert bound < 2e-5
    assert np.abs(got - exact).max() <= bound
    assert np.abs(got - exact).max() > 0  # really went through fixed point, not a plain sum
    rec = strategy._train_info
    assert rec["privacy"]["secure_aggregation"]["hospitals"] == 4
    assert rec["train"]["va"]["num_examples"] == 85 and rec["train"]["va"]["loss"] == pytest.approx(0.3)


def test_the_server_sees_only_masked_vectors_and_the_aggregate():
    strategy = make_strategy()
    seen_by_rule = []
    original = strategy.aggregate_train

    def spy(rnd, replies):
        replies = list(replies)
        seen_by_rule.extend(float_vector(m.content["arrays"]) for m in replies)
        return original(rnd, replies)

    strategy.aggregate_train = spy
    outer = wrap_secagg(strategy, True, max_weight=max(EXAMPLES))
    grid = LoopbackGrid(app, 4)
    gl, arrays = one_round(outer, grid)
    # what travelled from the hospitals: keys, shares, masked vectors; no update, no model
    for reply in grid.seen:
        assert all(len(rec) == 0 for rec in reply.content.array_records.values())
    masked = [r for r in grid.seen if "masked_params" in r.content.config_records.get("secaggplus_configs", {})]
    assert len(masked) == 4
    # what the aggregation (and any observer) gets: four copies of the aggregate
    assert len(seen_by_rule) == 4 and all(np.array_equal(v, seen_by_rule[0]) for v in seen_by_rule)
    g = float_vector(gl)
    for u in UPDATES:
        assert np.abs(seen_by_rule[0] - g - u).max() > 1e-3


def test_a_dropped_hospital_is_unmasked_and_reported():
    FAIL.add(3)  # va fails in the masking stage, after sharing its keys
    strategy = make_strategy({"federation": {"min_hospitals": 3}})
    outer = wrap_secagg(strategy, True, max_weight=max(EXAMPLES))
    gl, arrays = one_round(outer, LoopbackGrid(app, 4))
    got = float_vector(arrays) - float_vector(gl)
    exact = weighted_mean(UPDATES[:3], EXAMPLES[:3])
    assert np.abs(got - exact).max() <= quantisation_bound(EXAMPLES[:3], max_weight=max(EXAMPLES))
    failures = strategy._train_info["failures"]
    assert len(failures) == 1 and failures[0].startswith("va: dropped out of secure aggregation")
    assert "disk full at hospital 3" in failures[0]


def test_too_many_dropouts_halt_the_round_with_a_clear_error():
    FAIL.update({2, 3})  # 2 of 4 left, the threshold is 3 shares
    outer = wrap_secagg(make_strategy(), True, max_weight=max(EXAMPLES))
    with pytest.raises(FedsecError, match=r"round 1: secure aggregation halted before the sum was unmasked.*"
                                          r"disk full at hospital 2"):
        one_round(outer, LoopbackGrid(app, 4))


def test_client_side_central_dp_composes_with_secagg():
    strategy = make_strategy()
    dp = wrap_central_dp(strategy, {"noise_multiplier": 0.0, "clipping": "client", "clipping_norm": 0.2}, 4)
    outer = wrap_secagg(dp, True, max_weight=max(EXAMPLES))
    gl, arrays = one_round(outer, LoopbackGrid(app, 4))
    clipped = [u * min(1.0, 0.2 / np.linalg.norm(u)) for u in UPDATES]
    got = float_vector(arrays) - float_vector(gl)
    assert np.abs(got - weighted_mean(clipped, EXAMPLES)).max() <= quantisation_bound(EXAMPLES, max_weight=199)
    info = strategy._train_info["privacy"]
    assert set(info) == {"central_dp", "secure_aggregation"}
    assert set(info["central_dp"]["clipped"]) == {n for n, u in zip(NAMES, UPDATES) if np.linalg.norm(u) > 0.2}


def test_rules_that_need_individual_updates_are_refused():
    with pytest.raises(FedsecError, match="strategy 'krum' needs each hospital's update, which secure "
                                          "aggregation hides by design.*use strategy fedavg"):
        check_secagg_compatible(make_rule("krum"))
    for name in ("median", "trimmed_mean", "flame", "foolsgold", "norm_bounding"):
        with pytest.raises(FedsecError, match=f"strategy '{name}'"):
            check_secagg_compatible(make_rule(name))
    check_secagg_compatible(None)
    check_secagg_compatible(make_rule("fedavg"))
    with pytest.raises(FedsecError, match="'krum' needs each hospital's update"):
        wrap_secagg(make_strategy({"strategy": {"rule": "krum"}}))
    with pytest.raises(FedsecError, match="cannot clip updates it cannot see"):
        wrap_secagg(wrap_central_dp(make_strategy(), {"noise_multiplier": 1.0}, 4))


def test_options():
    assert SecAggConfig.parse(True) == SecAggConfig()
    with pytest.raises(FedsecError, match=r"privacy\.secure_aggregation\.treshold: unknown option"):
        SecAggConfig.parse({"treshold": 2})
    with pytest.raises(FedsecError, match="modulus_range"):
        SecAggConfig.parse({"modulus_range": 3 * 2**22})


# ---- the same on Flower's simulation engine, with fedsec's own ClientApp handlers --------
secure_app = ClientApp()


def _register():
    from fedsec.federation import client_app as fc

    secure_app.query()(fc.query)
    secure_app.train(mods=[secagg_mod, clipping_mod])(fc.train)
    secure_app.evaluate()(fc.evaluate)


_register()


@pytest.mark.ray
def test_secagg_round_on_ray_with_fedsec_apps():
    import logging
    import shutil
    import tempfile

    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from fedsec.federation.engine import quiet, ray_init_args
    from fedsec.federation.server_app import introduce_nodes
    from fedsec.tasks import build_task

    quiet(False)
    logging.getLogger("flwr").setLevel(logging.ERROR)
    scenario = load_scenario(str(HEART), {"federation": {"rounds": 2}})
    task = build_task(scenario)
    out: dict = {}
    server = ServerApp()

    @server.main()
    def main(grid, context):
        mapping, sizes = introduce_nodes(grid, scenario.to_yaml(), 4, 120)
        strategy = RecordingStrategy(scenario, list(task.data.hospitals), [], ServerTask(scenario, task))
        strategy.bind_nodes(mapping)
        outer = wrap_secagg(strategy, True, max_weight=max(s["num-train"] for s in sizes.values()),
                            timeout=scenario.federation.timeout_s)
        records = []
        strategy.on_round = records.append
        from flwr.app import ArrayRecord as AR

        res = outer.start(grid=grid, initial_arrays=AR(task.make_model(seed=0).state_dict()), num_rounds=2,
                          timeout=120, train_config=ConfigRecord({"scenario": scenario.to_yaml()}),
                          evaluate_config=ConfigRecord({"scenario": scenario.to_yaml()}))
        out["records"], out["result"] = records, res

    temp = tempfile.mkdtemp(prefix="fedsec-ray-")  # short: Ray's socket paths must fit 107 bytes
    try:
        run_simulation(server_app=server, client_app=secure_app, num_supernodes=4,
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                       "init_args": ray_init_args(scenario, False, temp)})
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    records = out["records"]
    assert [r["round"] for r in records] == [1, 2]
    assert records[-1]["privacy"]["secure_aggregation"]["hospitals"] == 4
    assert records[-1]["global"]["accuracy"] > 0.6

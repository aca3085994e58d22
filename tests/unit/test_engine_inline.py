"""The in-process engine's pieces (fedsec/federation/inline.py) with a toy ClientApp: node
configs and contexts as Flower's simulation gives them, message isolation, error replies,
torch threads and global RNGs left as they were, timeouts; and fedsec runs on it."""

import json
import random

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

import fedsec
from fedsec.errors import ScenarioError
from fedsec.federation.inline import run_inline
from fedsec.runner import RunFailed
from fedsec.scenario import load_scenario

from .test_scenario import QUICKSTART

toy = ClientApp()


@toy.train()
def _train(msg, context):
    cfg = msg.content["config"]
    if int(cfg.get("boom", 0)) == int(context.node_config["partition-id"]):
        raise RuntimeError("disk full")
    arrays = msg.content["arrays"]
    arrays["w"] = Array(arrays["w"].numpy() + 1.0)  # changing what it received: not the server's copy
    calls = int(context.state["count"]["n"]) + 1 if "count" in context.state else 1
    context.state["count"] = MetricRecord({"n": calls})
    torch.manual_seed(1234)  # a hospital seeding the global RNG
    np.random.seed(1234)
    random.seed(1234)
    torch.set_num_threads(3)  # and changing the thread count (the engine restores both)
    metrics = MetricRecord({"partition": int(context.node_config["partition-id"]),
                            "partitions": int(context.node_config["num-partitions"]),
                            "calls": calls})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


@toy.query()
def _query(msg, context):
    return Message(RecordDict({"metrics": MetricRecord({"threads": torch.get_num_threads()})}), reply_to=msg)


def _scenario(*overrides):
    return load_scenario(QUICKSTART, ["engine.name=inline", *overrides])


def _send(grid, kind, config, nodes=None, timeout=None):
    arrays = ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))})
    msgs = [Message(RecordDict({"arrays": arrays, "config": ConfigRecord(config)}), message_type=kind, dst_node_id=n)
            for n in (nodes if nodes is not None else grid.get_node_ids())]
    return arrays, msgs, list(grid.send_and_receive(msgs, timeout=timeout))


def test_nodes_get_partition_ids_and_keep_their_context_across_rounds():
    def serve(grid):
        out = []
        for _ in range(3):
            arrays, msgs, replies = _send(grid, MessageType.TRAIN, {"boom": -1})
            out.append((arrays, msgs, replies))
        return out

    rounds = run_inline(_scenario(), serve, 3, client_app=toy)
    arrays, msgs, replies = rounds[-1]
    assert sorted(int(r.content["metrics"]["partition"]) for r in replies) == [0, 1, 2]
    assert {int(r.content["metrics"]["partitions"]) for r in replies} == {3}
    assert [int(r.content["metrics"]["calls"]) for r in replies] == [3, 3, 3]  # Context.state persists
    # each reply answers its own message and comes from its destination node
    by_id = {m.metadata.message_id: m for m in msgs}
    for r in replies:
        sent = by_id[r.metadata.reply_to_message_id]
        assert r.metadata.src_node_id == sent.metadata.dst_node_id
        assert r.metadata.message_id and r.metadata.message_id != sent.metadata.message_id
    # the ClientApp added 1 to its copy; the server's record is untouched
    assert arrays["w"].numpy().tolist() == [0.0, 0.0, 0.0]
    assert [r.content["arrays"]["w"].numpy().tolist() for r in replies] == [[1.0, 1.0, 1.0]] * 3


def test_client_threads_and_global_rngs_are_restored():
    torch.set_num_threads(2)
    try:
        torch.manual_seed(7)
        expected = torch.rand(3)
        np.random.seed(7)
        expected_np = np.random.rand(3)
        random.seed(7)
        expected_py = random.random()
        torch.manual_seed(7)
        np.random.seed(7)
        random.seed(7)

        def serve(grid):
            return list(grid.send_and_receive(
                [Message(RecordDict({"config": ConfigRecord({})}), message_type=MessageType.QUERY, dst_node_id=n)
                 for n in grid.get_node_ids()]))

        replies = run_inline(_scenario(), serve, 2, client_app=toy)
        assert [int(r.content["metrics"]["threads"]) for r in replies] == [1, 1]  # engine.num_cpus=1
        run_inline(_scenario(), lambda g: _send(g, MessageType.TRAIN, {"boom": -1}),
                                  2, client_app=toy)
        assert torch.get_num_threads() == 2
        assert torch.equal(torch.rand(3), expected)
        assert np.array_equal(np.random.rand(3), expected_np)
        assert random.random() == expected_py
    finally:
        torch.set_num_threads(1)


def test_a_raising_clientapp_becomes_an_error_reply_with_flowers_wording():
    _, msgs, replies = run_inline(_scenario(), lambda g: _send(g, MessageType.TRAIN, {"boom": 1}),
                                  2, client_app=toy)
    errors = [r for r in replies if r.has_error()]
    assert len(replies) == 2 and len(errors) == 1
    assert errors[0].error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert "ClientAppException" in errors[0].error.reason and "disk full" in errors[0].error.reason


def test_unknown_node_and_expired_timeout_give_no_reply():
    def serve(grid):
        unknown = _send(grid, MessageType.TRAIN, {"boom": -1}, nodes=[12345])[2]
        late = _send(grid, MessageType.TRAIN, {"boom": -1}, timeout=-1.0)[2]
        return unknown, late

    unknown, late = run_inline(_scenario(), serve, 2, client_app=toy)
    assert unknown == [] and late == []


def test_engine_name_inline_is_valid_and_others_name_the_choices():
    assert _scenario().engine.name == "inline"
    with pytest.raises(ScenarioError, match="engine.name.*'inline'"):
        load_scenario(QUICKSTART, ["engine.name=thread"])


def test_quickstart_inline_results_and_a_failing_hospital(tmp_path):
    summary = fedsec.run(QUICKSTART, overrides=["engine.name=inline", "federation.rounds=2"], out=tmp_path / "ok",
                         progress=False)
    assert summary["status"] == "completed" and summary["rounds"] == 2
    assert set(summary["per_hospital"]) == {"cleveland", "hungary"}
    assert summary["final"]["accuracy"] > 0.7
    manifest = json.loads((tmp_path / "ok" / "manifest.json").read_text())
    assert manifest["status"] == "completed"
    with pytest.raises(RunFailed) as info:
        fedsec.run(QUICKSTART, out=tmp_path / "boom", progress=False,
                   overrides=["engine.name=inline", "federation.rounds=2",
                              "attacks=[{preset: hospital_fault, hospitals: [1], message: disk full}]"])
    assert "hungary" in str(info.value) and "disk full at hospital 1" in str(info.value)


# ---- sweeps ------------------------------------------------------------------------------


def test_sweep_picks_the_engine_per_cell():
    from fedsec.sweep import cell_engine, cell_need, default_parallel

    q = load_scenario(QUICKSTART)  # 2 hospitals on CPU: in-process
    assert cell_engine(q) == "inline" and cell_engine(q, "ray") == "ray"
    assert cell_engine(q, address="10.0.0.5:6379") == "ray"  # a cluster was named
    assert cell_engine(load_scenario(QUICKSTART, ["engine.address=10.0.0.5:6379"])) == "ray"
    many = ["task.name=pneumonia", "task.model=small_cnn", "federation.sites=null",
            "federation.partition={name: iid}", "federation.hospitals=50"]  # 50 hospitals: Ray
    assert cell_engine(load_scenario(QUICKSTART, many)) == "ray"
    assert cell_engine(load_scenario(QUICKSTART, ["engine.name=inline", *many])) == "inline"  # the scenario's choice
    # an in-process cell runs one hospital at a time: one CPU, so two cells side by side on 2 CPUs
    assert cell_need(q, "inline") == 1.0 and cell_need(q, "ray") == 2.0
    assert default_parallel([q], cpus=2, engines=["inline"]) == 2 and default_parallel([q], cpus=2) == 1


def test_worker_threads_share_the_cores():
    from fedsec.sweep import worker_threads

    assert worker_threads(2, cpus=2) == 1 and worker_threads(1, cpus=2) == 2
    assert worker_threads(3, cpus=16) == 5 and worker_threads(4, cpus=2) == 1
    assert worker_threads(0, cpus=2) == 2  # a nonsense slot count still gives a valid share


def test_sweep_runs_small_cells_in_process_with_a_direct_runs_results(tmp_path):
    from fedsec import sweep as sw

    res = sw.run_sweep(QUICKSTART, grid=["strategy=fedavg,median"], overrides=["federation.rounds=2"],
                       out=tmp_path / "sweep", stream=None)
    assert [c["status"] for c in res["cells"]] == ["completed", "completed"]
    assert [c["engine"] for c in res["cells"]] == ["inline", "inline"]
    meta = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert meta["ray_startup_s"] is None  # no Ray head was started
    # each worker takes its share of the cores (no oversubscription of the server side)
    want_threads = sw.worker_threads(meta["parallel"])
    for cell in res["cells"]:
        manifest = json.loads((tmp_path / "sweep" / cell["path"] / "manifest.json").read_text())
        assert manifest["torch_threads"] == want_threads
    for cell in res["cells"]:
        direct = tmp_path / f"direct-{cell['values']['strategy']}"
        fedsec.run(QUICKSTART, overrides=cell["overrides"] + ["engine.name=inline"], out=direct, progress=False)
        got = [json.loads(x) for x in (tmp_path / "sweep" / cell["path"] / "rounds.jsonl").read_text().splitlines()]
        want = [json.loads(x) for x in (direct / "rounds.jsonl").read_text().splitlines()]
        assert [r["global"] for r in got] == [r["global"] for r in want]
        assert [r["per_hospital"] for r in got] == [r["per_hospital"] for r in want]


class _SlowBackend:
    """A backend of three workers (like Ray's actor pool): hospitals side by side."""

    def __init__(self, slow_partition=None):
        from fedsec.federation.inline import InlineBackend

        self.inner = InlineBackend()
        self.num_workers, self.active, self.peak = 3, 0, 0
        self.slow_partition = slow_partition
        import threading

        self.lock = threading.Lock()

    def build(self, app_fn):
        self.inner.build(app_fn)

    def terminate(self):
        pass

    def process_message(self, message, context):
        import time

        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
        try:
            time.sleep(2.0 if context.node_config["partition-id"] == self.slow_partition else 0.2)
            return self.inner.process_message(message, context)
        finally:
            with self.lock:
                self.active -= 1


def test_a_backend_with_several_workers_runs_hospitals_side_by_side_and_drops_late_replies():
    from fedsec.federation.inline import run_on_backend

    backend = _SlowBackend()
    replies = run_on_backend(backend, lambda g: _send(g, MessageType.TRAIN, {"boom": -1})[2], 3, client_app=toy)
    assert sorted(int(r.content["metrics"]["partition"]) for r in replies) == [0, 1, 2]
    assert backend.peak == 3
    slow = _SlowBackend(slow_partition=1)
    replies = run_on_backend(slow, lambda g: _send(g, MessageType.TRAIN, {"boom": -1}, timeout=1.0)[2], 3,
                             client_app=toy)
    assert sorted(int(r.content["metrics"]["partition"]) for r in replies) == [0, 2]  # 1 did not answer in time


def test_inline_backend_has_flowers_backend_interface():
    import inspect

    from flwr.server.superlink.fleet.vce.backend import Backend

    from fedsec.federation.inline import InlineBackend

    for name in Backend.__abstractmethods__ | {"num_workers"}:
        theirs, ours = getattr(Backend, name), getattr(InlineBackend, name)
        if callable(theirs):
            assert list(inspect.signature(ours).parameters) == list(inspect.signature(theirs).parameters), name
        else:
            assert isinstance(ours, property), name


def test_hospitals_in_the_servers_process_reuse_its_scenario_which_equals_the_parsed_text():
    """The in-process engine's hospitals take the server's Scenario instead of parsing its
    text again; exact only because parsing the text gives back an equal Scenario, for every
    shipped scenario. The hospitals get a copy: what one changes the server never sees."""
    import glob

    from fedsec.federation import client_app
    from fedsec.scenario import parse_yaml_text

    checked = 0
    for path in sorted(glob.glob(str(QUICKSTART.parent / "*.yaml"))):
        s = load_scenario(path)
        assert load_scenario(parse_yaml_text(s.to_yaml(), path)) == s, path
        checked += 1
    assert checked >= 10

    s = load_scenario(QUICKSTART)
    text = s.to_yaml()
    client_app.remember_scenario(text, s)
    client_app._CACHE.clear()
    try:
        context = Context(run_id=1, node_id=1, node_config={"partition-id": 1}, state=RecordDict(), run_config={})
        got, _task, _plans, hospital, _ = client_app.load_context(ConfigRecord({"scenario": text}), context)
        assert got == s and got is not s and hospital == 1
        got.federation.rounds = 99
        assert s.federation.rounds != 99
    finally:
        client_app._PARSED.clear()
        client_app._CACHE.clear()

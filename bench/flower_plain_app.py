"""A plain Flower 1.41 app (Message API) for bench/bench_engines.py: the reference a Flower
user would write for the quickstart, with Flower's own FedAvg and simulation defaults.

It trains on the same data with the same local loop as fedsec (fedsec's data loader and
train_local), so the benchmark compares frameworks, not models. The scenario overrides come
in FEDSEC_BENCH_OVERRIDES (JSON list). No import-time side effects: Ray workers import it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

QUICKSTART = str(Path(__file__).resolve().parents[1] / "scenarios" / "quickstart.yaml")
client_app = ClientApp()
_TASK: dict = {}


def _task():
    if "task" not in _TASK:
        from fedsec.scenario import load_scenario
        from fedsec.tasks import build_task

        torch.set_num_threads(1)
        scenario = load_scenario(QUICKSTART, json.loads(os.environ.get("FEDSEC_BENCH_OVERRIDES", "[]")))
        _TASK["task"] = (scenario, build_task(scenario))
    return _TASK["task"]


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    from fedsec.core.training import train_local

    scenario, task = _task()
    h = int(context.node_config["partition-id"])
    model = task.make_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    r = int(msg.content["config"]["server-round"])
    stats = train_local(model, task.data.train[h], task, scenario.federation.local,
                        torch.Generator().manual_seed(r * 1000 + h))
    metrics = MetricRecord({"num-examples": len(task.data.train[h]), "train_loss": float(stats["loss"])})
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg)


@client_app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    from fedsec.core.training import predict

    _, task = _task()
    h = int(context.node_config["partition-id"])
    model = task.make_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    scores, loss = predict(model, task.data.test[h], task)
    acc = float((scores.argmax(1) == task.data.test[h].y).float().mean()) if scores.ndim == 2 else 0.0
    metrics = MetricRecord({"num-examples": len(task.data.test[h]), "loss": float(loss), "accuracy": acc})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


class _TimedFedAvg(FedAvg):
    """Flower's FedAvg, recording each round's seconds (train + evaluate)."""

    def __init__(self, times: list[float], **kw):
        super().__init__(**kw)
        self.times, self._t0 = times, None

    def configure_train(self, server_round, arrays, config, grid):
        self._t0 = time.perf_counter()
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round, replies):
        out = super().aggregate_evaluate(server_round, replies)
        self.times.append(time.perf_counter() - self._t0)
        return out


def make_server_app(rounds: int, times: list[float]) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        _, task = _task()
        strategy = _TimedFedAvg(times, fraction_train=1.0, fraction_evaluate=1.0, min_available_nodes=2)
        strategy.start(grid=grid, initial_arrays=ArrayRecord(task.make_model(seed=0).state_dict()),
                       num_rounds=rounds, train_config=ConfigRecord({}))

    return app

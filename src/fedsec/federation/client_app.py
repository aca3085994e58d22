"""A hospital: Flower ClientApp (Message API) that trains and evaluates locally.

Everything the hospital needs reaches it through the message (the resolved scenario as
YAML text in the ConfigRecord) and its Context (``partition-id`` = hospital index, optional
``data-path`` in deployment). The scenario's task is built once per process and cached:
Ray reuses actors across messages, so data is loaded once per actor, not once per round.

No import-time side effects: Ray workers and SuperNodes import this module.
"""

from __future__ import annotations

import copy
import hashlib
import os
import time

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedsec.attacks.base import AttackContext
from fedsec.privacy.central_dp import clipping_mod
from fedsec.privacy.secagg import secagg_mod

app = ClientApp()

# digest of the scenario text -> (scenario, task, plans); small and bounded (one per run).
_CACHE: dict[str, tuple] = {}
_POISONED: dict[tuple, object] = {}
# digest of the scenario text -> the Scenario the server dumped it from, when the server runs
# in this process (the in-process engine): parsing and validating the text again cost about
# 0.15 s of a 6 s quickstart. Ray's actors and deployed nodes never see it and parse the text.
_PARSED: dict[str, object] = {}


def remember_scenario(text: str, scenario) -> None:
    """The server's scenario and its text, for hospitals in the same process (a copy)."""
    _PARSED.clear()
    _PARSED[hashlib.sha256(text.encode()).hexdigest()] = copy.deepcopy(scenario)


def _threads(num_cpus: float | None) -> None:
    # Two threads on two cores made a training step ~20x slower here: follow the CPU share.
    n = max(1, int(num_cpus or 1))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def load_context(config: ConfigRecord, context: Context):
    """-> (scenario, task, plans, hospital id), cached per scenario text."""
    from fedsec.federation.adversary import build_plans
    from fedsec.scenario import load_scenario, parse_yaml_text
    from fedsec.tasks import build_task

    text = str(config["scenario"])
    key = hashlib.sha256(text.encode()).hexdigest()
    data_path = context.node_config.get("data-path")
    if data_path:
        key += f"|{data_path}"
    if key not in _CACHE:
        if len(_CACHE) > 4:
            _CACHE.clear()
            _POISONED.clear()
        # the server's scenario text is untrusted input here too: the same bounded parser
        parsed = _PARSED.get(key)
        if parsed is not None:
            scenario = copy.deepcopy(parsed)
        else:
            scenario = load_scenario(parse_yaml_text(text, "the server's scenario"))
        total = None
        if data_path:  # deployment: this node's own data replaces the scenario's path
            scenario.task.path = str(data_path)
            total = _own_site_only(scenario, context)
        _threads(scenario.engine.num_cpus)
        own = [int(context.node_config.get("partition-id", 0))] if total else None
        task = build_task(scenario, own)  # own: this node's id seeds its per-hospital draws
        # the federation's size, not the node's: who is malicious is drawn over every hospital
        task.data.info["federation_size"] = total or task.data.num_hospitals
        task.data.info["own_data"] = bool(data_path)
        plans = build_plans(scenario, federation_size(task))
        _CACHE[key] = (scenario, task, plans)
    scenario, task, plans = _CACHE[key]
    hospital = int(context.node_config.get("partition-id", 0))
    if data_path:
        hospital_index = 0 if task.data.num_hospitals == 1 else hospital
    else:
        hospital_index = hospital
    if not 0 <= hospital_index < task.data.num_hospitals:
        raise ValueError(f"partition-id {hospital} but the scenario has {task.data.num_hospitals} hospitals")
    return scenario, task, plans, hospital, hospital_index


def federation_size(task) -> int:
    """How many hospitals the federation has (a deployment node holds only its own)."""
    return int(task.data.info.get("federation_size", task.data.num_hospitals))


def _own_site_only(scenario, context: Context) -> int | None:
    """A deployment node of a natural split whose sites the task names (heart disease's four
    hospitals): read only this hospital's own file from its data folder, not every site's.
    -> the federation's number of hospitals (None when the node's data is used as given)."""
    from fedsec.registry import TASKS

    fed = scenario.federation
    if str(dict(fed.partition).get("name", "natural")) != "natural":
        return None
    sites = list(fed.sites or TASKS.get(scenario.task.name).spec.sites or [])
    if not sites:
        return None
    pid = int(context.node_config.get("partition-id", 0))
    if not 0 <= pid < len(sites):
        raise ValueError(f"partition-id {pid} but the scenario has {len(sites)} hospitals")
    fed.sites = [sites[pid]]
    return len(sites)


def _device(scenario) -> torch.device:
    # Ray sets CUDA_VISIBLE_DEVICES for an actor that was given a GPU share; without one the
    # actor sees no GPU and trains on CPU.
    if scenario.engine.num_gpus > 0 and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Introduce the node: which hospital it is, how much data it holds and what one record
    looks like to the model (input shape, classes) -- all a deployment's server, which holds
    no patient data, needs to build the global model."""
    scenario, task, _, hospital, idx = load_context(msg.content["config"], context)
    metrics = MetricRecord({"hospital": hospital, "num-train": len(task.data.train[idx]),
                            "num-test": len(task.data.test[idx]), "pid": os.getpid(),
                            "num-classes": int(task.data.num_classes), "multilabel": int(task.data.multilabel)})
    about = ConfigRecord({"name": str(task.data.hospitals[idx]),
                          "input-shape": [int(d) for d in task.data.input_shape]})
    moments = task.data.info.get("train_moments")
    if task.data.info.get("own_data") and moments and task.data.num_hospitals == 1:
        # a node holding only its own rows: its training features' count, mean and M2, from
        # which the server computes the pooled statistics every hospital standardises with
        own = moments[0]
        metrics["train-n"] = int(own["n"])
        metrics["train-mean"] = [float(v) for v in own["mean"]]
        metrics["train-m2"] = [float(v) for v in own["m2"]]
    return Message(content=RecordDict({"metrics": metrics, "config": about}), reply_to=msg)


@app.train(mods=[secagg_mod, clipping_mod])
def train(msg: Message, context: Context) -> Message:
    from fedsec.core.params import flatten_state, unflatten_state
    from fedsec.core.training import seed_global_rng, train_local

    t0 = time.perf_counter()
    config = msg.content["config"]
    scenario, task, plans, hospital, idx = load_context(config, context)
    server_round = int(config["server-round"])
    device = _device(scenario)
    seed = _seed(scenario.seed, server_round, hospital)

    model = task.make_model()
    global_state = msg.content["arrays"].to_torch_state_dict()
    model.load_state_dict(global_state)

    data = task.data.train[idx]
    active = [p for p in plans if hospital in p.hospitals and p.active(server_round)]
    for p in active:
        if p.has("poison_data"):
            cache_key = (id(p.attack), hospital)
            if cache_key not in _POISONED:
                rng = np.random.default_rng([scenario.seed, hospital, p.index])
                ctx = AttackContext(server_round, hospital, p.hospitals, federation_size(task), task,
                                    torch.Generator().manual_seed(seed))
                _POISONED[cache_key] = p.attack.poison_data(data, rng, ctx)
            data = _POISONED[cache_key]

    generator = torch.Generator().manual_seed(seed)
    seed_global_rng(seed)  # dropout and any other global-RNG use
    privacy = scenario.privacy
    dp_metrics: dict = {}
    if privacy.dp_sgd:  # record-level DP: Opacus, epsilon from this hospital's history
        from fedsec.privacy.dp_sgd import DPConfig, charged_before, count_participation, train_dp_sgd

        charged = count_participation(context.state, server_round, charged_before(config, hospital))
        dp = DPConfig.parse(privacy.dp_sgd).for_hospital(task.data.hospitals[idx])  # its own budget's delta
        res = train_dp_sgd(model, data, task, scenario.federation.local, dp,
                           generator=generator, participations=charged,
                           planned_rounds=scenario.federation.rounds, device=device)
        stats, dp_metrics = {"loss": res.loss, "steps": res.steps}, res.metrics()
    else:
        stats = train_local(model, data, task, scenario.federation.local, generator, device)

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    for p in active:
        if p.has("poison_update"):
            ctx = AttackContext(server_round, hospital, p.hospitals, federation_size(task), task,
                                torch.Generator().manual_seed(seed + 1),
                                participants=[int(h) for h in config.get("train-hospitals", [])] or None,
                                extra={"scenario": scenario})  # the defense in force (attacks.defense)
            g = flatten_state(global_state)
            poisoned = p.attack.poison_update(g, flatten_state(state), ctx)
            state = unflatten_state(poisoned, state)
    if privacy.compression:  # the wire format: every reply, attackers' included
        from fedsec.privacy.compression import compress_state

        state = compress_state(global_state, state, privacy.compression)

    metrics = {
        "num-examples": len(data), "hospital": hospital, "train_loss": stats["loss"],
        "steps": stats["steps"], "seconds": time.perf_counter() - t0, **dp_metrics,
    }
    for p in active:  # availability attacks: what the reply carries (size, simulated arrival, dropout)
        if p.has("poison_reply"):
            ctx = AttackContext(server_round, hospital, p.hospitals, federation_size(task), task,
                                torch.Generator().manual_seed(seed + 2), extra={"scenario": scenario, "data": data})
            state, metrics = p.attack.poison_reply(state, dict(metrics), ctx)
    metrics = MetricRecord(metrics)
    return Message(content=RecordDict({"arrays": ArrayRecord(state), "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Scores of the global model on this hospital's test patients. The per-patient scores
    (predictions, not inputs) go back so the server can compute exact metrics on the union."""
    from fedsec.core.training import predict

    config = msg.content["config"]
    scenario, task, plans, hospital, idx = load_context(config, context)
    model = task.make_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    test = task.data.test[idx]
    scores, loss = predict(model, test, task, _device(scenario))
    metrics = MetricRecord({"num-examples": len(test), "hospital": hospital, "loss": loss})
    preds = ArrayRecord({"scores": Array(scores.numpy()), "labels": Array(test.y.numpy())})
    content = RecordDict({"metrics": metrics, "predictions": preds})
    # attack metrics computed on this hospital's own test records (a backdoor's success):
    # per-record outcomes, averaged over every hospital's records by the server
    records = {}
    model.eval()
    for p in plans:
        if p.has("evaluate_records"):
            ctx = AttackContext(int(config["server-round"]), hospital, p.hospitals, federation_size(task), task, None,
                                extra={"model_fn": task.make_model, "scenario": scenario})
            with torch.no_grad():
                for k, v in p.attack.evaluate_records(model, test, ctx).items():
                    records[f"{p.index}/{k}"] = Array(v.double().numpy())
    if records:
        content["attack-records"] = ArrayRecord(records)
    return Message(content=content, reply_to=msg)

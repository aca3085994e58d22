"""The consortium server: Flower ServerApp (Message API) running fedsec's strategy.

:class:`FedsecStrategy` is Flower's FedAvg with three changes:
- hospitals are selected by id with a seeded RNG (Flower samples node ids at random, which
  would make runs irreproducible and can't force attackers into a round);
- ``aggregate_train`` flattens the replies, lets the adversary (colluding coalition) rewrite
  the malicious ones, lets observers look at what the server sees, then applies the robust
  rule; plain FedAvg with no attacker on the server goes through Flower's own aggregation;
- ``aggregate_evaluate`` computes exact union metrics from per-patient scores, evaluates
  attack success on the global model, and appends one record per round to the results.
A reply that carries an error fails the run with the hospital's name and the reason (Flower
alone would log "0 results, N failures" and return empty metrics), unless
``federation.min_hospitals`` allows the round to go on without it.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Callable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedsec.attacks.base import AttackContext
from fedsec.errors import FedsecError
from fedsec.federation.adversary import AttackPlan, all_malicious
from fedsec.federation.params import flatten_state, unflatten_state
from fedsec.metrics import METRIC_KEYS, classification_metrics

log = logging.getLogger("fedsec")


def finite_arrays(content: RecordDict) -> bool:
    """False when any float array of the reply's ``arrays`` holds NaN or +-inf."""
    if "arrays" not in content:
        return True
    for arr in content["arrays"].values():
        a = arr.numpy()
        if a.dtype.kind in "fc" and not np.isfinite(a).all():
            return False
    return True


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


class ServerTask:
    """The server's own copy of the task, built only when something needs it (attack
    evaluation on triggered test data, observers' scoring in simulation)."""

    def __init__(self, scenario, task=None):
        self.scenario, self._task = scenario, task

    @property
    def task(self):
        if self._task is None:
            from fedsec.tasks import build_task

            self._task = build_task(self.scenario)
        return self._task


class FedsecStrategy(FedAvg):
    def __init__(self, scenario, hospitals: list[str], plans: list[AttackPlan], server_task: ServerTask,
                 run_dir=None, on_round: Callable[[dict], None] | None = None, round_offset: int = 0):
        n = len(hospitals)
        fed = scenario.federation
        super().__init__(fraction_train=fed.fraction_train, fraction_evaluate=fed.fraction_evaluate,
                         min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1)
        self.scenario, self.hospitals, self.plans = scenario, hospitals, plans
        self.server_task, self.run_dir, self.on_round = server_task, run_dir, on_round
        self.round_offset = round_offset
        self.node_of: dict[int, int] = {}  # hospital id -> node id
        self.hospital_of: dict[int, int] = {}  # node id -> hospital id
        self.malicious = all_malicious(plans)
        self.rule = self._make_rule()
        self._global: ArrayRecord | None = None
        self._round_t0 = 0.0
        self._train_info: dict = {}
        self.rounds_done = 0
        self.last_record: dict | None = None
        self.rule_state_note = None
        self.num_hospitals = n

    # ---- set-up ------------------------------------------------------------------------
    def _make_rule(self):
        spec = dict(self.scenario.strategy)
        name = spec.get("rule", "fedavg")
        options = {k: v for k, v in spec.items() if k not in ("preset", "rule", "description", "flower")}
        if name == "fedavg" and not options:
            return None  # Flower's own FedAvg aggregation
        from fedsec.strategies.rules import make_rule

        return make_rule(name, **options)

    def bind_nodes(self, mapping: dict[int, int]) -> None:
        self.hospital_of = dict(mapping)
        self.node_of = {h: nid for nid, h in mapping.items()}

    def add_round_info(self, section: str, info: dict) -> None:
        """Strategy wrappers (central DP, secure aggregation) add their figures to this round's
        record (called after ``aggregate_train``, before the record is written)."""
        self._train_info.setdefault(section, {}).update(info)

    def _r(self, server_round: int) -> int:
        return server_round + self.round_offset

    def _name(self, hospital: int) -> str:
        return self.hospitals[hospital] if 0 <= hospital < len(self.hospitals) else f"hospital-{hospital}"

    def _select(self, server_round: int, fraction: float, salt: int) -> list[int]:
        n = self.num_hospitals
        available = sorted(self.node_of)
        k = min(len(available), max(1, math.ceil(fraction * n)))
        if k >= len(available):
            return available
        rng = np.random.default_rng([self.scenario.seed, server_round, salt])
        chosen = set(int(h) for h in rng.choice(available, size=k, replace=False))
        if salt == 1:  # training: attackers join every active round unless told otherwise
            for p in self.plans:
                if p.active(server_round) and not p.only_when_selected:
                    chosen.update(h for h in p.hospitals if h in self.node_of)
        return sorted(chosen)

    def _messages(self, hospitals: list[int], arrays: ArrayRecord, config: ConfigRecord, kind: str):
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return [Message(content=record, message_type=kind, dst_node_id=self.node_of[h]) for h in hospitals]

    # ---- training ----------------------------------------------------------------------
    def configure_train(self, server_round, arrays, config, grid):
        r = self._r(server_round)
        self._round_t0 = time.perf_counter()
        self._global = arrays
        config["server-round"] = r
        self._selected = self._select(r, self.fraction_train, 1)
        return self._messages(self._selected, arrays, config, MessageType.TRAIN)

    def _check(self, server_round: int, replies, is_train: bool, expected: list[int]):
        valid, errors = self._check_and_log_replies(list(replies), is_train=is_train, validate=False)
        # A diverged hospital (NaN / inf weights) is a failed reply, not an update: one NaN would
        # make every rule's output NaN. It counts against federation.min_hospitals like a crash.
        finite = [not is_train or finite_arrays(m.content) for m in valid]
        diverged = [m for m, ok in zip(valid, finite) if not ok]
        valid = [m for m, ok in zip(valid, finite) if ok]
        # one line per failing hospital; the full text (a traceback) goes to failures.log
        from fedsec.results import one_line_reason

        phase = "training" if is_train else "evaluation"
        problems = []
        for m in errors:
            name = self._name(self.hospital_of.get(m.metadata.src_node_id, -1))
            problems.append(f"{name}: {one_line_reason(m.error.reason)}")
            if self.run_dir is not None:
                self.run_dir.log_failure(server_round, name, phase, m.error.reason)
        problems += [f"{self._name(int(m.content['metrics']['hospital']))}: its update has NaN or infinite values "
                     "(local training diverged?); left out of the aggregate" for m in diverged]
        replied = ({int(m.content["metrics"]["hospital"]) for m in valid + diverged}
                   | {self.hospital_of.get(m.metadata.src_node_id, -1) for m in errors})
        problems += [f"{self._name(h)}: no reply within {self.scenario.federation.timeout_s:g} s"
                     for h in expected if h not in replied]
        need = self.scenario.federation.min_hospitals
        need = len(expected) if need is None else min(need, len(expected))
        if len(valid) < need:
            err = FedsecError(
                f"round {server_round}: {len(problems)} of {len(expected)} hospitals failed during {phase} "
                f"(federation.min_hospitals={need}):\n  " + "\n  ".join(problems))
            err.failures = [{"round": server_round, "hospital": h, "reason": r}
                            for h, _, r in (p.partition(": ") for p in problems)]
            raise err
        valid.sort(key=lambda m: int(m.content["metrics"]["hospital"]))  # order-independent sums
        return valid, problems

    def aggregate_train(self, server_round, replies):
        r = self._r(server_round)
        valid, problems = self._check(r, replies, True, self._selected)
        contents = [m.content for m in valid]
        ids = [int(c["metrics"]["hospital"]) for c in contents]
        self._train_info = {
            "selected": [self._name(h) for h in self._selected],
            "failures": problems,
            "train": {self._name(h): {"loss": float(c["metrics"]["train_loss"]),
                                      "num_examples": int(c["metrics"]["num-examples"]),
                                      "seconds": float(c["metrics"]["seconds"])}
                      for h, c in zip(ids, contents)},
            "attack": {}, "defense": {},
        }
        eps = {self._name(h): float(c["metrics"]["dp-epsilon"]) for h, c in zip(ids, contents)
               if "dp-epsilon" in c["metrics"]}
        if eps:  # DP-SGD: each hospital's cumulative (epsilon, delta) after this round
            self.add_round_info("privacy", {"dp_sgd": {
                "epsilon": eps, "epsilon_max": max(eps.values()),
                "delta": {self._name(h): float(c["metrics"]["dp-delta"]) for h, c in zip(ids, contents)
                          if "dp-delta" in c["metrics"]},
                "noise_multiplier": {self._name(h): float(c["metrics"]["dp-noise-multiplier"])
                                     for h, c in zip(ids, contents) if "dp-noise-multiplier" in c["metrics"]}}})
        server_hooks = [p for p in self.plans if p.active(r) and (p.has("collude") or p.has("observe"))]
        if self.rule is None and not server_hooks:
            arrays = aggregate_arrayrecords(contents, self.weighted_by_key)
        else:
            arrays = self._robust_aggregate(r, ids, contents)
        weights = [int(c["metrics"]["num-examples"]) for c in contents]
        loss = sum(w * float(c["metrics"]["train_loss"]) for w, c in zip(weights, contents)) / max(sum(weights), 1)
        return arrays, MetricRecord({"train_loss": loss})

    def _robust_aggregate(self, r: int, ids: list[int], contents) -> ArrayRecord:
        from fedsec.strategies.base import RuleContext

        template = self._global.to_torch_state_dict()
        g = flatten_state(template)
        local = torch.stack([flatten_state(c["arrays"].to_torch_state_dict()) for c in contents])
        updates = local - g
        weights = torch.tensor([float(c["metrics"]["num-examples"]) for c in contents])
        gen = torch.Generator().manual_seed(_seed(self.scenario.seed, r, 3))
        for p in self.plans:
            if not (p.active(r) and p.has("collude")):
                continue
            mal_rows = [i for i, h in enumerate(ids) if h in p.hospitals]
            benign_rows = [i for i, h in enumerate(ids) if h not in self.malicious]
            if not mal_rows or not benign_rows:
                continue
            ctx = AttackContext(r, None, p.hospitals, self.num_hospitals, None, gen,
                                extra={"global_params": g, "rule": self.scenario.strategy.get("rule"),
                                       "malicious_updates": updates[mal_rows].clone()})
            forged = p.attack.collude(updates[benign_rows], len(mal_rows), ctx)
            if forged is not None:
                updates[mal_rows] = forged.to(updates.dtype)
        for p in self.plans:
            if p.active(r) and p.has("observe"):
                seen = None if self.scenario.privacy.secure_aggregation else {h: updates[i] for i, h in enumerate(ids)}
                ctx = AttackContext(r, None, p.hospitals, self.num_hospitals, self.server_task, gen,
                                    extra=self._observer_extra())
                self._train_info["attack"].update(p.attack.observe(r, seen, updates.mean(0), g, ctx) or {})
        if self.rule is None:
            agg = (weights[:, None] * updates).sum(0) / weights.sum()
            flagged: list[int] = []
            info: dict = {}
        else:
            f = self.scenario.strategy.get("num_malicious")
            f = len(self.malicious) if f is None else f
            ctx = RuleContext(global_params=g, root_update=self._root_update(r, template), generator=gen,
                              server_round=r, num_malicious=int(f), client_ids=list(ids))
            res = self.rule(updates, weights, ctx)
            agg, flagged, info = res.update, res.flagged, res.info
        self._train_info["defense"] = {"flagged": [self._name(ids[i]) for i in flagged],
                                       **{k: v for k, v in (info or {}).items() if isinstance(v, (int, float, str))}}
        return ArrayRecord(unflatten_state(g + agg.to(g.dtype), template))

    def _observer_extra(self) -> dict:
        """What an honest-but-curious server knows (the model, the hospitals' local
        hyper-parameters and sample counts) plus, in simulation only, the true training data
        (``truth``) used solely to score reconstructions."""
        task = self.server_task.task
        local = self.scenario.federation.local
        return {
            "out_dir": str(self.run_dir.path / "figures") if self.run_dir else None,
            "scenario": self.scenario,
            "model_fn": task.make_model,
            "input_shape": tuple(task.data.input_shape),
            "local": {"lr": local.lr, "epochs": local.epochs, "batch_size": local.batch_size,
                      "steps": local.steps},
            "num_samples": {h: len(s) for h, s in enumerate(task.data.train)},
            "truth": dict(enumerate(task.data.train)),
            "hospital_names": task.data.hospitals,
        }

    def _root_update(self, r: int, template) -> torch.Tensor | None:
        """FLTrust's server update: one local round on the server's small clean root set."""
        if getattr(self.rule, "name", "") != "fltrust":
            return None
        from fedsec.federation.training import train_local

        task = self.server_task.task
        if task.data.root is None or len(task.data.root) == 0:
            raise FedsecError("strategy 'fltrust' needs a clean root set on the server: set "
                              "task.options.root_fraction (imaging) or use a task that provides one")
        model = task.make_model()
        model.load_state_dict(template)
        train_local(model, task.data.root, task, self.scenario.federation.local,
                    torch.Generator().manual_seed(_seed(self.scenario.seed, r, 5)))
        return flatten_state(model.state_dict()) - flatten_state(template)

    # ---- evaluation --------------------------------------------------------------------
    def configure_evaluate(self, server_round, arrays, config, grid):
        r = self._r(server_round)
        self._eval_arrays = arrays
        config["server-round"] = r
        self._eval_selected = self._select(r, self.fraction_evaluate, 2)
        return self._messages(self._eval_selected, arrays, config, MessageType.EVALUATE)

    def aggregate_evaluate(self, server_round, replies):
        r = self._r(server_round)
        valid, problems = self._check(r, replies, False, self._eval_selected)
        multilabel = bool(self._multilabel_hint(valid))
        per_hospital, all_scores, all_labels, losses, counts = {}, [], [], [], []
        for m in valid:
            h = int(m.content["metrics"]["hospital"])
            scores = torch.from_numpy(m.content["predictions"]["scores"].numpy())
            labels = torch.from_numpy(m.content["predictions"]["labels"].numpy())
            loss = float(m.content["metrics"]["loss"])
            per_hospital[self._name(h)] = classification_metrics(scores, labels, loss, multilabel)
            all_scores.append(scores)
            all_labels.append(labels)
            losses.append(loss * len(labels))
            counts.append(len(labels))
        union = classification_metrics(torch.cat(all_scores), torch.cat(all_labels),
                                       sum(losses) / max(sum(counts), 1), multilabel)
        attack_metrics = dict(self._train_info.get("attack", {}))
        attack_metrics.update(self._evaluate_attacks(r))
        record = {
            "round": r,
            "time_s": time.perf_counter() - self._round_t0,
            "global": union,
            "per_hospital": per_hospital,
            **{k: v for k, v in self._train_info.items() if k != "attack"},
            "attack": attack_metrics,
        }
        if problems:
            record["failures"] = list(record.get("failures", [])) + problems
        if self.run_dir is not None:
            self.run_dir.append_round(record)
            self.run_dir.save_checkpoint(r, self._eval_arrays.to_torch_state_dict(),
                                         {"rule_state": None})
        self.rounds_done = r
        self.last_record = record
        if self.on_round:
            self.on_round(record)
        return MetricRecord({k: v for k, v in union.items() if not math.isnan(v)})

    def _multilabel_hint(self, valid) -> bool:
        if not valid:
            return False
        labels = valid[0].content["predictions"]["labels"].numpy()
        return labels.ndim == 2

    def _evaluate_attacks(self, r: int) -> dict:
        plans = [p for p in self.plans if p.has("evaluate")]
        if not plans:
            return {}
        task = self.server_task.task
        model = task.make_model()
        model.load_state_dict(self._eval_arrays.to_torch_state_dict())
        model.eval()
        out = {}
        for p in plans:
            ctx = AttackContext(r, None, p.hospitals, self.num_hospitals, task, None,
                                extra={**self._observer_extra(), "members": dict(enumerate(task.data.train)),
                                       "non_members": dict(enumerate(task.data.test))})
            res = p.attack.evaluate(model, task.data.union_test(), ctx) or {}
            prefix = "" if len(plans) == 1 else f"{p.name}."
            out.update({f"{prefix}{k}": v for k, v in res.items()})
        return out


# --------------------------------------------------------------------------------------
# Running a scenario on a Grid (simulation thread or deployment ServerApp process)
# --------------------------------------------------------------------------------------


def introduce_nodes(grid: Grid, scenario_text: str, expected: int | None, timeout: float) -> tuple[dict, dict]:
    """Wait for the hospitals' nodes and ask each which hospital it is.

    -> (node id -> hospital id, hospital id -> {num-train, num-test}). Fails naming the
    hospitals that did not join within ``timeout`` seconds.
    """
    t0 = time.time()
    while True:
        nodes = sorted(grid.get_node_ids())
        if expected is None or len(nodes) >= expected or time.time() - t0 > timeout:
            break
        time.sleep(0.5)
    config = ConfigRecord({"scenario": scenario_text})
    msgs = [Message(content=RecordDict({"config": config}), message_type=MessageType.QUERY, dst_node_id=n)
            for n in nodes]
    replies = list(grid.send_and_receive(msgs, timeout=max(30.0, timeout - (time.time() - t0))))
    mapping, sizes, errors = {}, {}, []
    for m in replies:
        if m.has_error():
            errors.append(f"node {m.metadata.src_node_id}: {m.error.reason}")
            continue
        h = int(m.content["metrics"]["hospital"])
        if h in sizes:
            errors.append(f"two nodes claim partition-id {h}")
            continue
        mapping[m.metadata.src_node_id] = h
        sizes[h] = {"num-train": int(m.content["metrics"]["num-train"]),
                    "num-test": int(m.content["metrics"]["num-test"])}
    if errors:
        raise FedsecError("hospital nodes failed to start:\n  " + "\n  ".join(errors))
    if expected is not None:
        missing = [h for h in range(expected) if h not in sizes]
        if missing:
            raise FedsecError(f"hospital(s) with partition-id {missing} did not join within {timeout:g} s "
                              f"({len(sizes)} of {expected} connected)")
    return mapping, sizes


def serve(grid: Grid, scenario, hospitals: list[str], run_dir=None, on_round=None, task=None,
          initial_state: dict | None = None, round_offset: int = 0) -> FedsecStrategy:
    """Run the scenario's rounds (after ``round_offset`` finished ones) on ``grid``."""
    from fedsec.federation.adversary import build_plans

    scenario_text = scenario.to_yaml()
    n = len(hospitals)
    if hasattr(grid, "pull_interval"):
        # Flower's in-memory (simulation) grid polls for replies every 0.1 s; with two
        # exchanges per round that polling was most of a small task's per-round cost.
        grid.pull_interval = min(float(grid.pull_interval), 0.01)
    mapping, sizes = introduce_nodes(grid, scenario_text, n, scenario.federation.timeout_s)
    server_task = ServerTask(scenario, task)
    plans = build_plans(scenario, n)
    strategy = FedsecStrategy(scenario, hospitals, plans, server_task, run_dir, on_round, round_offset)
    strategy.bind_nodes(mapping)
    from fedsec.privacy.defenses import wrap_strategy

    outer = wrap_strategy(strategy, scenario, num_hospitals=n,
                          max_train_size=max((s["num-train"] for s in sizes.values()), default=None),
                          previous_rounds=run_dir.read_rounds() if (run_dir is not None and round_offset) else None)
    if initial_state is None:
        initial_state = server_task.task.make_model(seed=scenario.seed).state_dict()
    remaining = scenario.federation.rounds - round_offset
    if remaining > 0:
        config = ConfigRecord({"scenario": scenario_text})
        outer.start(grid=grid, initial_arrays=ArrayRecord(initial_state), num_rounds=remaining,
                       timeout=scenario.federation.timeout_s, train_config=config,
                       evaluate_config=ConfigRecord({"scenario": scenario_text}))
    return strategy


# Deployment: `flwr run . <connection>` loads this object (pyproject [tool.flwr.app.components]).
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from fedsec.runner import run_on_grid

    cfg = context.run_config
    run_on_grid(grid, str(cfg.get("scenario", "")), str(cfg.get("overrides", "")), str(cfg.get("out", "")))

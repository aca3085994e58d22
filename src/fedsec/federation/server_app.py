"""The consortium server: Flower ServerApp (Message API) running fedsec's strategy.

:class:`FedsecStrategy` is Flower's FedAvg with these changes:
- hospitals are selected by id with a seeded RNG (Flower samples node ids at random, which
  would make runs irreproducible and can't force attackers into a round);
- ``aggregate_train`` runs the server's round as a pipeline of named steps, in the order of
  the threat model (docs/design.md, "The server's round"): collect replies -> drop failed
  and non-finite ones -> the adversary (a colluding coalition forges its hospitals' updates)
  -> server-side defenses (central DP's clipping) -> observers (what the server received, or
  only the aggregate under secure aggregation) -> the aggregation rule -> noise (central DP)
  -> apply. The round's record holds ``update_norm``, the norm of the applied update;
- ``aggregate_evaluate`` computes exact union metrics from per-patient scores, evaluates
  attack success on the global model, appends one record per round to the results and saves
  the checkpoint (the global model and every state that carries over between rounds:
  :meth:`FedsecStrategy.state_dict`), so a resumed run ends exactly as an uninterrupted one.
A reply that carries an error fails the run with the hospital's name and the reason (Flower
alone would log "0 results, N failures" and return empty metrics), unless
``federation.min_hospitals`` allows the round to go on without it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fedsec.attacks.nulls import merge_attack_metrics
from fedsec.attacks.base import AttackContext
from fedsec.errors import FedsecError
from fedsec.core.params import flatten_state, unflatten_state
from fedsec.core.training import seed_global_rng
from fedsec.federation.adversary import AttackPlan, all_malicious, forge_updates
from fedsec.metrics import classification_metrics, undefined_reasons

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


def weighted_mean(updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """FedAvg: Tensor[n, d], Tensor[n] (sample counts) -> Tensor[d] in updates' dtype."""
    w = weights.double() / weights.double().sum()
    return w.to(updates.dtype) @ updates


@dataclass
class ServerRound:
    """One training round on its way through FedsecStrategy's pipeline. Row i of every
    tensor is hospital ``hospitals[i]`` (ids ascending).

    number: the round, 1-based, counted over resumed runs. contents: the replies' RecordDicts.
    weights: Tensor[n] float64 sample counts. global_params: Tensor[d], the global model's
    float entries flattened; template: its state dict (shapes, dtypes, integer buffers).
    updates: Tensor[n, d], local - global; steps replace it (forged rows, clipped rows).
    received: Tensor[n, d], what the server received from the hospitals (forged updates
    included, before any server-side defense): what observers see.
    aggregate_only: secure aggregation: every row is the same aggregate; no hospital's own
    update exists on the server. forged: hospital ids whose update the coalition forged.
    generator: torch.Generator seeded by (scenario seed, round) for the steps that draw.
    """

    number: int
    hospitals: list[int]
    contents: list
    weights: torch.Tensor
    global_params: torch.Tensor
    template: dict
    updates: torch.Tensor
    received: torch.Tensor | None
    aggregate_only: bool
    generator: torch.Generator
    forged: list[int] = field(default_factory=list)


def _server_data_needs(scenario) -> list[str]:
    from fedsec.federation.adversary import server_data_needs

    return server_data_needs(scenario)


class ServerTask:
    """The task as the server holds it: in simulation the built task (observers' scoring,
    membership evaluation, FLTrust's root set); in a deployment none (no patient data)."""

    def __init__(self, scenario, task=None, holds_data: bool = True):
        self.scenario, self._task, self.holds_data = scenario, task, holds_data

    @property
    def task(self):
        if self._task is None and self.holds_data:  # simulation: built when first needed
            from fedsec.tasks import build_task

            self._task = build_task(self.scenario)
        if self._task is None:
            # a deployment's server holds no patient data; what would need it is refused before
            # the deployment starts (fedsec.federation.adversary.server_data_needs)
            raise FedsecError("this step needs the task's data on the server, which a deployment's server does "
                              "not hold: " + ("; ".join(_server_data_needs(self.scenario)) or "unknown step"))
        return self._task


def _same_part(saved, present: bool, what: str,
               words: tuple[str, str, str, str] = ("with", "without", "has it", "has none")) -> None:
    """A checkpoint's optional part (central DP, buffered policy, server momentum) must be there
    exactly when this scenario has it: otherwise a FedsecError naming the key."""
    if (saved is not None) != bool(present):
        with_, without, has, has_not = words
        raise FedsecError(f"checkpoint: written {with_ if saved is not None else without} {what}, "
                          f"this scenario {has if saved is None else has_not}")


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
        from fedsec.strategies.server_momentum import ServerMomentum

        self.server_momentum = ServerMomentum.from_spec(scenario.strategy)  # None: apply the aggregate as is
        self.drift_cumulative = 0.0  # sum over the rounds of the record's drift.along_minus_std
        self._global: ArrayRecord | None = None
        self._round_t0 = 0.0
        self._train_info: dict = {}
        self.rounds_done = 0
        self.last_record: dict | None = None
        self.num_hospitals = n
        self.budget = None  # privacy budget per hospital (fedsec.privacy.budget; set by serve)
        self._dp_ledger = None  # DP-SGD: each hospital's epsilon over every round (fedsec.privacy.dp_sgd)
        if scenario.privacy.dp_sgd:
            from fedsec.privacy.dp_sgd import EpsilonLedger

            earlier = run_dir.read_rounds() if run_dir is not None and round_offset else []
            self._dp_ledger = EpsilonLedger.from_rounds(earlier)
        # central DP's mechanism (fedsec.privacy.central_dp.wrap_central_dp installs it): its
        # clipping and noise are steps of the round
        self.central_dp = None
        # False under secure aggregation (SecAggPlusStrategy sets it): the replies carry only
        # the aggregate
        self.sees_individual_updates = not scenario.privacy.secure_aggregation
        self._init_participation(run_dir, round_offset)

    # ---- state that carries over between rounds (checkpoint.pt) -------------------------
    def state_dict(self) -> dict:
        """Everything stateful on the server, for the checkpoint: the aggregation rule's state
        (centered clipping's center, FoolsGold's histories), each attack's state, central
        DP's clipping norm and accountant. No RNG state: every generator the server uses is
        seeded by (scenario seed, round), and the round's global torch RNG too
        (:meth:`_server_rng`), so nothing random carries over between rounds."""
        return {
            "rule": {"name": getattr(self.rule, "name", None),
                     "state": self.rule.state_dict() if self.rule is not None else {}},
            "attacks": [{"index": p.index, "name": p.name, "state": p.attack.state_dict()} for p in self.plans],
            "central_dp": self.central_dp.state_dict() if self.central_dp is not None else None,
            "buffered": self._buffered_state() if self.buffered else None,
            "server_momentum": self.server_momentum.state_dict() if self.server_momentum is not None else None,
            "drift": {"cumulative": self.drift_cumulative},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` when resuming; a checkpoint written by another scenario
        (another rule, other attacks) is a FedsecError naming what differs."""
        rule = state.get("rule") or {}
        name = getattr(self.rule, "name", None)
        if rule.get("name") != name:
            raise FedsecError(f"checkpoint: written with aggregation rule {rule.get('name') or 'fedavg'!r}, "
                              f"this scenario uses {name or 'fedavg'!r}")
        if self.rule is not None:
            self.rule.load_state_dict(rule.get("state") or {})
        attacks = state.get("attacks") or []
        if [(a["index"], a["name"]) for a in attacks] != [(p.index, p.name) for p in self.plans]:
            raise FedsecError(f"checkpoint: written with attacks {[a['name'] for a in attacks]}, this scenario "
                              f"has {[p.name for p in self.plans]}")
        for p, a in zip(self.plans, attacks):
            p.attack.load_state_dict(a["state"])
        dp = state.get("central_dp")
        _same_part(dp, self.central_dp is not None, "privacy.central_dp")
        if dp is not None:
            self.central_dp.load_state_dict(dp)
        buffered = state.get("buffered")
        _same_part(buffered, self.buffered, "federation.participation.policy 'buffered'",
                   ("under", "without", "uses it", "does not use it"))
        if buffered is not None:
            self._load_buffered_state(buffered)
        momentum = state.get("server_momentum")
        _same_part(momentum, self.server_momentum is not None, "strategy.server_momentum")
        if momentum is not None:
            self.server_momentum.load_state_dict(momentum)
        self.drift_cumulative = float((state.get("drift") or {}).get("cumulative", 0.0))

    @contextlib.contextmanager
    def _server_rng(self, r: int):
        """The global torch RNG seeded by (scenario seed, round) for the server's own work
        (FLTrust's root training, observers' models), restored afterwards: a function of the
        round alone, so a resumed run draws what an uninterrupted one drew."""
        with torch.random.fork_rng(devices=[]):
            seed_global_rng(_seed(self.scenario.seed, r, 9))
            yield

    # ---- set-up ------------------------------------------------------------------------
    def _make_rule(self):
        spec = dict(self.scenario.strategy)
        name = spec.get("rule", "fedavg")
        from fedsec.scenario import STRATEGY_FRAMEWORK_KEYS

        options = {k: v for k, v in spec.items() if k not in STRATEGY_FRAMEWORK_KEYS}
        if name == "fedavg" and not options:
            return None  # Flower's own FedAvg aggregation
        from fedsec.strategies.rules import make_rule

        return make_rule(name, **options)

    def bind_nodes(self, mapping: dict[int, int]) -> None:
        self.hospital_of = dict(mapping)
        self.node_of = {h: nid for nid, h in mapping.items()}

    def add_round_info(self, section: str, info: dict) -> None:
        """Add figures to this round's record under ``section`` (central DP's step, the secure
        aggregation wrapper after ``aggregate_train``; before the record is written)."""
        self._train_info.setdefault(section, {}).update(info)

    def _r(self, server_round: int) -> int:
        return server_round + self.round_offset

    def _name(self, hospital: int) -> str:
        return self.hospitals[hospital] if 0 <= hospital < len(self.hospitals) else f"hospital-{hospital}"

    def _select(self, server_round: int, fraction: float, salt: int) -> list[int]:
        n = self.num_hospitals
        available = sorted(self.node_of)
        if salt == 1 and self.buffered:  # hospitals still training (policy 'buffered') are not asked again
            available = [h for h in available if h not in self._in_flight]
        if salt == 1:  # training: hospitals unavailable this round (participation model) are not asked
            available = self.available_for_training(server_round, available)
        if salt == 1 and self.budget is not None:  # who may still train within its DP budget
            available = self.budget.eligible(available, server_round)
        if salt == 1 and self.buffered:  # FedBuff: the idle hospitals, up to the concurrency
            return self._select_idle(server_round, available, fraction)
        k = min(len(available), max(1, math.ceil(fraction * n)))
        if k >= len(available):
            return available
        rng = np.random.default_rng([self.scenario.seed, server_round, salt])
        chosen = set(int(h) for h in rng.choice(available, size=k, replace=False))
        if salt == 1:  # training: attackers join every active round unless told otherwise
            for p in self.plans:
                if p.active(server_round) and not p.only_when_selected:
                    chosen.update(h for h in p.hospitals if h in available)
        return sorted(chosen)

    def _messages(self, hospitals: list[int], arrays: ArrayRecord, config: ConfigRecord, kind: str,
                  own_config: Callable[[int], dict] | None = None):
        """One message per hospital; ``own_config(h)``: entries added to hospital h's config only."""
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        def content(h: int) -> RecordDict:
            if own_config is None:
                return record
            return RecordDict({self.arrayrecord_key: arrays,
                               self.configrecord_key: ConfigRecord({**dict(config), **own_config(h)})})

        return [Message(content=content(h), message_type=kind, dst_node_id=self.node_of[h]) for h in hospitals]

    # ---- training: the server's round as a pipeline -------------------------------------
    # aggregate_train runs these steps in this order (docs/design.md, "The server's round"):
    #   collect_replies -> drop_unusable -> to_updates -> run_adversary -> apply_server_defenses
    #   -> run_observers -> aggregate -> add_noise -> apply
    def configure_train(self, server_round, arrays, config, grid):
        r = self._r(server_round)
        self._round_t0 = time.perf_counter()
        self._global = arrays
        config["server-round"] = r
        if self.central_dp is not None and not self.central_dp.server_side:
            config[KEY_CLIPPING_NORM] = float(self.central_dp.clipping_norm)  # clipping_mod clips to it
        self._selected = self._select(r, self.fraction_train, 1)
        if self.buffered:  # the model these hospitals train on is kept until their replies are used
            self._dispatched = list(self._selected)
            self._bases[self._version] = arrays
        config["train-hospitals"] = list(self._selected)  # the round's participants (model replacement's n)
        if self._dp_ledger is not None:  # rounds each hospital was charged for: survives a lost node state
            from fedsec.privacy.dp_sgd import CHARGED_KEY

            config[CHARGED_KEY] = self._dp_ledger.charged(self.hospitals)
        return self._messages(self._selected, arrays, config, MessageType.TRAIN)

    def aggregate_train(self, server_round, replies):
        """The server's round: the replies -> (the new global model, the mean training loss),
        through the steps below in this order (each documents its input and output)."""
        r = self._r(server_round)
        with self._server_rng(r):
            kept, problems = self.collect_replies(r, replies)
            kept = self.screen_replies(r, kept, problems)
            kept = self.drop_unusable(r, kept, problems)
            self._train_info.update(self._participation_record)
            if not kept:  # nobody available this round (min_hospitals allowing): the model stays
                return None, None
            rnd = self.to_updates(r, kept)
            self.run_adversary(rnd)
            self.apply_server_defenses(rnd)
            self.run_observers(rnd)
            update = self.aggregate(rnd)
            update = self.add_noise(rnd, update)
            arrays = self.apply(rnd, update)
            if self.buffered:
                self._version += 1
        weights = [int(c["metrics"]["num-examples"]) for c in rnd.contents]
        loss = sum(w * float(c["metrics"]["train_loss"]) for w, c in zip(weights, rnd.contents)) / max(sum(weights), 1)
        return arrays, MetricRecord({"train_loss": loss})

    def collect_replies(self, r: int, replies) -> tuple[list[Message], list[str]]:
        """Step 1. Flower's replies -> (the replies without an error, problems): each problem
        names a hospital that replied with an error or did not reply in time."""
        valid, errors = self._check_and_log_replies(list(replies), is_train=True, validate=False)
        problems = self._error_problems(r, errors, "training")
        replied = ({int(m.content["metrics"]["hospital"]) for m in valid}
                   | {self.hospital_of.get(m.metadata.src_node_id, -1) for m in errors})
        problems += [f"{self._name(h)}: no reply within {self.scenario.federation.timeout_s:g} s"
                     for h in self._selected if h not in replied]
        return list(valid), problems

    # ---- participation: availability, deadline, reply size (fedsec.federation.participation)
    def _init_participation(self, run_dir, round_offset: int) -> None:
        from fedsec.federation.participation import ParticipationModel

        self.participation = ParticipationModel.from_scenario(self.scenario, self.hospitals)
        self._participation_record: dict = {}
        self._available: list[int] | None = None
        self._unavailable: dict[int, str] = {}
        self.simulated_time_s = 0.0  # cumulative over the rounds, resumed runs included
        if self.participation is not None and run_dir is not None and round_offset:
            earlier = run_dir.read_rounds()
            if earlier:
                self.simulated_time_s = float(earlier[-1].get("simulated_time_s", 0.0))
        # policy 'buffered' (FedBuff in simulated time; fedsec.federation.participation.fill_buffer)
        self.buffered = self.participation is not None and self.participation.buffered
        self._in_flight: dict = {}  # hospital id -> InFlight: replies held until their simulated arrival
        self._held: dict[int, Message] = {}  # hospital id -> its held reply (usable so far)
        self._bases: dict[int, ArrayRecord] = {}  # server version -> the global model of that version
        self._version = 0  # server updates applied
        self._dispatched: list[int] = []
        self._buffer: dict[int, tuple[int, ArrayRecord]] = {}  # this round's buffer: id -> (staleness, base)

    def _buffered_state(self) -> dict:
        """Policy 'buffered': what the server holds between rounds (for the checkpoint): the
        version, the replies in flight (timing, and the usable ones' arrays and metrics) and
        the global models they were trained on."""
        import dataclasses

        def arrays(record) -> dict:
            return {k: a.numpy() for k, a in record.items()}

        return {"version": self._version,
                "in_flight": {h: dataclasses.asdict(f) for h, f in self._in_flight.items()},
                "held": {h: {"arrays": arrays(m.content["arrays"]), "metrics": dict(m.content["metrics"])}
                         for h, m in self._held.items()},
                "bases": {v: arrays(rec) for v, rec in self._bases.items()}}

    def _load_buffered_state(self, state: dict) -> None:
        from types import SimpleNamespace

        from fedsec.federation.participation import InFlight

        def record(values: dict) -> ArrayRecord:
            return ArrayRecord({k: Array(v) for k, v in values.items()})

        self._version = int(state["version"])
        self._in_flight = {int(h): InFlight(**f) for h, f in state["in_flight"].items()}
        # a held reply needs only its content from here on (its arrays and metrics)
        self._held = {int(h): SimpleNamespace(content=RecordDict({"arrays": record(m["arrays"]),
                                                                  "metrics": MetricRecord(m["metrics"])}))
                      for h, m in state["held"].items()}
        self._bases = {int(v): record(a) for v, a in state["bases"].items()}

    def available_for_training(self, server_round: int, hospitals: list[int]) -> list[int]:
        """The hospitals (of ``hospitals``) available in this round: not in a maintenance window
        and not drawn as missing it (a function of seed, round and hospital only)."""
        if self.participation is None:
            return hospitals
        self._unavailable = {h: why for h in hospitals
                             if (why := self.participation.unavailable(server_round, h)) is not None}
        self._available = [h for h in hospitals if h not in self._unavailable]
        return self._available

    def _select_idle(self, server_round: int, available: list[int], fraction: float) -> list[int]:
        """Policy 'buffered': the idle hospitals (``available``) to send the current model to,
        keeping at most ceil(fraction_train x hospitals) in flight (FedBuff's concurrency); a
        seeded draw when there are more. Attackers join every active round they are idle."""
        from fedsec.federation.participation import concurrency

        k = concurrency(fraction, self.num_hospitals) - len(self._in_flight)
        if k >= len(available):
            return available
        chosen: set[int] = set()
        if k > 0:
            rng = np.random.default_rng([self.scenario.seed, server_round, 1])
            chosen = set(int(h) for h in rng.choice(available, size=k, replace=False))
        for p in self.plans:
            if p.active(server_round) and not p.only_when_selected:
                chosen.update(h for h in p.hospitals if h in available)
        return sorted(chosen)

    def screen_replies(self, r: int, replies: list[Message], problems: list[str]) -> list[Message]:
        """Step 1b. Before any reply is unpacked: leave out replies larger than
        ``federation.max_reply_mb`` and replies whose arrays are not the global model's (names
        and shapes: malformed), then, with a participation model, replies that arrive after the
        round's cut-off (``deadline_s`` under 'proceed', ``federation.timeout_s`` under 'wait')
        or never (a hospital that dropped out). Each is named in ``problems``. Sets the round's
        ``participation`` record (available, unavailable, late, simulated_s, received_mb) and
        the cumulative ``simulated_time_s``."""
        from fedsec.federation.participation import megabytes, round_duration

        limit = self.scenario.federation.max_reply_mb
        model = {k: tuple(a.shape) for k, a in self._global.items()}
        sent_mb = megabytes(sum(len(a.data) for a in self._global.values()))
        kept, arrivals, received = [], {}, 0.0
        for m in replies:
            h = int(m.content["metrics"]["hospital"])
            size = megabytes(sum(len(a.data) for rec in m.content.array_records.values() for a in rec.values()))
            received += size
            if self.participation is not None:
                arrivals[h] = self.participation.arrival_s(r, h, int(m.content["metrics"]["num-examples"]),
                                                           sent_mb, size, m.content["metrics"])
            if limit is not None and size > limit:
                problems.append(f"{self._name(h)}: its reply is {size:.3g} MB, over federation.max_reply_mb "
                                f"({limit:g} MB); dropped before it was unpacked")
                continue
            arrays = m.content["arrays"] if "arrays" in m.content.array_records else None
            shapes = {k: tuple(a.shape) for k, a in arrays.items()} if arrays is not None else {}
            if shapes != model:
                extra, missing = sorted(set(shapes) - set(model)), sorted(set(model) - set(shapes))
                other = sorted(k for k in set(shapes) & set(model) if shapes[k] != model[k])
                problems.append(f"{self._name(h)}: malformed reply (arrays differ from the global model's: "
                                f"extra {extra[:3]}, missing {missing[:3]}, other shapes {other[:3]}); left out")
                continue
            kept.append(m)
        self._participation_record = {}
        if self.participation is None:
            return kept
        if self.buffered:
            return self._fill_buffer(r, replies, kept, arrivals, received, problems)
        cutoff = self.participation.cutoff_s
        late, duration = round_duration(arrivals, cutoff)
        what = ("deadline_s" if self.participation.policy == "proceed" else "federation.timeout_s")
        named = {int(m.content["metrics"]["hospital"]) for m in replies} - {int(m.content["metrics"]["hospital"])
                                                                          for m in kept}
        for h in late:
            if h in named:  # already left out for its size or shape
                continue
            if arrivals[h] == float("inf"):
                why = f"no reply (dropped out); the server waited until its cut-off ({what} = {cutoff:g} s simulated)"
            else:
                why = (f"replied at {arrivals[h]:.4g} s simulated, after {what} ({cutoff:g} s); "
                       "left out of the aggregate")
            problems.append(f"{self._name(h)}: {why}")
        late_set = set(late)
        kept = [m for m in kept if int(m.content["metrics"]["hospital"]) not in late_set]
        self.simulated_time_s += duration
        self._participation_record = {
            "participation": {
                "policy": self.participation.policy,
                "available": [self._name(h) for h in (self._available or [])],
                "unavailable": {self._name(h): why for h, why in sorted(self._unavailable.items())},
                "late": [self._name(h) for h in late if arrivals[h] != float("inf")],
                "dropped_out": [self._name(h) for h in late if arrivals[h] == float("inf")],
                "arrival_s": {self._name(h): (None if t == float("inf") else t) for h, t in sorted(arrivals.items())},
                "simulated_s": duration,
                "received_mb": received,
            },
            "simulated_time_s": self.simulated_time_s,
        }
        return kept

    def _fill_buffer(self, r: int, replies: list[Message], kept: list[Message], arrivals: dict[int, float],
                     received: float, problems: list[str]) -> list[Message]:
        """Step 1b under policy 'buffered' (FedBuff in simulated time): this round's usable
        replies are held until their simulated arrival (sent at the current simulated second,
        trained on the current version); then the held replies are taken in arrival order
        until ``buffer_size`` usable ones are in (``participation.fill_buffer``): too stale
        ones are discarded and named, dropouts too. -> the buffer's replies. Sets
        ``self._buffer`` (each one's staleness and the model it trained on), the round's
        ``selected`` (the hospitals reached), its ``participation`` record and the clock."""
        from fedsec.federation.participation import InFlight, fill_buffer, staleness_factor

        model = self.participation
        now = self.simulated_time_s
        usable = {int(m.content["metrics"]["hospital"]): m for m in kept}
        for h, t in arrivals.items():
            if t == float("inf"):  # sent nothing: the server gives up on it at its give-up time
                self._in_flight[h] = InFlight(self._version, now, now + model.timeout_s, dropped=True)
            elif h in usable:
                self._in_flight[h] = InFlight(self._version, now, now + t)
                self._held[h] = usable[h]
        # hospitals sent the model this round that are not in flight failed at once (an error,
        # a malformed or oversized reply: already named in problems)
        failed_now = [h for h in self._dispatched if h not in self._in_flight]
        taken, stale, dropped, flush = fill_buffer(self._in_flight, self._version, model.buffer_size,
                                                   model.max_staleness, now)
        self._buffer = {}
        out = []
        for h in taken:
            f = self._in_flight[h]
            self._buffer[h] = (self._version - f.base_version, self._bases[f.base_version])
            out.append(self._held.pop(h))
        for h in stale:
            f = self._in_flight[h]
            problems.append(f"{self._name(h)}: its update was computed on global model version {f.base_version}, "
                            f"{self._version - f.base_version} updates old (over max_staleness "
                            f"{model.max_staleness}); discarded")
        for h in dropped:
            problems.append(f"{self._name(h)}: no reply (dropped out); the server gave up on it at "
                            f"{self._in_flight[h].arrival_s:.4g} s simulated (federation.timeout_s = "
                            f"{model.timeout_s:g} s after it was sent the model)")
        reached = {h: self._in_flight.pop(h) for h in taken + stale + dropped}
        for h in stale + dropped:
            self._held.pop(h, None)
        # a reply already too stale for the next update is discarded on arrival anyway: free
        # it now, and with it the global models no held reply was trained on (at most
        # max_staleness + 1 versions are kept)
        for h, f in self._in_flight.items():
            if model.max_staleness is not None and self._version + 1 - f.base_version > model.max_staleness:
                self._held.pop(h, None)
        needed = {f.base_version for h, f in self._in_flight.items() if h in self._held} | {self._version}
        self._bases = {v: a for v, a in self._bases.items() if v in needed}
        self._selected = sorted(set(reached) | set(failed_now))
        duration = flush - now
        self.simulated_time_s = flush
        self._participation_record = {
            "participation": {
                "policy": "buffered",
                "available": [self._name(h) for h in (self._available or [])],
                "unavailable": {self._name(h): why for h, why in sorted(self._unavailable.items())},
                "dispatched": [self._name(h) for h in self._dispatched],
                "buffer_size": model.buffer_size,
                "buffer": {self._name(h): self._buffer[h][0] for h in taken},
                "weights": {self._name(h): staleness_factor(self._buffer[h][0], model.staleness_weight,
                                                            model.staleness_exponent) for h in taken},
                "stale": [self._name(h) for h in stale],
                "late": [],
                "dropped_out": [self._name(h) for h in dropped],
                "in_flight": [self._name(h) for h in sorted(self._in_flight)],
                "arrival_s": {self._name(h): reached[h].arrival_s for h in taken + stale + dropped},
                "version": self._version + (1 if taken else 0),
                "simulated_s": duration,
                "received_mb": received,
            },
            "simulated_time_s": self.simulated_time_s,
        }
        return out

    def drop_unusable(self, r: int, replies: list[Message], problems: list[str]) -> list[Message]:
        """Step 2. Leave out updates with NaN or infinite values (one would make every rule's
        output NaN), adding them to ``problems``; fail the run, naming every problem, when
        fewer than ``federation.min_hospitals`` replies are left (default: all selected).
        -> the usable replies sorted by hospital id (sums independent of arrival order). Starts
        the round's record (selection, failures, per-hospital training figures)."""
        finite = [finite_arrays(m.content) for m in replies]
        problems += [f"{self._name(int(m.content['metrics']['hospital']))}: its update has NaN or infinite values "
                     "(local training diverged?); left out of the aggregate"
                     for m, ok in zip(replies, finite) if not ok]
        kept = sorted((m for m, ok in zip(replies, finite) if ok), key=lambda m: int(m.content["metrics"]["hospital"]))
        self._require(r, len(kept), problems, len(self._selected), "training")
        contents = [m.content for m in kept]
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
        if self._dp_ledger is not None:  # DP-SGD: trained hospitals' cumulative epsilon; the ledger's max
            trained = {self._name(h): c["metrics"] for h, c in zip(ids, contents) if "dp-epsilon" in c["metrics"]}
            self._dp_ledger.record_round(r, [self._name(h) for h in self._selected], trained)
            self.add_round_info("privacy", {"dp_sgd": self._dp_ledger.round_block(
                {name: self._dp_ledger.entries[name] for name in trained})})
            if self.budget is not None:  # who was left out for its privacy budget
                self.add_round_info("privacy", {"budget": self.budget.round_block()})
        return kept

    def to_updates(self, r: int, replies: list[Message]) -> ServerRound:
        """Step 3. The usable replies -> a :class:`ServerRound`: one row per hospital of
        ``updates`` (local - global over the model's float entries, flattened) and its weight
        (sample count)."""
        from fedsec.core.params import float_keys, stack_flat

        template = self._global.to_torch_state_dict()
        g = flatten_state(template)
        contents = [m.content for m in replies]
        try:
            updates = stack_flat([c["arrays"] for c in contents], float_keys(template), g.numel(), minus=g)
        except (KeyError, ValueError) as err:
            raise FedsecError(f"round {r}: a hospital's reply does not have the global model's entries ({err}); "
                              "replies are checked before they are unpacked") from err
        if self.buffered:  # a stale reply's update is relative to the older model it was trained on
            for i, c in enumerate(contents):
                staleness, base = self._buffer.get(int(c["metrics"]["hospital"]), (0, None))
                if staleness:
                    updates[i] += g - flatten_state(base.to_torch_state_dict()).to(updates.dtype)
        return ServerRound(
            number=r, hospitals=[int(c["metrics"]["hospital"]) for c in contents], contents=contents,
            weights=torch.tensor([float(c["metrics"]["num-examples"]) for c in contents], dtype=torch.float64),
            global_params=g, template=template, updates=updates, received=updates,
            aggregate_only=not self.sees_individual_updates,
            generator=torch.Generator().manual_seed(_seed(self.scenario.seed, r, 3)))

    def run_adversary(self, rnd: ServerRound) -> None:
        """Step 4. Active colluding coalitions (``collude`` hook) replace their hospitals' rows
        with forged updates, knowing the benign rows. ``rnd.received`` is then what the server
        received from the hospitals, forged updates included."""
        if rnd.aggregate_only:
            return  # refused before the run (check_secagg_compatible): no update to forge from
        rows = forge_updates(self.plans, rnd.number, rnd.hospitals, rnd.updates, num_hospitals=self.num_hospitals,
                             generator=rnd.generator,
                             extra={"global_params": rnd.global_params, "rule": self.scenario.strategy.get("rule"),
                                    "scenario": self.scenario, "weights": rnd.weights})
        rnd.forged = [rnd.hospitals[i] for i in rows]
        rnd.received = rnd.updates

    def apply_server_defenses(self, rnd: ServerRound) -> None:
        """Step 5. Central DP's clipping: server side, every received row (forged ones too) is
        scaled to norm <= C (``rnd.updates`` becomes the clipped rows, ``rnd.received`` keeps
        what arrived); client side, the hospitals clipped and the server reads their norm bits."""
        dp = self.central_dp
        if dp is None:
            return
        dp.start_round(rnd.number)
        names = [self._name(h) for h in rnd.hospitals]
        if dp.server_side:
            rnd.updates = dp.clip_updates(rnd.updates, names)
        else:
            dp.note_client_clipping(names, [c.get("metrics") for c in rnd.contents])

    def run_observers(self, rnd: ServerRound) -> None:
        """Step 6. Server-side observers (``observe`` hook, e.g. gradient inversion) look at
        exactly what the server received: each hospital's update before any server-side
        defense, or under secure aggregation only the aggregate (``updates`` = None). Their
        metrics go to the round's ``attack`` record. Read-only."""
        plans = [p for p in self.plans if p.active(rnd.number) and p.has("observe")]
        if not plans:
            return
        received = rnd.received
        if rnd.aggregate_only:
            seen, aggregate = None, received[0].clone()
        else:
            seen = {h: received[i] for i, h in enumerate(rnd.hospitals)}
            aggregate = weighted_mean(received, rnd.weights)
        for p in plans:
            ctx = AttackContext(rnd.number, None, p.hospitals, self.num_hospitals, self.server_task, rnd.generator,
                                extra={**self._observer_extra(),  # + the aggregation weights (sent in the clear)
                                       "weights": dict(zip(rnd.hospitals, rnd.weights.tolist()))},
                                participants=list(rnd.hospitals))
            merge_attack_metrics(self._train_info["attack"], p.attack.observe(rnd.number, seen, aggregate,
                                                                              rnd.global_params, ctx) or {})

    def aggregate(self, rnd: ServerRound) -> torch.Tensor:
        """Step 7. The aggregation rule on ``rnd.updates`` -> the aggregated update Tensor[d].
        No rule: the sample-weighted mean (FedAvg); under secure aggregation the rows already
        are the aggregate and it is taken as is. Records the rule's flags in ``defense``."""
        from fedsec.strategies.base import RuleContext

        rnd.received = None  # observers are done: free it if defenses made a copy
        flagged: list[int] = []
        info: dict = {}
        if self.buffered and self.participation.staleness_weight != "constant":
            # FedBuff's s(staleness) x update, before the rule (fedsec.federation.participation)
            from fedsec.federation.participation import staleness_factor

            p = self.participation
            w = torch.tensor([staleness_factor(self._buffer.get(h, (0, None))[0], p.staleness_weight,
                                               p.staleness_exponent) for h in rnd.hospitals], dtype=rnd.updates.dtype)
            rnd.updates = rnd.updates * w[:, None]
        if rnd.aggregate_only:
            agg = rnd.updates[0].clone()
        elif self.rule is None:
            agg = weighted_mean(rnd.updates, rnd.weights)
        else:
            f = self.scenario.strategy.get("num_malicious")
            f = len(self.malicious) if f is None else f
            ctx = RuleContext(global_params=rnd.global_params, root_update=self._root_update(rnd.number, rnd.template),
                              generator=rnd.generator, server_round=rnd.number, num_malicious=int(f),
                              client_ids=list(rnd.hospitals))
            res = self.rule(rnd.updates, rnd.weights.to(rnd.updates.dtype), ctx)
            agg, flagged, info = res.update, res.flagged, res.info
        self._train_info["defense"] = {"flagged": [self._name(rnd.hospitals[i]) for i in flagged],
                                       **{k: v for k, v in (info or {}).items() if isinstance(v, (int, float, str))}}
        self.record_drift(rnd, agg)
        return agg

    def record_drift(self, rnd: ServerRound, agg: torch.Tensor) -> None:
        """Step 7b. The round record's ``drift``: the rule's aggregate minus the benign mean,
        projected on ALIE's direction -std of the benign rows (fedsec.strategies.drift), and
        ``cumulative``, its running sum over the rounds. Benign = hospitals no attack names
        (simulation knowledge). Not under secure aggregation (no individual rows)."""
        if rnd.aggregate_only:
            return
        from fedsec.strategies.drift import drift_along_minus_std

        malicious = set(self.malicious)
        drift = drift_along_minus_std(rnd.updates, [i for i, h in enumerate(rnd.hospitals) if h not in malicious], agg)
        if drift is not None:
            self.drift_cumulative += drift["along_minus_std"]
            self._train_info["drift"] = {**drift, "cumulative": self.drift_cumulative}

    def add_noise(self, rnd: ServerRound, update: torch.Tensor) -> torch.Tensor:
        """Step 8. Central DP's Gaussian noise on the aggregated update (Tensor[d] -> Tensor[d])
        and its accounting; the round's ``privacy.central_dp`` record."""
        dp = self.central_dp
        if dp is None:
            return update
        update = dp.add_noise(update, rnd.weights.tolist())
        self.add_round_info("privacy", {"central_dp": dp.finish_round()})
        return update

    def apply(self, rnd: ServerRound, update: torch.Tensor) -> ArrayRecord:
        """Step 9. global + update -> the new global model (integer buffers keep the global
        model's values). Records ``update_norm``: the L2 norm of new global - old global over
        the float entries, as applied (after the cast to the model's dtypes). With
        ``strategy.server_momentum`` / ``server_lr`` the update goes through the server's
        momentum first (fedsec.strategies.server_momentum: v <- beta v + update, step eta v)."""
        if self.server_momentum is not None:
            update = self.server_momentum.step(update)
        state = unflatten_state(rnd.global_params + update.to(rnd.global_params.dtype), rnd.template)
        applied = flatten_state(state).double() - rnd.global_params.double()
        self._train_info["update_norm"] = float(torch.linalg.vector_norm(applied))
        return ArrayRecord(state)

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
        from fedsec.core.training import train_local

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

    def _require(self, r: int, usable: int, problems: list[str], expected: int, phase: str) -> None:
        """Fail the run, naming every problem, when fewer than ``federation.min_hospitals``
        of the ``expected`` hospitals gave a usable reply (default: all of them)."""
        need = self.scenario.federation.min_hospitals
        need = expected if need is None else min(need, expected)
        if usable < need:
            err = FedsecError(
                f"round {r}: {len(problems)} of {expected} hospitals failed during {phase} "
                f"(federation.min_hospitals={need}):\n  " + "\n  ".join(problems))
            err.failures = [{"round": r, "hospital": h, "reason": why}
                            for h, _, why in (p.partition(": ") for p in problems)]
            raise err

    def _error_problems(self, r: int, errors: list[Message], phase: str) -> list[str]:
        """One line per hospital whose reply is an error (its name and the exception's last
        line, no ANSI codes); the full text (a traceback) goes to the run's failures.log."""
        from fedsec.results import one_line_reason

        problems = []
        for m in errors:
            name = self._name(self.hospital_of.get(m.metadata.src_node_id, -1))
            problems.append(f"{name}: {one_line_reason(m.error.reason)}")
            if self.run_dir is not None:
                self.run_dir.log_failure(r, name, phase, m.error.reason)
        return problems

    def _check(self, r: int, replies, expected: list[int]):
        """Evaluation replies -> (valid replies sorted by hospital, problems)."""
        valid, errors = self._check_and_log_replies(list(replies), is_train=False, validate=False)
        problems = self._error_problems(r, errors, "evaluation")
        replied = ({int(m.content["metrics"]["hospital"]) for m in valid}
                   | {self.hospital_of.get(m.metadata.src_node_id, -1) for m in errors})
        problems += [f"{self._name(h)}: no reply within {self.scenario.federation.timeout_s:g} s"
                     for h in expected if h not in replied]
        self._require(r, len(valid), problems, len(expected), "evaluation")
        return sorted(valid, key=lambda m: int(m.content["metrics"]["hospital"])), problems

    def aggregate_evaluate(self, server_round, replies):
        r = self._r(server_round)
        valid, problems = self._check(r, replies, self._eval_selected)
        multilabel = bool(self._multilabel_hint(valid))
        per_hospital, all_scores, all_labels, losses, counts = {}, [], [], [], []
        undefined: dict[str, dict[str, str]] = {}
        for m in valid:
            h = int(m.content["metrics"]["hospital"])
            scores = torch.from_numpy(m.content["predictions"]["scores"].numpy())
            labels = torch.from_numpy(m.content["predictions"]["labels"].numpy())
            loss = float(m.content["metrics"]["loss"])
            per_hospital[self._name(h)] = classification_metrics(scores, labels, loss, multilabel)
            why = undefined_reasons(labels, per_hospital[self._name(h)], multilabel)  # e.g. one-class test set
            if why:
                undefined[self._name(h)] = why
            all_scores.append(scores)
            all_labels.append(labels)
            losses.append(loss * len(labels))
            counts.append(len(labels))
        union = classification_metrics(torch.cat(all_scores), torch.cat(all_labels),
                                       sum(losses) / max(sum(counts), 1), multilabel)
        attack_metrics = dict(self._train_info.get("attack", {}))
        merge_attack_metrics(attack_metrics, self._pool_attack_records(valid))
        with self._server_rng(r):
            merge_attack_metrics(attack_metrics, self._evaluate_attacks(r))
        record = {
            "round": r,
            "time_s": time.perf_counter() - self._round_t0,
            "global": union,
            "per_hospital": per_hospital,
            **({"undefined": undefined} if undefined else {}),
            **{k: v for k, v in self._train_info.items() if k != "attack"},
            "attack": attack_metrics,
        }
        if problems:
            record["failures"] = list(record.get("failures", [])) + problems
        if self.run_dir is not None:
            self.run_dir.append_round(record)
            self.run_dir.save_checkpoint(r, self._eval_arrays.to_torch_state_dict(), self.state_dict())
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

    def _metric_name(self, plan: AttackPlan, metric: str) -> str:
        with_metrics = [p for p in self.plans if p.has("evaluate") or p.has("evaluate_records")]
        return metric if len(with_metrics) == 1 else f"{plan.name}.{metric}"

    def _pool_attack_records(self, valid: list[Message]) -> dict:
        """Attack metrics the hospitals computed on their own test records (``evaluate_records``):
        each metric is the mean over every evaluated hospital's records that count (non-NaN)."""
        plans = [p for p in self.plans if p.has("evaluate_records")]
        if not plans:
            return {}
        pooled: dict[str, list[torch.Tensor]] = {}
        for m in valid:  # sorted by hospital id
            rec = m.content.array_records.get("attack-records")
            for key, arr in (rec.items() if rec is not None else []):
                pooled.setdefault(key, []).append(torch.from_numpy(arr.numpy()))
        out: dict = {}
        for p in plans:
            records = {key.partition("/")[2]: torch.cat(parts) for key, parts in pooled.items()
                       if key.partition("/")[0] == str(p.index)}
            if records:
                res = p.attack.summarise_records(records, seed=int(self.scenario.seed))
                merge_attack_metrics(out, {self._metric_name(p, k): v for k, v in res.items()})
        return out

    def _evaluate_attacks(self, r: int) -> dict:
        """Attack metrics only the server can compute (``evaluate`` without
        ``evaluate_records``: membership inference scored against who trained on what)."""
        plans = [p for p in self.plans if p.has("evaluate") and not p.has("evaluate_records")]
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
                                       "non_members": dict(enumerate(task.data.test)),
                                       "holdout": dict(enumerate(task.data.holdout or []))})
            res = p.attack.evaluate(model, task.data.union_test(), ctx) or {}
            merge_attack_metrics(out, {self._metric_name(p, k): v for k, v in res.items()})
        return out


# --------------------------------------------------------------------------------------
# Running a scenario on a Grid (simulation thread or deployment ServerApp process)
# --------------------------------------------------------------------------------------


def introduce_nodes(grid: Grid, scenario_text: str, expected: int | None, timeout: float) -> tuple[dict, dict]:
    """Wait for the hospitals' nodes and ask each which hospital it is.

    -> (node id -> hospital id, hospital id -> its introduction: num-train, num-test, name,
    input-shape, num-classes, multilabel). Fails naming the hospitals that did not join
    within ``timeout`` seconds.
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
        metrics = m.content["metrics"]
        about = m.content.config_records.get("config")
        if "train-n" in metrics:
            sizes.setdefault(h, {})["moments"] = (int(metrics["train-n"]), list(metrics["train-mean"]),
                                                  list(metrics["train-m2"]))
        sizes[h] = {**sizes.get(h, {}), "num-train": int(metrics["num-train"]), "num-test": int(metrics["num-test"]),
                    "num-classes": int(metrics.get("num-classes", 0)), "multilabel": bool(metrics.get("multilabel", 0)),
                    "name": str(about["name"]) if about is not None and "name" in about else f"hospital-{h}",
                    "input-shape": [int(d) for d in about["input-shape"]] if about is not None else []}
    if errors:
        raise FedsecError("hospital nodes failed to start:\n  " + "\n  ".join(errors))
    if expected is not None:
        missing = [h for h in range(expected) if h not in sizes]
        if missing:
            raise FedsecError(f"hospital(s) with partition-id {missing} did not join within {timeout:g} s "
                              f"({len(sizes)} of {expected} connected)")
    return mapping, sizes


def serve(grid: Grid, scenario, hospitals: list[str] | None = None, run_dir=None, on_round=None, task=None,
          initial_state: dict | None = None, round_offset: int = 0,
          server_state: dict | None = None, num_hospitals: int | None = None,
          on_introduced: Callable[[object], None] | None = None) -> FedsecStrategy:
    """Run the scenario's rounds (after ``round_offset`` finished ones) on ``grid``.

    Simulation passes the built ``task`` and the ``hospitals``' names. A deployment's
    server holds no patient data: it passes neither, and the hospitals' introductions give
    their names and the model's input (``fedsec.tasks.NodesTask``); ``num_hospitals`` is
    then how many nodes to wait for. ``on_introduced(task)``: called once the hospitals
    are known, before the first round (the deployment checks its privacy options there).
    initial_state: the global model to start from. server_state: the checkpoint's
    ``FedsecStrategy.state_dict()`` when resuming (rule, attacks, central DP)."""
    from fedsec.federation.adversary import build_plans

    scenario_text = scenario.to_yaml()
    n = len(hospitals) if hospitals is not None else num_hospitals
    if n is None:
        raise FedsecError("serve: give the hospitals' names or how many hospital nodes to wait for")
    if hasattr(grid, "pull_interval"):
        # Flower's in-memory (simulation) grid polls for replies every 0.1 s; with two
        # exchanges per round that polling was most of a small task's per-round cost.
        grid.pull_interval = min(float(grid.pull_interval), 0.01)
    from fedsec.federation.client_app import remember_scenario

    remember_scenario(scenario_text, scenario)  # for hospitals in this process (in-process engine)
    mapping, sizes = introduce_nodes(grid, scenario_text, n, scenario.federation.timeout_s)
    if task is None:
        from fedsec.tasks import NodesTask

        if _pool_feature_stats(scenario, sizes):
            scenario_text = scenario.to_yaml()  # every hospital now standardises with the pooled statistics
            remember_scenario(scenario_text, scenario)
        model_task = NodesTask.from_introductions(scenario, sizes)
        hospitals = model_task.hospitals if hospitals is None else hospitals
    else:
        model_task = task
    if on_introduced is not None:
        on_introduced(model_task)
    server_task = ServerTask(scenario, task, holds_data=task is not None)
    plans = build_plans(scenario, n)
    strategy = FedsecStrategy(scenario, hospitals, plans, server_task, run_dir, on_round, round_offset)
    strategy.bind_nodes(mapping)
    from fedsec.privacy.budget import keeper_for

    strategy.budget = keeper_for(strategy, scenario, hospitals, sizes)
    from fedsec.privacy.defenses import wrap_strategy

    outer = wrap_strategy(strategy, scenario, num_hospitals=n,
                          max_train_size=max((s["num-train"] for s in sizes.values()), default=None),
                          previous_rounds=run_dir.read_rounds() if (run_dir is not None and round_offset) else None)
    if server_state is not None:
        strategy.load_state_dict(server_state)
    if initial_state is None:
        initial_state = model_task.make_model(seed=scenario.seed).state_dict()
    remaining = scenario.federation.rounds - round_offset
    if remaining > 0:
        config = ConfigRecord({"scenario": scenario_text})
        outer.start(grid=grid, initial_arrays=ArrayRecord(initial_state), num_rounds=remaining,
                       timeout=scenario.federation.timeout_s, train_config=config,
                       evaluate_config=ConfigRecord({"scenario": scenario_text}))
    return strategy


def _pool_feature_stats(scenario, intro: dict[int, dict]) -> bool:
    """A deployment whose hospitals each hold only their own rows, on a task standardised
    with pooled statistics (heart disease, ehr_csv): combine the moments the hospitals sent
    in their introductions (count, mean, M2 of their training features: no record leaves a
    hospital) into ``task.options.feature_stats``, exactly what a simulation holding every
    row computes. -> True when the scenario changed."""
    opts = dict(scenario.task.options or {})
    if not intro or "feature_stats" in opts or opts.get("normalize", "pooled") != "pooled":
        return False
    if not all("moments" in intro[h] for h in intro):
        return False
    from fedsec.data.tabular import stats_from_moments

    mean, std = stats_from_moments([intro[h]["moments"] for h in sorted(intro)])
    opts["feature_stats"] = {"mean": [float(v) for v in mean], "std": [float(v) for v in std]}
    scenario.task.options = opts
    return True


# Deployment: `flwr run . <connection>` loads this object (pyproject [tool.flwr.app.components]).
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from fedsec.runner import run_on_grid

    cfg = context.run_config
    run_on_grid(grid, str(cfg.get("scenario", "")), str(cfg.get("overrides", "")), str(cfg.get("out", "")),
                resume=bool(cfg.get("resume", False)))

"""Who takes part in a round, and how long the round takes, in simulated seconds.

The scenario's ``federation.participation`` block (docs/scenarios.md, "Participation")
describes each hospital's availability (a probability of missing a round, maintenance
windows) and speed (compute and network delay), the round's deadline and the server's
policy:

- ``wait``: the server waits for every selected hospital (up to ``federation.timeout_s``,
  its real give-up time); the round lasts as long as the slowest reply;
- ``proceed``: the server closes the round at ``deadline_s``; replies that arrive later are
  left out and named in the round's ``failures``, and the run goes on while at least
  ``federation.min_hospitals`` usable replies remain;
- ``buffered``: buffered asynchronous aggregation (FedBuff, Nguyen et al. 2022): hospitals
  train at their own pace and the server applies an update once ``buffer_size`` replies have
  arrived (a round = one server update); a reply computed on a global model more than
  ``max_staleness`` versions old is discarded, the others may be down-weighted by their
  staleness (``staleness_weight``). See :func:`fill_buffer` and docs/scenarios.md.

Everything here is a pure function of (scenario seed, round, hospital) and of the replies'
sizes and sample counts: no clock is read and nothing sleeps, so runs stay fast, a resumed
run draws what an uninterrupted one drew, and every engine agrees. Flower and Ray have no
notion of simulated time (their timeouts are wall-clock), which is why this is written here.

Client-side availability attacks (``fedsec.attacks.availability``) speak to this model
through two reply metrics: ``sim-arrival-s`` (the simulated second the reply arrives at, at
the earliest) and ``sim-dropped`` (1: the hospital sent nothing this round). In simulation
the message is delivered anyway; the server treats it as what it stands for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

import numpy as np

from fedsec.errors import ScenarioError
from fedsec.registry import check_options, did_you_mean, option

ARRIVAL_KEY = "sim-arrival-s"  # reply metric: the reply arrives at this simulated second at the earliest
DROPPED_KEY = "sim-dropped"  # reply metric: 1 = the hospital sent no reply this round

# salts of the seeded draws (scenario seed, round, hospital, salt): one stream per purpose
_SALT_MISS, _SALT_STRAGGLE = 71, 72


@dataclass
class HospitalProfile:
    """One hospital's availability and speed. In ``hospitals.<name>`` every key is optional
    and a key left out takes the value of ``default``."""

    miss_probability: float = option(0.0, "probability that the hospital is unavailable in a round "
                                          "(drawn from the scenario seed, the round and the hospital)",
                                     min=0.0, max=1.0)
    maintenance: List[List[int]] = option([], "round windows [first, last] (inclusive) in which the "
                                              "hospital is unavailable")
    seconds_per_example: float = option(0.0, "simulated compute seconds per training example processed "
                                              "(epochs x examples, or steps x batch_size)", min=0.0, max=1e6)
    seconds_per_round: float = option(0.0, "simulated fixed seconds per round (start-up, data loading)",
                                      min=0.0, max=1e9)
    latency_s: float = option(0.0, "simulated network round-trip latency per round", min=0.0, max=1e9)
    bandwidth_mbps: Optional[float] = option(None, "simulated link speed in megabit/s for the model sent "
                                                   "and the reply received (null: no transfer time)", gt=0.0)
    straggle_probability: float = option(0.0, "probability that the round's compute is slowed by "
                                              "straggle_factor (seeded draw)", min=0.0, max=1.0)
    straggle_factor: float = option(1.0, "how much slower a straggling round's compute is", min=1.0, max=1e6)


@dataclass
class ParticipationOptions:
    """The ``federation.participation`` block."""

    policy: str = option("wait", "wait: wait for every selected hospital (up to federation.timeout_s); "
                                 "proceed: close the round at deadline_s and leave later replies out; "
                                 "buffered: FedBuff, apply an update once buffer_size replies have arrived",
                         choices=("wait", "proceed", "buffered"))
    deadline_s: Optional[float] = option(None, "the round's deadline in simulated seconds (needed by "
                                               "'proceed'; under 'wait' only attacks read it)", gt=0.0)
    default: dict = option({}, "HospitalProfile keys that apply to every hospital")
    hospitals: dict = option({}, "HospitalProfile keys of one hospital, keyed by its name or id (quoted: '0')")
    target_metric: str = option("auroc", "the global metric of 'time to target' in summary.json",
                                choices=("auroc", "accuracy", "balanced_accuracy", "sensitivity", "specificity"))
    target_value: Optional[float] = option(None, "the target: the first round whose global metric is at "
                                                 "least this (null: not reported)")
    buffer_size: Optional[int] = option(None, "buffered (needed): the server applies an update once this many "
                                              "replies have arrived (FedBuff's K); at most the hospitals in "
                                              "flight (ceil(fraction_train x hospitals))", min=1)
    max_staleness: Optional[int] = option(None, "buffered: a reply computed on a global model more than this "
                                                "many server updates old is discarded (null: no bound)", min=0)
    staleness_weight: str = option("constant", "buffered: constant: every kept reply counts fully; polynomial: "
                                               "a reply of staleness s is scaled by (1 + s)^-staleness_exponent",
                                   choices=("constant", "polynomial"))
    staleness_exponent: float = option(0.5, "buffered: the exponent a of the polynomial staleness weight",
                                       min=0.0, max=100.0)


BUFFERED_KEYS = ("buffer_size", "max_staleness", "staleness_weight", "staleness_exponent")


def _profile(given, key: str) -> dict:
    return check_options(HospitalProfile, given, key, "participation profile")


def _check_windows(windows: list, key: str, rounds: int | None) -> None:
    for i, w in enumerate(windows):
        if len(w) != 2 or not 1 <= w[0] <= w[1] or (rounds is not None and w[1] > rounds):
            raise ScenarioError(f"window {w} must be [first, last] with 1 <= first <= last"
                                + (f" <= federation.rounds ({rounds})" if rounds is not None else ""),
                                key=f"{key}[{i}]")


def resolve(block, hospitals: list[str] | None, rounds: int | None = None,
            key: str = "federation.participation") -> tuple[dict, list[dict] | dict]:
    """Check ``block`` (the scenario's plain dict) -> (options, profiles).

    hospitals: the hospitals' names in id order, or None when not known yet (validation
    before the data is loaded: names are then checked only against ids). -> profiles: one
    dict per hospital id (or, names unknown, {"default": ..., key: ...} as given). Raises
    ScenarioError naming the key path."""
    opts = check_options(ParticipationOptions, block, key, "participation")
    default = _profile(opts["default"], f"{key}.default")
    _check_windows(default["maintenance"], f"{key}.default.maintenance", rounds)
    own: dict[int | str, dict] = {}
    for name, entry in (opts["hospitals"] or {}).items():
        sub = f"{key}.hospitals.{name}"
        given = _profile(entry, sub)
        given = {k: v for k, v in given.items() if k in (entry or {})}
        _check_windows(given.get("maintenance", []), f"{sub}.maintenance", rounds)
        name = str(name)
        if name.isdigit():
            ident: int | str = int(name)
            if hospitals is not None and ident >= len(hospitals):
                raise ScenarioError(f"hospital id {ident} out of range: there are {len(hospitals)} hospitals "
                                    f"(0..{len(hospitals) - 1})", key=sub)
        elif hospitals is not None:
            if name not in hospitals:
                raise ScenarioError(f"no hospital named '{name}'{did_you_mean(name, hospitals)}; hospitals: "
                                    f"{', '.join(hospitals)} (or their ids 0..{len(hospitals) - 1})", key=sub)
            ident = hospitals.index(name)
        else:
            ident = name
        if ident in own:
            raise ScenarioError("the same hospital is given twice (by name and by id)", key=sub)
        own[ident] = given
    if opts["policy"] == "proceed" and opts["deadline_s"] is None:
        raise ScenarioError("policy 'proceed' closes the round at the deadline: set deadline_s",
                            key=f"{key}.deadline_s")
    if opts["policy"] == "buffered":
        if opts["buffer_size"] is None:
            raise ScenarioError("policy 'buffered' applies an update once buffer_size replies have arrived: "
                                "set buffer_size", key=f"{key}.buffer_size")
    else:
        for k in BUFFERED_KEYS:
            if k in (block or {}):
                raise ScenarioError(f"{k} is read only by policy 'buffered' (this scenario's policy is "
                                    f"'{opts['policy']}')", key=f"{key}.{k}")
    if hospitals is None:
        return opts, {"default": default, **own}
    return opts, [{**default, **own.get(h, {})} for h in range(len(hospitals))]


def _uniform(seed: int, server_round: int, hospital: int, salt: int) -> float:
    return float(np.random.default_rng([int(seed), int(server_round), int(hospital), salt]).random())


def unavailable_reason(profile: dict, seed: int, server_round: int, hospital: int) -> str | None:
    """Why ``hospital`` is not available in ``server_round`` (None: it is). A function of
    (seed, round, hospital) and its profile only."""
    for first, last in profile["maintenance"]:
        if first <= server_round <= last:
            return f"maintenance window [{first}, {last}]"
    p = profile["miss_probability"]
    if p > 0 and _uniform(seed, server_round, hospital, _SALT_MISS) < p:
        return f"missed the round (miss_probability {p:g})"
    return None


def examples_per_round(local, num_examples: int) -> int:
    """Training examples a hospital processes in a round (``federation.local``)."""
    if local.steps:
        return int(local.steps) * int(local.batch_size)
    return int(local.epochs) * int(num_examples)


def compute_s(profile: dict, seed: int, server_round: int, hospital: int, examples: int) -> float:
    """Simulated compute seconds of one round; a straggling round (seeded draw) is
    ``straggle_factor`` times slower."""
    t = profile["seconds_per_round"] + profile["seconds_per_example"] * examples
    p = profile["straggle_probability"]
    if p > 0 and _uniform(seed, server_round, hospital, _SALT_STRAGGLE) < p:
        t *= profile["straggle_factor"]
    return t


def network_s(profile: dict, sent_mb: float, received_mb: float) -> float:
    """Simulated seconds on the wire: latency plus the model sent and the reply received."""
    t = profile["latency_s"]
    if profile["bandwidth_mbps"]:
        t += (sent_mb + received_mb) * 8.0 / profile["bandwidth_mbps"]
    return t


def round_duration(arrivals: dict[int, float], cutoff: float) -> tuple[list[int], float]:
    """arrivals: hospital id -> simulated arrival second of its reply (inf: no reply).
    -> (hospitals later than ``cutoff``, sorted; the round's simulated seconds). The server
    waits until the cut-off when any reply is missing or late, else until the last reply."""
    late = sorted(h for h, t in arrivals.items() if t > cutoff)
    if late:
        return late, float(cutoff)
    return [], float(max(arrivals.values(), default=0.0))


def megabytes(nbytes: int) -> float:
    return nbytes / 1e6


# --------------------------------------------------------------------------------------
# policy 'buffered': FedBuff in simulated time
# --------------------------------------------------------------------------------------
# Flower's strategies are synchronous (one train message per hospital per server round) and
# Flower has no buffered-asynchronous strategy, so the asynchrony is simulated here: a
# hospital is sent the current global model when it is idle, trains at once (really, on that
# model), and its reply is held by the server until its simulated arrival time. Each server
# round takes the held replies in simulated-arrival order until buffer_size usable ones are
# in (FedBuff's buffer), applies the aggregation rule to their updates (each one's local
# model minus the model it was trained from) and advances the simulated clock to the last
# reply taken. Hospitals whose reply was taken (or discarded) are idle again and get the
# new model in the next round; the others are still training and their replies grow stale.


@dataclass
class InFlight:
    """A hospital's reply the server holds until its simulated arrival."""

    base_version: int  # the server version (updates applied) of the model it trained on
    dispatched_s: float  # simulated second the hospital received that model
    arrival_s: float  # simulated second its reply arrives (dropped: when the server gives up on it)
    dropped: bool = False  # it sent nothing (``sim-dropped``)


def fill_buffer(in_flight: dict[int, InFlight], version: int, buffer_size: int, max_staleness: int | None,
                now: float) -> tuple[list[int], list[int], list[int], float]:
    """One server update of the buffered policy: take the held replies in simulated-arrival
    order (ties by hospital id) until ``buffer_size`` usable ones are in.

    version: the server's version now (updates applied so far); a reply's staleness is
    ``version - base_version``. -> (taken, stale, dropped, flush_s): taken: the buffer's
    hospitals, in arrival order; stale: replies reached before the buffer filled whose
    staleness exceeds ``max_staleness`` (discarded); dropped: hospitals that sent nothing,
    reached before the buffer filled (the server gave up on them); flush_s: the simulated
    second of the last reply reached (never before ``now``). Fewer than ``buffer_size`` are
    taken only when every held reply has been reached."""
    taken: list[int] = []
    stale: list[int] = []
    dropped: list[int] = []
    t = float(now)
    for h in sorted(in_flight, key=lambda h: (in_flight[h].arrival_s, h)):
        if len(taken) >= buffer_size:
            break
        f = in_flight[h]
        t = max(t, f.arrival_s)
        if f.dropped:
            dropped.append(h)
        elif max_staleness is not None and version - f.base_version > max_staleness:
            stale.append(h)
        else:
            taken.append(h)
    return taken, stale, dropped, t


def staleness_factor(staleness: int, weight: str, exponent: float) -> float:
    """How much a reply of ``staleness`` counts: 1 (constant) or (1 + s)^-a (polynomial, as in
    FedAsync and FedBuff). The server scales the reply's update by it before the rule."""
    if weight == "polynomial":
        return float((1.0 + staleness) ** -float(exponent))
    return 1.0


@dataclass
class ParticipationModel:
    """The scenario's participation block resolved for its hospitals (ids in order)."""

    seed: int
    policy: str
    deadline_s: float | None
    timeout_s: float
    profiles: list[dict]
    local: object
    target_metric: str = "auroc"
    target_value: float | None = None
    buffer_size: int | None = None
    max_staleness: int | None = None
    staleness_weight: str = "constant"
    staleness_exponent: float = 0.5

    @classmethod
    def from_scenario(cls, scenario, hospitals: list[str]) -> "ParticipationModel | None":
        block = scenario.federation.participation
        if block is None:
            return None
        opts, profiles = resolve(_plain(block), list(hospitals), scenario.federation.rounds)
        if opts["policy"] == "buffered":
            _check_buffered(scenario, opts, len(hospitals))
        return cls(seed=int(scenario.seed), policy=opts["policy"], deadline_s=opts["deadline_s"],
                   timeout_s=float(scenario.federation.timeout_s), profiles=profiles,
                   local=scenario.federation.local, target_metric=opts["target_metric"],
                   target_value=opts["target_value"], buffer_size=opts["buffer_size"],
                   max_staleness=opts["max_staleness"], staleness_weight=opts["staleness_weight"],
                   staleness_exponent=float(opts["staleness_exponent"]))

    @property
    def buffered(self) -> bool:
        return self.policy == "buffered"

    @property
    def cutoff_s(self) -> float:
        """When the server stops waiting: the deadline under 'proceed', federation.timeout_s
        under 'wait'."""
        if self.policy == "proceed" and self.deadline_s is not None:
            return float(self.deadline_s)
        return self.timeout_s

    def unavailable(self, server_round: int, hospital: int) -> str | None:
        return unavailable_reason(self.profiles[hospital], self.seed, server_round, hospital)

    def available(self, server_round: int, hospitals: list[int]) -> list[int]:
        return [h for h in hospitals if self.unavailable(server_round, h) is None]

    def arrival_s(self, server_round: int, hospital: int, num_examples: int, sent_mb: float, received_mb: float,
                  metrics=None) -> float:
        """When the hospital's reply reaches the server (simulated seconds from the round's
        start): compute + network, or later if the reply says so (``sim-arrival-s``); inf
        when it dropped out (``sim-dropped``)."""
        metrics = metrics or {}
        if int(metrics.get(DROPPED_KEY, 0) or 0):
            return math.inf
        prof = self.profiles[hospital]
        t = compute_s(prof, self.seed, server_round, hospital, examples_per_round(self.local, num_examples))
        t += network_s(prof, sent_mb, received_mb)
        if ARRIVAL_KEY in metrics:
            t = max(t, float(metrics[ARRIVAL_KEY]))
        return t


def _plain(value):
    if type(value).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(value, resolve=False)
    return value


def check_scenario(scenario, num_hospitals: int | None, site_names: list[str] | None) -> None:
    """Load-time check of ``federation.participation`` (and the attacks that need it):
    ScenarioError naming the key path."""
    block = scenario.federation.participation
    if block is None:
        return
    # site_names: the hospitals' names when the scenario alone says them (a natural split);
    # otherwise they are known once the data is loaded (check_hospital_names) and ids are
    # checked here against the number of hospitals
    names = site_names
    opts, profiles = resolve(_plain(block), names, scenario.federation.rounds)
    if names is None and num_hospitals is not None:
        for ident in profiles:
            if isinstance(ident, int) and ident >= num_hospitals:
                raise ScenarioError(f"hospital id {ident} out of range: there are {num_hospitals} hospitals "
                                    f"(0..{num_hospitals - 1})", key=f"federation.participation.hospitals.{ident}")
    if opts["policy"] == "buffered":
        _check_buffered(scenario, opts, num_hospitals)
    if opts["deadline_s"] is not None and opts["deadline_s"] > scenario.federation.timeout_s:
        raise ScenarioError(f"{opts['deadline_s']:g} s is later than federation.timeout_s "
                            f"({scenario.federation.timeout_s:g} s), when the server gives up anyway",
                            key="federation.participation.deadline_s")


def concurrency(fraction_train: float, num_hospitals: int) -> int:
    """How many hospitals train at once under 'buffered' (FedBuff's concurrency)."""
    return min(num_hospitals, max(1, math.ceil(float(fraction_train) * num_hospitals)))


def _check_buffered(scenario, opts: dict, num_hospitals: int | None) -> None:
    key = "federation.participation"
    if num_hospitals is not None:
        c = concurrency(scenario.federation.fraction_train, num_hospitals)
        if opts["buffer_size"] > c:
            raise ScenarioError(f"buffer_size {opts['buffer_size']} can never fill: at most {c} hospitals train at "
                                f"once ({num_hospitals} hospitals x federation.fraction_train "
                                f"{scenario.federation.fraction_train:g})", key=f"{key}.buffer_size")
    privacy = scenario.privacy
    for name in ("secure_aggregation", "dp_sgd", "central_dp", "compression"):
        if getattr(privacy, name, None):
            # each needs every update to be relative to the current global model (or only
            # sees the aggregate): a stale update is relative to an older one
            raise ScenarioError(f"policy 'buffered' is not supported with privacy.{name} (its updates are "
                                "relative to older global models)", key=f"{key}.policy")


def check_hospital_names(scenario, hospitals: list[str]) -> None:
    """Run-time check once the data names its hospitals (a partition that is not natural
    names them only then): ScenarioError naming the key."""
    if scenario.federation.participation is not None:
        ParticipationModel.from_scenario(scenario, hospitals)


# --------------------------------------------------------------------------------------
# summary.json's "availability" block (read from rounds.jsonl, so a resumed run agrees)
# --------------------------------------------------------------------------------------


def availability_summary(scenario, rounds: list[dict]) -> dict:
    """Rounds lost, simulated and wall time (to the target metric), and per hospital how often
    it was selected, aggregated, late, dropped out, discarded as stale (policy 'buffered'),
    unavailable or failed.

    rounds_degraded: rounds whose aggregate had fewer hospitals than were selected (late,
    dropped out, crashed, malformed or oversized replies). rounds_failed: planned rounds that
    did not finish. rounds_lost = rounds_degraded + rounds_failed. rounds_short also counts
    rounds in which a hospital was unavailable (not selected). rounds_empty: rounds with no
    aggregate at all (the global model stayed). Under 'buffered' a round's "selected" are the
    hospitals whose replies the server reached while filling the buffer."""
    block = _plain(scenario.federation.participation) or {}
    metric = block.get("target_metric", "auroc")
    target = block.get("target_value")
    per: dict[str, dict] = {}

    def count(name: str, what: str) -> None:
        per.setdefault(name, {"selected": 0, "aggregated": 0, "late": 0, "dropped_out": 0, "stale": 0,
                              "unavailable": 0, "failed": 0})[what] += 1

    degraded = short = empty = 0
    wall = 0.0
    reached = None
    for r in rounds:
        selected = list(r.get("selected", []))
        trained = list((r.get("train") or {}).keys())
        part = r.get("participation") or {}
        unavailable = list((part.get("unavailable") or {}).keys())
        for h in selected:
            count(h, "selected")
        for h in trained:
            count(h, "aggregated")
        for h in part.get("late", []):
            count(h, "late")
        for h in part.get("dropped_out", []):
            count(h, "dropped_out")
        for h in part.get("stale", []):
            count(h, "stale")
        for h in unavailable:
            count(h, "unavailable")
        timing = set(part.get("late", [])) | set(part.get("dropped_out", [])) | set(part.get("stale", []))
        for text in r.get("failures", []) or []:
            h = str(text).partition(": ")[0]
            if h not in timing:
                count(h, "failed")
        degraded += len(trained) < len(selected)
        short += len(trained) < len(selected) + len(unavailable)
        empty += not trained
        wall += float(r.get("time_s", 0.0))
        value = (r.get("global") or {}).get(metric)
        if reached is None and target is not None and value is not None and value == value and value >= target:
            reached = {"round": r.get("round"), "simulated_s": r.get("simulated_time_s"), "wall_s": wall}
    failed = max(int(scenario.federation.rounds) - len(rounds), 0)
    out = {
        "rounds_lost": degraded + failed,
        "rounds_degraded": degraded,
        "rounds_failed": failed,
        "rounds_short": short,
        "rounds_empty": empty,
        "wall_rounds_s": wall,
        "simulated_time_s": rounds[-1].get("simulated_time_s") if rounds else None,
        "hospitals": per,
    }
    if target is not None:
        out["target"] = {"metric": metric, "value": target, "reached": reached}
    return out

"""Secure aggregation with Flower's SecAgg+ protocol, driven from fedsec's Message-API apps.

What it gives: the server learns only the (sample-weighted) *sum* of the hospitals' updates,
never one hospital's update (Bell et al. 2020, SecAgg+; pairwise masks that cancel in the sum,
Shamir shares of the mask seeds so dropped hospitals can be unmasked). Observers (a curious
server, fedsec's server-side attacks) therefore see only the aggregate, and aggregation rules
that need each hospital's update (Krum, median, FLTrust, ...) cannot run: see
:func:`check_secagg_compatible`. The training metrics (loss, sample count) still travel in
the clear, as in Flower.

How it runs on the Message API (Flower 1.41). ``SecAggPlusWorkflow`` (``flwr.server.workflow``)
and ``secaggplus_mod`` (``flwr.client.mod``) live on Flower's legacy path, but they speak plain
``Message``s over a ``Grid``; the legacy parts are only (a) the workflow takes a
``LegacyContext`` whose legacy ``Strategy`` supplies ``configure_fit`` / receives
``aggregate_fit``, and (b) in the "collect masked vectors" stage the mod hands the app a
message in the legacy FitIns layout and expects a FitRes-layout reply. fedsec bridges both:

- server: :class:`SecAggPlusStrategy` wraps the Message-API strategy (FedsecStrategy). Its
  ``configure_train`` asks the wrapped strategy for the round's train messages, runs the
  four SecAgg+ stages on the ``Grid`` it is given (a ``LegacyContext`` with a one-round
  legacy strategy; a ``SecAggPlusWorkflow`` subclass that sends fedsec's own message content,
  "arrays" + "config", instead of legacy FitIns) and returns no messages;
  ``aggregate_train`` then gives the wrapped strategy one reply per hospital that carries
  the *aggregate* (plus that hospital's clear-text metrics); FedsecStrategy knows (this
  wrapper sets its ``sees_individual_updates`` to False) that every row is the aggregate:
  its observers see only that, it takes it as the round's update, and its bookkeeping
  (losses, failures, records) works as usual; hospitals that dropped out get an error
  reply naming the SecAgg+ failure.
- client: :func:`secagg_mod` for ``@app.train(mods=[secagg_mod, ...])`` runs Flower's
  ``secaggplus_mod`` on SecAgg+ messages only (others pass through) and, in the masking
  stage, calls the unchanged fedsec train handler and turns its reply into the FitRes layout:
  the masked vector is the float part of the *update* (local - global, float64), not the
  model, so the fixed-point range covers updates and not weights.

Quantisation (Flower's): each value x of w_i/max_weight * update is clipped to
[-clipping_range, clipping_range] and stochastically rounded to a grid of step
2 * clipping_range / quantization_range (8 * 2 / 2**22 = 3.8e-6 by default); the weights are
quantised to 1/quantization_range. The aggregate's error per entry is at most
n * step / sum_i(w_i / max_weight) (about 1e-5 for the four heart-disease hospitals); values
beyond the clipping range are clipped (fedsec counts them: ``secagg-out-of-range``). Stochastic
rounding is seeded per hospital and round so runs repeat.
"""

from __future__ import annotations

from typing import ClassVar

import zlib
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE
from flwr.serverapp.strategy import Strategy

from fedsec.errors import FedsecError
from fedsec.privacy.central_dp import innermost, report_round_info
from fedsec.privacy.options import number, parse_options
from fedsec.registry import PRIVACY

SECTION = "secure_aggregation"
RECORD_KEY = RECORD_KEY_CONFIGS  # the SecAgg+ ConfigRecord in a message
STATE_KEY = RECORD_KEY_STATE  # the client's SecAgg+ state in Context.state
METRIC_OUT_OF_RANGE = "secagg-out-of-range"


@PRIVACY.register("secure_aggregation")
@dataclass
class SecAggConfig:
    """``privacy.secure_aggregation``: ``true`` for the defaults, or a mapping of these.

    num_shares: hospitals each one secret-shares its keys with (int > 2), or a fraction of the
        sampled hospitals (default 1.0: all of them).
    reconstruction_threshold: shares needed to reconstruct a key (int), or a fraction of
        num_shares (default 0.75). Higher = a larger coalition is needed to unmask one
        hospital; lower = more dropouts tolerated.
    clipping_range: updates are clipped to [-r, r] per entry before quantisation (default 8.0).
    quantization_range: fixed-point levels (default 2**22). modulus_range: mask modulus
        (default 2**32, a power of 2 > quantization_range; the sum of n hospitals overflows
        beyond n > modulus_range / quantization_range = 1024).
    max_weight: the largest sample-count weight (default: the largest hospital's training set).
    """

    # the defense's declaration (docs/components.md, the threat map)
    title: ClassVar[str] = "secure aggregation (Flower SecAgg+): the server sees only the sum"
    acts_in: ClassVar[str] = "both"  # client (a ClientApp mod / training), server, or both
    hides_individual_updates: ClassVar[bool] = True
    example: ClassVar[object] = True

    num_shares: float = 1.0
    reconstruction_threshold: float = 0.75
    clipping_range: float = 8.0
    quantization_range: int = 2 ** 22
    modulus_range: int = 2 ** 32
    max_weight: float | None = None

    def __post_init__(self):
        s = SECTION
        if isinstance(self.num_shares, bool) or not isinstance(self.num_shares, (int, float)) or self.num_shares <= 0:
            raise FedsecError(f"privacy.{s}.num_shares: a fraction in (0, 1] or an integer > 2, "
                              f"got {self.num_shares!r}")
        if isinstance(self.num_shares, float) and self.num_shares > 1:
            raise FedsecError(f"privacy.{s}.num_shares: a fraction must be <= 1, got {self.num_shares!r}")
        t = self.reconstruction_threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or t <= 0 or (isinstance(t, float) and t > 1):
            raise FedsecError(f"privacy.{s}.reconstruction_threshold: a fraction in (0, 1] or an integer >= 2, "
                              f"got {t!r}")
        self.clipping_range = number(s, "clipping_range", self.clipping_range, minimum=0.0, strict_min=True)
        for key in ("quantization_range", "modulus_range"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 1:
                raise FedsecError(f"privacy.{s}.{key}: an integer > 1, got {v!r}")
        if self.modulus_range <= self.quantization_range or bin(self.modulus_range).count("1") != 1:
            raise FedsecError(f"privacy.{s}.modulus_range: a power of 2 larger than quantization_range, "
                              f"got {self.modulus_range}")
        self.max_weight = number(s, "max_weight", self.max_weight, minimum=0.0, strict_min=True, allow_none=True)

    @classmethod
    def parse(cls, value) -> "SecAggConfig":
        """``privacy.secure_aggregation``: true / a mapping -> SecAggConfig."""
        if value is True:
            return cls()
        return parse_options(cls, SECTION, value)


def check_secagg_compatible(rule, plans=()) -> None:
    """Raise FedsecError when the scenario needs what secure aggregation hides.

    rule: the fedsec AggregationRule (None = Flower's FedAvg). A rule with
    ``needs_individual_updates`` compares or selects hospitals' updates, and SecAgg+ gives the
    server only their sum. plans: the attack plans; a server-side ``collude`` hook (an
    omniscient coalition rewriting malicious updates with knowledge of the benign ones) has no
    individual updates to work on either. Observers (``observe``) are fine: they see the sum.
    """
    if rule is not None and getattr(rule, "needs_individual_updates", True):
        name = getattr(rule, "name", type(rule).__name__)
        raise FedsecError(
            f"strategy '{name}' needs each hospital's update, which secure aggregation hides by design (the "
            "server only learns the sum); use strategy fedavg, or drop privacy.secure_aggregation to compare "
            "robust rules")
    for p in plans:
        if getattr(p, "has", None) and p.has("collude"):
            raise FedsecError(
                f"attack '{getattr(p, 'name', 'collude')}' rewrites malicious updates on the server using the benign "
                "hospitals' updates (an omniscient coalition), which secure aggregation hides; drop "
                "privacy.secure_aggregation for this attack, or use a client-side attack")


# --------------------------------------------------------------------------------------
# Vectors: the float part of an ArrayRecord, in its key order
# --------------------------------------------------------------------------------------


def float_vector(record: ArrayRecord) -> np.ndarray:
    """ArrayRecord -> float64 [d] over its floating-point arrays, in key order."""
    parts = [np.asarray(a, dtype=np.float64).ravel() for a in record.to_numpy_ndarrays()
             if np.issubdtype(np.asarray(a).dtype, np.floating)]
    return np.concatenate(parts) if parts else np.zeros(0)


def add_to_floats(record: ArrayRecord, vec: np.ndarray) -> ArrayRecord:
    """record + vec on its float arrays (integer arrays copied): the inverse of float_vector."""
    out, offset = {}, 0
    for key, arr in zip(record.keys(), record.to_numpy_ndarrays(), strict=True):
        arr = np.asarray(arr)
        if np.issubdtype(arr.dtype, np.floating):
            n = arr.size
            arr = (arr.astype(np.float64) + vec[offset:offset + n].reshape(arr.shape)).astype(arr.dtype)
            offset += n
        out[key] = Array(np.ascontiguousarray(arr))
    if offset != vec.size:
        raise ValueError(f"update has {vec.size} values, the model's float arrays {offset}")
    return ArrayRecord(out)


# --------------------------------------------------------------------------------------
# Client side
# --------------------------------------------------------------------------------------


def _rounding_seed(msg: Message, ctxt: Context) -> int:
    """Seed of the stochastic rounding: hospital, round, scenario (so runs repeat)."""
    cfg = msg.content["config"] if "config" in msg.content else {}
    parts = [int(ctxt.node_config.get("partition-id", ctxt.node_id) if ctxt.node_config else ctxt.node_id),
             int(cfg.get("server-round", 0)) if hasattr(cfg, "get") else 0,
             zlib.crc32(str(cfg.get("scenario", "")).encode()) if hasattr(cfg, "get") else 0]
    return int(np.random.SeedSequence(parts).generate_state(1)[0])


def secagg_mod(msg: Message, ctxt: Context, call_next) -> Message:
    """ClientApp mod for ``@app.train(mods=[secagg_mod, ...])``: SecAgg+ on SecAgg+ messages,
    everything else passed through untouched (the same ClientApp serves plain rounds)."""
    if not msg.has_content() or RECORD_KEY not in msg.content.config_records:
        return call_next(msg, ctxt)
    from flwr.client.mod import secaggplus_mod

    if "arrays" not in msg.content:  # setup / share keys / unmask: the mod answers alone
        return secaggplus_mod(msg, ctxt, call_next)

    global_record = msg.content["arrays"]
    g = float_vector(global_record)
    # set up in stage 0 and kept by secaggplus_mod in the node's state
    setup = ctxt.state.config_records.get(STATE_KEY) or {}
    clip, max_weight = float(setup.get("clipping_range", 0) or 0), float(setup.get("max_weight", 0) or 0)

    def train_as_fitres(m: Message, c: Context) -> Message:
        from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
        from flwr.compat.common import recorddict_compat as compat

        reply = call_next(m, c)
        if reply.has_error():
            raise RuntimeError(f"training failed: {reply.error.reason}")
        update = float_vector(reply.content["arrays"]) - g
        metrics = {k: v for k, v in reply.content["metrics"].items() if isinstance(v, (int, float))}
        # Flower clips (w / max_weight) * update to [-clip, clip]; count the values it cuts
        scaled = update * (float(metrics["num-examples"]) / max_weight if max_weight else 1.0)
        metrics[METRIC_OUT_OF_RANGE] = int(np.count_nonzero(np.abs(scaled) > clip)) if clip else 0
        res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([update]), int(metrics["num-examples"]), metrics)
        return Message(compat.fitres_to_recorddict(res, keep_input=False), reply_to=m)

    # Flower's quantiser rounds with NumPy's global RNG: seed it for this call only.
    saved = np.random.get_state()
    np.random.seed(_rounding_seed(msg, ctxt) % 2**32)
    try:
        return secaggplus_mod(msg, ctxt, train_as_fitres)
    finally:
        np.random.set_state(saved)


# --------------------------------------------------------------------------------------
# Server side
# --------------------------------------------------------------------------------------


def _workflow_classes():
    """The SecAgg+ workflow subclass and the one-round legacy strategy (imported lazily:
    flwr.server pulls in the legacy stack)."""
    from flwr.common import FitIns, Parameters
    from flwr.server.strategy import Strategy as LegacyStrategy
    from flwr.server.workflow import SecAggPlusWorkflow

    class OneRound(LegacyStrategy):
        """The legacy strategy SecAggPlusWorkflow asks for its sampled nodes and hands the
        unmasked result to."""

        def __init__(self, proxies):
            self.proxies, self.results, self.failures = proxies, [], []

        def initialize_parameters(self, client_manager):
            return None

        def configure_fit(self, server_round, parameters, client_manager):
            return [(p, FitIns(Parameters([], "numpy.ndarray"), {})) for p in self.proxies]

        def aggregate_fit(self, server_round, results, failures):
            self.results, self.failures = list(results), list(failures)
            return None, {}

        def configure_evaluate(self, server_round, parameters, client_manager):
            return []

        def aggregate_evaluate(self, server_round, results, failures):
            return None, {}

        def evaluate(self, server_round, parameters):
            return None

    class Workflow(SecAggPlusWorkflow):
        """Flower's SecAgg+ with fedsec's Message-API train content in the masking stage."""

        def __init__(self, contents: dict[int, RecordDict], **kw):
            super().__init__(**kw)
            self.contents = contents
            self.state = None

        def setup_stage(self, grid, context, state):
            ok = super().setup_stage(grid, context, state)
            self.state = state
            # Each node gets its own RecordDict: the masking stage adds a per-node ConfigRecord.
            state.nid_to_fitins = {nid: RecordDict({k: v for k, v in self.contents[nid].items()})
                                   for nid in state.nid_to_fitins}
            return ok

    return OneRound, Workflow


class SecAggPlusStrategy(Strategy):
    """Message-API strategy wrapper: each round's training goes through SecAgg+ (module doc).

    strategy: the wrapped strategy (FedsecStrategy, possibly inside a client-side central-DP
    wrapper). config: SecAggConfig. max_weight: the largest hospital's sample count (for the
    fixed-point weights). timeout: seconds per SecAgg+ stage (None = wait).
    """

    def __init__(self, strategy, config: SecAggConfig | None = None, *, max_weight: float | None = None,
                 timeout: float | None = None):
        super().__init__()
        self.strategy = strategy
        self.config = config or SecAggConfig()
        self.max_weight = float(self.config.max_weight or max_weight or 1000.0)
        self.timeout = timeout
        self._round: dict | None = None
        self.last_info: dict = {}
        inner = innermost(strategy)
        check_secagg_compatible(getattr(inner, "rule", None), getattr(inner, "plans", ()))
        if hasattr(inner, "sees_individual_updates"):
            inner.sees_individual_updates = False  # its replies will carry only the aggregate

    def __repr__(self) -> str:
        return f"SecAggPlusStrategy({self.strategy!r})"

    def summary(self) -> None:
        self.strategy.summary()

    def configure_train(self, server_round, arrays, config, grid):
        from flwr.server.compat.grid_client_proxy import GridClientProxy
        from flwr.server.compat.legacy_context import LegacyContext
        from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
        from flwr.server.workflow.constant import Key as WorkflowKey

        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        if not messages:
            self._round = None
            return []
        if len(messages) < 2:
            raise FedsecError(f"round {server_round}: secure aggregation needs at least 2 hospitals per round, "
                              f"{len(messages)} selected (raise federation.fraction_train)")
        instructions = {m.metadata.dst_node_id: m for m in messages}
        OneRound, Workflow = _workflow_classes()
        try:
            run_id = int(grid.run.run_id)
        except Exception:  # a Grid without a run (tests)
            run_id = 0
        legacy = OneRound([GridClientProxy(nid, grid, run_id) for nid in instructions])
        context = LegacyContext(Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                                strategy=legacy)
        context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round})
        context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
        c = self.config
        workflow = Workflow({nid: m.content for nid, m in instructions.items()}, num_shares=c.num_shares,
                            reconstruction_threshold=c.reconstruction_threshold, max_weight=self.max_weight,
                            clipping_range=c.clipping_range, quantization_range=c.quantization_range,
                            modulus_range=c.modulus_range, timeout=self.timeout)
        workflow(grid, context)
        state = workflow.state  # its failures are the ones aggregate_fit also received
        failures = [str(getattr(f.args[0], "reason", f)) if f.args else str(f)
                    for f in (state.failures if state is not None else legacy.failures)]
        if not legacy.results:
            raise FedsecError(f"round {server_round}: secure aggregation halted before the sum was unmasked "
                              f"({len(messages)} hospitals sampled; errors: {sorted(set(failures)) or 'none reported'}"
                              "); SecAgg+ needs at least reconstruction_threshold hospitals to stay in every stage")
        # the workflow puts the unmasked weighted mean into every result's parameters
        aggregate = np.asarray(_to_ndarrays(legacy.results[0][1].parameters)[0], dtype=np.float64)
        self._round = {"round": server_round, "instructions": instructions, "global": arrays,
                       "aggregate": aggregate, "results": [(p.node_id, r) for p, r in legacy.results],
                       "failures": sorted(set(failures)),
                       "num_shares": getattr(state, "num_shares", None), "threshold": getattr(state, "threshold", None)}
        return []

    def aggregate_train(self, server_round, replies):
        replies = list(replies)  # none expected: the round's messages went through SecAgg+
        if self._round is None or self._round["round"] != server_round:
            return self.strategy.aggregate_train(server_round, replies)
        r, self._round = self._round, None
        aggregated = add_to_floats(r["global"], r["aggregate"])
        out, done = [], set()
        for nid, fitres in r["results"]:
            metrics = MetricRecord({k: v for k, v in fitres.metrics.items() if isinstance(v, (int, float))})
            out.append(Message(RecordDict({"arrays": aggregated, "metrics": metrics}), reply_to=r["instructions"][nid]))
            done.add(nid)
        # SecAgg+ keeps the errors of a stage but not who sent them: list the round's errors
        why = "; ".join(r["failures"]) or "no reply"
        for nid, instr in r["instructions"].items():
            if nid not in done:
                out.append(Message(Error(code=0, reason=f"dropped out of secure aggregation (this round's errors: "
                                                        f"{why})"), reply_to=instr))
        arrays, metrics = self.strategy.aggregate_train(server_round, out)
        out_of_range = sum(int(f.metrics.get(METRIC_OUT_OF_RANGE, 0)) for _, f in r["results"])
        info = {"protocol": "SecAgg+", "hospitals": len(r["results"]), "dropped": len(r["instructions"]) - len(done),
                "num_shares": r["num_shares"], "reconstruction_threshold": r["threshold"],
                "clipping_range": self.config.clipping_range, "quantization_range": self.config.quantization_range,
                "out_of_range_values": out_of_range}
        self.last_info = info
        report_round_info(self, "privacy", {"secure_aggregation": info})
        return arrays, metrics

    def configure_evaluate(self, server_round, arrays, config, grid):
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round, replies):
        return self.strategy.aggregate_evaluate(server_round, replies)


def _to_ndarrays(parameters):
    from flwr.common import parameters_to_ndarrays

    return parameters_to_ndarrays(parameters)


def wrap_secagg(strategy, config=True, *, max_weight: float | None = None, timeout: float | None = None):
    """``privacy.secure_aggregation`` (true or a mapping) -> SecAggPlusStrategy around ``strategy``.

    Raises FedsecError for a rule or attack that needs individual updates, or a server-side
    central-DP wrapper inside (the server cannot clip what it cannot see: use
    ``privacy.central_dp.clipping: client``)."""
    from fedsec.privacy.central_dp import CentralDPMixin

    cfg = config if isinstance(config, SecAggConfig) else SecAggConfig.parse(config)
    s = strategy
    while s is not None:
        dp = s if isinstance(s, CentralDPMixin) else getattr(s, "central_dp", None)
        if isinstance(dp, CentralDPMixin) and dp.server_side:
            raise FedsecError("privacy.secure_aggregation with privacy.central_dp.clipping: server -- the server "
                              "cannot clip updates it cannot see; set privacy.central_dp.clipping: client")
        s = getattr(s, "strategy", None)
    return SecAggPlusStrategy(strategy, cfg, max_weight=max_weight, timeout=timeout)


def quantisation_bound(weights, config: SecAggConfig | None = None, max_weight: float | None = None) -> float:
    """Worst-case absolute error per entry of the SecAgg+ weighted mean against the exact
    weighted mean, for hospitals with sample counts ``weights`` whose weighted updates lie in
    the clipping range r.

    Each hospital sends round(w_i / W * Q) / Q * update_i (W = max_weight, Q =
    quantization_range) stochastically rounded to the grid 2r / Q: an error below one level
    per hospital, and a weight off by at most 1 / (2Q); the server divides by sum_i w_i / W.
    Together: (n * 2r / Q + n * r / Q) / sum_i(w_i / W) = 3 n r / (Q sum_i w_i / W).
    """
    c = config or SecAggConfig()
    mw = float(max_weight or c.max_weight or max(weights))
    return 3 * len(weights) * c.clipping_range / (c.quantization_range * sum(w / mw for w in weights))

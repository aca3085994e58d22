"""Record-level differential privacy: DP-SGD in each hospital through Opacus.

Each hospital trains its local epochs with Opacus's ``PrivacyEngine.make_private``: Poisson
sampling of its training records (rate q = 1 / ceil(N / batch_size)), per-record gradient
clipping to ``max_grad_norm`` and Gaussian noise of std ``noise_multiplier * max_grad_norm``
on every step. The guarantee protects one *patient record* of that hospital against anyone
who sees what the hospital sends (the server, observers, the other hospitals, the final
model).

Adjacency. Opacus's accountants (RDP, PRV, GDP) analyse the Poisson-subsampled Gaussian
mechanism under add/remove-one adjacency: two datasets of one hospital that differ by one
patient record present in one and absent from the other. A guarantee under replace-one
adjacency (a record changed) follows from it by group privacy over 2 records, with a larger
epsilon; fedsec reports the add/remove figure.

Accounting across rounds. Opacus's accountant lives in the ``PrivacyEngine``, which lives for
one round (a ClientApp call; Flower may reuse a process, but nothing guarantees it). fedsec
therefore never carries accountant objects between rounds: the hospital's epsilon is
recomputed from its *history*, which is fully determined by (noise_multiplier, q, steps per
round, number of rounds the hospital trained in). Steps per round are deterministic
(``epochs x int(1/q)``: Opacus's Poisson loader takes int(1/q) steps per epoch). A hospital is
charged only for the rounds it trained in (:func:`count_participation`): the node's
``Context.state`` (kept by Flower per node for the whole run, in simulation and deployment,
across the rounds it is not selected) records them, and the server sends each round the
number of rounds it has seen each hospital train in (its ledger, rebuilt from
``rounds.jsonl`` on ``--resume``), which covers a node whose state was lost. The hospital
takes the larger of the two counts. Empty Poisson batches still take a (noise-only) step, as
the analysis assumes.

The server's :class:`EpsilonLedger` keeps each hospital's latest cumulative epsilon over every
round; ``summary.json``'s ``epsilon_max`` is the ledger's maximum, not the last round's.

Options (``privacy.dp_sgd``), see :class:`DPConfig`.
"""

from __future__ import annotations

from typing import ClassVar

import dataclasses
import logging
import math
import warnings
from dataclasses import dataclass
from functools import lru_cache

import torch

from fedsec.errors import FedsecError
from fedsec.core.training import epoch_range, step_limit
from fedsec.privacy.options import choice, flag, number, option_error, parse_options
from fedsec.registry import PRIVACY

SECTION = "dp_sgd"
CHARGED_KEY = "dp-rounds-charged"  # train config: rounds charged so far, one int per hospital id
ACCOUNTANTS = ("rdp", "prv", "gdp")
DEFAULT_DELTA = 1e-3
STATE_KEY = "fedsec.dp_sgd"  # ConfigRecord in the node's Context.state


@PRIVACY.register("dp_sgd")
@dataclass
class DPConfig:
    """``privacy.dp_sgd``.

    noise_multiplier: z, the Gaussian noise std in units of max_grad_norm. Give this or
        target_epsilon (not both).
    target_epsilon: the epsilon each hospital should reach after ``federation.rounds`` rounds;
        z is then computed per hospital with Opacus's ``get_noise_multiplier`` for its
        sampling rate and planned steps (rounds x epochs x steps per epoch).
    max_grad_norm: C, the per-record gradient clipping norm (default 1.0).
    delta: the delta of the reported (epsilon, delta); default ``min(1e-3, N ** -1.1)`` for a
        hospital with N training records: 1e-3 is FLamby's choice for Fed-Heart-Disease (it
        applies to all four hospitals there, N <= 199), and N ** -1.1 keeps delta below 1/N
        (a mechanism that leaks one whole record with probability 1/N is no protection) for
        large hospitals.
    poisson: Poisson sampling of the batches (default true). false uses shuffled fixed-size
        batches; the epsilon is then computed as if sampling were Poisson, which is how
        Opacus reports it too, but is not a proven bound.
    accountant: "rdp" (default), "prv" or "gdp" -- Opacus's accountants.
    budgets: a privacy budget per hospital, {name: {epsilon, delta}} plus ``default``; the
        server stops selecting a hospital whose next round would exceed it
        (fedsec.privacy.budget, docs/privacy.md).
    """

    # the defense's declaration (docs/components.md, the threat map)
    title: ClassVar[str] = "record-level DP-SGD (Opacus) at each hospital"
    acts_in: ClassVar[str] = "client"  # client (a ClientApp mod / training), server, or both
    hides_individual_updates: ClassVar[bool] = False
    example: ClassVar[object] = {"noise_multiplier": 1.0}

    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    max_grad_norm: float = 1.0
    delta: float | None = None
    poisson: bool = True
    accountant: str = "rdp"
    budgets: dict | None = None  # per-hospital (epsilon, delta) budgets: fedsec.privacy.budget

    def __post_init__(self):
        s = SECTION
        self.noise_multiplier = number(s, "noise_multiplier", self.noise_multiplier, minimum=0.0, allow_none=True)
        self.target_epsilon = number(s, "target_epsilon", self.target_epsilon, minimum=0.0, strict_min=True,
                                     allow_none=True)
        self.max_grad_norm = number(s, "max_grad_norm", self.max_grad_norm, minimum=0.0, strict_min=True)
        self.delta = number(s, "delta", self.delta, minimum=0.0, maximum=1.0, strict_min=True, strict_max=True,
                            allow_none=True)
        self.poisson = flag(s, "poisson", self.poisson)
        self.accountant = choice(s, "accountant", self.accountant, ACCOUNTANTS)
        from fedsec.privacy.budget import parse_budgets

        self.budgets = parse_budgets(self.budgets)
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise FedsecError(f"privacy.{s}: give exactly one of noise_multiplier (the noise) or target_epsilon "
                              f"(the budget after federation.rounds rounds), got "
                              f"noise_multiplier={self.noise_multiplier!r}, target_epsilon={self.target_epsilon!r}")

    @classmethod
    def parse(cls, options) -> "DPConfig":
        """``privacy.dp_sgd`` (a mapping) -> DPConfig; unknown keys name ``privacy.dp_sgd.<key>``."""
        return parse_options(cls, SECTION, options)

    def for_hospital(self, name: str) -> "DPConfig":
        """This config as hospital ``name`` runs it: its budget's delta, when it sets one,
        replaces ``delta`` (fedsec.privacy.budget)."""
        from fedsec.privacy.budget import budget_for

        b = budget_for(self.budgets, name)
        if b is None or b.delta is None:
            return self
        return dataclasses.replace(self, delta=b.delta)

    def delta_for(self, num_records: int) -> float:
        if self.delta is not None:
            return self.delta
        return min(DEFAULT_DELTA, max(int(num_records), 1) ** -1.1)


@dataclass
class DPPlan:
    """What one hospital's DP-SGD looks like, fixed for the whole run.

    sample_rate: q = 1 / ceil(N / batch_size) (Opacus's Poisson rate for this batch size).
    steps_per_round: epochs x steps per epoch (see :func:`sampling`).
    """

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps_per_round: int
    delta: float
    accountant: str


def sampling(num_records: int, batch_size: int, poisson: bool = True) -> tuple[float, int]:
    """-> (q, steps per epoch) exactly as Opacus does it: q = 1 / len(DataLoader) =
    1 / ceil(N / B); its Poisson loader then takes int(1 / q) steps per epoch (one fewer than
    ceil(N / B) for some sizes, e.g. 93 batches, through float rounding), a shuffled loader
    ceil(N / B)."""
    batches = max(1, math.ceil(int(num_records) / int(batch_size)))
    q = 1.0 / batches
    return q, (int(1 / q) if poisson else batches)


@lru_cache(maxsize=256)
def _noise_for(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                          sample_rate=sample_rate, steps=steps, accountant=accountant))


def plan(dp: DPConfig, num_records: int, local, planned_rounds: int) -> DPPlan:
    """The hospital's DP-SGD parameters: its sampling rate, steps per round, delta and the noise
    (given, or computed from ``target_epsilon`` for ``planned_rounds`` rounds)."""
    if num_records <= 0:
        raise FedsecError("privacy.dp_sgd: this hospital has no training records")
    q, per_epoch = sampling(num_records, local.batch_size, dp.poisson)
    per_round = step_limit(local) or int(local.epochs) * per_epoch
    delta = dp.delta_for(num_records)
    if dp.noise_multiplier is not None:
        z = dp.noise_multiplier
    else:
        try:
            z = _noise_for(dp.target_epsilon, delta, q, per_round * int(planned_rounds), dp.accountant)
        except ValueError as err:  # Opacus: "The privacy budget is too low."
            raise option_error(SECTION, "target_epsilon",
                               f"{dp.target_epsilon:g} cannot be reached at delta={delta:g} with sampling rate "
                               f"{q:.4g} over {planned_rounds} rounds ({err})") from None
    return DPPlan(z, dp.max_grad_norm, q, per_round, delta, dp.accountant)


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp") -> float:
    """Epsilon of ``steps`` Poisson-subsampled Gaussian steps (Opacus's accountant, fresh).

    inf for noise_multiplier 0 (clipping only), 0 for no steps."""
    if steps <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=accountant)
    acc.history = [(float(noise_multiplier), float(sample_rate), int(steps))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta=delta))


def count_participation(state, server_round: int, charged_before: int | None = None) -> int:
    """Record that this hospital trains in ``server_round`` and return how many rounds it is
    charged for so far (this one included).

    ``state`` is the node's ``Context.state`` (a RecordDict that Flower keeps per node across
    the run, including the rounds the node is not selected in). ``charged_before``: the rounds
    the server's ledger has seen this hospital train in before ``server_round`` (sent in the
    train config as ``dp-rounds-charged``); it covers a node whose state was lost (a resumed
    run, a restarted node). The count is the larger of the two, so neither a lost state nor a
    lost reply makes it an underestimate. With neither (a server that sends no ledger and an
    empty state), every earlier round is counted: an upper bound.
    """
    from flwr.app import ConfigRecord

    rec = state.config_records.get(STATE_KEY)
    rounds = set(int(r) for r in rec["rounds"]) if rec is not None and "rounds" in rec else set()
    if not rounds and charged_before is None:
        rounds = set(range(1, int(server_round)))
    rounds.add(int(server_round))
    state.config_records[STATE_KEY] = ConfigRecord({"rounds": sorted(rounds)})
    return max(len(rounds), int(charged_before or 0) + 1)


def charged_before(config, hospital: int) -> int | None:
    """The server's count of rounds ``hospital`` was charged for before this one, from the
    train config; None when the server sent no ledger."""
    if CHARGED_KEY not in config:
        return None
    counts = list(config[CHARGED_KEY])
    return int(counts[hospital]) if 0 <= hospital < len(counts) else 0


class EpsilonLedger:
    """The server's record of each hospital's DP-SGD spending over the whole run.

    For each hospital that has trained: its latest cumulative epsilon, delta, noise multiplier,
    the number of rounds it was charged for and the last round it trained in. A hospital's
    entry only moves in a round it trains in. Rebuilt from ``rounds.jsonl`` on ``--resume``.

    A hospital selected in a round whose reply did not count (a crash, a timeout, a diverged
    update) may or may not have trained: such rounds since its last counted reply are kept as
    ``unconfirmed`` and added to what the server tells the hospital it has spent
    (:meth:`charged`), so that a node that lost its own state (``--resume``) is never
    undercharged. The hospital's own state, when it has one, is exact and its next counted
    reply resets them.
    """

    def __init__(self):
        self.entries: dict[str, dict] = {}
        self.unconfirmed: dict[str, int] = {}

    def record_round(self, server_round: int, selected, trained: dict) -> None:
        """One round: ``selected`` hospital names, ``trained`` = name -> reply metrics for the
        hospitals whose reply counted."""
        for hospital, metrics in trained.items():
            self.record(server_round, hospital, metrics)
            self.unconfirmed.pop(hospital, None)
        for hospital in selected:
            if hospital not in trained:
                self.unconfirmed[hospital] = self.unconfirmed.get(hospital, 0) + 1

    def record(self, server_round: int, hospital: str, metrics) -> None:
        """One trained hospital's reply metrics (``DPTrainResult.metrics()``) in ``server_round``."""
        entry = {"epsilon": float(metrics["dp-epsilon"]), "last_round": int(server_round)}
        for key, name in (("dp-delta", "delta"), ("dp-noise-multiplier", "noise_multiplier")):
            if key in metrics:
                entry[name] = float(metrics[key])
        if "dp-rounds" in metrics:
            entry["rounds"] = int(metrics["dp-rounds"])
        self.entries[hospital] = entry

    @classmethod
    def from_rounds(cls, records) -> "EpsilonLedger":
        """The ledger after the rounds in ``records`` (rounds.jsonl's dicts, in order)."""
        ledger = cls()
        for rec in records:
            block = (rec.get("privacy") or {}).get("dp_sgd") or {}
            trained = {}
            for hospital, eps in (block.get("epsilon") or {}).items():
                metrics = {"dp-epsilon": eps}
                for name, key in (("delta", "dp-delta"), ("noise_multiplier", "dp-noise-multiplier"),
                                  ("rounds", "dp-rounds")):
                    if hospital in (block.get(name) or {}):
                        metrics[key] = block[name][hospital]
                trained[hospital] = metrics
            ledger.record_round(int(rec.get("round", 0)), rec.get("selected") or list(trained), trained)
        return ledger

    def charged(self, hospitals: list[str]) -> list[int]:
        """Rounds charged so far, one int per hospital id: counted replies' rounds plus the
        unconfirmed rounds since (0 for a hospital never selected)."""
        return [int(self.entries.get(h, {}).get("rounds", 0)) + self.unconfirmed.get(h, 0) for h in hospitals]

    def epsilon_max(self) -> float:
        return max((e["epsilon"] for e in self.entries.values()), default=0.0)

    def round_block(self, trained: dict[str, dict]) -> dict:
        """A round's ``privacy.dp_sgd`` record: the hospitals that trained this round (their
        cumulative epsilon, delta, noise, rounds charged) and ``epsilon_max``, the ledger's
        maximum over every hospital and every round so far."""
        block: dict = {"epsilon": {h: m["epsilon"] for h, m in trained.items()}}
        for name in ("delta", "noise_multiplier", "rounds"):
            values = {h: m[name] for h, m in trained.items() if name in m}
            if values:
                block[name] = values
        block["epsilon_max"] = self.epsilon_max()
        return block

    def summary(self) -> dict:
        """``summary.json``'s ``privacy.dp_sgd``: the ledger per hospital and its maximum."""
        out = {
            "epsilon_max": self.epsilon_max(),
            "epsilon": {h: e["epsilon"] for h, e in sorted(self.entries.items())},
            "ledger": {h: dict(e) for h, e in sorted(self.entries.items())},
        }
        if self.unconfirmed:  # selected since their last counted reply, without one
            out["unconfirmed_rounds"] = dict(sorted(self.unconfirmed.items()))
        return out


def summarise(records) -> dict | None:
    """``summary.json``'s ``privacy.dp_sgd`` from every round in rounds.jsonl; None without
    DP-SGD figures."""
    ledger = EpsilonLedger.from_rounds(records)
    return ledger.summary() if ledger.entries else None


def check_delta(dp: "DPConfig", train_sizes: dict[str, int]) -> None:
    """Refuse an explicit delta >= 1/N for any hospital (N: its training records), before
    training starts. A mechanism may leak one record outright with probability delta: at
    delta >= 1/N that is a whole record of the hospital, no protection."""
    from fedsec.privacy.budget import budget_for

    for h, n in train_sizes.items():  # a hospital's own budget delta (privacy.dp_sgd.budgets)
        b = budget_for(dp.budgets, h)
        if b is not None and b.delta is not None and n > 0 and b.delta >= 1.0 / n:
            name = h if h in (dp.budgets or {}) else "default"
            raise option_error(SECTION, f"budgets.{name}.delta",
                               f"{b.delta:g} is not below 1/N for {h} (N = {n}, 1/N = {1.0 / n:.3g}): a delta of "
                               f"1/N allows leaking a whole patient record. Use delta < {1.0 / n:.3g}")
    if dp.delta is None:
        return
    bad = {h: n for h, n in train_sizes.items() if n > 0 and dp.delta >= 1.0 / n
           and (budget_for(dp.budgets, h) is None or budget_for(dp.budgets, h).delta is None)}
    if bad:
        listing = ", ".join(f"{h} (N = {n}, 1/N = {1.0 / n:.3g})" for h, n in sorted(bad.items(), key=lambda kv: -kv[1]))
        smallest = min(1.0 / n for n in train_sizes.values() if n > 0)
        raise option_error(SECTION, "delta",
                           f"{dp.delta:g} is not below 1/N for {listing}: a delta of 1/N allows leaking a "
                           f"whole patient record. Use delta < {smallest:.3g} (e.g. N^-1.1), or leave delta "
                           f"unset (min(1e-3, N^-1.1) per hospital)")


def check_model(model: torch.nn.Module, model_name: str = "model") -> None:
    """Raise FedsecError if Opacus cannot train ``model`` (BatchNorm, unsupported layers)."""
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        detail = "; ".join(sorted({str(e).strip() for e in errors}))[:600]
        raise FedsecError(
            f"privacy.dp_sgd: Opacus cannot train task.model '{model_name}' ({detail}). Use a model without "
            "BatchNorm (logistic, mlp, small_cnn), or for MONAI networks set task.model_options.opacus: true "
            "(GroupNorm instead of BatchNorm, no in-place activations)")


@dataclass
class DPTrainResult:
    """state: the trained model's state_dict with plain keys (no ``_module.`` prefix), on CPU.
    steps: optimizer steps taken this round (empty Poisson batches included).
    loss: mean loss over the non-empty batches.
    epsilon: the hospital's cumulative epsilon after this round (at ``delta``)."""

    state: dict
    steps: int
    loss: float
    epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float

    rounds: int = 0  # rounds charged, this one included

    def metrics(self) -> dict:
        """Flat MetricRecord entries for the reply."""
        return {"dp-epsilon": self.epsilon, "dp-delta": self.delta,
                "dp-noise-multiplier": self.noise_multiplier, "dp-sample-rate": self.sample_rate,
                "dp-rounds": int(self.rounds)}


def train_dp_sgd(model: torch.nn.Module, data, task, local, dp: DPConfig, *, generator: torch.Generator,
                 participations: int, planned_rounds: int, device: torch.device | str = "cpu") -> DPTrainResult:
    """One round of DP-SGD for one hospital.

    model: the global model (trained in place). data: the hospital's training Split (x [N, ...],
    y [N]). task: fedsec Task (loss). local: LocalConfig (epochs, batch_size, lr, optimizer...).
    generator: seeds the Poisson sampling and, through one draw, the noise.
    participations: rounds this hospital has trained in, this one included
    (:func:`count_participation`). planned_rounds: federation.rounds (for target_epsilon).
    """
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    from fedsec.core.training import make_optimizer

    check_model(model, getattr(task, "model_name", "model"))
    p = plan(dp, len(data), local, planned_rounds)
    model.to(device).train()
    optimizer = make_optimizer(model, local)
    noise_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    loader = DataLoader(TensorDataset(data.x, data.y), batch_size=int(local.batch_size), shuffle=not dp.poisson,
                        generator=generator)
    noise_gen = torch.Generator(device=device).manual_seed(noise_seed) if str(device) != "cpu" else \
        torch.Generator().manual_seed(noise_seed)
    # Opacus logs a warning when the first Poisson batch is empty (expected with small q).
    loader_log = logging.getLogger("opacus.data_loader")
    old_level = loader_log.level
    loader_log.setLevel(logging.ERROR)
    dp_model = None
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
            warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
            warnings.filterwarnings("ignore", message=".*Optimal order is the (largest|smallest) alpha.*")
            engine = PrivacyEngine(accountant=p.accountant)
            dp_model, dp_opt, dp_loader = engine.make_private(
                module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=p.noise_multiplier,
                max_grad_norm=p.max_grad_norm, poisson_sampling=dp.poisson, noise_generator=noise_gen)
            total, batches, steps = 0.0, 0, 0
            limit = step_limit(local)
            for _ in epoch_range(local):
                for xb, yb in dp_loader:
                    xb, yb = xb.to(device), yb.to(device)
                    dp_opt.zero_grad(set_to_none=True)
                    out = dp_model(xb)
                    # An empty Poisson batch is still a step (noise only), as the analysis assumes.
                    loss = task.loss(out, yb) if len(xb) else out.sum() * 0.0
                    loss.backward()
                    dp_opt.step()
                    steps += 1
                    if len(xb):
                        total += float(loss.detach())
                        batches += 1
                    if steps == limit:
                        break
                if steps == limit:
                    break
    except RuntimeError as err:
        if "BackwardHookFunction" in str(err) or "inplace" in str(err):
            raise FedsecError(
                f"privacy.dp_sgd: Opacus cannot train task.model '{getattr(task, 'model_name', 'model')}' "
                f"({str(err).splitlines()[0]}); for MONAI networks set task.model_options.opacus: true "
                "(no in-place activations, GroupNorm)") from None
        raise
    finally:
        loader_log.setLevel(old_level)
        if dp_model is not None and hasattr(dp_model, "_close"):
            dp_model._close()  # remove Opacus's hooks from the caller's model
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    eps = epsilon(p.noise_multiplier, p.sample_rate, p.steps_per_round * int(participations), p.delta, p.accountant)
    return DPTrainResult(state, steps, total / max(batches, 1), eps, p.delta, p.noise_multiplier, p.sample_rate,
                         int(participations))

"""Record-level differential privacy: DP-SGD in each hospital through Opacus.

Each hospital trains its local epochs with Opacus's ``PrivacyEngine.make_private``: Poisson
sampling of its training records (rate q = 1 / ceil(N / batch_size)), per-record gradient
clipping to ``max_grad_norm`` and Gaussian noise of std ``noise_multiplier * max_grad_norm``
on every step. The guarantee protects one *patient record* of that hospital against anyone
who sees what the hospital sends (the server, observers, the other hospitals, the final
model).

Accounting across rounds. Opacus's accountant lives in the ``PrivacyEngine``, which lives for
one round (a ClientApp call; Flower may reuse a process, but nothing guarantees it). fedsec
therefore never carries accountant objects between rounds: the hospital's epsilon is
recomputed from its *history*, which is fully determined by (noise_multiplier, q, steps per
round, number of rounds the hospital trained in). Steps per round are deterministic
(``epochs x int(1/q)``: Opacus's Poisson loader takes int(1/q) steps per epoch) and the
number of rounds comes from :func:`count_participation` (the node's ``Context.state``, which
Flower keeps per node for the whole run, in simulation and deployment; when that state is
missing -- a resumed run or a restarted node -- every earlier round is counted, an upper
bound). So the reported epsilon is exact when the hospital trained in every round and never
an underestimate. Empty Poisson batches still take a (noise-only) step, as the analysis
assumes.

Options (``privacy.dp_sgd``), see :class:`DPConfig`.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from functools import lru_cache

import torch

from fedsec.errors import FedsecError
from fedsec.federation.training import epoch_range, step_limit
from fedsec.privacy.options import choice, flag, number, option_error, parse_options

SECTION = "dp_sgd"
ACCOUNTANTS = ("rdp", "prv", "gdp")
DEFAULT_DELTA = 1e-3
STATE_KEY = "fedsec.dp_sgd"  # ConfigRecord in the node's Context.state


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
    """

    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    max_grad_norm: float = 1.0
    delta: float | None = None
    poisson: bool = True
    accountant: str = "rdp"

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
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise FedsecError(f"privacy.{s}: give exactly one of noise_multiplier (the noise) or target_epsilon "
                              f"(the budget after federation.rounds rounds), got "
                              f"noise_multiplier={self.noise_multiplier!r}, target_epsilon={self.target_epsilon!r}")

    @classmethod
    def parse(cls, options) -> "DPConfig":
        """``privacy.dp_sgd`` (a mapping) -> DPConfig; unknown keys name ``privacy.dp_sgd.<key>``."""
        return parse_options(cls, SECTION, options)

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


def count_participation(state, server_round: int, selected=None) -> int:
    """Record that this hospital trains in ``server_round`` and return how many rounds it has
    trained in so far (this one included).

    ``state`` is the node's ``Context.state`` (a RecordDict that Flower keeps per node across
    the run). If it holds no history (first call of the run, a resumed run, a restarted
    node), the rounds the server says it selected this hospital in (``selected``, the train
    config's "dp-rounds") are counted, else every round before ``server_round``: an upper
    bound either way (a selected hospital may have failed), exact when it trained each time.
    """
    from flwr.app import ConfigRecord

    rec = state.config_records.get(STATE_KEY)
    rounds = set(int(r) for r in rec["rounds"]) if rec is not None and "rounds" in rec else set()
    if not rounds:
        rounds = ({int(r) for r in selected if int(r) < int(server_round)} if selected is not None
                  else set(range(1, int(server_round))))
    rounds.add(int(server_round))
    state.config_records[STATE_KEY] = ConfigRecord({"rounds": sorted(rounds)})
    return len(rounds)


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

    def metrics(self) -> dict:
        """Flat MetricRecord entries for the reply."""
        return {"dp-epsilon": self.epsilon, "dp-delta": self.delta,
                "dp-noise-multiplier": self.noise_multiplier, "dp-sample-rate": self.sample_rate}


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

    from fedsec.federation.training import make_optimizer

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
    return DPTrainResult(state, steps, total / max(batches, 1), eps, p.delta, p.noise_multiplier, p.sample_rate)

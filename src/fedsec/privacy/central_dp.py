"""Hospital-level (central) differential privacy through Flower's DP strategy wrappers.

The server clips each hospital's update (local - global) to an L2 norm C, averages, and adds
Gaussian noise of std ``noise_multiplier * C / m`` (m = hospitals sampled per round) to the
aggregate (DP-FedAvg, McMahan et al. 2018; adaptive C: Andrew et al. 2021). The guarantee
protects a *whole hospital's participation* (all of its records at once) against whoever
sees the global models -- the other hospitals, anyone the final model is given to -- but not
against the server, which sees each update before the noise (use DP-SGD, ``privacy.dp_sgd``,
for that, or client-side clipping with secure aggregation).

The mechanism is Flower's ``DifferentialPrivacy{Server,Client}Side{Fixed,Adaptive}Clipping``
from ``flwr.serverapp.strategy``, subclassed here (their options and checks, client-side
``configure_train`` that sends the clipping norm, ``compute_stdv``). It is *not* an outer
wrapper around the aggregation: :func:`wrap_central_dp` installs it on FedsecStrategy, whose
round clips after the colluding coalition has forged its updates (as an outer wrapper it
clipped the replies before the strategy ran, so forged updates escaped clipping: with IPM,
eps 10, on heart_fedavg it checked the two hospitals' honest updates, norms 0.13 and 0.20,
and the forged ones that replaced them, norm 3.5, reached the mean unclipped) and adds noise
after the aggregation rule
(docs/design.md, "The server's round"). What fedsec changes from Flower, and why (Flower 1.41
behaviour read in ``flwr/serverapp/strategy/dp_*.py``):

- the round keeps Flower's order (clip -> aggregate -> noise) but:
  * replies that carry an error are passed on to the wrapped strategy, which fails the run
    or drops them per ``federation.min_hospitals``; Flower's wrapper silently skips the
    whole round's aggregation when any reply has an error;
  * only floating-point arrays are clipped and noised; Flower's ``clip_inputs_inplace``
    multiplies every array in place, which raises on integer buffers
    (BatchNorm's ``num_batches_tracked``);
  * adaptive clipping: the noise std uses the clipping norm that was *applied* this round;
    Flower updates the norm first and calibrates the noise to the *new* norm, which
    under-noises whenever the norm shrinks;
  * adaptive clipping: the norm update has Andrew et al.'s sign, C <- C exp(lr (f - q)) with
    f the (noisy) fraction of clipped updates and q = ``target_clipped_quantile``. Flower
    computes exp(-lr (f - q)) with f the *clipped* fraction (the paper's bit is "not
    clipped"), so its norm shrinks when too many updates are clipped and collapses towards
    0 (measured: 0.1 -> 0.002 in 15 rounds with every update norm >= 1);
  * noise (and adaptive clipping's noisy count) come from a generator seeded by the
    scenario seed and the round (Flower draws from NumPy's global RNG): runs repeat.
- Epsilon: Flower's own accountant needs ``dp-accounting`` (``flwr[dp]``, not installed) and
  only supports uniform FedAvg weights. fedsec accounts with Opacus's ``RDPAccountant``: one
  sampled-Gaussian step per round, sampling rate q = 1 (no amplification by sampling; always
  valid) or, with ``amplification: true``, q = m / hospitals (fedsec samples a fixed-size set,
  so this treats it as Poisson sampling: the usual approximation, not a proof). The noise
  multiplier of a round is the *effective* one: FedsecStrategy weights hospitals by their
  sample counts, so one hospital can move the mean by ``C * max_i p_i`` (p_i its normalised
  weight), not ``C / m``; z_eff = z / (m * max_i p_i) (= z for equal weights). Adaptive
  clipping's noisy clipped-count query is composed in (z_round = (z_eff^-2 + (2 sigma_b)^-2)^-1/2,
  Andrew et al. Thm 1). Epsilon is cumulative over the rounds run so far, at ``delta``.

Only the weighted mean has the sensitivity the noise is calibrated to: robust rules that
select or reweight updates by comparing them are refused (:func:`check_central_dp_compatible`).

Client-side clipping (``clipping: client``) uses :func:`clipping_mod`, a ClientApp mod for
``@app.train(mods=[...])`` that clips the reply only when the server's config carries a
clipping norm. Flower's ``fixedclipping_mod`` / ``adaptiveclipping_mod`` do work with the
Message-API ClientApp (they are Message-API mods), but they return an error for any train
message without the clipping key -- so one ClientApp could not serve scenarios with and
without central DP -- and they require exactly one ConfigRecord, which is not the case under
SecAgg+ (its own ConfigRecord travels with the train message). In simulation the mod also
clips a malicious hospital's update (its ``poison_update`` runs inside the train handler):
client-side clipping models hospitals that follow the protocol; server-side clipping does not
need to trust them.
"""

from __future__ import annotations

from typing import ClassVar

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
)
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, KEY_NORM_BIT, compute_stdv

from fedsec.errors import FedsecError
from fedsec.privacy.options import choice, flag, number, parse_options
from fedsec.registry import PRIVACY

SECTION = "central_dp"
DEFAULT_DELTA = 1e-3


@PRIVACY.register("central_dp")
@dataclass
class CentralDPConfig:
    """``privacy.central_dp``.

    mode: "fixed" (default) or "adaptive" clipping norm (Andrew et al.: the norm follows the
        ``target_clipped_quantile`` of the update norms, geometric steps of ``clip_norm_lr``).
    clipping: "server" (default: the server clips what it receives) or "client" (each
        hospital clips before sending, via :func:`clipping_mod`; needed with secure aggregation).
    noise_multiplier: z; the aggregate gets noise of std z * C / m. Give this or target_epsilon.
    target_epsilon: epsilon after federation.rounds rounds; z is computed with Opacus's
        ``get_noise_multiplier`` (for equal weights; sample-count weights spend more, and the
        reported epsilon says so).
    clipping_norm: C (fixed), or the initial C (adaptive; Andrew et al. suggest 0.1). Default 1.0.
    target_clipped_quantile, clip_norm_lr, clipped_count_stddev: adaptive only (Flower's
        defaults 0.5, 0.2, m/20).
    delta: default min(1e-3, H ** -1.1) for H hospitals.
    amplification: account with sampling rate m / H instead of 1 (default false).
    """

    # the defense's declaration (docs/components.md, the threat map)
    title: ClassVar[str] = "hospital-level central DP (Flower's DP strategy wrappers)"
    acts_in: ClassVar[str] = "server"  # client (a ClientApp mod / training), server, or both
    hides_individual_updates: ClassVar[bool] = False
    example: ClassVar[object] = {"noise_multiplier": 1.0}

    mode: str = "fixed"
    clipping: str = "server"
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    clipping_norm: float = 1.0
    target_clipped_quantile: float = 0.5
    clip_norm_lr: float = 0.2
    clipped_count_stddev: float | None = None
    delta: float | None = None
    amplification: bool = False

    def __post_init__(self):
        s = SECTION
        self.mode = choice(s, "mode", self.mode, ("fixed", "adaptive"))
        self.clipping = choice(s, "clipping", self.clipping, ("server", "client"))
        self.noise_multiplier = number(s, "noise_multiplier", self.noise_multiplier, minimum=0.0, allow_none=True)
        self.target_epsilon = number(s, "target_epsilon", self.target_epsilon, minimum=0.0, strict_min=True,
                                     allow_none=True)
        self.clipping_norm = number(s, "clipping_norm", self.clipping_norm, minimum=0.0, strict_min=True)
        self.target_clipped_quantile = number(s, "target_clipped_quantile", self.target_clipped_quantile,
                                              minimum=0.0, maximum=1.0)
        self.clip_norm_lr = number(s, "clip_norm_lr", self.clip_norm_lr, minimum=0.0, strict_min=True)
        self.clipped_count_stddev = number(s, "clipped_count_stddev", self.clipped_count_stddev, minimum=0.0,
                                           allow_none=True)
        self.delta = number(s, "delta", self.delta, minimum=0.0, maximum=1.0, strict_min=True, strict_max=True,
                            allow_none=True)
        self.amplification = flag(s, "amplification", self.amplification)
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise FedsecError(f"privacy.{s}: give exactly one of noise_multiplier or target_epsilon, got "
                              f"noise_multiplier={self.noise_multiplier!r}, target_epsilon={self.target_epsilon!r}")

    @classmethod
    def parse(cls, options) -> "CentralDPConfig":
        return parse_options(cls, SECTION, options)

    def delta_for(self, num_hospitals: int) -> float:
        return self.delta if self.delta is not None else min(DEFAULT_DELTA, max(int(num_hospitals), 1) ** -1.1)


def check_adaptive_noise(cfg: CentralDPConfig, num_sampled: int, noise_multiplier: float | None = None) -> None:
    """Adaptive clipping spends part of the noise on the clipped-count query (Andrew et al.):
    the update noise is z_update = (z^-2 - (2 sigma_b)^-2)^-1/2, which needs z < 2 sigma_b
    (sigma_b = clipped_count_stddev, Flower's default m/20). Raise a FedsecError naming the
    options before Flower's own ValueError does, mid-run."""
    z = cfg.noise_multiplier if noise_multiplier is None else noise_multiplier
    if cfg.mode != "adaptive" or not z:
        return
    sigma_b = cfg.clipped_count_stddev if cfg.clipped_count_stddev is not None else num_sampled / 20
    if z >= 2 * sigma_b:
        raise FedsecError(
            f"privacy.central_dp: adaptive clipping spends part of the noise on the noisy count of clipped "
            f"updates, so noise_multiplier ({z:g}) must be below 2 x clipped_count_stddev ({2 * sigma_b:g}; the "
            f"default is hospitals-per-round / 20 = {num_sampled}/20). Set clipped_count_stddev above {z / 2:g} "
            "(a noisier clipping-norm estimate), lower noise_multiplier, or use mode: fixed")


def check_central_dp_compatible(rule) -> None:
    """Raise unless the aggregation is the (weighted) mean the noise is calibrated to.

    ``rule``: None (Flower's FedAvg aggregation) or a fedsec AggregationRule."""
    name = getattr(rule, "name", None)
    if rule is None or getattr(rule, "mean_like", False):  # the rule's declaration (RuleSpec)
        return
    raise FedsecError(
        f"strategy '{name}' with privacy.central_dp: the Gaussian noise is calibrated to the sensitivity of "
        f"the mean of clipped updates; '{name}' selects or reweights updates by comparing them, so one "
        "hospital can move the aggregate by more than its clipped share and the reported epsilon would not "
        "hold. Use strategy fedavg with central DP, or privacy.dp_sgd (record-level DP that holds whatever "
        "the server aggregates)")


def num_sampled(fraction_train: float, num_hospitals: int) -> int:
    """Hospitals sampled per round, as FedsecStrategy selects them: ceil(fraction * H) in [1, H]."""
    return max(1, min(int(num_hospitals), math.ceil(float(fraction_train) * int(num_hospitals))))


def noise_for_target(target_epsilon: float, delta: float, q: float, rounds: int) -> float:
    """z such that ``rounds`` sampled-Gaussian rounds at rate q spend ``target_epsilon`` at
    ``delta`` (Opacus's get_noise_multiplier, RDP; equal weights)."""
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=q,
                                              steps=int(rounds), accountant="rdp"))
        except ValueError as err:
            raise FedsecError(f"privacy.central_dp.target_epsilon: {target_epsilon:g} cannot be reached at "
                              f"delta={delta:g} over {rounds} rounds ({err})") from None


def hospital_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """Cumulative epsilon of a list of (noise_multiplier, sample_rate, steps), Opacus RDP."""
    history = [h for h in history if h[2] > 0]
    if not history:
        return 0.0
    if any(h[0] <= 0 for h in history):
        return math.inf
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(float(z), float(q), int(n)) for z, q, n in history]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta=delta))


def innermost(strategy):
    """Follow ``.strategy`` through wrappers to the strategy that aggregates."""
    seen = 0
    while hasattr(strategy, "strategy") and seen < 16:
        strategy = strategy.strategy
        seen += 1
    return strategy


def report_round_info(strategy, section: str, info: dict) -> None:
    """Hand ``info`` to the innermost strategy's round record (``add_round_info``), if it has one."""
    target = innermost(strategy)
    add = getattr(target, "add_round_info", None)
    if callable(add):
        add(section, info)


def _float_indices(arrays: list[np.ndarray]) -> list[int]:
    return [i for i, a in enumerate(arrays) if np.issubdtype(np.asarray(a).dtype, np.floating)]


def _update_norm(local: list[np.ndarray], current: list[np.ndarray], idx: list[int]) -> float:
    return float(math.sqrt(sum(float(np.sum((local[i].astype(np.float64) - current[i]) ** 2)) for i in idx)))


def clip_arrays(local: list[np.ndarray], current: list[np.ndarray],
                clipping_norm: float) -> tuple[list[np.ndarray], float]:
    """Scale the float part of (local - current) to L2 norm <= clipping_norm.

    -> (current + clipped update as arrays of local's dtypes; integer arrays unchanged, the
    norm before clipping)."""
    idx = _float_indices(local)
    norm = _update_norm(local, current, idx)
    scale = min(1.0, clipping_norm / norm) if norm > 0 else 1.0
    out = [np.array(a, copy=True) for a in local]
    if scale < 1.0:
        for i in idx:
            out[i] = (current[i] + (local[i].astype(np.float64) - current[i]) * scale).astype(local[i].dtype)
    return out, norm


class CentralDPMixin:
    """fedsec's central DP: Flower's DP wrapper classes (their options, checks, configure_train
    and noise calibration ``compute_stdv``) with fedsec's changes (module docstring), used as
    two steps of the server's round rather than as an outer wrapper.

    FedsecStrategy calls, in its pipeline (docs/design.md, "The server's round"):
    :meth:`start_round`; :meth:`clip_updates` (server-side clipping, after the coalition has
    forged its updates, so forged updates are clipped like any other) or
    :meth:`note_client_clipping` (client side); then, after the aggregation rule,
    :meth:`add_noise` and :meth:`finish_round` (adaptive norm update, accounting, the round's
    ``privacy.central_dp`` record). Put first in the bases so its methods override Flower's.
    """

    strategy: Any
    noise_multiplier: float
    clipping_norm: float
    num_sampled_clients: int

    def _init_fedsec(self, config: CentralDPConfig, num_hospitals: int, seed: int, history=None,
                     nominal_noise_multiplier: float | None = None) -> None:
        self.config = config
        # z as configured (Flower's adaptive wrapper keeps only the update's share of it)
        self.nominal_noise_multiplier = float(config.noise_multiplier if nominal_noise_multiplier is None
                                              else nominal_noise_multiplier)
        self.num_hospitals = int(num_hospitals)
        self.seed = int(seed)
        self.delta = config.delta_for(num_hospitals)
        self.sample_rate = (self.num_sampled_clients / self.num_hospitals) if config.amplification else 1.0
        self.history: list[tuple[float, float, int]] = [tuple(h) for h in (history or [])]
        self.last_info: dict = {}
        self._round: dict = {}

    # ---- pieces -------------------------------------------------------------------------
    @property
    def adaptive(self) -> bool:
        return isinstance(self, (DifferentialPrivacyServerSideAdaptiveClipping,
                                 DifferentialPrivacyClientSideAdaptiveClipping))

    @property
    def server_side(self) -> bool:
        return isinstance(self, (DifferentialPrivacyServerSideFixedClipping,
                                 DifferentialPrivacyServerSideAdaptiveClipping))

    def _rng(self, server_round: int, salt: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, int(server_round), 0xD1FF, salt])

    def effective_noise_multiplier(self, weights: list[float]) -> float:
        """The round's z for the hospital whose update weighs most (module docstring)."""
        if not weights or self.noise_multiplier <= 0:
            return 0.0
        total = sum(weights)
        p_max = max(weights) / total if total > 0 else 1.0 / len(weights)
        z_update = self.noise_multiplier / (self.num_sampled_clients * p_max)
        if self.adaptive and self.clipped_count_stddev > 0:
            return (z_update ** -2 + (2 * self.clipped_count_stddev) ** -2) ** -0.5
        return z_update

    def privacy_spent(self) -> dict:
        """-> {"epsilon", "delta", "rounds"} so far (fedsec's accountant)."""
        return {"epsilon": hospital_epsilon(self.history, self.delta), "delta": self.delta,
                "rounds": sum(h[2] for h in self.history)}

    def accountant_state(self) -> list[list]:
        """The accountant history [(z, q, rounds)], JSON-able, to resume with."""
        return [list(h) for h in self.history]

    def state_dict(self) -> dict:
        """What carries over between rounds: the accountant's history and the clipping norm
        (adaptive clipping moves it every round). Goes into checkpoint.pt."""
        return {"clipping_norm": float(self.clipping_norm), "history": self.accountant_state()}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (resuming a run)."""
        self.clipping_norm = float(state["clipping_norm"])
        self.history = [tuple(h) for h in state["history"]]

    # ---- the round: steps of FedsecStrategy's pipeline -----------------------------------
    def start_round(self, server_round: int) -> None:
        """Fix the round's clipping norm (the one noise is calibrated to) and its RNG."""
        self._round = {"round": int(server_round), "norm": float(self.clipping_norm), "clipped": [],
                       "norms": {}}

    def clip_updates(self, updates: torch.Tensor, names: list[str]) -> torch.Tensor:
        """Server-side clipping. updates: Tensor[n, d] (local - global, float entries, as the
        server received them, forged ones included) -> Tensor[n, d], each row scaled to L2
        norm <= C. Rows already within C are returned unchanged (a new tensor only if some
        row is clipped). Norms in float64."""
        norm = self._round["norm"]
        norms = torch.linalg.vector_norm(updates.double(), dim=1)
        self._round["norms"] = {name: float(v) for name, v in zip(names, norms)}
        self._round["clipped"] = sorted(name for name, v in zip(names, norms) if float(v) > norm)
        if not self._round["clipped"]:
            return updates
        scale = torch.where(norms > norm, norm / norms.clamp_min(torch.finfo(torch.float64).tiny), 1.0)
        return (updates.double() * scale[:, None]).to(updates.dtype)

    def note_client_clipping(self, names: list[str], metrics: list) -> None:
        """Client-side clipping: the hospitals clipped (``clipping_mod``) and say so with
        their norm bit; collect it (adaptive clipping needs it to move the norm)."""
        bits = []
        for name, m in zip(names, metrics):
            m = m if m is not None else {}
            if KEY_NORM_BIT not in m and self.adaptive:
                raise FedsecError(f"privacy.central_dp (client-side adaptive clipping): {name}'s reply has no "
                                  f"'{KEY_NORM_BIT}'; the ClientApp's train handler needs "
                                  "mods=[fedsec.privacy.central_dp.clipping_mod]")
            bits.append((name, bool(m.get(KEY_NORM_BIT, False))))
        self._round["clipped"] = sorted(n for n, b in bits if b)

    def add_noise(self, aggregate: torch.Tensor, weights: list[float]) -> torch.Tensor:
        """aggregate: Tensor[d], the aggregated update -> aggregate + N(0, std^2) per entry,
        std = z * C / m (Flower's ``compute_stdv``, C the norm this round clipped to), drawn
        from a generator seeded by (scenario seed, round). Accounts the release."""
        rnd = self._round
        std = compute_stdv(self.noise_multiplier, rnd["norm"], self.num_sampled_clients)
        if std > 0:
            noise = self._rng(rnd["round"], 1).normal(0.0, std, aggregate.numel())
            aggregate = aggregate + torch.from_numpy(noise).to(aggregate.dtype).reshape(aggregate.shape)
        z = self.effective_noise_multiplier(list(weights))
        self.history.append((z, self.sample_rate, 1))
        rnd.update(noise_std=std, z=z, num_valid=len(weights))
        return aggregate

    def finish_round(self) -> dict:
        """Move the adaptive norm, and return the round's ``privacy.central_dp`` record."""
        rnd = self._round
        if self.adaptive and rnd.get("num_valid"):
            # Andrew et al.: the norm grows while more than the target fraction is clipped.
            # (Flower's _geometric_update applies exp(-lr * (clipped - target)), the opposite
            # sign: the norm shrinks when too many updates are clipped and runs off to 0.)
            noisy = float(self._rng(rnd["round"], 2).normal(len(rnd["clipped"]), self.clipped_count_stddev))
            frac = noisy / float(rnd["num_valid"])
            self.clipping_norm *= math.exp(self.clip_norm_lr * (frac - self.target_clipped_quantile))
        info: dict[str, Any] = {"mode": self.config.mode, "clipping": self.config.clipping,
                                "clipping_norm": rnd["norm"], "clipped": rnd["clipped"]}
        if "noise_std" in rnd:
            info.update(noise_std=rnd["noise_std"], noise_multiplier=self.nominal_noise_multiplier,
                        noise_multiplier_effective=rnd["z"], sample_rate=self.sample_rate)
        if rnd["norms"]:
            info["update_norms"] = dict(sorted(rnd["norms"].items()))
        if self.adaptive:
            info["next_clipping_norm"] = float(self.clipping_norm)
        info.update(self.privacy_spent())
        self.last_info = info
        return info

    # ---- as a Flower strategy -------------------------------------------------------------
    def aggregate_train(self, server_round: int, replies) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The replies go to the wrapped strategy unchanged: clipping and noise are steps of
        its pipeline (Flower's wrapper would clip here, before the strategy's coalition forges
        its updates, and silently skip a round with any error reply)."""
        return self.strategy.aggregate_train(server_round, replies)


class FedsecServerSideFixedClipping(CentralDPMixin, DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed clipping with fedsec's accounting (see CentralDPMixin)."""


class FedsecClientSideFixedClipping(CentralDPMixin, DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side fixed clipping (hospitals clip with :func:`clipping_mod`)."""


class FedsecServerSideAdaptiveClipping(CentralDPMixin, DifferentialPrivacyServerSideAdaptiveClipping):
    """Flower's server-side adaptive clipping (Andrew et al.) with fedsec's accounting."""


class FedsecClientSideAdaptiveClipping(CentralDPMixin, DifferentialPrivacyClientSideAdaptiveClipping):
    """Flower's client-side adaptive clipping (hospitals clip and report their norm bit)."""


WRAPPERS = {("fixed", "server"): FedsecServerSideFixedClipping,
            ("fixed", "client"): FedsecClientSideFixedClipping,
            ("adaptive", "server"): FedsecServerSideAdaptiveClipping,
            ("adaptive", "client"): FedsecClientSideAdaptiveClipping}


def wrap_central_dp(strategy, config, num_sampled: int, *, num_hospitals: int | None = None,
                    rounds: int | None = None, seed: int = 0, history=None):
    """Give ``strategy`` (FedsecStrategy, or a wrapper around one) central DP.

    The DP object is installed on the innermost FedsecStrategy (``central_dp``), whose round
    clips after the coalition and adds noise after the aggregation rule; it is also returned,
    and may be started as a Flower strategy (it passes everything through to ``strategy``).

    config: ``privacy.central_dp`` (a mapping or CentralDPConfig). num_sampled: m, hospitals per
    round (:func:`num_sampled`). num_hospitals: H (default m). rounds: federation.rounds, needed
    for target_epsilon. seed: the scenario seed (noise). history: an earlier accountant state
    (``accountant_state()``) when resuming a run.
    The round record gets ``privacy.central_dp``; ``privacy_spent()`` gives the running epsilon.
    """
    cfg = config if isinstance(config, CentralDPConfig) else CentralDPConfig.parse(config)
    check_central_dp_compatible(getattr(innermost(strategy), "rule", None))
    m = int(num_sampled)
    h = int(num_hospitals or m)
    if m < 1 or h < m:
        raise FedsecError(f"privacy.central_dp: {m} hospitals sampled per round out of {h}")
    z = cfg.noise_multiplier
    if z is None:
        if not rounds:
            raise FedsecError("privacy.central_dp.target_epsilon needs the number of rounds")
        q = m / h if cfg.amplification else 1.0
        z = noise_for_target(cfg.target_epsilon, cfg.delta_for(h), q, int(rounds))
    check_adaptive_noise(cfg, m, z)
    cls = WRAPPERS[(cfg.mode, cfg.clipping)]
    try:
        if cfg.mode == "fixed":
            wrapper = cls(strategy, z, cfg.clipping_norm, m)
        else:
            wrapper = cls(strategy, z, m, initial_clipping_norm=cfg.clipping_norm,
                          target_clipped_quantile=cfg.target_clipped_quantile, clip_norm_lr=cfg.clip_norm_lr,
                          clipped_count_stddev=cfg.clipped_count_stddev)
    except ValueError as err:  # Flower's own checks (e.g. clipped_count_stddev too low for z)
        raise FedsecError(f"privacy.central_dp: {err}") from None
    wrapper._init_fedsec(cfg, h, seed, history, z)
    inner = innermost(strategy)
    if not hasattr(inner, "central_dp"):
        raise FedsecError(f"privacy.central_dp: {type(inner).__name__} has no pipeline step for central DP "
                          "(FedsecStrategy has)")
    inner.central_dp = wrapper  # clipping and noise run as steps of its round
    return wrapper


# --------------------------------------------------------------------------------------
# Client side
# --------------------------------------------------------------------------------------


def clipping_mod(msg: Message, ctxt, call_next) -> Message:
    """ClientApp mod: clip the hospital's update to the norm the server sent (client-side
    central DP), and report whether it was clipped (``norm_bit``, for adaptive clipping).

    Passes every message through untouched unless it is a train message whose "config"
    carries ``clipping_norm`` -- so the same ClientApp serves scenarios without central DP.
    Expects fedsec's message layout: "arrays" (the global model) and "config" in, "arrays"
    and "metrics" out.
    """
    from flwr.app import MessageType

    content = msg.content if msg.has_content() else None
    if (msg.metadata.message_type != MessageType.TRAIN or content is None or "config" not in content
            or KEY_CLIPPING_NORM not in content["config"] or "arrays" not in content):
        return call_next(msg, ctxt)
    norm = float(content["config"][KEY_CLIPPING_NORM])
    current_record = content["arrays"]
    current = [np.asarray(a) for a in current_record.to_numpy_ndarrays()]
    keys = list(current_record.keys())
    reply = call_next(msg, ctxt)
    if reply.has_error():
        return reply
    record = reply.content["arrays"]
    if list(record.keys()) != keys:
        raise FedsecError("central DP client-side clipping: the reply's arrays do not match the global model's")
    clipped, n = clip_arrays([np.asarray(a) for a in record.to_numpy_ndarrays()], current, norm)
    reply.content["arrays"] = ArrayRecord({k: Array(np.ascontiguousarray(v))
                                           for k, v in zip(keys, clipped, strict=True)})
    if "metrics" in reply.content:
        reply.content["metrics"][KEY_NORM_BIT] = int(n > norm)
    else:
        reply.content["metrics"] = MetricRecord({KEY_NORM_BIT: int(n > norm)})
    return reply

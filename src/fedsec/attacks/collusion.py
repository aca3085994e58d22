"""Omniscient colluding coalitions: the malicious hospitals see every benign update of the
round and agree on what to send (``collude`` hook, server side, before the defense).

Simulation only (``simulation_only = True``): on real Flower nodes the hospitals cannot see
each other's updates. All attacks work in *update* space (``local - global``), return
``Tensor[n_malicious, d]`` and are untargeted (goal ``availability``).

- :class:`ALIE` — "A little is enough", Baruch et al. 2019.
- :class:`IPM` — inner-product manipulation, Xie et al. 2020 ("Fall of empires").
- :class:`MinMax`, :class:`MinSum` — Shejwalkar & Houmansadr 2021 (NDSS), AGR-agnostic.
- :class:`FangKrum`, :class:`FangMedian` — Fang et al. 2020 (USENIX Security), against Krum
  and against coordinate-wise median / trimmed mean.

Scalar products are accumulated in float64 over column chunks, so ``d`` of several million
parameters costs no float64 copy of the update matrix.
"""

from __future__ import annotations

from dataclasses import dataclass as _dataclass
from typing import Optional

from fedsec.registry import ATTACKS, option

import math
from statistics import NormalDist

import torch

from fedsec.attacks.base import Attack, AttackContext
from fedsec.errors import FedsecError

_CHUNK = 1 << 20  # columns per float64 block in _dots


def _dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T`` in float64 (``a``: [n, d], ``b``: [m, d]), one column block at a time."""
    out = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64, device=a.device)
    for j in range(0, a.shape[1], _CHUNK):
        out += a[:, j:j + _CHUNK].double() @ b[:, j:j + _CHUNK].double().T
    return out


def pairwise_sq_distances(updates: torch.Tensor) -> torch.Tensor:
    """``Tensor[n, n]`` float64 squared Euclidean distances between the rows of ``updates``."""
    g = _dots(updates, updates)
    sq = torch.diagonal(g)
    return (sq[:, None] + sq[None, :] - 2 * g).clamp_min(0.0)


def krum_index(sq_dist: torch.Tensor, f: int) -> int:
    """Krum (Blanchard et al. 2017) on a squared-distance matrix: the row whose summed squared
    distance to its ``n - f - 2`` nearest other rows is smallest (at least 1 neighbour)."""
    n = sq_dist.shape[0]
    k = max(1, min(n - 1, n - f - 2))
    others = sq_dist + torch.diag(torch.full((n,), float("inf"), dtype=sq_dist.dtype))
    scores = others.topk(k, dim=1, largest=False).values.sum(dim=1)
    return int(scores.argmin())


def _std(x: torch.Tensor) -> torch.Tensor:
    """Per-coordinate standard deviation (unbiased; 0 for a single row)."""
    return x.std(dim=0) if x.shape[0] > 1 else torch.zeros_like(x[0])


def _number(attack: Attack, key: str, positive: bool = True, allow_none: bool = False) -> float | None:
    v = attack.options[key]
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (positive and not v > 0):
        raise attack.option_error(key, "must be a " + ("positive " if positive else "") + "number"
                                  + (" or null" if allow_none else ""))
    return float(v)


class Coalition(Attack):
    """Shared ``collude``: nothing to do without malicious or benign hospitals; :meth:`craft`
    returns one update ``[d]`` (sent by every malicious hospital) or one per hospital."""

    goal = "availability"
    kind = "collusion"
    simulation_only = True
    success_metric = "auroc"
    success_wording = "the global model's AUROC / balanced accuracy falls against the no-attack run"

    def collude(self, benign_updates: torch.Tensor, n_malicious: int, ctx: AttackContext) -> torch.Tensor | None:
        if n_malicious <= 0 or benign_updates.shape[0] == 0:
            return None
        out = self.craft(benign_updates, int(n_malicious), ctx)
        if out.dim() == 1:
            out = out.unsqueeze(0).expand(n_malicious, -1)
        return out.to(benign_updates.dtype).clone()

    def craft(self, benign: torch.Tensor, n_malicious: int, ctx: AttackContext) -> torch.Tensor:
        raise NotImplementedError


@ATTACKS.register()
class ALIE(Coalition):
    """Send ``mean - z * std`` (per coordinate, over the benign updates). ``z``: null = the
    paper's ``z_max``: with n hospitals in the round and f malicious,
    ``s = floor(n / 2 + 1) - f`` and ``z = Phi^-1((n - s) / n)`` (``n = benign + malicious``);
    the probability is kept inside (0, 1) when f is so large that s <= 0."""

    name = "alie"
    verb = "sends crafted updates that hide inside the others' spread (ALIE)"

    @_dataclass
    class Options:
        z: Optional[float] = option(None, "deviation in std units; null = the paper's z_max")

    def __init__(self, **options):
        super().__init__(**options)
        self.z = _number(self, "z", positive=False, allow_none=True)
        self.last_z: float | None = None

    @staticmethod
    def z_max(n: int, f: int) -> float:
        s = math.floor(n / 2 + 1) - f
        p = min(max((n - s) / n, 1e-6), 1 - 1e-6)
        return NormalDist().inv_cdf(p)

    def craft(self, benign, n_malicious, ctx):
        z = self.z if self.z is not None else self.z_max(benign.shape[0] + n_malicious, n_malicious)
        self.last_z = z
        return benign.mean(dim=0) - z * _std(benign)


@ATTACKS.register()
class IPM(Coalition):
    """Inner-product manipulation: send ``-eps * mean(benign)``; a small eps (0.1) defeats
    median and Krum, a large one (e.g. 10) plain averaging."""

    name = "ipm"
    verb = "sends updates pointing against the others' mean (IPM)"

    @_dataclass
    class Options:
        eps: float = option(0.1, "the coalition sends -eps times the benign mean", gt=0.0)

    def __init__(self, **options):
        super().__init__(**options)
        self.eps = _number(self, "eps")

    def craft(self, benign, n_malicious, ctx):
        return -self.eps * benign.mean(dim=0)


class _MinMaxBase(Coalition):
    """``mean + gamma * p`` with the largest gamma whose malicious update stays inside the
    benign spread (see subclasses). p: ``unit_vec`` = -mean / ||mean||, ``std`` = -std,
    ``sign`` = -sign(mean). gamma: bracket grown from ``gamma_init`` by doubling, then
    bisection to ``tolerance`` (absolute); the feasible end is kept. ``last_gamma`` holds it."""


    @_dataclass
    class Options:
        perturbation: str = option("std", "direction of the perturbation", choices=("unit_vec", "std", "sign"))
        gamma_init: float = option(10.0, "initial scale of the search", gt=0.0)
        tolerance: float = option(1e-5, "stop the scale search at this step", gt=0.0)
    perturbations = ("unit_vec", "std", "sign")

    def __init__(self, **options):
        super().__init__(**options)
        if self.options["perturbation"] not in self.perturbations:
            raise self.option_error("perturbation", f"must be one of {', '.join(self.perturbations)}")
        self.gamma_init = _number(self, "gamma_init")
        self.tolerance = _number(self, "tolerance")
        self.last_gamma: float | None = None

    def perturbation(self, benign: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        kind = self.options["perturbation"]
        if kind == "std":
            return -_std(benign)
        if kind == "sign":
            return -torch.sign(mean)
        norm = float(_dots(mean[None], mean[None]).sqrt())
        return -mean / norm if norm > 0 else torch.zeros_like(mean)

    def feasible(self, sq_to_benign, pair_sq) -> bool:
        raise NotImplementedError

    def largest_gamma(self, ok) -> float:
        lo, hi = 0.0, self.gamma_init
        for _ in range(200):  # grow the bracket until hi is infeasible
            if not ok(hi):
                break
            lo, hi = hi, hi * 2
        else:
            return lo
        while hi - lo > self.tolerance:
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if ok(mid) else (lo, mid)
        return lo

    def craft(self, benign, n_malicious, ctx):
        mean = benign.mean(dim=0)
        p = self.perturbation(benign, mean)
        pair_sq = pairwise_sq_distances(benign)
        # ||mean + g p - b_i||^2 = ||mean - b_i||^2 + 2 g (mean - b_i).p + g^2 ||p||^2
        vp = _dots(torch.stack([mean, p]), torch.stack([mean, p]))
        bmp = _dots(benign, torch.stack([mean, p]))
        sq_b = torch.diagonal(_dots(benign, benign))
        cc = vp[0, 0] - 2 * bmp[:, 0] + sq_b
        cp = vp[0, 1] - bmp[:, 1]
        pp = vp[1, 1]
        if float(pp) == 0.0:
            gamma = 0.0
        else:
            gamma = self.largest_gamma(lambda g: self.feasible(cc + 2 * g * cp + g * g * pp, pair_sq))
        self.last_gamma = gamma
        return mean + gamma * p


@ATTACKS.register()
class MinMax(_MinMaxBase):
    """Min-max: the malicious update's largest distance to a benign update is at most the
    largest distance between two benign updates."""

    name = "min_max"
    verb = "sends crafted updates (min-max)"

    def feasible(self, sq_to_benign, pair_sq):
        return bool(sq_to_benign.max() <= pair_sq.max())


@ATTACKS.register()
class MinSum(_MinMaxBase):
    """Min-sum: the malicious update's sum of squared distances to the benign updates is at
    most the largest such sum of a benign update."""

    name = "min_sum"
    verb = "sends crafted updates (min-sum)"

    def feasible(self, sq_to_benign, pair_sq):
        return bool(sq_to_benign.sum() <= pair_sq.sum(dim=1).max())


class _Fang(Coalition):
    """knowledge ``full``: the benign updates of the round; ``partial`` (Fang et al.'s partial
    knowledge): only the coalition's own honest updates, which the framework passes as
    ``ctx.extra["malicious_updates"]`` (``Tensor[n_malicious, d]``)."""

    def __init__(self, **options):
        super().__init__(**options)
        if self.options["knowledge"] not in ("full", "partial"):
            raise self.option_error("knowledge", "must be 'full' or 'partial'")

    def reference(self, benign: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        if self.options["knowledge"] == "full":
            return benign
        own = (ctx.extra or {}).get("malicious_updates") if ctx is not None else None
        if own is None or len(own) == 0:
            raise FedsecError(f"attack '{self.name}': knowledge 'partial' needs the coalition's own honest "
                              "updates in ctx.extra['malicious_updates']")
        return torch.as_tensor(own).to(benign.device, benign.dtype)


@ATTACKS.register()
class FangKrum(_Fang):
    """Fang et al. 2020 against Krum: every malicious hospital sends ``-lambda * s`` with
    ``s = sign(mean of the reference updates)`` (the direction the model would move). lambda
    starts at the paper's upper bound

        1 / ((m - 2c - 1) sqrt(d)) * min_i sum_{l in G_i} ||b_l - b_i|| + max_i ||b_i|| / sqrt(d)

    (G_i: the m - c - 2 reference updates nearest to b_i; the first term is dropped when
    m - 2c - 1 <= 0) and is halved until Krum, simulated on the reference updates plus the c
    identical malicious ones with ``f = num_byzantine`` (null = c), selects a malicious
    update, or lambda falls below ``lambda_threshold`` (then that last lambda is sent).
    ``last_lambda`` / ``last_selected`` record the outcome."""

    name = "fang_krum"
    verb = "sends updates crafted against Krum"

    @_dataclass
    class Options:
        knowledge: str = option("full", "full: the benign updates; partial: the coalition's own",
                                choices=("full", "partial"))
        lambda_threshold: float = option(1e-5, "smallest lambda tried before giving up", gt=0.0)
        num_byzantine: Optional[int] = option(None, "f Krum assumes; null = the malicious hospitals", min=0)

    def __init__(self, **options):
        super().__init__(**options)
        self.threshold = _number(self, "lambda_threshold")
        nb = self.options["num_byzantine"]
        if nb is not None and (isinstance(nb, bool) or not isinstance(nb, int) or nb < 0):
            raise self.option_error("num_byzantine", "must be a non-negative integer or null")
        self.last_lambda: float | None = None
        self.last_selected: bool | None = None

    def craft(self, benign, n_malicious, ctx):
        ref = self.reference(benign, ctx)
        c, nr, d = n_malicious, ref.shape[0], ref.shape[1]
        m = nr + c
        s = torch.sign(ref.mean(dim=0))
        ref_sq = pairwise_sq_distances(ref)
        gram_s = _dots(ref, s[None])[:, 0]  # b_i . s
        ss = float(_dots(s[None], s[None]))
        sq_norm = torch.diagonal(_dots(ref, ref))

        dist = ref_sq.sqrt()
        neighbours = min(max(m - c - 2, 0), nr - 1)
        first = 0.0
        if m - 2 * c - 1 > 0 and neighbours > 0:
            near = (dist + torch.diag(torch.full((nr,), float("inf"), dtype=dist.dtype)))
            near = near.topk(neighbours, dim=1, largest=False).values.sum(dim=1)
            first = float(near.min()) / ((m - 2 * c - 1) * math.sqrt(d))
        lam = first + float(sq_norm.max().sqrt()) / math.sqrt(d)

        f = self.options["num_byzantine"]
        f = c if f is None else int(f)
        full = torch.zeros(m, m, dtype=torch.float64, device=ref.device)
        full[:nr, :nr] = ref_sq
        selected = False
        while lam > self.threshold:
            to_mal = (sq_norm + 2 * lam * gram_s + lam * lam * ss).clamp_min(0.0)  # ||b_i + lam s||^2
            full[:nr, nr:] = to_mal[:, None]
            full[nr:, :nr] = to_mal[None, :]
            if krum_index(full, f) >= nr:
                selected = True
                break
            lam /= 2
        self.last_lambda, self.last_selected = lam, selected
        return -lam * s


@ATTACKS.register()
@ATTACKS.register("fang_trimmed_mean")  # the same attack (Fang et al. 2020)
class FangMedian(_Fang):
    """Fang et al. 2020 against coordinate-wise median and trimmed mean. With ``s_j`` the sign
    of the mean reference update (the direction coordinate j would move):

    - full knowledge: where ``s_j > 0`` each malicious value is drawn uniformly below the
      benign minimum ``w_min`` (from ``[w_min / b, w_min]`` if ``w_min > 0`` else
      ``[b * w_min, w_min]``); elsewhere above the maximum ``w_max`` (from ``[w_max, b * w_max]``
      if ``w_max > 0`` else ``[w_max, w_max / b]``).
    - partial knowledge: mean mu and std sigma of the coalition's own honest updates; draws
      from ``[mu - 4 sigma, mu - 3 sigma]`` where ``s_j > 0``, else ``[mu + 3 sigma, mu + 4 sigma]``.

    Each malicious hospital draws its own values from ``ctx.generator``."""

    name = "fang_median"
    verb = "sends updates crafted against the median"

    @_dataclass
    class Options:
        knowledge: str = option("full", "full: the benign updates; partial: the coalition's own",
                                choices=("full", "partial"))
        b: float = option(2.0, "how far beyond the benign extremes to go (> 1)", gt=1.0)

    def __init__(self, **options):
        super().__init__(**options)
        self.b = _number(self, "b")
        if self.b <= 1:
            raise self.option_error("b", "must be > 1")

    def craft(self, benign, n_malicious, ctx):
        ref = self.reference(benign, ctx)
        gen = ctx.generator if ctx is not None and ctx.generator is not None else torch.Generator().manual_seed(0)
        u = torch.rand((n_malicious, ref.shape[1]), generator=gen, dtype=ref.dtype).to(ref.device)
        down = ref.mean(dim=0) > 0  # the model would move up here: push it down
        if self.options["knowledge"] == "partial":
            mu, sigma = ref.mean(dim=0), _std(ref)
            lo = torch.where(down, mu - 4 * sigma, mu + 3 * sigma)
            hi = torch.where(down, mu - 3 * sigma, mu + 4 * sigma)
        else:
            b = self.b
            w_max, w_min = ref.max(dim=0).values, ref.min(dim=0).values
            lo = torch.where(down, torch.where(w_min > 0, w_min / b, w_min * b),
                             w_max)
            hi = torch.where(down, w_min,
                             torch.where(w_max > 0, w_max * b, w_max / b))
        return lo + u * (hi - lo)

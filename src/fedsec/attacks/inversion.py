"""Gradient inversion: a curious server reconstructs a hospital's training records from its update.

Threat model (docs/privacy-attacks.md): an *honest-but-curious server*. It runs the protocol
faithfully and only looks at what the protocol hands it: the global parameters it sent, the
target hospital's update (``local - global``, flattened over the float entries of
``model.state_dict()``), the model architecture, and the local training hyper-parameters
(learning rate, epochs, batch size — the server configured them — and the number of samples,
which every Flower reply reports). It never sees the data.

Four attacks, each a pure function plus an :class:`~fedsec.attacks.base.Attack` with an
``observe`` hook:

- :func:`dlg` — Zhu et al. 2019, "Deep Leakage from Gradients": L2 gradient matching,
  L-BFGS on dummy images *and* dummy soft labels.
- :func:`idlg` — Zhao et al. 2020, "iDLG": the label of a single sample comes exactly from
  the sign of the last layer's gradient; then DLG on the image alone.
- :func:`inverting_gradients` — Geiping et al. 2020, "Inverting Gradients": cosine
  similarity + total variation, signed Adam, step schedule, restarts, [0, 1] box.
- :func:`tabular_inversion` — EHR records: exact analytic recovery from the first linear
  layer (``x = dW_i / db_i``) for one record, gradient matching for several.

FedAvg (several local SGD steps): every attack re-runs the hospital's local SGD on the dummy
data, differentiably (Geiping et al.'s "multi-step" attack), and matches the simulated
*update* to the observed one; with one step this is gradient matching. The step ``t`` uses
dummy samples ``[(t * batch_size) mod n, ...)``: the attacker assumes the hospital's batch order
(true when ``batch_size == n`` or without shuffling), as Geiping et al. do.

Secure aggregation: the server sees only the weighted mean of the participants' updates.
The observers then reconstruct every participant's records jointly (:class:`AggregateTraining`:
each participant's local SGD re-run on its own slice of the dummy batch, combined with the
aggregation weights) and score them against every participant (:func:`joint_scores`).

Evaluation protocol: the server never sees the truth. In simulation, the framework hands
the target hospital's true training batch to :meth:`observe` through
``ctx.extra["truth"]`` *for scoring only* (PSNR / SSIM / label accuracy, after Hungarian
matching); no attack reads it before its reconstruction is final.
"""

from __future__ import annotations

from dataclasses import dataclass as _dataclass
from typing import List, Literal, Optional, Union

from fedsec.registry import ATTACKS, option

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from fedsec.attacks.base import Attack, AttackContext
from fedsec.errors import FedsecError

# ---------------------------------------------------------------------------------------------
# Flat parameter vectors (the framework's update layout)
# ---------------------------------------------------------------------------------------------


def _float_state(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(k, v) for k, v in model.state_dict().items() if v.is_floating_point()]


def flat_params(model: torch.nn.Module) -> torch.Tensor:
    """``Tensor[d]`` (float32): the float entries of ``model.state_dict()`` in order, flattened
    (the layout the framework sends updates in: fedsec.core.params)."""
    from fedsec.core.params import flatten_state

    return flatten_state(model.state_dict()).cpu()


def load_flat_params(model: torch.nn.Module, vec: torch.Tensor) -> torch.nn.Module:
    """Copy ``vec`` (``Tensor[d]``, layout of :func:`flat_params`) into ``model`` in place."""
    entries = _float_state(model)
    total = sum(v.numel() for _, v in entries)
    if vec.numel() != total:
        raise ValueError(f"flat vector has {vec.numel()} values, the model's float state has {total}")
    offset = 0
    with torch.no_grad():
        for _, v in entries:
            v.copy_(vec[offset:offset + v.numel()].reshape(v.shape).to(v.device, v.dtype))
            offset += v.numel()
    return model


# ---------------------------------------------------------------------------------------------
# What the attacker knows about local training
# ---------------------------------------------------------------------------------------------


@dataclass
class LocalTraining:
    """The hospital's local SGD as the attacker re-runs it.

    lr: local learning rate. steps: number of SGD steps in the update. batch_size: samples per
    step (None = the whole dummy batch every step, i.e. full-batch gradient descent).
    """

    lr: float = 0.01
    steps: int = 1
    batch_size: int | None = None

    @staticmethod
    def from_hyperparameters(lr: float, epochs: int, batch_size: int, num_samples: int,
                             steps: int | None = None) -> "LocalTraining":
        """Steps of ``epochs`` passes over ``num_samples`` with ``batch_size`` (last batch kept),
        or ``steps`` when the scenario fixes the number of steps per round."""
        bs = max(1, min(int(batch_size), int(num_samples)))
        steps = int(steps) if steps else int(epochs) * math.ceil(int(num_samples) / bs)
        return LocalTraining(lr=float(lr), steps=max(1, steps), batch_size=bs)


@dataclass
class Participant:
    """One hospital behind a secure aggregate, as the attacker re-runs it. hospital: its id.
    local: its local SGD. count: dummy records the attacker gives it (its sample count, capped
    by ``max_images``). weight: its aggregation weight (FedAvg: its reported sample count; the
    server knows it, Flower's training metrics travel in the clear under SecAgg+)."""

    hospital: int
    local: LocalTraining
    count: int
    weight: float


@dataclass
class AggregateTraining:
    """The local training behind a secure aggregate: each participant re-runs its own local
    SGD on its own slice of the dummy batch (participants in order, ``count`` records each),
    and the simulated updates are combined with the normalised weights, as the server's
    weighted mean does. Every attack accepts it where it takes a :class:`LocalTraining`."""

    parts: list[Participant]

    def __post_init__(self):
        if not self.parts:
            raise ValueError("AggregateTraining needs at least one participant")
        total = sum(float(p.weight) for p in self.parts)
        if not total > 0:
            raise ValueError("AggregateTraining: the participants' weights must sum to more than 0")
        self.fractions = [float(p.weight) / total for p in self.parts]

    @property
    def lr(self) -> float:
        """Weighted mean local lr (the L2 objective's scale)."""
        return sum(f * p.local.lr for f, p in zip(self.fractions, self.parts))

    @property
    def steps(self) -> int:
        return max(1, round(sum(f * p.local.steps for f, p in zip(self.fractions, self.parts))))

    @property
    def lr_steps(self) -> float:
        """sum_h w_h lr_h steps_h: the aggregate update is about ``-lr_steps`` times a mean gradient."""
        return sum(f * p.local.lr * p.local.steps for f, p in zip(self.fractions, self.parts))

    @property
    def batch_size(self) -> None:
        return None

    @property
    def count(self) -> int:
        return sum(p.count for p in self.parts)


def _lr_steps(local) -> float:
    return local.lr_steps if isinstance(local, AggregateTraining) else local.lr * local.steps


@dataclass
class InversionResult:
    """x: the reconstruction ``[B, *input_shape]`` (images clamped to [0, 1]). labels: ``LongTensor[B]``
    (recovered or optimised). objective: the final matching objective of the kept restart.
    seconds: wall time. iterations: optimiser iterations run (all restarts; for L-BFGS,
    objective evaluations). history: objective per iteration of the kept restart.
    """

    x: torch.Tensor
    labels: torch.Tensor
    objective: float
    seconds: float
    iterations: int
    history: list[float] = field(default_factory=list)
    info: dict = field(default_factory=dict)


def _device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The hospital's training loss, mean over the batch: cross-entropy for ``K >= 2`` logits,
    logistic (BCE) for a single logit. target: class indices ``[B]``, or soft labels
    (probabilities ``[B, K]``; ``[B]`` for one logit)."""
    if logits.dim() == 2 and logits.shape[1] == 1:
        return F.binary_cross_entropy_with_logits(logits.reshape(-1), target.reshape(-1).to(logits.dtype))
    if target.dtype == torch.long:
        return F.cross_entropy(logits, target)
    return -(target * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


def _soft_labels(label_logits: torch.Tensor) -> torch.Tensor:
    """Dummy-label parameters -> probabilities: sigmoid for one logit, softmax otherwise."""
    if label_logits.shape[1] == 1:
        return torch.sigmoid(label_logits.reshape(-1))
    return torch.softmax(label_logits, dim=-1)


class _LocalSGD:
    """A differentiable re-run of the hospital's local SGD from the global parameters.

    ``simulate(x, y)`` returns the simulated update (``local - global``) per trainable
    parameter, with a graph back to ``x`` (and ``y`` if soft). ``target(update)`` cuts the
    observed flat update into the same pieces (buffers such as BatchNorm statistics are not
    matched).
    """

    def __init__(self, model: torch.nn.Module, global_params: torch.Tensor, local: LocalTraining,
                 device: torch.device, model_mode: str = "eval"):
        if model_mode not in ("eval", "train"):
            raise ValueError(f"model_mode must be 'eval' or 'train', got {model_mode!r}")
        m = copy.deepcopy(model).to(device)
        load_flat_params(m, global_params.to(device))
        m.train(model_mode == "train")
        for p in m.parameters():
            p.requires_grad_(False)
        self.model, self.local, self.device = m, local, device
        offsets, offset = {}, 0
        for k, v in _float_state(m):
            offsets[k] = (offset, v.numel(), v.shape)
            offset += v.numel()
        self.dim = offset
        named = dict(m.named_parameters())
        self.names = [k for k in offsets if k in named]
        self.slices = [offsets[k] for k in self.names]
        self.params0 = {k: named[k].detach().clone().requires_grad_(True) for k in self.names}
        self.buffers = {k: b for k, b in m.named_buffers()}

    def target(self, update: torch.Tensor) -> list[torch.Tensor]:
        update = update.detach().reshape(-1).to(self.device, torch.float32)
        if update.numel() != self.dim:
            raise ValueError(f"update has {update.numel()} values, the model's float state has {self.dim}")
        return [update[o:o + n].reshape(s) for o, n, s in self.slices]

    def simulate(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        if not isinstance(self.local, AggregateTraining):
            return self._simulate(x, y, self.local)
        if x.shape[0] != self.local.count:
            raise ValueError(f"the dummy batch has {x.shape[0]} records, the participants {self.local.count}")
        total, start = None, 0
        for f, part in zip(self.local.fractions, self.local.parts):
            upd = self._simulate(x[start:start + part.count], y[start:start + part.count], part.local)
            start += part.count
            total = [f * u for u in upd] if total is None else [t + f * u for t, u in zip(total, upd)]
        return total

    def _simulate(self, x: torch.Tensor, y: torch.Tensor, local: LocalTraining) -> list[torch.Tensor]:
        from torch.func import functional_call

        params = dict(self.params0)
        n = x.shape[0]
        bs = n if local.batch_size is None else max(1, min(local.batch_size, n))
        batches = math.ceil(n / bs)
        for t in range(local.steps):
            start = (t % batches) * bs
            xb, yb = x[start:start + bs], y[start:start + bs]
            out = functional_call(self.model, {**params, **self.buffers}, (xb,))
            grads = torch.autograd.grad(_loss(out, yb), [params[k] for k in self.names], create_graph=True)
            params = {k: params[k] - local.lr * g for k, g in zip(self.names, grads)}
        return [params[k] - self.params0[k] for k in self.names]

    def last_layer(self) -> tuple[str, str | None]:
        """Names of the last 2-D weight ``[K, H]`` and of its bias (None if it has none)."""
        weights = [k for k in self.names if self.params0[k].dim() == 2]
        if not weights:
            raise FedsecError("label recovery needs a final linear layer (a 2-D weight); the model has none")
        w = weights[-1]
        b = w.rsplit(".", 1)[0] + ".bias" if "." in w else "bias"
        return w, (b if b in self.params0 else None)

    def first_linear(self, num_features: int) -> tuple[str, str | None]:
        """Names of the first 2-D weight ``[H, num_features]`` and of its bias."""
        for k in self.names:
            p = self.params0[k]
            if p.dim() == 2 and p.shape[1] == num_features:
                b = k.rsplit(".", 1)[0] + ".bias" if "." in k else "bias"
                return k, (b if b in self.params0 else None)
        raise FedsecError(f"tabular inversion needs a first linear layer with {num_features} inputs")


# ---------------------------------------------------------------------------------------------
# Objectives and priors
# ---------------------------------------------------------------------------------------------


def _cosine_distance(sim: list[torch.Tensor], tgt: list[torch.Tensor]) -> torch.Tensor:
    """1 - cos(sim, tgt) over all parameters concatenated (Geiping et al., eq. 4)."""
    dot = sum((s * t).sum() for s, t in zip(sim, tgt))
    s_norm = sum(s.pow(2).sum() for s in sim)
    t_norm = sum(t.pow(2).sum() for t in tgt)
    return 1.0 - dot / (s_norm.sqrt() * t_norm.sqrt() + 1e-12)


def _l2_distance(sim: list[torch.Tensor], tgt: list[torch.Tensor], lr: float) -> torch.Tensor:
    """||g_sim - g_obs||^2 on 'effective gradients' ``-update / lr`` (for one step, exactly the
    gradients DLG matches; the 1/lr keeps the objective's scale independent of the local lr)."""
    return sum((s - t).pow(2).sum() for s, t in zip(sim, tgt)) / (lr * lr)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic TV of images ``[B, C, H, W]``: mean |dx| + mean |dy| (Geiping et al.)."""
    return (x[..., :, 1:] - x[..., :, :-1]).abs().mean() + (x[..., 1:, :] - x[..., :-1, :]).abs().mean()


def _init(shape: tuple[int, ...], how: str, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    if how == "rand":
        x = torch.rand(shape, generator=generator)
    elif how == "randn":
        x = torch.randn(shape, generator=generator)
    elif how == "gray":
        x = torch.full(shape, 0.5) + 0.01 * torch.randn(shape, generator=generator)
    else:
        raise ValueError(f"init must be 'rand', 'randn' or 'gray', got {how!r}")
    return x.to(device)


def _generator(seed: int | torch.Generator | None) -> torch.Generator:
    if isinstance(seed, torch.Generator):
        return seed
    g = torch.Generator()
    g.manual_seed(0 if seed is None else int(seed))
    return g


# ---------------------------------------------------------------------------------------------
# Label recovery
# ---------------------------------------------------------------------------------------------


def _round_counts(estimate: torch.Tensor, total: int, minimum: torch.Tensor) -> torch.Tensor:
    """Integer counts summing to ``total``, at least ``minimum``, closest to ``estimate``
    (largest remainder)."""
    est = estimate.clamp_min(0).double()
    counts = torch.maximum(est.floor().long(), minimum.long())
    while counts.sum() > total:  # too many forced ones: drop from the largest overshoot
        i = int(torch.argmax(counts.double() - est + (counts <= minimum).double() * -1e9))
        counts[i] -= 1
    remainder = est - counts.double()
    while counts.sum() < total:
        i = int(torch.argmax(remainder))
        counts[i] += 1
        remainder[i] -= 1.0
    return counts


@torch.no_grad()
def infer_labels(model: torch.nn.Module, global_params: torch.Tensor, update: torch.Tensor, num_images: int,
                 input_shape: tuple[int, ...], local: LocalTraining | None = None,
                 seed: int | torch.Generator | None = 0, device: str | torch.device | None = "cpu",
                 model_mode: str = "eval") -> torch.Tensor:
    """Labels of the batch behind ``update`` from the last layer's update, ``LongTensor[num_images]``
    (sorted: for a batch only the multiset is recoverable).

    One sample (iDLG, Zhao et al. 2020): with softmax cross-entropy the gradient of the last
    bias is ``p - onehot(y)``, negative only at the true class, and the last weight's row
    ``i`` is ``(p_i - y_i) h`` with ``h >= 0`` after ReLU / sigmoid, so its row sum is negative
    only at the true class. The bias is used when the layer has one (exact for any
    activation), else the weight's row sums (iDLG's rule). Several local steps on the same
    sample keep the sign, so this stays exact for FedAvg updates of one sample.

    A batch (an extension, after Geng et al. 2021 / Wainakh et al. 2022): the mean bias
    gradient is ``mean_i p_i - counts / B``; ``mean p`` is estimated by the model's mean
    prediction on random dummy inputs, giving ``counts ~ B (mean p - db)``, rounded so
    that every class with a negative gradient gets at least one. Without a bias, counts are
    proportional to the negative row sums. Binary one-logit models: the same on the single
    logit (``db < 0`` means label 1).
    """
    local = local or LocalTraining()
    dev = _device(device)
    sim = _LocalSGD(model, global_params, local, dev, model_mode)
    w_name, b_name = sim.last_layer()
    pieces = dict(zip(sim.names, sim.target(update)))
    # effective mean gradient per step: update = -lr * sum_t g_t
    scale = -1.0 / _lr_steps(local)
    g_w = pieces[w_name] * scale
    g_b = pieces[b_name] * scale if b_name is not None else None
    k = g_w.shape[0]
    if k == 1:  # binary logistic: y = 1 where the logit's gradient is negative
        signal = (g_b if g_b is not None else g_w.sum(dim=1)).reshape(-1)[0]
        if num_images == 1:
            return torch.tensor([int(signal < 0)], dtype=torch.long)
        from torch.func import functional_call
        xs = _init((64, *input_shape), "rand" if len(input_shape) == 3 else "randn", _generator(seed), dev)
        p = torch.sigmoid(functional_call(sim.model, {**sim.params0, **sim.buffers}, (xs,))).mean()
        ones = int(round(float(num_images * (p - signal)) if g_b is not None else float(num_images) / 2))
        ones = max(0, min(num_images, ones))
        return torch.tensor([0] * (num_images - ones) + [1] * ones, dtype=torch.long)
    signal = g_b if g_b is not None else g_w.sum(dim=1)
    if num_images == 1:
        return torch.argmin(signal).reshape(1).cpu()
    negative = (signal < 0).long()
    if g_b is not None:
        from torch.func import functional_call
        xs = _init((64, *input_shape), "rand" if len(input_shape) == 3 else "randn", _generator(seed), dev)
        p_mean = torch.softmax(functional_call(sim.model, {**sim.params0, **sim.buffers}, (xs,)), dim=-1).mean(0)
        estimate = num_images * (p_mean - g_b)
    else:
        mag = (-signal).clamp_min(0)
        estimate = num_images * mag / mag.sum().clamp_min(1e-12)
    counts = _round_counts(estimate.cpu(), num_images, negative.cpu())
    return torch.repeat_interleave(torch.arange(k), counts)


# ---------------------------------------------------------------------------------------------
# The attacks as pure functions
# ---------------------------------------------------------------------------------------------


def _check_shape(input_shape) -> tuple[int, ...]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) not in (1, 3):
        raise ValueError(f"input_shape must be (C, H, W) or (F,), got {shape}")
    return shape


def _lbfgs_match(sim: _LocalSGD, tgt: list[torch.Tensor], x: torch.Tensor, label_logits: torch.Tensor | None,
                 labels: torch.Tensor | None, iterations: int, lr: float, inner_iterations: int,
                 line_search: str | None, boxed: bool):
    """DLG's loop: L-BFGS on the L2 gradient distance; keeps the best iterate (L-BFGS without
    line search can blow up to NaN, which ends the run)."""
    params = [x] + ([label_logits] if label_logits is not None else [])
    opt = torch.optim.LBFGS(params, lr=lr, max_iter=inner_iterations, history_size=100,
                            line_search_fn=line_search)
    best = {"obj": math.inf, "x": x.detach().clone(),
            "y": None if label_logits is None else label_logits.detach().clone()}
    history: list[float] = []
    evals = [0]

    class _Diverged(Exception):
        pass

    def closure():
        opt.zero_grad()
        y = labels if label_logits is None else _soft_labels(label_logits)
        obj = _l2_distance(sim.simulate(x, y), tgt, sim.local.lr)
        value = float(obj.detach())
        evals[0] += 1
        if not math.isfinite(value):
            raise _Diverged
        if value < best["obj"]:
            best.update(obj=value, x=x.detach().clone(),
                        y=None if label_logits is None else label_logits.detach().clone())
        obj.backward()
        return obj

    for _ in range(iterations):
        try:
            obj = opt.step(closure)
        except _Diverged:
            break
        history.append(float(obj.detach()))
        if boxed:
            with torch.no_grad():
                x.clamp_(0, 1)
    return best, history, evals[0]


def dlg(model: torch.nn.Module, global_params: torch.Tensor, update: torch.Tensor, input_shape: tuple[int, ...],
        num_images: int = 1, *, local: LocalTraining | None = None, iterations: int = 300, lr: float = 1.0,
        inner_iterations: int = 20, line_search: str | None = None, init: str = "rand", boxed: bool = False,
        seed: int | torch.Generator | None = 0, device: str | torch.device | None = "cpu",
        model_mode: str = "eval") -> InversionResult:
    """Deep Leakage from Gradients (Zhu et al., NeurIPS 2019).

    Optimises dummy inputs ``[num_images, *input_shape]`` and dummy soft labels
    ``[num_images, K]`` so that the simulated update matches ``update`` in L2 (on
    effective gradients ``-update / lr``), with L-BFGS (``iterations`` outer steps of up to
    ``inner_iterations`` evaluations each; the paper: 300 x 20, lr 1, no line search).
    ``boxed`` clamps to [0, 1] after every step (not in the paper); image outputs are
    clamped for scoring either way. Labels are the argmax of the optimised soft labels.
    """
    t0 = time.perf_counter()
    shape, dev, gen = _check_shape(input_shape), _device(device), _generator(seed)
    local = local or LocalTraining()
    sim = _LocalSGD(model, global_params, local, dev, model_mode)
    tgt = sim.target(update)
    k = sim.params0[sim.last_layer()[0]].shape[0]
    x = _init((num_images, *shape), init, gen, dev).requires_grad_(True)
    label_logits = torch.randn((num_images, k), generator=gen).to(dev).requires_grad_(True)
    best, history, evals = _lbfgs_match(sim, tgt, x, label_logits, None, iterations, lr, inner_iterations,
                                        line_search, boxed and len(shape) == 3)
    xr = best["x"].clamp(0, 1) if len(shape) == 3 else best["x"]
    y = best["y"]
    labels = (y.reshape(-1) > 0).long() if k == 1 else y.argmax(dim=1)
    return InversionResult(xr.cpu(), labels.cpu(), best["obj"], time.perf_counter() - t0, evals, history,
                           {"attack": "dlg"})


def idlg(model: torch.nn.Module, global_params: torch.Tensor, update: torch.Tensor, input_shape: tuple[int, ...],
         num_images: int = 1, *, local: LocalTraining | None = None, iterations: int = 300, lr: float = 1.0,
         inner_iterations: int = 20, line_search: str | None = None, init: str = "rand", boxed: bool = False,
         seed: int | torch.Generator | None = 0, device: str | torch.device | None = "cpu",
         model_mode: str = "eval") -> InversionResult:
    """Improved DLG (Zhao et al. 2020): the label is read off the last layer's update
    (:func:`infer_labels`, exact for one sample), then DLG optimises the inputs alone with
    hard labels. ``num_images > 1`` uses the batch label-count estimate (not in the paper).
    """
    t0 = time.perf_counter()
    shape, dev, gen = _check_shape(input_shape), _device(device), _generator(seed)
    local = local or LocalTraining()
    labels = infer_labels(model, global_params, update, num_images, shape, local, gen, dev, model_mode)
    sim = _LocalSGD(model, global_params, local, dev, model_mode)
    tgt = sim.target(update)
    target = labels.to(dev)
    if sim.params0[sim.last_layer()[0]].shape[0] == 1:
        target = target.float()
    x = _init((num_images, *shape), init, gen, dev).requires_grad_(True)
    best, history, evals = _lbfgs_match(sim, tgt, x, None, target, iterations, lr, inner_iterations,
                                        line_search, boxed and len(shape) == 3)
    xr = best["x"].clamp(0, 1) if len(shape) == 3 else best["x"]
    return InversionResult(xr.cpu(), labels.cpu(), best["obj"], time.perf_counter() - t0, evals, history,
                           {"attack": "idlg"})


def inverting_gradients(model: torch.nn.Module, global_params: torch.Tensor, update: torch.Tensor,
                        input_shape: tuple[int, ...], num_images: int = 1, *, local: LocalTraining | None = None,
                        iterations: int = 2000, lr: float = 0.1, tv_weight: float = 1e-2, restarts: int = 1,
                        signed: bool = True, boxed: bool = True, schedule: bool = True, init: str = "rand",
                        labels: str | torch.Tensor = "infer", seed: int | torch.Generator | None = 0,
                        device: str | torch.device | None = "cpu", model_mode: str = "eval",
                        x_init: torch.Tensor | None = None) -> InversionResult:
    """Inverting Gradients (Geiping et al., NeurIPS 2020).

    Minimises ``1 - cos(simulated update, update) + tv_weight * TV(x)`` over dummy inputs
    with Adam (``lr``) on the *sign* of the gradient (``signed``), the learning rate cut by
    10x at 3/8, 5/8 and 7/8 of ``iterations`` (``schedule``), clamping to [0, 1] after each
    step (``boxed``, images only), ``restarts`` random starts keeping the one with the lowest
    objective (within a run, the best iterate is kept). TV applies to images only.

    labels: ``"infer"`` (:func:`infer_labels`, as in the paper's experiments), ``"optimize"``
    (joint soft labels, DLG-style), or a ``LongTensor[num_images]`` the caller knows.
    x_init: optional ``[num_images, *input_shape]`` start for the first restart.
    """
    t0 = time.perf_counter()
    shape, dev, gen = _check_shape(input_shape), _device(device), _generator(seed)
    local = local or LocalTraining()
    is_image = len(shape) == 3
    sim = _LocalSGD(model, global_params, local, dev, model_mode)
    tgt = [t.detach() for t in sim.target(update)]
    k = sim.params0[sim.last_layer()[0]].shape[0]
    optimise_labels = isinstance(labels, str) and labels == "optimize"
    if isinstance(labels, str) and labels == "infer":
        hard = infer_labels(model, global_params, update, num_images, shape, local, gen, dev, model_mode)
    elif isinstance(labels, torch.Tensor):
        hard = labels.long().reshape(-1)
    elif optimise_labels:
        hard = None
    else:
        raise ValueError(f"labels must be 'infer', 'optimize' or a LongTensor, got {labels!r}")
    target = None if hard is None else (hard.float() if k == 1 else hard).to(dev)

    best = {"obj": math.inf}
    total_iters = 0
    for restart in range(max(1, int(restarts))):
        if restart == 0 and x_init is not None:
            x = x_init.detach().clone().to(dev).reshape(num_images, *shape)
        else:
            x = _init((num_images, *shape), init, gen, dev)
        x.requires_grad_(True)
        variables = [x]
        label_logits = None
        if optimise_labels:
            label_logits = torch.randn((num_images, k), generator=gen).to(dev).requires_grad_(True)
            variables.append(label_logits)
        opt = torch.optim.Adam(variables, lr=lr)
        sched = None
        if schedule:
            milestones = [int(iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
        run_best = {"obj": math.inf}
        history = []
        for _ in range(iterations):
            y = _soft_labels(label_logits) if optimise_labels else target
            obj = _cosine_distance(sim.simulate(x, y), tgt)
            if is_image and tv_weight > 0:
                obj = obj + tv_weight * total_variation(x)
            value = float(obj.detach())
            history.append(value)
            total_iters += 1
            if not math.isfinite(value):
                break
            if value < run_best["obj"]:
                run_best = {"obj": value, "x": x.detach().clone(),
                            "y": None if label_logits is None else label_logits.detach().clone()}
            grads = torch.autograd.grad(obj, variables)
            for v, g in zip(variables, grads):
                v.grad = g.sign() if signed else g
            opt.step()
            if sched is not None:
                sched.step()
            if boxed and is_image:
                with torch.no_grad():
                    x.clamp_(0, 1)
        if "x" in run_best and run_best["obj"] < best["obj"]:
            best = dict(run_best, history=history, restart=restart)
    if "x" not in best:
        raise FedsecError("inverting_gradients: the objective was not finite from the start")
    xr = best["x"].clamp(0, 1) if is_image else best["x"]
    if optimise_labels:
        y = best["y"]
        out_labels = (y.reshape(-1) > 0).long() if k == 1 else y.argmax(dim=1)
    else:
        out_labels = hard
    return InversionResult(xr.cpu(), out_labels.cpu(), best["obj"], time.perf_counter() - t0, total_iters,
                           best["history"], {"attack": "inverting_gradients", "restart": best["restart"]})


def analytic_records(model: torch.nn.Module, global_params: torch.Tensor, update: torch.Tensor,
                     num_features: int, rel_threshold: float = 1e-3, device: str | torch.device | None = "cpu",
                     model_mode: str = "eval") -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate records read off the first linear layer: for unit ``i``, ``dW[i] / db[i]``.

    With one record ``x``, every local step changes unit ``i`` by ``-lr * delta_i * x`` (weight)
    and ``-lr * delta_i`` (bias), so the ratio is ``x`` exactly, for any number of steps
    (Phong et al. 2018; Fowl et al. 2022 build on it). With several records each unit gives a
    weighted mean of the records that reached it. Returns ``(candidates [M, F], weight [M])``
    with ``weight = |db_i|`` (units with ``|db_i| <= rel_threshold * max |db|`` dropped),
    sorted by decreasing weight.
    """
    dev = _device(device)
    sim = _LocalSGD(model, global_params, LocalTraining(), dev, model_mode)
    w_name, b_name = sim.first_linear(num_features)
    if b_name is None:
        raise FedsecError("analytic record recovery needs a bias on the first linear layer")
    pieces = dict(zip(sim.names, sim.target(update)))
    dw, db = pieces[w_name].double(), pieces[b_name].double().reshape(-1)
    keep = db.abs() > rel_threshold * db.abs().max().clamp_min(1e-300)
    cand, weight = (dw[keep] / db[keep, None]), db[keep].abs()
    order = torch.argsort(weight, descending=True)
    return cand[order].float().cpu(), weight[order].float().cpu()


def _pick_records(candidates: torch.Tensor, k: int, rtol: float = 1e-3,
                  max_abs: float = 6.0) -> tuple[torch.Tensor, int]:
    """Choose ``k`` records among unit candidates ``[M, F]`` (sorted by decreasing |db|).

    A unit reached by a single record gives that record exactly, and several such units give
    the *same* vector. Mixtures (units reached by several records) are weighted means whose
    weights can have opposite signs (records of different classes), so they can be far out:
    candidates with a feature beyond ``max_abs`` standardised units are dropped as
    implausible. The rest are grouped by near-equality (relative distance < ``rtol``);
    groups seen from two or more units come first (most units first), then the others by
    decreasing unit strength. Returns ``(records [<=k, F], repeated)``: the first
    ``repeated`` rows were seen from two or more units. (With two classes, units reached by
    the same *pair* of records also repeat — the weights' ratio does not depend on the
    unit — so a repeated candidate is likely, not certainly, a single record.)
    """
    plausible = candidates[(candidates.abs() <= max_abs).all(dim=1)]
    if plausible.shape[0] == 0:
        plausible = candidates[:k]
    groups: list[list[int]] = []
    for i in range(plausible.shape[0]):
        c = plausible[i]
        for g in groups:
            ref = plausible[g[0]]
            if (c - ref).norm() <= rtol * max(float(ref.norm()), 1e-12):
                g.append(i)
                break
        else:
            groups.append([i])
    repeated = [g[0] for g in sorted(groups, key=lambda g: (-len(g), g[0])) if len(g) >= 2]
    single = [g[0] for g in groups if len(g) < 2]
    chosen = (repeated + single)[:k]
    return plausible[chosen], min(len(repeated), k)


def tabular_inversion(model: torch.nn.Module, global_params: torch.Tensor, update: torch.Tensor,
                      num_features: int, num_records: int = 1, *, local: LocalTraining | None = None,
                      method: str = "auto", iterations: int = 500, lr: float = 0.05, restarts: int = 1,
                      objective: str = "l2", seed: int | torch.Generator | None = 0,
                      device: str | torch.device | None = "cpu", model_mode: str = "eval") -> InversionResult:
    """Reconstruct EHR records ``[num_records, num_features]`` (standardised units) from a
    logistic-regression / MLP update.

    method: ``"analytic"`` — :func:`analytic_records` (exact for one record, any number of
    local steps; for several records, candidates seen identically from several hidden units
    first, then the most spread-out others); ``"optimize"`` — gradient matching from a
    N(0, 1) start; ``"auto"`` — analytic for one record; for several, the candidates seen
    from several units are kept fixed (likely exact records), the others are optimised from
    the remaining analytic picks, then each record is *snapped* to its nearest analytic
    candidate when that lowers the objective (a unit reached by one record only gives that
    record exactly, so snapping turns a close estimate into an exact one).

    Optimisation: Adam (``lr``, ``iterations``, ``restarts``) on ``objective`` (``"l2"`` or
    ``"cosine"``) between simulated and observed update, with soft labels optimised jointly
    (for a batch the record-label pairing is unknown). The returned labels are
    :func:`infer_labels`' estimate (a multiset for a batch).
    """
    t0 = time.perf_counter()
    dev, gen = _device(device), _generator(seed)
    local = local or LocalTraining()
    shape = (int(num_features),)
    if method not in ("auto", "analytic", "optimize"):
        raise ValueError(f"method must be 'auto', 'analytic' or 'optimize', got {method!r}")
    if objective not in ("l2", "cosine"):
        raise ValueError(f"objective must be 'l2' or 'cosine', got {objective!r}")
    labels = infer_labels(model, global_params, update, num_records, shape, local, gen, dev, model_mode)
    cand, start, repeated = torch.empty(0, num_features), None, 0
    if method in ("auto", "analytic"):
        try:
            cand, _ = analytic_records(model, global_params, update, num_features, device=dev, model_mode=model_mode)
        except FedsecError:
            if method == "analytic":
                raise
        if cand.shape[0] > 0:
            start, repeated = _pick_records(cand, num_records)
            if start.shape[0] < num_records:  # fewer live units than records: pad with noise
                pad = torch.randn((num_records - start.shape[0], num_features), generator=gen)
                start = torch.cat([start, pad])
        if method == "analytic" or (num_records == 1 and start is not None):
            if start is None:
                raise FedsecError("analytic record recovery: no unit of the first layer changed")
            return InversionResult(start, labels, 0.0, time.perf_counter() - t0, 0, [],
                                   {"attack": "tabular_inversion", "method": "analytic"})
    sim = _LocalSGD(model, global_params, local, dev, model_mode)
    tgt = [t.detach() for t in sim.target(update)]
    k = sim.params0[sim.last_layer()[0]].shape[0]

    def objective_of(x, label_logits):
        sim_upd = sim.simulate(x, _soft_labels(label_logits))
        return _cosine_distance(sim_upd, tgt) if objective == "cosine" else _l2_distance(sim_upd, tgt, local.lr)

    best = {"obj": math.inf}
    total = 0
    for restart in range(max(1, int(restarts))):
        if restart == 0 and start is not None:
            fixed, free = start[:repeated].to(dev), start[repeated:].clone().to(dev)
        else:
            fixed = torch.empty((0, *shape), device=dev)
            free = torch.randn((num_records, *shape), generator=gen).to(dev)
        free.requires_grad_(True)
        label_logits = torch.zeros((num_records, k), device=dev).requires_grad_(True)
        opt = torch.optim.Adam([free, label_logits], lr=lr)
        history = []
        for _ in range(iterations):
            x = torch.cat([fixed, free])
            obj = objective_of(x, label_logits)
            value = float(obj.detach())
            history.append(value)
            total += 1
            if not math.isfinite(value):
                break
            if value < best["obj"]:
                best = {"obj": value, "x": x.detach().clone(), "y": label_logits.detach().clone(), "history": history}
            free.grad, label_logits.grad = torch.autograd.grad(obj, [free, label_logits])
            opt.step()
    if "x" not in best:
        raise FedsecError("tabular_inversion: the objective was not finite from the start")
    snapped = 0
    if method == "auto" and cand.shape[0] > 0:
        x, y = best["x"], best["y"]
        cand = cand.to(x.device, x.dtype)
        for r in range(num_records):
            trial = x.clone()
            trial[r] = cand[int(torch.cdist(x[r:r + 1], cand).argmin())]
            value = float(objective_of(trial, y).detach())
            if value < best["obj"]:
                x, best["obj"], snapped = trial, value, snapped + 1
        best["x"] = x
    return InversionResult(best["x"].cpu(), labels, best["obj"], time.perf_counter() - t0, total,
                           best.get("history", []), {"attack": "tabular_inversion", "method": "optimize",
                                                     "snapped": snapped, "repeated": repeated})


# ---------------------------------------------------------------------------------------------
# The attacks as observers (design §3: observe hook, server side, read-only)
# ---------------------------------------------------------------------------------------------


def _as_list(value) -> list[int] | None:
    if value is None or value == "all":
        return None
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


def _per_hospital(value, hospital: int):
    """ctx.extra entries are either one value or a dict hospital -> value."""
    if isinstance(value, dict):
        return value.get(hospital, value.get(str(hospital)))
    return value


def resolve_model(ctx: AttackContext) -> torch.nn.Module:
    """The architecture the server trains: ``ctx.extra["model"]`` (a module, copied),
    ``ctx.extra["model_fn"]()`` or the task's factory (``build_model`` / ``make_model`` /
    ``model_fn`` / ``create_model``)."""
    extra = ctx.extra or {}
    if isinstance(extra.get("model"), torch.nn.Module):
        return copy.deepcopy(extra["model"])
    if callable(extra.get("model_fn")):
        return extra["model_fn"]()
    for attr in ("build_model", "make_model", "model_fn", "create_model"):
        fn = getattr(ctx.task, attr, None)
        if callable(fn):
            return fn()
    raise FedsecError("a server-side attack needs the model: pass ctx.extra['model_fn'] or a task with build_model()")


def _resolve_input_shape(ctx: AttackContext, truth) -> tuple[int, ...]:
    extra = ctx.extra or {}
    for source in (extra.get("input_shape"), getattr(ctx.task, "input_shape", None),
                   getattr(getattr(ctx.task, "data", None), "input_shape", None)):
        if source is not None:
            return tuple(int(s) for s in source)
    if truth is not None:
        return tuple(int(s) for s in truth.x.shape[1:])
    raise FedsecError("inversion needs the input shape: ctx.extra['input_shape'] or task.input_shape")


class GradientInversionAttack(Attack):
    """Common part of the gradient-inversion observers.

    Options (every subclass's YAML): target_hospital (id or list; all hospitals when
    ``"all"``), target_round (1-based round or list), max_images (cap on the reconstructed
    batch), local_lr / local_epochs / local_batch_size / num_samples (override what the
    framework passes; None = use ``ctx.extra``), device, seed, save_grid,
    on_secure_aggregation (``"joint"``: reconstruct every participant's records at once from
    the aggregate — each participant's local SGD re-run on its own dummy records, combined
    with the aggregation weights — and score against every participant; ``"skip"``: record
    ``blocked_by_secure_aggregation``), model_mode (``"eval"`` / ``"train"``).

    ``ctx.extra`` read by :meth:`observe`: ``local`` = {"lr", "epochs", "batch_size"}
    (the scenario's local training), ``num_samples`` = {hospital: n} (from the replies),
    ``model_fn`` / ``model``, ``input_shape``; for scoring only: ``truth`` (a Split or
    {hospital: Split}, the hospital's true batch) and ``out_dir`` (grids are written there).
    Under SecAgg also ``weights`` = {hospital: aggregation weight} (the reported sample counts;
    default ``num_samples``) and ``ctx.participants`` (default: every hospital in ``truth`` /
    ``num_samples``).
    """

    goal = "confidentiality"
    kind = "inversion"
    server_only = True
    success_metric = "psnr"
    success_wording = "PSNR (dB) of the reconstruction against the hospital's true batch"
    state_attributes = ("artifacts",)  # the figures written in earlier rounds

    @_dataclass
    class Options:
        target_hospital: Union[int, List[int], Literal["all"], None] = option(
            0, "hospital id(s) whose update is inverted; all = every participant")
        target_round: Union[int, List[int], Literal["all"], None] = option(1, "round(s) the attack runs in")
        max_images: int = option(8, "cap on the reconstructed batch", min=1)
        local_lr: Optional[float] = option(None, "the hospital's local lr the attacker assumes; null = the scenario's", gt=0.0)
        local_epochs: Optional[int] = option(None, "local epochs assumed; null = the scenario's", min=1)
        local_batch_size: Optional[int] = option(None, "local batch size assumed; null = the scenario's", min=1)
        num_samples: Optional[int] = option(None, "samples behind the update; null = from the reply", min=1)
        device: str = option("cpu", "torch device of the optimisation")
        seed: int = option(0, "seed of the dummy data", min=0)
        save_grid: bool = option(True, "write reconstruction grids to figures/")
        on_secure_aggregation: str = option(
            "joint", "under SecAgg: reconstruct every participant's records jointly from the aggregate "
            "(scored against all of them), or skip", choices=("joint", "skip"))
        model_mode: str = option("eval", "model mode during inversion", choices=("eval", "train"))

    def __init__(self, target_hospital=0, target_round=1, max_images: int = 8, local_lr: float | None = None,
                 local_epochs: int | None = None, local_batch_size: int | None = None,
                 num_samples: int | None = None, device: str = "cpu", seed: int = 0, save_grid: bool = True,
                 on_secure_aggregation: str = "joint", model_mode: str = "eval"):
        if on_secure_aggregation not in ("joint", "skip"):
            raise ValueError(f"on_secure_aggregation must be 'joint' or 'skip', got {on_secure_aggregation!r}")
        self.target_hospital, self.target_round = target_hospital, target_round
        self.max_images, self.local_lr, self.local_epochs = int(max_images), local_lr, local_epochs
        self.local_batch_size, self.num_samples = local_batch_size, num_samples
        self.device, self.seed, self.save_grid = device, seed, save_grid
        self.on_secure_aggregation, self.model_mode = on_secure_aggregation, model_mode
        self.artifacts: list[Path] = []

    def check(self, num_hospitals, malicious, key=""):
        self.check_hospital_ids("target_hospital", self.target_hospital, num_hospitals)

    # the method itself --------------------------------------------------------------------
    def reconstruct(self, model, global_params, update, input_shape, num_images, local, seed) -> InversionResult:
        raise NotImplementedError

    # helpers ------------------------------------------------------------------------------
    def local_training(self, ctx: AttackContext, hospital: int) -> tuple[LocalTraining, int, int]:
        """(LocalTraining the attacker re-runs, num_images reconstructed, num_samples reported)."""
        extra = ctx.extra or {}
        local = extra.get("local") or {}
        if hospital in local or str(hospital) in local:  # per-hospital settings
            local = _per_hospital(local, hospital) or {}
        lr = self.local_lr if self.local_lr is not None else local.get("lr")
        epochs = self.local_epochs if self.local_epochs is not None else local.get("epochs", 1)
        bs = self.local_batch_size if self.local_batch_size is not None else local.get("batch_size")
        n = self.num_samples if self.num_samples is not None else _per_hospital(extra.get("num_samples"), hospital)
        if lr is None:
            raise FedsecError(f"{self.name}: the local learning rate is unknown (ctx.extra['local']['lr'] or local_lr)")
        if n is None:
            truth = _per_hospital(extra.get("truth"), hospital)
            n = bs if bs is not None else (len(truth) if truth is not None else 1)
        n = int(n)
        bs = n if bs is None else int(bs)
        num_images = min(n, self.max_images)
        # Beyond max_images the re-run uses a smaller dummy set: an approximation (documented).
        local_sgd = LocalTraining.from_hyperparameters(lr, epochs, bs, n, steps=local.get("steps"))
        local_sgd.batch_size = min(local_sgd.batch_size, num_images)
        return local_sgd, num_images, n

    def score(self, result: InversionResult, truth, input_shape, population=None) -> dict:
        """Scores against the truth batch (after Hungarian matching; when the truth batch is
        larger than the reconstruction, against the matched truth samples only).
        ``population``: ``[C, H, W]`` mean image of records other than the target's (the null:
        a reconstruction that knows only the population); then ``stats`` gives PSNR / SSIM
        against that null with paired bootstrap CIs over the images."""
        from fedsec.attacks import leakage

        metrics = {}
        true_labels = truth.y
        if len(input_shape) == 3:
            ri, ti = leakage.match_reconstructions(result.x, truth.x)
            rec, ref = result.x[ri], truth.x[ti].to(result.x.dtype)
            metrics["psnr"] = leakage.psnr(rec, ref)
            metrics["ssim"] = leakage.ssim(rec, ref)
            if population is not None:
                from fedsec.attacks.nulls import mean_stat

                mean = population.to(ref.dtype).expand_as(ref)
                p_rec = leakage.psnr(rec, ref, reduction="none").clamp(max=100.0).numpy()
                p_null = leakage.psnr(mean, ref, reduction="none").clamp(max=100.0).numpy()
                s_rec = leakage.ssim(rec, ref, reduction="none").numpy()
                s_null = leakage.ssim(mean, ref, reduction="none").numpy()
                metrics["psnr_null"], metrics["ssim_null"] = float(p_null.mean()), float(s_null.mean())
                metrics["stats"] = {"psnr": mean_stat(p_rec, p_null, "population_mean"),
                                    "ssim": mean_stat(s_rec, s_null, "population_mean")}
            if len(truth) > len(result.x):
                true_labels = truth.y[ti]
        if true_labels.dtype == torch.long:
            metrics["label_acc"] = leakage.label_recovery_accuracy(result.labels, true_labels)
        return metrics

    def score_joint(self, result: InversionResult, truths: dict, input_shape, all_truth=None) -> dict:
        """Scores of a joint reconstruction from a secure aggregate against **every**
        participant: the participants' true records are pooled, reconstructions are paired
        with them by the optimal assignment (Hungarian, on PSNR), and PSNR / SSIM are the mean
        over the matched records (``images_scored`` of ``images_total``; all of them when no
        participant has more records than ``max_images``), with the mean per participant in
        ``psnr_by_hospital``. Nulls, scored the same way: ``psnr_null`` / ``ssim_null`` — each
        record against the population-mean image (the mean of every *other* hospital's
        records, :func:`population_mean`), with paired bootstrap CIs in ``stats``; and
        ``psnr_participants_mean`` / ``ssim_participants_mean`` — every reconstruction
        replaced by the plain average of the participants' records (what one blurred image of
        the aggregate would give at best)."""
        from fedsec.attacks import leakage

        hospitals = [h for h in truths if truths[h] is not None and len(truths[h])]
        if not hospitals:
            return {}
        xs = torch.cat([truths[h].x for h in hospitals])
        ys = torch.cat([truths[h].y for h in hospitals])
        owner = torch.cat([torch.full((len(truths[h]),), int(h), dtype=torch.long) for h in hospitals])
        metrics = {"participants": len(hospitals), "images_total": int(len(xs))}
        if len(input_shape) != 3:
            source = all_truth if all_truth is not None else truths
            rows = [population_mean(source, h, input_shape) for h in owner.tolist()]
            null = torch.stack(rows) if rows and all(r is not None for r in rows) else None
            metrics.update(self.score(result, _Pooled(xs, ys), input_shape, null))
            return metrics
        xs = xs.reshape(len(xs), *input_shape).to(result.x.dtype)
        pooled = joint_scores(result.x, xs, owner)
        metrics.update({k: v for k, v in pooled.items() if k != "matched"})
        ti = pooled["matched"]
        ref, who = xs[ti], owner[ti]
        source = all_truth if all_truth is not None else truths
        per_hospital = {h: population_mean(source, h, input_shape) for h in set(who.tolist())}
        nulls = [per_hospital[h] for h in who.tolist()]
        if all(n is not None for n in nulls):
            from fedsec.attacks.nulls import mean_stat

            null = torch.stack(nulls).to(ref.dtype)
            p_null = leakage.psnr(null, ref, reduction="none").clamp(max=100.0).numpy()
            s_null = leakage.ssim(null, ref, reduction="none").numpy()
            metrics["psnr_null"], metrics["ssim_null"] = float(p_null.mean()), float(s_null.mean())
            metrics["stats"] = {"psnr": mean_stat(pooled["psnr_per_image"], p_null, "population_mean"),
                                "ssim": mean_stat(pooled["ssim_per_image"], s_null, "population_mean")}
        blend = xs.double().mean(0, keepdim=True).to(xs.dtype).expand(len(result.x), *input_shape)
        blended = joint_scores(blend, xs, owner)
        metrics["psnr_participants_mean"] = blended["psnr"]
        metrics["ssim_participants_mean"] = blended["ssim"]
        if ys.dtype == torch.long:
            metrics["label_acc"] = leakage.label_recovery_accuracy(result.labels, ys[ti] if len(ti) < len(ys) else ys)
        metrics.pop("psnr_per_image", None)
        metrics.pop("ssim_per_image", None)
        return metrics

    def joint_training(self, ctx: AttackContext, participants: list[int]) -> AggregateTraining:
        """The participants' local training as the server knows it, for a joint reconstruction."""
        extra = ctx.extra or {}
        parts = []
        for h in participants:
            local, count, n = self.local_training(ctx, h)
            w = _per_hospital(extra.get("weights"), h) if isinstance(extra.get("weights"), dict) else None
            parts.append(Participant(int(h), local, count, float(n if w is None else w)))
        return AggregateTraining(parts)

    def observe(self, server_round: int, updates: dict[int, torch.Tensor] | None, aggregate: torch.Tensor,
                global_params: torch.Tensor, ctx: AttackContext) -> dict:
        rounds = _as_list(self.target_round)
        if rounds is not None and server_round not in rounds:
            return {}
        if updates is None:
            if self.on_secure_aggregation == "skip":
                return {"blocked_by_secure_aggregation": 1.0}
            return self.observe_aggregate(server_round, aggregate, global_params, ctx)
        extra = ctx.extra or {}
        wanted = _as_list(self.target_hospital)
        targets = [h for h in (wanted if wanted is not None else sorted(updates)) if h in updates]
        out: dict = {}
        for hospital in targets:
            update = updates[hospital]
            truth = _per_hospital(extra.get("truth"), hospital)
            model = resolve_model(ctx)
            shape = _resolve_input_shape(ctx, truth)
            local, num_images, n = self.local_training(ctx, hospital)
            seed = ctx.generator if ctx.generator is not None else self.seed
            result = self.reconstruct(model, global_params, update, shape, num_images, local, seed)
            metrics = {"seconds": result.seconds, "objective": result.objective, "num_images": num_images,
                       "num_samples": n, "local_steps": local.steps, "on_aggregate": 0.0}
            if truth is not None:
                metrics.update(self.score(result, truth, shape, population_mean(extra.get("truth"), hospital, shape)))
                self._save_grid(result, truth.x, shape, extra, f"round{server_round}_hospital{hospital}")
            prefix = "" if len(targets) == 1 else f"h{hospital}/"
            out.update({prefix + k: v for k, v in metrics.items()})
        return out

    def participants(self, ctx: AttackContext) -> list[int]:
        """Who is behind the aggregate: ``ctx.participants``, else every hospital the
        framework reports a sample count (or, failing that, a truth batch) for."""
        if ctx.participants:
            return [int(h) for h in ctx.participants]
        extra = ctx.extra or {}
        for source in (extra.get("weights"), extra.get("num_samples"), extra.get("truth")):
            if isinstance(source, dict) and source:
                return sorted(int(h) for h in source)
        raise FedsecError(f"{self.name}: under secure aggregation the attack needs the participants "
                          "(ctx.participants or ctx.extra['num_samples'] as {hospital: n})")

    def observe_aggregate(self, server_round: int, aggregate: torch.Tensor, global_params: torch.Tensor,
                          ctx: AttackContext) -> dict:
        """Secure aggregation: the honest attack. One dummy batch holds every participant's
        records (``count`` each); each participant's local SGD is re-run on its own slice and
        the simulated updates are combined with the aggregation weights, to match the observed
        aggregate. Scored against every participant (:meth:`score_joint`)."""
        extra = ctx.extra or {}
        hospitals = self.participants(ctx)
        truth_all = extra.get("truth")
        truths = {h: _per_hospital(truth_all, h) for h in hospitals}
        first = next((t for t in truths.values() if t is not None), None)
        model = resolve_model(ctx)
        shape = _resolve_input_shape(ctx, first)
        local = self.joint_training(ctx, hospitals)
        seed = ctx.generator if ctx.generator is not None else self.seed
        result = self.reconstruct(model, global_params, aggregate, shape, local.count, local, seed)
        metrics = {"seconds": result.seconds, "objective": result.objective, "num_images": local.count,
                   "num_samples": int(sum(p.weight for p in local.parts)), "local_steps": local.steps,
                   "on_aggregate": 1.0}
        if all(t is not None for t in truths.values()):
            metrics.update(self.score_joint(result, truths, shape, truth_all if isinstance(truth_all, dict) else None))
            if len(shape) == 3:
                pooled = torch.cat([truths[h].x for h in hospitals])
                self._save_grid(result, pooled, shape, extra, f"round{server_round}_aggregate")
        return metrics

    def _save_grid(self, result: InversionResult, truth_x: torch.Tensor, shape, extra: dict, where: str) -> None:
        out_dir = extra.get("out_dir")
        if not (self.save_grid and out_dir is not None and len(shape) == 3):
            return
        from fedsec.attacks import leakage

        ri, ti = leakage.match_reconstructions(result.x, truth_x)
        path = Path(out_dir) / f"inversion_{self.name}_{where}.png"
        titles = [f"{v:.1f} dB" for v in leakage.psnr(result.x[ri], truth_x[ti], reduction="none")]
        self.artifacts.append(leakage.save_grid(truth_x[ti], result.x[ri], path, titles))


class _Pooled:
    """The participants' records pooled (``x``, ``y``) for the tabular scorer."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)


def joint_scores(recon: torch.Tensor, truth: torch.Tensor, owner: torch.Tensor) -> dict:
    """Reconstructions ``[R, C, H, W]`` against the pooled true records ``[T, C, H, W]`` of
    several participants (``owner[T]``: each record's hospital), paired by the optimal
    assignment on PSNR (scipy's ``linear_sum_assignment``). -> ``psnr`` / ``ssim`` (mean over
    the ``images_scored = min(R, T)`` matched records), ``psnr_by_hospital`` (mean per
    participant, over its matched records), ``hospitals_scored``, the per-image values and
    ``matched`` (the matched truth indices, ascending)."""
    from fedsec.attacks import leakage

    ri, ti = leakage.match_reconstructions(recon, truth)
    rec, ref = recon[ri], truth[ti].to(recon.dtype)
    p = leakage.psnr(rec, ref, reduction="none").clamp(max=100.0)
    q = leakage.ssim(rec, ref, reduction="none")
    who = owner[ti]
    by = {int(h): float(p[who == h].mean()) for h in torch.unique(who).tolist()}
    return {"psnr": float(p.mean()), "ssim": float(q.mean()), "images_scored": int(len(ti)),
            "psnr_by_hospital": by, "hospitals_scored": len(by), "psnr_per_image": p.numpy(),
            "ssim_per_image": q.numpy(), "matched": ti}


def population_mean(truth, hospital, shape) -> torch.Tensor | None:
    """The inversion null: the mean image (or tabular record) of every other hospital's records
    (what a server that knows only the population would "reconstruct"); None for a lone
    hospital."""
    if not isinstance(truth, dict) or len(shape) not in (1, 3):
        return None
    others = [s.x for h, s in truth.items() if h != hospital and len(s)]
    if not others:
        return None
    return torch.cat([x.reshape(len(x), *shape).double() for x in others]).mean(0).float()


@ATTACKS.register()
class DLGAttack(GradientInversionAttack):
    """:func:`dlg` as an observer. Options: the common ones + iterations, lr, inner_iterations,
    line_search, init, boxed."""

    name = "dlg"
    modality = "image"

    @_dataclass
    class Options(GradientInversionAttack.Options):
        iterations: int = option(300, "L-BFGS iterations", min=1)
        lr: float = option(1.0, "optimiser learning rate", gt=0.0)
        inner_iterations: int = option(20, "L-BFGS inner iterations", min=1)
        line_search: Optional[str] = option(None, "L-BFGS line search (null or strong_wolfe)")
        init: str = option("rand", "dummy-data initialisation")
        boxed: bool = option(False, "clamp the dummy data to the valid range")

    def __init__(self, iterations: int = 300, lr: float = 1.0, inner_iterations: int = 20,
                 line_search: str | None = None, init: str = "rand", boxed: bool = False, **common):
        super().__init__(**common)
        self.method_options = dict(iterations=iterations, lr=lr, inner_iterations=inner_iterations,
                                   line_search=line_search, init=init, boxed=boxed)

    def reconstruct(self, model, global_params, update, input_shape, num_images, local, seed):
        return dlg(model, global_params, update, input_shape, num_images, local=local, seed=seed,
                   device=self.device, model_mode=self.model_mode, **self.method_options)


@ATTACKS.register()
class IDLGAttack(DLGAttack):
    """:func:`idlg` as an observer (options as DLG)."""

    name = "idlg"
    modality = "image"

    @_dataclass
    class Options(DLGAttack.Options):
        max_images: int = option(1, "cap on the reconstructed batch (iDLG recovers one label)", min=1)

    def __init__(self, max_images: int = 1, **options):
        super().__init__(max_images=max_images, **options)

    def reconstruct(self, model, global_params, update, input_shape, num_images, local, seed):
        return idlg(model, global_params, update, input_shape, num_images, local=local, seed=seed,
                    device=self.device, model_mode=self.model_mode, **self.method_options)


@ATTACKS.register()
class InvertingGradientsAttack(GradientInversionAttack):
    """:func:`inverting_gradients` as an observer. Options: the common ones + iterations, lr,
    tv_weight, restarts, signed, boxed, schedule, init, labels (``"infer"`` / ``"optimize"``)."""

    name = "inverting_gradients"
    modality = "image"

    @_dataclass
    class Options(GradientInversionAttack.Options):
        iterations: int = option(2000, "Adam iterations", min=1)
        lr: float = option(0.1, "Adam learning rate", gt=0.0)
        tv_weight: float = option(1e-2, "total-variation prior weight", min=0.0)
        restarts: int = option(1, "independent restarts, best kept", min=1)
        signed: bool = option(True, "signed gradients (Geiping et al.)")
        boxed: bool = option(True, "clamp the dummy data to the valid range")
        schedule: bool = option(True, "step learning-rate schedule")
        init: str = option("rand", "dummy-data initialisation")
        labels: str = option("infer", "infer labels from the update, or optimise them", choices=("infer", "optimize"))

    def __init__(self, iterations: int = 2000, lr: float = 0.1, tv_weight: float = 1e-2, restarts: int = 1,
                 signed: bool = True, boxed: bool = True, schedule: bool = True, init: str = "rand",
                 labels: str = "infer", **common):
        super().__init__(**common)
        self.method_options = dict(iterations=iterations, lr=lr, tv_weight=tv_weight, restarts=restarts,
                                   signed=signed, boxed=boxed, schedule=schedule, init=init, labels=labels)

    def reconstruct(self, model, global_params, update, input_shape, num_images, local, seed):
        return inverting_gradients(model, global_params, update, input_shape, num_images, local=local, seed=seed,
                                   device=self.device, model_mode=self.model_mode, **self.method_options)


@ATTACKS.register()
class TabularInversionAttack(GradientInversionAttack):
    """:func:`tabular_inversion` as an observer. Options: the common ones + method, iterations,
    lr, restarts, objective, tol (standardised units for ``records_recovered``)."""

    name = "tabular_inversion"
    modality = "tabular"
    success_metric = "records_recovered"
    success_wording = "records whose features are recovered within tol (standardised units)"

    @_dataclass
    class Options(GradientInversionAttack.Options):
        save_grid: bool = option(False, "(images only)")
        method: str = option("auto", "closed form when possible, else optimisation")
        iterations: int = option(500, "optimisation iterations", min=1)
        lr: float = option(0.05, "optimiser learning rate", gt=0.0)
        restarts: int = option(1, "independent restarts, best kept", min=1)
        objective: str = option("cosine", "gradient-matching objective")
        tol: float = option(0.1, "a feature is recovered within this error", gt=0.0)

    def __init__(self, method: str = "auto", iterations: int = 500, lr: float = 0.05, restarts: int = 1,
                 objective: str = "cosine", tol: float = 0.1, **common):
        common.setdefault("save_grid", False)
        super().__init__(**common)
        self.tol = float(tol)
        self.method_options = dict(method=method, iterations=iterations, lr=lr, restarts=restarts,
                                   objective=objective)

    def reconstruct(self, model, global_params, update, input_shape, num_images, local, seed):
        return tabular_inversion(model, global_params, update, int(input_shape[0]), num_images, local=local,
                                 seed=seed, device=self.device, model_mode=self.model_mode, **self.method_options)

    def score(self, result, truth, input_shape, population=None) -> dict:
        """Errors in standardised units after matching. ``population``: ``[F]`` mean record of
        the other hospitals, or ``[T, F]`` one per truth record (a joint attack's pooled truth,
        each record's own hospital left out) — the null: a server that knows only the
        population "reconstructs" it; then ``mean_abs_error_null``, ``records_recovered_null``
        and ``stats`` with paired bootstrap CIs over the records: ``mean_abs_error`` (lower = more leakage) and
        ``records_recovered`` as the *share* of records recovered within ``tol``."""
        from fedsec.attacks import leakage

        errs = leakage.tabular_errors(result.x, truth.x, tol=self.tol)
        metrics = {"mean_abs_error": errs["mean_abs_error"], "records_recovered": errs["records_recovered"],
                   "records_total": errs["records_total"],
                   "feature_abs_error": [float(v) for v in errs["feature_abs_error"]]}
        if population is not None and len(truth):
            from fedsec.attacks.nulls import mean_stat

            ri, ti = leakage.match_reconstructions(result.x, truth.x, metric="mse")
            ref = truth.x.detach().double().cpu()[ti]
            err = (result.x.detach().double().cpu()[ri] - ref).abs()
            pop = population.detach().double().cpu()
            pop = pop[ti] if pop.dim() == 2 else pop.reshape(1, -1).expand_as(ref)
            null = (pop - ref).abs()
            hit, null_hit = (err.max(1).values <= self.tol).double(), (null.max(1).values <= self.tol).double()
            metrics["mean_abs_error_null"] = float(null.mean())
            metrics["records_recovered_null"] = int(null_hit.sum())
            metrics["stats"] = {"mean_abs_error": mean_stat(err.mean(1).numpy(), null.mean(1).numpy(),
                                                            "population_mean"),
                                "records_recovered": mean_stat(hit.numpy(), null_hit.numpy(), "population_mean")}
        if truth.y.dtype == torch.long:
            metrics["label_acc"] = leakage.label_recovery_accuracy(result.labels, truth.y)
        return metrics


INVERSION_ATTACKS = {
    "dlg": DLGAttack,
    "idlg": IDLGAttack,
    "inverting_gradients": InvertingGradientsAttack,
    "tabular_inversion": TabularInversionAttack,
}

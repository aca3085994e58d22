"""Membership inference on the global model: was this patient's record in a hospital's training set?

Threat model (docs/privacy-attacks.md): a curious server (or anyone holding the released
global model) with white-box access to the model, querying per-record losses. The attack is
scored per hospital as the AUROC of *members* (the hospital's training records) against
*non-members* (its held-out test records): 0.5 is chance, 1.0 is full leakage.

- :class:`LossThresholdMIA` — Yeom et al. 2018 ("Privacy Risk in Machine Learning"): a
  member has a lower loss. Scores: ``loss`` (``-loss``), ``confidence`` (probability of the
  true class, Salem et al. 2019), ``entropy`` (``-`` prediction entropy; label-free).
- :class:`CalibratedLossMIA` — difficulty calibration (Watson et al. 2022, "On the
  Importance of Difficulty Calibration in Membership Inference Attacks"): score =
  ``loss_reference(x) - loss_target(x)``, where the reference model (same architecture,
  trained from scratch) never saw ``x``. Records that are hard for every model stop looking
  like non-members.

Evaluation protocol: the framework passes ``ctx.extra["members"]`` and
``ctx.extra["non_members"]``, dicts hospital -> :class:`~fedsec.data.base.Split`, to
:meth:`evaluate`. They are the ground truth the score is measured against; the loss-threshold
attack only queries the model on them. The calibrated attack also needs reference data
from the same population: ``ctx.extra["reference"]`` (a Split the server owns, e.g. its root
set) or, in simulation, half of each hospital's non-members (a stand-in for public data of
the same population) — that half is then left out of the evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass as _dataclass
from typing import List, Literal, Optional, Union

from fedsec.registry import ATTACKS, option

import copy

import numpy as np
import torch
import torch.nn.functional as F

from fedsec.attacks.base import Attack, AttackContext
from fedsec.data.base import Split


def auroc(scores_pos: torch.Tensor, scores_neg: torch.Tensor) -> float:
    """Area under the ROC curve of ``scores_pos`` (members, label 1) vs ``scores_neg``:
    the Mann-Whitney U statistic with ties counted half. NaN if either side is empty."""
    from scipy.stats import rankdata

    pos = np.asarray(scores_pos, dtype=np.float64).reshape(-1)
    neg = np.asarray(scores_neg, dtype=np.float64).reshape(-1)
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    ranks = rankdata(np.concatenate([pos, neg]))
    u = ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2.0
    return float(u / (pos.size * neg.size))


def advantage(scores_pos: torch.Tensor, scores_neg: torch.Tensor) -> float:
    """Membership advantage (Yeom et al.): max over thresholds of TPR - FPR."""
    pos = np.sort(np.asarray(scores_pos, dtype=np.float64).reshape(-1))
    neg = np.sort(np.asarray(scores_neg, dtype=np.float64).reshape(-1))
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    thresholds = np.concatenate([pos, neg])
    tpr = 1.0 - np.searchsorted(pos, thresholds, side="left") / pos.size  # score >= t
    fpr = 1.0 - np.searchsorted(neg, thresholds, side="left") / neg.size
    return float(max(0.0, np.max(tpr - fpr)))


def _batched_logits(model: torch.nn.Module, data: Split, batch_size: int, device):
    """Yield (logits, y) over ``data`` in eval mode; the model's train/eval mode is restored."""
    was_training = model.training
    model = model.to(device).eval()
    try:
        for i in range(0, len(data), batch_size):
            x, y = data.x[i:i + batch_size].to(device), data.y[i:i + batch_size].to(device)
            yield model(x), y
    finally:
        model.train(was_training)


@torch.no_grad()
def per_record_loss(model: torch.nn.Module, data: Split, batch_size: int = 256,
                    device: str | torch.device = "cpu") -> torch.Tensor:
    """``Tensor[N]``: the model's loss on each record (cross-entropy; BCE summed over labels
    for multi-label ``y [N, K]``; BCE for a single-logit binary model), in eval mode."""
    out = []
    for logits, y in _batched_logits(model, data, batch_size, device):
        if y.dtype != torch.long:
            out.append(F.binary_cross_entropy_with_logits(logits, y.float(), reduction="none").sum(dim=1))
        elif logits.dim() == 2 and logits.shape[1] == 1:
            out.append(F.binary_cross_entropy_with_logits(logits.reshape(-1), y.float(), reduction="none"))
        else:
            out.append(F.cross_entropy(logits, y, reduction="none"))
    return torch.cat(out).cpu() if out else torch.empty(0)


@torch.no_grad()
def per_record_score(model: torch.nn.Module, data: Split, score: str = "loss", batch_size: int = 256,
                     device: str | torch.device = "cpu") -> torch.Tensor:
    """``Tensor[N]``, higher = more likely a member. score: ``"loss"`` (negative loss),
    ``"confidence"`` (probability of the true class; for multi-label the mean probability
    of the true 0/1 labels), ``"entropy"`` (negative prediction entropy, needs no labels)."""
    if score == "loss":
        return -per_record_loss(model, data, batch_size, device)
    if score not in ("confidence", "entropy"):
        raise ValueError(f"score must be 'loss', 'confidence' or 'entropy', got {score!r}")
    out = []
    for logits, y in _batched_logits(model, data, batch_size, device):
        if y.dtype != torch.long or (logits.dim() == 2 and logits.shape[1] == 1):
            p = torch.sigmoid(logits.reshape(y.shape) if y.dtype != torch.long else logits.reshape(-1))
            yf = y.float()
            p_true = (yf * p + (1 - yf) * (1 - p))
            ent = -(p * p.clamp_min(1e-12).log() + (1 - p) * (1 - p).clamp_min(1e-12).log())
            if p_true.dim() == 2:
                p_true, ent = p_true.mean(1), ent.mean(1)
        else:
            prob = torch.softmax(logits, dim=-1)
            p_true = prob.gather(1, y.reshape(-1, 1)).reshape(-1)
            ent = -(prob * prob.clamp_min(1e-12).log()).sum(-1)
        out.append(p_true if score == "confidence" else -ent)
    return torch.cat(out).cpu() if out else torch.empty(0)


def _subsample(data: Split, limit: int | None, generator: torch.Generator | None) -> Split:
    if limit is None or len(data) <= limit:
        return data
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    return data.subset(torch.randperm(len(data), generator=g)[:limit])


def _hospital_splits(ctx: AttackContext, hospitals) -> list[tuple[int, Split, Split]]:
    members = (ctx.extra or {}).get("members") or {}
    non_members = (ctx.extra or {}).get("non_members") or {}
    ids = sorted(h for h in members if h in non_members)
    if hospitals is not None:
        wanted = [int(h) for h in (hospitals if isinstance(hospitals, (list, tuple)) else [hospitals])]
        ids = [h for h in ids if h in wanted]
    return [(h, members[h], non_members[h]) for h in ids]


def _summarise(per_hospital: dict[int, tuple[float, float]]) -> dict:
    out = {}
    for h, (a, adv) in per_hospital.items():
        out[f"auroc_h{h}"] = a
        out[f"advantage_h{h}"] = adv
    if per_hospital:
        values = np.array([a for a, _ in per_hospital.values()])
        out["auroc_mean"] = float(np.nanmean(values))
        out["auroc_max"] = float(np.nanmax(values))
        out["advantage_mean"] = float(np.nanmean([adv for _, adv in per_hospital.values()]))
    return out


@ATTACKS.register()
class LossThresholdMIA(Attack):
    """Loss-threshold / confidence membership inference per hospital (evaluate hook).

    Options: score (``"loss"`` | ``"confidence"`` | ``"entropy"``), target_hospital (id,
    list, or ``"all"``), target_round (rounds to evaluate: a list, or ``"all"``), max_records
    (per side, subsampled with ``ctx.generator``), batch_size, device.
    Metrics: ``auroc_h<i>``, ``advantage_h<i>``, ``auroc_mean``, ``auroc_max``, ``advantage_mean``.
    """

    name = "membership_loss"
    goal = "confidentiality"
    kind = "membership"
    server_only = True
    success_metric = "auroc_mean"
    success_wording = "membership AUROC (0.5 = no better than chance)"

    @_dataclass
    class Options:
        score: str = option("loss", "per-record score", choices=("loss", "confidence", "entropy"))
        target_hospital: Union[int, List[int], Literal["all"], None] = option("all", "hospital id(s) attacked")
        target_round: Union[int, List[int], Literal["all"], None] = option("all", "round(s) evaluated")
        max_records: Optional[int] = option(2000, "records per side (subsampled)", min=1)
        batch_size: int = option(256, "scoring batch size", min=1)
        device: str = option("cpu", "torch device")

    def __init__(self, score: str = "loss", target_hospital="all", target_round="all", max_records: int | None = 2000,
                 batch_size: int = 256, device: str = "cpu"):
        if score not in ("loss", "confidence", "entropy"):
            raise ValueError(f"score must be 'loss', 'confidence' or 'entropy', got {score!r}")
        self.score, self.target_hospital, self.target_round = score, target_hospital, target_round
        self.max_records, self.batch_size, self.device = max_records, int(batch_size), device

    def check(self, num_hospitals, malicious, key=""):
        self.check_hospital_ids("target_hospital", self.target_hospital, num_hospitals)

    def _active(self, ctx: AttackContext) -> bool:
        r = self.target_round
        if r is None or r == "all":
            return True
        return ctx.server_round in ([int(v) for v in r] if isinstance(r, (list, tuple)) else [int(r)])

    def _hospitals(self):
        return None if self.target_hospital in (None, "all") else self.target_hospital

    def evaluate(self, model: torch.nn.Module, test: Split, ctx: AttackContext) -> dict:
        if not self._active(ctx):
            return {}
        results = {}
        for h, members, non_members in _hospital_splits(ctx, self._hospitals()):
            members = _subsample(members, self.max_records, ctx.generator)
            non_members = _subsample(non_members, self.max_records, ctx.generator)
            s_in = per_record_score(model, members, self.score, self.batch_size, self.device)
            s_out = per_record_score(model, non_members, self.score, self.batch_size, self.device)
            results[h] = (auroc(s_in, s_out), advantage(s_in, s_out))
        return _summarise(results)


def train_reference(model: torch.nn.Module, data: Split, epochs: int = 10, lr: float = 0.01, batch_size: int = 32,
                    generator: torch.Generator | None = None, device: str | torch.device = "cpu") -> torch.nn.Module:
    """A reference model: ``model``'s architecture re-initialised and trained with SGD
    (momentum 0.9) on ``data`` — the attacker's own, same-population records."""
    ref = copy.deepcopy(model).to(device)
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator)) if generator is not None else 0
    with torch.random.fork_rng(devices=[]):  # re-initialise reproducibly, global RNG untouched
        torch.manual_seed(seed)
        for module in ref.modules():
            if callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()
    ref.train()
    opt = torch.optim.SGD(ref.parameters(), lr=lr, momentum=0.9)
    n = len(data)
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for i in range(0, n, batch_size):
            idx = order[i:i + batch_size]
            x, y = data.x[idx].to(device), data.y[idx].to(device)
            logits = ref(x)
            if y.dtype != torch.long:
                loss = F.binary_cross_entropy_with_logits(logits, y.float())
            elif logits.dim() == 2 and logits.shape[1] == 1:
                loss = F.binary_cross_entropy_with_logits(logits.reshape(-1), y.float())
            else:
                loss = F.cross_entropy(logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return ref.eval()


@ATTACKS.register()
class CalibratedLossMIA(LossThresholdMIA):
    """Difficulty-calibrated loss attack (Watson et al. 2022): score =
    ``loss_ref(x) - loss_target(x)``.

    The reference model per hospital is trained once (cached across rounds) on
    ``ctx.extra["reference"]`` if given, else on a random half of that hospital's non-members
    (simulation stand-in for same-population data the attacker owns); that half is excluded
    from the evaluation so the reference never saw an evaluated record.
    Options: those of :class:`LossThresholdMIA` (score fixed to loss) + ref_epochs, ref_lr,
    ref_batch_size.
    """

    name = "membership_calibrated"

    @_dataclass
    class Options(LossThresholdMIA.Options):
        ref_epochs: int = option(10, "epochs of the reference model", min=1)
        ref_lr: float = option(0.01, "reference model's learning rate", gt=0.0)
        ref_batch_size: int = option(32, "reference model's batch size", min=1)

    def __init__(self, ref_epochs: int = 10, ref_lr: float = 0.01, ref_batch_size: int = 32, **options):
        options.setdefault("score", "loss")
        super().__init__(**options)
        self.ref_epochs, self.ref_lr, self.ref_batch_size = int(ref_epochs), float(ref_lr), int(ref_batch_size)
        self._references: dict = {}

    def _reference(self, key, model, data: Split, ctx: AttackContext) -> torch.nn.Module:
        if key not in self._references:
            g = torch.Generator().manual_seed(1234)
            self._references[key] = train_reference(model, data, self.ref_epochs, self.ref_lr, self.ref_batch_size,
                                                     g, self.device)
        return self._references[key]

    def evaluate(self, model: torch.nn.Module, test: Split, ctx: AttackContext) -> dict:
        if not self._active(ctx):
            return {}
        shared = (ctx.extra or {}).get("reference")
        results = {}
        for h, members, non_members in _hospital_splits(ctx, self._hospitals()):
            if shared is not None:
                ref = self._reference("shared", model, shared, ctx)
                held_out = non_members
            else:
                perm = torch.randperm(len(non_members), generator=torch.Generator().manual_seed(h))
                half = len(non_members) // 2
                ref = self._reference(h, model, non_members.subset(perm[:half]), ctx)
                held_out = non_members.subset(perm[half:])
            members = _subsample(members, self.max_records, ctx.generator)
            held_out = _subsample(held_out, self.max_records, ctx.generator)
            s_in = (per_record_loss(ref, members, self.batch_size, self.device)
                    - per_record_loss(model, members, self.batch_size, self.device))
            s_out = (per_record_loss(ref, held_out, self.batch_size, self.device)
                     - per_record_loss(model, held_out, self.batch_size, self.device))
            results[h] = (auroc(s_in, s_out), advantage(s_in, s_out))
        return _summarise(results)


MEMBERSHIP_ATTACKS = {
    "membership_loss": LossThresholdMIA,
    "membership_calibrated": CalibratedLossMIA,
}

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
import math

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


def _hospital_splits(ctx: AttackContext, hospitals, protocol: str = "test") -> list[tuple[int, Split, Split]]:
    """(hospital, members, non-members) per attacked hospital. protocol ``holdout``: the
    non-members are ``ctx.extra["holdout"]`` (each hospital's own records reserved out of
    training by :func:`reserve_holdout`); ``test``: its test split (the old protocol)."""
    extra = ctx.extra or {}
    members = extra.get("members") or {}
    if protocol == "holdout":
        non_members = extra.get("holdout")
        if not non_members:
            from fedsec.errors import FedsecError

            raise FedsecError("membership inference with non_members: holdout needs the records the task reserved "
                              "out of training (ctx.extra['holdout']); none were reserved")
    else:
        non_members = extra.get("non_members") or {}
    ids = sorted(h for h in members if h in non_members)
    if hospitals is not None:
        wanted = [int(h) for h in (hospitals if isinstance(hospitals, (list, tuple)) else [hospitals])]
        ids = [h for h in ids if h in wanted]
    return [(h, members[h], non_members[h]) for h in ids]


def _row_keys(x: torch.Tensor) -> list[bytes]:
    flat = x.reshape(len(x), -1).contiguous().numpy()
    return [r.tobytes() for r in flat]


def drop_member_copies(members: Split, non_members: Split) -> tuple[Split, int]:
    """Non-members without any record identical to a member (a duplicated patient row would be
    both); -> (non-members kept, number dropped)."""
    seen = set(_row_keys(members.x))
    keep = [i for i, k in enumerate(_row_keys(non_members.x)) if k not in seen]
    dropped = len(non_members) - len(keep)
    return (non_members if not dropped else non_members.subset(keep)), dropped


def label_strata(y: torch.Tensor) -> np.ndarray:
    """The label stratum of each record: the class index; multi-label: 1 when any label is on."""
    if y.dim() == 2:
        return (y > 0.5).any(dim=1).long().numpy()
    return y.long().numpy()


def stratified_holdout(y: torch.Tensor, fraction: float, generator: torch.Generator) -> tuple[list[int], list[int]]:
    """(kept, reserved) row indices: ``round(fraction * n_c)`` rows of every label stratum c
    reserved (at least one when the stratum has two or more rows), chosen at random."""
    strata = label_strata(y)
    kept, reserved = [], []
    for c in np.unique(strata):
        rows = np.flatnonzero(strata == c)
        perm = rows[torch.randperm(len(rows), generator=generator).numpy()]
        k = int(round(fraction * len(rows)))
        if k == 0 and len(rows) >= 2 and fraction > 0:
            k = 1
        k = min(k, len(rows) - 1) if len(rows) > 1 else 0
        reserved += perm[:k].tolist()
        kept += perm[k:].tolist()
    return sorted(kept), sorted(reserved)


def holdout_fraction_of(scenario) -> float | None:
    """The largest ``holdout_fraction`` of the scenario's membership attacks that use the
    ``holdout`` protocol (None: no records are reserved)."""
    fractions = []
    for entry in (getattr(scenario, "attacks", None) or []):
        cls = MEMBERSHIP_ATTACKS.get(str(entry.get("attack")))
        if cls is None:
            continue
        defaults = cls.option_defaults()
        if entry.get("non_members", defaults.get("non_members")) == "holdout":
            fractions.append(float(entry.get("holdout_fraction", defaults.get("holdout_fraction"))))
    return max(fractions) if fractions else None


def reserve_holdout(data, fraction: float, seed: int, hospital_ids: list[int] | None = None) -> None:
    """Move a label-stratified ``fraction`` of each hospital's training records into
    ``data.holdout`` (membership inference's non-members): they are never trained on, since
    every hospital trains on ``data.train`` only. The same scenario gives the same split on
    the server and on every hospital (seeded by the scenario seed and the hospital)."""
    train, holdout, index = [], [], []
    for i, split in enumerate(data.train):
        h = hospital_ids[i] if hospital_ids is not None else i  # the federation's id of the hospital
        g = torch.Generator().manual_seed(int(seed) * 1000 + 17 * h + 3)
        kept, reserved = stratified_holdout(split.y, fraction, g)
        assert not set(kept) & set(reserved) and len(kept) + len(reserved) == len(split), \
            "membership holdout overlaps the training records"
        train.append(split.subset(kept))
        holdout.append(split.subset(reserved))
        index.append(reserved)
    data.train, data.holdout = train, holdout
    data.info["membership_holdout"] = {"fraction": float(fraction),
                                       "reserved": {data.hospitals[h]: len(s) for h, s in enumerate(holdout)}}


def _auroc_rows(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """AUROC of each row: pos [B, n] vs neg [B, m] (Mann-Whitney, ties half)."""
    from scipy.stats import rankdata

    n, m = pos.shape[1], neg.shape[1]
    if n == 0 or m == 0:
        return np.full(pos.shape[0], np.nan)
    ranks = rankdata(np.concatenate([pos, neg], axis=1), axis=1)
    return (ranks[:, :n].sum(1) - n * (n + 1) / 2.0) / (n * m)


def _tpr_rows(pos: np.ndarray, neg: np.ndarray, fpr: float) -> np.ndarray:
    """TPR at the strictest threshold whose FPR <= ``fpr``: the share of members scoring above
    the ``floor(fpr * m) + 1``-th highest non-member score (with few non-members this is the
    share above the highest one)."""
    m = neg.shape[1]
    if pos.shape[1] == 0 or m == 0:
        return np.full(pos.shape[0], np.nan)
    k = int(math.floor(fpr * m))
    t = np.sort(neg, axis=1)[:, m - 1 - k]
    return (pos > t[:, None]).mean(1)


MIA_METRICS = ("auroc_mean", "auroc_stratified_mean", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr")


def mia_stats(sets: dict, seed: int = 0, n_boot: int | None = None) -> tuple[dict, dict]:
    """Membership metrics of the attacked model and of the null (untrained) model, with paired
    bootstrap CIs. ``sets``: hospital -> dict with ``s_in``, ``s_out`` (attacked model's
    scores), ``n_in``, ``n_out`` (null model's), ``y_in``, ``y_out`` (label strata).
    Resampling is stratified by hospital, side and label. -> (plain metrics, stats)."""
    from fedsec.attacks.nulls import N_BOOT, percentile_ci, rng_for, stat

    n_boot = N_BOOT if n_boot is None else n_boot
    rng = rng_for(seed, len(sets))
    per = {k: [] for k in ("auroc", "strat", "tpr1", "tpr01")}
    per_null = {k: [] for k in per}
    plain = {}
    for h, d in sets.items():
        idx = {}
        for side in ("in", "out"):
            y = d[f"y_{side}"]
            cols = []
            for c in np.unique(y):
                rows = np.flatnonzero(y == c)
                cols.append(rows[rng.integers(0, len(rows), size=(n_boot, len(rows)))])
            boot = np.concatenate(cols, axis=1) if cols else np.zeros((n_boot, 0), dtype=int)
            full = np.concatenate([np.flatnonzero(y == c) for c in np.unique(y)]) if len(y) else np.zeros(0, int)
            idx[side] = np.concatenate([full[None, :], boot], axis=0)  # row 0: the data as is
        for which, store in (("s", per), ("n", per_null)):
            P, N = d[f"{which}_in"][idx["in"]], d[f"{which}_out"][idx["out"]]
            yP, yN = d["y_in"][idx["in"][0]], d["y_out"][idx["out"][0]]
            store["auroc"].append(_auroc_rows(P, N))
            store["tpr1"].append(_tpr_rows(P, N, 0.01))
            store["tpr01"].append(_tpr_rows(P, N, 0.001))
            # Label-stratified AUROC: the share of (member, non-member) pairs *of the same label*
            # in which the member scores higher, i.e. each label's AUROC weighted by its number
            # of pairs. An unweighted mean over labels let a stratum of one non-member (a skewed
            # chest X-ray hospital holds out 1 "normal" image) count as much as one of 230: the
            # untrained model then scored 0.60 [0.55, 0.65] on seed 0 instead of 0.5.
            classes = [c for c in np.unique(yP) if (yN == c).any()]
            if classes:
                rows = np.stack([_auroc_rows(P[:, yP == c], N[:, yN == c]) for c in classes])
                pairs = np.array([(yP == c).sum() * (yN == c).sum() for c in classes], dtype=np.float64)
                store["strat"].append(pairs @ rows / pairs.sum())
            else:
                store["strat"].append(np.full(n_boot + 1, np.nan))
        plain[f"auroc_h{h}"] = float(per["auroc"][-1][0])
        plain[f"advantage_h{h}"] = advantage(d["s_in"], d["s_out"])
        plain[f"auroc_stratified_h{h}"] = float(per["strat"][-1][0])
    if not sets:
        return {}, {}
    names = {"auroc": "auroc_mean", "strat": "auroc_stratified_mean", "tpr1": "tpr_at_1pct_fpr",
             "tpr01": "tpr_at_0.1pct_fpr"}
    stats = {}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a hospital without a class pair: NaN
        for k, name in names.items():
            a = np.nanmean(np.stack(per[k]), axis=0)
            b = np.nanmean(np.stack(per_null[k]), axis=0)
            plain[name] = float(a[0])
            stats[name] = stat(a[0], b[0], percentile_ci(a[1:]), percentile_ci(a[1:] - b[1:]),
                               int(sum(len(d["s_in"]) + len(d["s_out"]) for d in sets.values())),
                               "untrained", percentile_ci(b[1:]))
        plain["auroc_max"] = float(np.nanmax([plain[f"auroc_h{h}"] for h in sets]))
        plain["advantage_mean"] = float(np.nanmean([plain[f"advantage_h{h}"] for h in sets]))
    return plain, stats


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
        non_members: str = option("holdout", "holdout: each hospital's own records reserved out of training, "
                                             "label-stratified; test: its test split (old protocol)",
                                  choices=("holdout", "test"))
        holdout_fraction: float = option(0.2, "share of each hospital's training records reserved as "
                                              "non-members (holdout protocol)", gt=0.0, max=0.9)

    def __init__(self, score: str = "loss", target_hospital="all", target_round="all", max_records: int | None = 2000,
                 batch_size: int = 256, device: str = "cpu", non_members: str = "holdout",
                 holdout_fraction: float = 0.2):
        if score not in ("loss", "confidence", "entropy"):
            raise ValueError(f"score must be 'loss', 'confidence' or 'entropy', got {score!r}")
        if non_members not in ("holdout", "test"):
            raise ValueError(f"non_members must be 'holdout' or 'test', got {non_members!r}")
        self.score, self.target_hospital, self.target_round = score, target_hospital, target_round
        self.max_records, self.batch_size, self.device = max_records, int(batch_size), device
        self.non_members, self.holdout_fraction = non_members, float(holdout_fraction)
        self._null_model = None

    def check(self, num_hospitals, malicious, key=""):
        self.check_hospital_ids("target_hospital", self.target_hospital, num_hospitals)

    def _active(self, ctx: AttackContext) -> bool:
        r = self.target_round
        if r is None or r == "all":
            return True
        return ctx.server_round in ([int(v) for v in r] if isinstance(r, (list, tuple)) else [int(r)])

    def _hospitals(self):
        return None if self.target_hospital in (None, "all") else self.target_hospital

    def untrained_model(self, model, ctx: AttackContext):
        """The null model: the run's own initial (untrained) model, from the scenario seed."""
        if self._null_model is None:
            extra = ctx.extra or {}
            make, scenario = extra.get("model_fn"), extra.get("scenario")
            if make is not None:
                self._null_model = make(seed=int(getattr(scenario, "seed", 0) or 0)).eval()
            else:  # no task in the context (unit tests): re-initialise a copy of the model
                self._null_model = copy.deepcopy(model)
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(0)
                    for module in self._null_model.modules():
                        if callable(getattr(module, "reset_parameters", None)):
                            module.reset_parameters()
                self._null_model.eval()
        return self._null_model

    def scores(self, model, h: int, members: Split, non_members: Split, ctx: AttackContext):
        """(member scores, non-member scores) of ``model``; higher = more likely a member."""
        return (per_record_score(model, members, self.score, self.batch_size, self.device),
                per_record_score(model, non_members, self.score, self.batch_size, self.device))

    def pairs(self, ctx: AttackContext):
        """(hospital, members, non-members) actually scored: subsampled, non-members identical
        to a member dropped."""
        out = []
        for h, members, non_members in _hospital_splits(ctx, self._hospitals(), self.non_members):
            non_members, _ = drop_member_copies(members, non_members)
            out.append((h, _subsample(members, self.max_records, ctx.generator),
                        _subsample(non_members, self.max_records, ctx.generator)))
        return out

    def evaluate(self, model: torch.nn.Module, test: Split, ctx: AttackContext) -> dict:
        """Per hospital and averaged: AUROC, label-stratified AUROC, TPR at 1% and 0.1% FPR,
        advantage; ``stats``: each with its null (the untrained model scored the same way on
        the same records) and paired bootstrap 95% CIs."""
        if not self._active(ctx):
            return {}
        null = self.untrained_model(model, ctx)
        sets = {}
        for h, members, non_members in self.pairs(ctx):
            s_in, s_out = self.scores(model, h, members, non_members, ctx)
            n_in, n_out = self.scores(null, h, members, non_members, ctx)
            sets[h] = {"s_in": np.asarray(s_in, np.float64), "s_out": np.asarray(s_out, np.float64),
                       "n_in": np.asarray(n_in, np.float64), "n_out": np.asarray(n_out, np.float64),
                       "y_in": label_strata(members.y), "y_out": label_strata(non_members.y)}
        scenario = (ctx.extra or {}).get("scenario")
        seed = int(getattr(scenario, "seed", 0) or 0)
        # The bootstrap (1000 resamples) runs in the run's last round only (seconds per round on
        # large hospitals); earlier rounds record value, null and effect without CIs.
        last = getattr(getattr(scenario, "federation", None), "rounds", None)
        plain, stats = mia_stats(sets, seed, n_boot=0 if last is not None and ctx.server_round < last else None)
        if stats:
            plain["stats"] = stats
        return plain


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

    def pairs(self, ctx: AttackContext):
        """As the loss attack's, but without the half of the non-members the reference model is
        trained on (when no shared reference set is given)."""
        shared = (ctx.extra or {}).get("reference")
        out = []
        for h, members, non_members in _hospital_splits(ctx, self._hospitals(), self.non_members):
            non_members, _ = drop_member_copies(members, non_members)
            if shared is None:
                perm = torch.randperm(len(non_members), generator=torch.Generator().manual_seed(h))
                half = len(non_members) // 2
                self._ref_data = getattr(self, "_ref_data", {})
                self._ref_data[h] = non_members.subset(perm[:half])
                non_members = non_members.subset(perm[half:])
            out.append((h, _subsample(members, self.max_records, ctx.generator),
                        _subsample(non_members, self.max_records, ctx.generator)))
        return out

    def scores(self, model, h, members, non_members, ctx):
        shared = (ctx.extra or {}).get("reference")
        ref = (self._reference("shared", model, shared, ctx) if shared is not None
               else self._reference(h, model, self._ref_data[h], ctx))
        return (per_record_loss(ref, members, self.batch_size, self.device)
                - per_record_loss(model, members, self.batch_size, self.device),
                per_record_loss(ref, non_members, self.batch_size, self.device)
                - per_record_loss(model, non_members, self.batch_size, self.device))


MEMBERSHIP_ATTACKS = {
    "membership_loss": LossThresholdMIA,
    "membership_calibrated": CalibratedLossMIA,
}

"""Where a record came from: a curious server infers which hospital a patient record belongs
to from the hospitals' individual updates (issue 14, item 4).

For each record the server guesses the hospital whose update points most along the record's
own descent direction: the cosine between the update and the record's negative loss gradient
at the global model (``score: cosine``, the default), or the loss drop the update causes on
the record (``score: loss_drop``; biased towards hospitals whose updates are larger, i.e. that
took more local steps). A record a hospital trained on is, typically, one its update fits. This is the update-based analogue of membership
inference with one candidate "member set" per hospital; knowing a patient's hospital can
reveal a diagnosis or a place of care.

Null: always guessing the hospital that reported the most training records (what the server
knows without looking at any update), scored on the same records: its accuracy is the largest
hospital's share of the records. ``stats.provenance_acc`` gives the attack's accuracy, that
null, the effect and paired bootstrap 95% CIs over the records.

Records scored: in simulation, a uniform random sample (``max_records``) of the round's
participants' training records, so each hospital appears in its natural share. Under secure
aggregation the server sees no individual update and the attack cannot run.
"""

from __future__ import annotations

from dataclasses import dataclass as _dataclass
from typing import List, Literal, Optional, Union

import numpy as np
import torch

from fedsec.attacks.base import Attack, AttackContext
from fedsec.data.base import Split
from fedsec.registry import ATTACKS, option


def guess_hospital(drop: np.ndarray, hospitals: list[int], sizes: dict) -> np.ndarray:
    """drop [H, N]: how much each hospital's update favours each record -> the guessed
    hospital id per record: the largest; ties (e.g. all updates zero) go to the hospital with
    the most training records, i.e. to the null's guess."""
    best = drop.max(axis=0)
    order = sorted(range(len(hospitals)), key=lambda i: (-sizes.get(hospitals[i], 0), hospitals[i]))
    out = np.full(drop.shape[1], -1, dtype=np.int64)
    for i in reversed(order):  # the largest hospital last, so it wins ties
        out[drop[i] >= best] = hospitals[i]
    return out


def per_record_gradients(model: torch.nn.Module, data: Split) -> torch.Tensor:
    """``Tensor[N, d]`` (float64): each record's loss gradient over the model's float state in
    the update layout (fedsec.core.params; buffers get 0), through ``torch.func``."""
    from fedsec.attacks.inversion import _float_state
    from fedsec.attacks.membership import per_record_loss  # noqa: F401  (same loss)
    import torch.nn.functional as F

    model = model.eval()
    names = [k for k, _ in _float_state(model)]
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss(p, x, y):
        logits = torch.func.functional_call(model, (p, buffers), (x[None],))
        if y.dtype != torch.long:
            return F.binary_cross_entropy_with_logits(logits, y[None].float(), reduction="sum")
        if logits.dim() == 2 and logits.shape[1] == 1:
            return F.binary_cross_entropy_with_logits(logits.reshape(-1), y[None].float(), reduction="sum")
        return F.cross_entropy(logits, y[None], reduction="sum")

    per = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, data.x, data.y)
    cols = []
    for k in names:
        if k in per:
            cols.append(per[k].reshape(len(data), -1).double())
        else:  # a buffer: no gradient
            cols.append(torch.zeros(len(data), dict(model.named_buffers())[k].numel(), dtype=torch.float64))
    return torch.cat(cols, dim=1)


@ATTACKS.register()
class RecordProvenance(Attack):
    """Which hospital holds this patient? The hospital whose update best fits the record
    (observe hook; server only; ``score``: cosine or loss_drop). Metrics: ``provenance_acc`` (share of records assigned
    to their true hospital), ``provenance_null`` (largest hospital's share),
    ``provenance_null_random`` (share-weighted random guessing: the sum of squared shares),
    ``provenance_records``; ``stats.provenance_acc``."""

    name = "record_provenance"
    goal = "confidentiality"
    kind = "membership"
    server_only = True
    success_metric = "provenance_acc"
    success_wording = "share of patient records whose hospital the server names correctly"

    @_dataclass
    class Options:
        target_round: Union[int, List[int], Literal["all"], None] = option("all", "round(s) observed")
        max_records: Optional[int] = option(1000, "records scored per round (uniform sample of the "
                                                  "participants' training records)", min=1)
        batch_size: int = option(512, "scoring batch size", min=1)
        device: str = option("cpu", "torch device")
        score: str = option("cosine", "loss_drop: the loss drop the update causes on the record; cosine: "
                                      "cosine between the update and the record's negative loss gradient "
                                      "(not biased towards hospitals whose updates are larger)",
                            choices=("loss_drop", "cosine"))

    def __init__(self, target_round="all", max_records: int | None = 1000, batch_size: int = 512,
                 device: str = "cpu", score: str = "cosine"):
        if score not in ("loss_drop", "cosine"):
            raise ValueError(f"score must be 'loss_drop' or 'cosine', got {score!r}")
        self.target_round, self.max_records = target_round, max_records
        self.batch_size, self.device, self.score = int(batch_size), device, score

    def _active(self, server_round: int) -> bool:
        r = self.target_round
        if r is None or r == "all":
            return True
        return server_round in ([int(v) for v in r] if isinstance(r, (list, tuple)) else [int(r)])

    def records(self, truth: dict, hospitals: list[int], generator) -> tuple[Split, np.ndarray]:
        """(records, true hospital of each): a uniform sample of the hospitals' records."""
        splits = [truth[h] for h in hospitals]
        owner = np.concatenate([np.full(len(s), h, dtype=np.int64) for h, s in zip(hospitals, splits)])
        pool = Split.concat(splits)
        if self.max_records is not None and len(pool) > self.max_records:
            g = generator if generator is not None else torch.Generator().manual_seed(0)
            idx = torch.randperm(len(pool), generator=g)[: self.max_records]
            pool, owner = pool.subset(idx), owner[idx.numpy()]
        return pool, owner

    def observe(self, server_round, updates, aggregate, global_params, ctx: AttackContext) -> dict:
        from fedsec.attacks.inversion import load_flat_params
        from fedsec.attacks.membership import per_record_loss
        from fedsec.attacks.nulls import mean_stat

        if not self._active(server_round):
            return {}
        if updates is None:
            return {"blocked_by_secure_aggregation": 1.0}
        extra = ctx.extra or {}
        truth, make = extra.get("truth") or {}, extra.get("model_fn")
        hospitals = sorted(h for h in updates if h in truth)
        if len(hospitals) < 2 or make is None:
            return {}
        sizes = {h: int(v) for h, v in (extra.get("num_samples") or {h: len(truth[h]) for h in hospitals}).items()}
        data, owner = self.records(truth, hospitals, ctx.generator)
        model = make()
        g = global_params.detach().float()
        load_flat_params(model, g)
        if self.score == "loss_drop":
            base = per_record_loss(model, data, self.batch_size, self.device).double().numpy()
            drop = []
            for h in hospitals:
                load_flat_params(model, g + updates[h].detach().float())
                drop.append(base - per_record_loss(model, data, self.batch_size, self.device).double().numpy())
            drop = np.stack(drop)
        else:
            U = torch.stack([updates[h].detach().double() for h in hospitals])  # [H, d]
            U = U / U.norm(dim=1, keepdim=True).clamp_min(1e-300)
            cols = []
            for i in range(0, len(data), 64):  # [64, d] gradients at a time: memory stays small
                G = -per_record_gradients(model, data.subset(range(i, min(i + 64, len(data)))))
                cols.append(U @ (G / G.norm(dim=1, keepdim=True).clamp_min(1e-300)).T)
            drop = torch.cat(cols, dim=1).numpy()
        guess = guess_hospital(drop, hospitals, sizes)
        largest = max(hospitals, key=lambda h: (sizes.get(h, 0), -h))
        correct = (guess == owner).astype(np.float64)
        null = (owner == largest).astype(np.float64)
        shares = np.array([np.mean(owner == h) for h in hospitals])
        seed = int(getattr(extra.get("scenario"), "seed", 0) or 0)
        return {"provenance_acc": float(correct.mean()), "provenance_null": float(null.mean()),
                "provenance_null_random": float((shares ** 2).sum()), "provenance_records": float(len(owner)),
                "stats": {"provenance_acc": mean_stat(correct, null, "largest_hospital", seed + server_round)}}

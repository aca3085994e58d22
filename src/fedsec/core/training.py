"""Local training and evaluation loops (one hospital, in-memory tensors).

Seeded through an explicit ``torch.Generator`` so a hospital's round is reproducible no
matter which Ray actor runs it.
"""

from __future__ import annotations

import itertools
import math

import torch

from fedsec.data.base import Split
from fedsec.metrics import classification_metrics



def seed_global_rng(seed: int) -> None:
    """``torch.manual_seed(seed)`` for the CPU (the same stream), without its cost on a
    machine with no accelerator in use: ``torch.manual_seed`` also queues the seed for CUDA,
    MTIA and XPU, and each of those records the caller's stack (``traceback.format_stack``,
    several ms a call) while that device is not initialised. Called in every hospital's every
    round, that was a visible share of a small round's fixed cost (docs/engines.md)."""
    seed = int(seed)
    torch.random.default_generator.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)

def batches(n: int, batch_size: int, generator: torch.Generator | None, shuffle: bool = True):
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]


def step_limit(local) -> int | None:
    """``local.steps`` (None = full epochs); tolerant of configs without the field."""
    steps = getattr(local, "steps", None)
    return int(steps) if steps else None


def epoch_range(local):
    """Passes over the data: ``local.epochs`` of them, or as many as ``local.steps`` needs."""
    return itertools.count() if step_limit(local) else range(int(local.epochs))


def make_optimizer(model: torch.nn.Module, local) -> torch.optim.Optimizer:
    if local.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=local.lr, weight_decay=local.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=local.lr, momentum=local.momentum,
                           weight_decay=local.weight_decay)


def train_local(model: torch.nn.Module, data: Split, task, local, generator: torch.Generator,
                device: torch.device | str = "cpu", optimizer: torch.optim.Optimizer | None = None,
                data_loader=None) -> dict:
    """``local.epochs`` passes over ``data`` with mini-batches of ``local.batch_size``, or
    exactly ``local.steps`` mini-batches when that is set (reshuffling between passes).

    ``data_loader`` (an iterable of (x, y) per epoch) replaces the built-in batching, e.g.
    Opacus's Poisson-sampled loader for DP-SGD. Returns {"loss": mean batch loss, "steps"}.
    """
    model.to(device).train()
    optimizer = optimizer or make_optimizer(model, local)
    total, steps = 0.0, 0
    x_all, y_all = data.x, data.y
    limit = step_limit(local)
    for _ in epoch_range(local):
        iterator = data_loader if data_loader is not None else (
            (x_all[i], y_all[i]) for i in batches(len(data), local.batch_size, generator))
        before = steps
        for xb, yb in iterator:
            if len(xb) == 0:  # Poisson sampling can draw an empty batch
                continue
            xb, yb = xb.to(device), yb.to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = task.loss(model(xb), yb)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
            steps += 1
            if steps == limit:
                break
        if limit and steps in (limit, before):  # done, or no data to step on
            break
    return {"loss": total / max(steps, 1), "steps": steps}


@torch.no_grad()
def predict(model: torch.nn.Module, data: Split, task, device: torch.device | str = "cpu",
            batch_size: int = 1024) -> tuple[torch.Tensor, float]:
    """-> (scores [N, K] probabilities on CPU, mean loss)."""
    model.to(device).eval()
    scores, loss_sum = [], 0.0
    for start in range(0, len(data), batch_size):
        xb = data.x[start:start + batch_size].to(device)
        yb = data.y[start:start + batch_size].to(device)
        logits = model(xb)
        loss_sum += float(task.loss(logits, yb, reduction="sum"))
        scores.append(task.scores(logits).cpu())
    n = len(data)
    if task.multilabel and n:
        loss_sum /= data.y.shape[1]  # BCE summed over labels: report the per-label mean
    k = task.data.num_classes
    return (torch.cat(scores) if scores else torch.empty(0, k)), (loss_sum / n if n else math.nan)


def evaluate(model: torch.nn.Module, data: Split, task, device="cpu") -> dict:
    scores, loss = predict(model, data, task, device)
    return classification_metrics(scores, data.y, loss=loss, multilabel=task.multilabel)

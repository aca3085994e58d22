"""The centralised (pooled-data) baseline of a scenario, from the same task, model and
training loop: every hospital's training rows pooled at one site, trained for
``rounds x local.epochs`` epochs (with ``local.steps``: enough epochs to see as many samples
as the federation does), scored on the union of the hospitals' test sets. It is the
reference a federated run is compared with (FLamby's "pooled" column)."""

from __future__ import annotations

import math
import time

import torch

from fedsec.data.base import Split


def centralised(scenario, epochs: int | None = None) -> dict:
    from dataclasses import replace

    from fedsec.core.training import evaluate, make_optimizer, train_local
    from fedsec.tasks import build_task

    torch.set_num_threads(max(1, int(scenario.engine.num_cpus)))
    t0 = time.perf_counter()
    task = build_task(scenario)
    pooled = Split.concat(task.data.train)
    model = task.make_model(seed=scenario.seed)
    local = scenario.federation.local
    if not epochs and local.steps:  # as many samples as the federation's rounds see, in epochs
        seen = scenario.federation.rounds * local.steps * local.batch_size * task.data.num_hospitals
        epochs = max(1, math.ceil(seen / max(len(pooled), 1)))
    epochs = epochs or scenario.federation.rounds * local.epochs
    generator = torch.Generator().manual_seed(scenario.seed)
    optimizer = make_optimizer(model, local)  # one optimizer across epochs, as pooled training would
    one_epoch = replace(local, epochs=1, steps=None)
    for _ in range(epochs):
        train_local(model, pooled, task, one_epoch, generator, optimizer=optimizer)
    metrics = evaluate(model, task.data.union_test(), task)
    return {"final": metrics, "epochs": epochs, "train_rows": len(pooled), "seconds": time.perf_counter() - t0}

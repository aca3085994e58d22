"""The centralised (pooled-data) baseline of a scenario, from the same task, model and
training loop: every hospital's training rows pooled at one site, trained for
``rounds x local.epochs`` epochs, scored on the union of the hospitals' test sets.
It is the reference a federated run is compared with (FLamby's "pooled" column)."""

from __future__ import annotations

import time

import torch

from fedsec.data.base import Split


def centralised(scenario, epochs: int | None = None) -> dict:
    from dataclasses import replace

    from fedsec.federation.training import evaluate, make_optimizer, train_local
    from fedsec.tasks import build_task

    torch.set_num_threads(max(1, int(scenario.engine.num_cpus)))
    t0 = time.perf_counter()
    task = build_task(scenario)
    pooled = Split.concat(task.data.train)
    model = task.make_model(seed=scenario.seed)
    local = scenario.federation.local
    epochs = epochs or scenario.federation.rounds * local.epochs
    generator = torch.Generator().manual_seed(scenario.seed)
    optimizer = make_optimizer(model, local)  # one optimizer across epochs, as pooled training would
    one_epoch = replace(local, epochs=1)
    for _ in range(epochs):
        train_local(model, pooled, task, one_epoch, generator, optimizer=optimizer)
    metrics = evaluate(model, task.data.union_test(), task)
    return {"final": metrics, "epochs": epochs, "train_rows": len(pooled), "seconds": time.perf_counter() - t0}

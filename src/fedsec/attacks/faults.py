"""Fault injection: a hospital whose software fails, rather than one that attacks.

A consortium's first real failures are hospitals that crash (a full disk, an out-of-memory
kill) or whose training diverges; this component lets a scenario put one in, to see how the
server, ``federation.min_hospitals`` and the results folder cope (docs/attacks.md). It is a
registered component like any attack, so no scenario needs to name code to do it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedsec.attacks.base import Attack
from fedsec.registry import ATTACKS, option


@ATTACKS.register()
class HospitalFault(Attack):
    """A hospital that fails: ``crash`` raises in its ClientApp before training (the server
    receives an error reply), ``nan`` sends an all-NaN update (diverged training)."""

    name = "hospital_fault"
    goal = "availability"
    kind = "fault"
    success_metric = None
    success_wording = "the run's status and failures (summary.json), not a metric"

    @dataclass
    class Options:
        mode: str = option("crash", "crash: the ClientApp raises; nan: the update is all NaN", choices=("crash", "nan"))
        message: str = option("injected fault", "the error a crash reports")

    def poison_data(self, data, rng, ctx):
        if self.options["mode"] == "crash":
            raise RuntimeError(f"{self.options['message']} at hospital {ctx.hospital}")
        return data

    def poison_update(self, global_params, local_params, ctx):
        if self.options["mode"] == "nan":
            return torch.full_like(local_params, float("nan"))
        return local_params

"""Test-only attacks. ``Boom``'s client hook raises, to check that a failing ClientApp fails
the run visibly (Flower alone would log "0 results" and return empty metrics); ``Diverge``
sends a NaN update, as a hospital whose training diverged would."""

import torch

from fedsec.attacks.base import Attack


class Boom(Attack):
    def __init__(self):
        pass

    def poison_data(self, data, rng, ctx):
        raise RuntimeError(f"disk full at hospital {ctx.hospital}")


class Diverge(Attack):
    """A hospital whose local training blew up: its update is all NaN."""

    def __init__(self):
        pass

    def poison_update(self, global_params, local_params, ctx):
        return torch.full_like(local_params, float("nan"))

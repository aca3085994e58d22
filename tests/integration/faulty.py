"""A test-only attack whose client hook raises, to check that a failing ClientApp fails
the run visibly (Flower alone would log "0 results" and return empty metrics)."""

from fedsec.attacks.base import Attack


class Boom(Attack):
    def __init__(self):
        pass

    def poison_data(self, data, rng, ctx):
        raise RuntimeError(f"disk full at hospital {ctx.hospital}")

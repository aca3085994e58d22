"""Update compression as a cheap defense against gradient inversion: top-k magnitude pruning
of the update and uniform quantisation, applied by each hospital to (local - global) before
it is sent.

Gradient-inversion attacks (DLG, iDLG, Inverting Gradients) fit dummy inputs to the update the
server sees; pruning the small entries (Zhu et al. 2019 report DLG failing beyond ~20 %
pruning) and coarse quantisation remove information they rely on. There is no formal
guarantee: this is a utility/leakage trade-off to measure, not differential privacy.

Options (``privacy.compression``), see :class:`CompressionConfig`. Compression is part of the
wire format, so it applies to every hospital's reply, attackers' included (apply it after the
attack's ``poison_update``).
"""

from __future__ import annotations

from typing import ClassVar

import math
from dataclasses import dataclass

import torch

from fedsec.errors import FedsecError
from fedsec.privacy.options import number, parse_options
from fedsec.registry import PRIVACY

SECTION = "compression"


@PRIVACY.register("compression")
@dataclass
class CompressionConfig:
    """``privacy.compression``.

    keep_ratio: fraction of the update's entries kept, by magnitude (top-k with
        k = ceil(keep_ratio * d), at least 1); default 1.0 (no pruning).
    bits: quantise the kept entries to this many bits, symmetric and uniform: 2**(bits-1) - 1
        levels each side of 0 up to the largest magnitude (int8-style for 8), rounded to the
        nearest level, so the error per entry is at most half a step; default null (no
        quantisation). 2 <= bits <= 16.
    """

    # the defense's declaration (docs/components.md, the threat map)
    title: ClassVar[str] = "update compression (top-k pruning, quantisation) at each hospital"
    acts_in: ClassVar[str] = "client"  # client (a ClientApp mod / training), server, or both
    hides_individual_updates: ClassVar[bool] = False
    example: ClassVar[object] = {"keep_ratio": 0.5}

    keep_ratio: float = 1.0
    bits: int | None = None

    def __post_init__(self):
        self.keep_ratio = number(SECTION, "keep_ratio", self.keep_ratio, minimum=0.0, maximum=1.0, strict_min=True)
        if self.bits is not None and (isinstance(self.bits, bool) or not isinstance(self.bits, int)
                                      or not 2 <= self.bits <= 16):
            raise FedsecError(f"privacy.{SECTION}.bits: an integer from 2 to 16 (or null), got {self.bits!r}")
        if self.keep_ratio >= 1.0 and self.bits is None:
            raise FedsecError(f"privacy.{SECTION}: set keep_ratio < 1 (pruning) and/or bits (quantisation); "
                              "with neither the update is sent unchanged")

    @classmethod
    def parse(cls, options) -> "CompressionConfig":
        return parse_options(cls, SECTION, options)

    def kept(self, d: int) -> int:
        """k: how many of d entries survive pruning."""
        return max(1, min(int(d), math.ceil(self.keep_ratio * int(d) - 1e-9)))


def quantisation_step(update: torch.Tensor, bits: int) -> float:
    """The step of the symmetric uniform grid for ``update`` (0 for an all-zero update)."""
    levels = 2 ** (bits - 1) - 1
    top = float(update.abs().max()) if update.numel() else 0.0
    return top / levels if top > 0 else 0.0


def compress_update(global_vec: torch.Tensor, local_vec: torch.Tensor, config) -> torch.Tensor:
    """global_vec, local_vec: Tensor[d] -> global_vec + compress(local_vec - global_vec).

    config: CompressionConfig or its mapping. Exactly k = config.kept(d) entries of the update
    are non-zero at most (those of largest magnitude; fewer only if the update itself has
    zeros or a kept entry quantises to 0); quantisation error per entry <= step / 2.
    """
    cfg = config if isinstance(config, CompressionConfig) else CompressionConfig.parse(config)
    if global_vec.shape != local_vec.shape or global_vec.dim() != 1:
        raise ValueError(f"expected two vectors of the same length, got {tuple(global_vec.shape)} and "
                         f"{tuple(local_vec.shape)}")
    update = (local_vec - global_vec).to(torch.float64)
    d = update.numel()
    if cfg.keep_ratio < 1.0:
        k = cfg.kept(d)
        idx = torch.topk(update.abs(), k, sorted=False).indices
        pruned = torch.zeros_like(update)
        pruned[idx] = update[idx]
        update = pruned
    if cfg.bits is not None:
        step = quantisation_step(update, cfg.bits)
        if step > 0:
            update = torch.round(update / step) * step
    return (global_vec.to(torch.float64) + update).to(local_vec.dtype)


def compress_state(global_state: dict, local_state: dict, config) -> dict:
    """The same on model state dicts (float entries; integer buffers keep the local value)."""
    from fedsec.core.params import flatten_state, unflatten_state

    out = unflatten_state(compress_update(flatten_state(global_state), flatten_state(local_state), config),
                          local_state)
    return out

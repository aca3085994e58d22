"""How far a round's aggregate moved along ALIE's direction (Baruch et al. 2019).

ALIE's coalition sends ``mean - z * std`` of the benign updates: a shift along ``-std``
small enough to hide inside the benign spread. Under Krum or the coordinate-wise median the
aggregate then lands a little along ``-std`` every round, and with one gradient per round
those small shifts add up. :func:`drift_along_minus_std` measures one round's share; the
server logs it in the round record (``drift``) with its running sum (docs/results.md).

The server knows who is malicious only because this is a simulation: the benign statistics
use the rows of the hospitals no attack names.
"""

from __future__ import annotations

import math

import torch

_CHUNK = 1 << 20  # columns per float64 block: no float64 copy of the whole update matrix


def drift_along_minus_std(updates: torch.Tensor, benign: list[int], aggregate: torch.Tensor) -> dict | None:
    """updates: Tensor[n, d] (what the rule aggregated); benign: the row indices of honest
    hospitals; aggregate: the rule's output Tensor[d].

    With ``m`` = the benign rows' coordinate-wise mean, ``s`` = their coordinate-wise standard
    deviation (unbiased, as ALIE computes it) and ``e = aggregate - m``:
    -> {"along_minus_std": <e, -s/||s||> (parameter units), "std_units": <e, -s>/||s||^2
    (ALIE's own update scores exactly z), "cosine": cos(e, -s), "deviation_norm": ||e||,
    "std_norm": ||s||, "benign": len(benign)}; None with fewer than 2 benign rows (no spread).
    Sums in float64."""
    if len(benign) < 2:
        return None
    rows = torch.as_tensor(benign, dtype=torch.long, device=updates.device)
    dot = std_sq = dev_sq = 0.0
    for j in range(0, updates.shape[1], _CHUNK):
        x = updates[:, j:j + _CHUNK].index_select(0, rows).double()
        mean, std = x.mean(dim=0), x.std(dim=0)
        dev = aggregate[j:j + _CHUNK].double() - mean
        dot += float(-(dev * std).sum())
        std_sq += float((std * std).sum())
        dev_sq += float((dev * dev).sum())
    std_norm, dev_norm = math.sqrt(std_sq), math.sqrt(dev_sq)
    along = dot / std_norm if std_norm > 0 else 0.0
    return {"along_minus_std": along, "std_units": along / std_norm if std_norm > 0 else 0.0,
            "cosine": along / dev_norm if dev_norm > 0 else 0.0,
            "deviation_norm": dev_norm, "std_norm": std_norm, "benign": len(benign)}

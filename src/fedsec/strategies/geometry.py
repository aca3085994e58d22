"""Pairwise geometry of one round's update matrix: squared distances and cosine similarities.

Every distance-based rule (Krum, Multi-Krum, Bulyan, RFA) and every direction-based rule
(FLAME, FoolsGold) starts from an ``n x n`` Gram matrix, so all of them cost one matrix
product over ``[n, d]`` instead of ``n^2`` passes over ``d``.
"""

from __future__ import annotations

import torch

# Columns per block when the Gram matrix is accumulated block by block: ~256 KiB per row
# keeps the centred copy of a block in cache instead of materialising a second [n, d] matrix.
_GRAM_BLOCK = 65536


def reference_row(updates: torch.Tensor) -> int:
    """Index of the row with the median L2 norm.

    updates: Tensor[n, d]. Used as the origin before computing distances through a Gram
    matrix: ``|x|^2 + |y|^2 - 2 x.y`` loses everything below ``eps * |x|^2``, so the origin
    must sit among the benign rows. The mean would be dragged away by one 1e6-scaled update;
    the median-norm row stays benign while fewer than half the rows are attackers.
    """
    norms = torch.linalg.vector_norm(updates, dim=1)
    return int(torch.argsort(norms)[(updates.shape[0] - 1) // 2])


def centered_gram(updates: torch.Tensor, origin: torch.Tensor | None = None) -> torch.Tensor:
    """Gram matrix of ``updates - origin``.

    updates: Tensor[n, d]; origin: Tensor[d] (default: the median-norm row).
    Returns Tensor[n, n] in float64 (the accumulation over d stays in the input dtype, the
    differences taken afterwards need the extra precision).
    """
    if origin is None:
        origin = updates[reference_row(updates)]
    n, d = updates.shape
    gram = torch.zeros(n, n, dtype=updates.dtype, device=updates.device)
    for start in range(0, d, _GRAM_BLOCK):
        block = updates[:, start : start + _GRAM_BLOCK] - origin[start : start + _GRAM_BLOCK]
        gram.addmm_(block, block.T)
    return gram.double()


def squared_distances(updates: torch.Tensor) -> torch.Tensor:
    """Pairwise squared Euclidean distances ``|u_i - u_j|^2``.

    updates: Tensor[n, d]. Returns Tensor[n, n] (float64), symmetric, zero diagonal, >= 0.
    """
    gram = centered_gram(updates)
    sq = gram.diagonal()
    dist = (sq[:, None] + sq[None, :] - 2.0 * gram).clamp_(min=0.0)
    dist.fill_diagonal_(0.0)
    return dist


def cosine_similarities(updates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairwise cosine similarities and the row norms.

    updates: Tensor[n, d]. Returns (cos: Tensor[n, n] float64 in [-1, 1], norms: Tensor[n]
    float64). A zero row has cosine 0 with every row, itself included: it points nowhere.
    """
    gram = (updates @ updates.T).double()
    norms = gram.diagonal().clamp(min=0.0).sqrt()
    denom = norms[:, None] * norms[None, :]
    cos = torch.where(denom > 0, gram / denom.clamp(min=torch.finfo(torch.float64).tiny), 0.0)
    return cos.clamp_(-1.0, 1.0), norms

"""Pairwise geometry of one round's update matrix: squared distances and cosine similarities.

Every distance-based rule (Krum, Multi-Krum, Bulyan, RFA) and every direction-based rule
(FLAME, FoolsGold) starts from an ``n x n`` Gram matrix, so all of them cost one matrix
product over ``[n, d]`` instead of ``n^2`` passes over ``d``.

Overflow. One finite float32 update of norm above ~1.8e19 has a squared norm beyond
float32's 3.4e38: inf, and then NaN in every distance and cosine it touches. Each product is
first accumulated in the updates' own dtype (fast: float32 BLAS); only when a result is not
finite is it accumulated again in float64, block by block. In float64 any finite float32
update is safe: its squared norm is at most d * (3.4e38)^2 ~ 1.2e77 * d, far below 1.8e308.
A non-finite entry only ever involves the huge row (entry (i, j) is a product of rows i and
j alone), so the benign entries of the fast path were exact to float32 precision anyway.
"""

from __future__ import annotations

import torch

# Columns per block when the Gram matrix is accumulated block by block: ~512 KiB per float64
# row keeps the centred copy of a block in cache instead of materialising a second [n, d]
# matrix.
_GRAM_BLOCK = 65536


def row_norms(updates: torch.Tensor) -> torch.Tensor:
    """L2 norm of each row (no overflow for any finite float32 row).

    updates: Tensor[n, d] -> Tensor[n] float64.
    """
    fast = torch.linalg.vector_norm(updates, dim=1).double()
    if bool(torch.isfinite(fast).all()):
        return fast
    n, d = updates.shape
    sq = torch.zeros(n, dtype=torch.float64, device=updates.device)
    for start in range(0, d, _GRAM_BLOCK):
        block = updates[:, start : start + _GRAM_BLOCK].double()
        sq += (block * block).sum(dim=1)
    return sq.sqrt()


def row_dots(updates: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """Dot product of each row with ``vector`` (float64 again when float32 overflows).

    updates: Tensor[n, d], vector: Tensor[d] -> Tensor[n] float64.
    """
    fast = (updates @ vector.to(updates.dtype)).double()
    if bool(torch.isfinite(fast).all()):
        return fast
    n, d = updates.shape
    out = torch.zeros(n, dtype=torch.float64, device=updates.device)
    for start in range(0, d, _GRAM_BLOCK):
        out += updates[:, start : start + _GRAM_BLOCK].double() @ vector[start : start + _GRAM_BLOCK].double()
    return out


def reference_row(updates: torch.Tensor) -> int:
    """Index of the row with the median L2 norm.

    updates: Tensor[n, d]. Used as the origin before computing distances through a Gram
    matrix: ``|x|^2 + |y|^2 - 2 x.y`` loses everything below ``eps * |x|^2``, so the origin
    must sit among the benign rows. The mean would be dragged away by one 1e6-scaled update;
    the median-norm row stays benign while fewer than half the rows are attackers.
    """
    norms = row_norms(updates)
    return int(torch.argsort(norms, stable=True)[(updates.shape[0] - 1) // 2])


def _accumulate_gram(updates: torch.Tensor, origin: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    n, d = updates.shape
    gram = torch.zeros(n, n, dtype=dtype, device=updates.device)
    for start in range(0, d, _GRAM_BLOCK):
        block = updates[:, start : start + _GRAM_BLOCK].to(dtype)  # a view when already dtype
        if origin is not None:
            block = block - origin[start : start + _GRAM_BLOCK].to(dtype)
        gram.addmm_(block, block.T)
    return gram


def gram64(updates: torch.Tensor, origin: torch.Tensor | None = None, exact: bool = False) -> torch.Tensor:
    """Gram matrix of ``updates - origin`` (origin default 0), returned in float64.

    updates: Tensor[n, d]; origin: Tensor[d] or None. Accumulated in the updates' dtype, and
    again in float64 when that overflowed (or always, with ``exact``). Returns Tensor[n, n].
    """
    if not exact and updates.dtype != torch.float64:
        fast = _accumulate_gram(updates, origin, updates.dtype).double()
        if bool(torch.isfinite(fast).all()):
            return fast
    return _accumulate_gram(updates, origin, torch.float64)


def centered_gram(updates: torch.Tensor, origin: torch.Tensor | None = None) -> torch.Tensor:
    """Gram matrix of ``updates - origin`` in float64.

    updates: Tensor[n, d]; origin: Tensor[d] (default: the median-norm row).
    Returns Tensor[n, n] float64.
    """
    if origin is None:
        origin = updates[reference_row(updates)]
    return gram64(updates, origin)


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
    gram = gram64(updates)
    norms = gram.diagonal().clamp(min=0.0).sqrt()
    # Divide by each norm in turn: the product of two norms of 1e40 would overflow even float64.
    safe = norms.clamp(min=torch.finfo(torch.float64).tiny)
    cos = (gram / safe[:, None]) / safe[None, :]
    cos = torch.where((norms[:, None] > 0) & (norms[None, :] > 0), cos, 0.0)
    return cos.clamp_(-1.0, 1.0), norms

"""How much a reconstruction leaks: PSNR, SSIM, batch matching, label recovery, image grids.

Every function takes tensors shaped like a :class:`fedsec.data.base.Split`'s ``x``: images
``[B, C, H, W]`` in [0, 1] or tabular records ``[B, F]``. Reconstruction attacks return their
batch in an arbitrary order, so scores are computed after :func:`match_reconstructions`
(the Hungarian assignment on pairwise PSNR, as in breaching).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

# PSNR of an exact copy is +inf; inside the assignment cost matrix it is capped here so
# that the Hungarian solver gets finite numbers (an MSE of 1e-10 on [0, 1] data).
_PSNR_CAP_DB = 100.0


def _per_sample_mse(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    if x.shape != ref.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} vs {tuple(ref.shape)}")
    diff = x.detach().double() - ref.detach().double().to(x.device)
    return diff.reshape(diff.shape[0], -1).pow(2).mean(dim=1)


def psnr(x: torch.Tensor, ref: torch.Tensor, data_range: float = 1.0, reduction: str = "mean"):
    """Peak signal-to-noise ratio ``10 log10(data_range^2 / MSE)`` in dB, per sample.

    x, ref: ``[B, ...]`` (a batch; pass ``x[None]`` for one image). reduction: ``"mean"``
    returns a float, the mean of the per-image PSNRs (breaching's convention, not the PSNR
    of the pooled MSE); ``"none"`` returns the per-image ``Tensor[B]`` (float64). An exact
    copy gives ``inf``.
    """
    mse = _per_sample_mse(x, ref)
    values = 10.0 * torch.log10(torch.as_tensor(data_range, dtype=torch.float64) ** 2 / mse)
    if reduction == "none":
        return values
    if reduction == "mean":
        return float(values.mean())
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def ssim(x: torch.Tensor, ref: torch.Tensor, data_range: float = 1.0, reduction: str = "mean"):
    """Structural similarity of images ``[B, C, H, W]`` through MONAI's ``SSIMMetric``
    (spatial_dims=2, Gaussian window 11 / sigma 1.5, shrunk to the largest odd size that fits
    images smaller than 11 px). reduction as in :func:`psnr`. Identical images give 1.0.
    """
    from monai.metrics import SSIMMetric  # monai import costs ~3 s: only when scoring

    if x.dim() != 4:
        raise ValueError(f"ssim needs images [B, C, H, W], got {tuple(x.shape)}")
    if x.shape != ref.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} vs {tuple(ref.shape)}")
    win = min(11, int(x.shape[-1]), int(x.shape[-2]))
    win -= 1 - win % 2  # odd window
    metric = SSIMMetric(spatial_dims=2, data_range=data_range, win_size=win)
    values = metric(y_pred=x.detach().float().cpu(), y=ref.detach().float().cpu()).reshape(-1).double()
    if reduction == "none":
        return values
    if reduction == "mean":
        return float(values.mean())
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def pairwise_psnr(recon: torch.Tensor, truth: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """``Tensor[R, T]``: PSNR (dB, capped at 100) of every reconstruction against every truth."""
    r = recon.detach().double().reshape(recon.shape[0], -1)
    t = truth.detach().double().to(r.device).reshape(truth.shape[0], -1)
    if r.shape[1] != t.shape[1]:
        raise ValueError(f"sample shapes differ: {tuple(recon.shape[1:])} vs {tuple(truth.shape[1:])}")
    mse = torch.cdist(r, t).pow(2) / r.shape[1]
    return (10.0 * torch.log10(data_range**2 / mse.clamp_min(1e-300))).clamp_max(_PSNR_CAP_DB)


def match_reconstructions(recon: torch.Tensor, truth: torch.Tensor, data_range: float = 1.0,
                          metric: str = "psnr") -> tuple[torch.Tensor, torch.Tensor]:
    """Pair reconstructions with ground-truth samples so that batch order does not matter.

    recon ``[R, ...]``, truth ``[T, ...]``; returns ``(recon_index, truth_index)``, two
    ``LongTensor[min(R, T)]`` with ``truth_index`` ascending, such that
    ``recon[recon_index][k]`` is the reconstruction of ``truth[truth_index][k]``. The
    assignment maximises the summed pairwise PSNR (``metric="psnr"``) or minimises the
    summed MSE (``metric="mse"``, for standardised tabular records where a peak value has
    no meaning) with scipy's Hungarian solver.
    """
    from scipy.optimize import linear_sum_assignment

    if metric == "psnr":
        cost = -pairwise_psnr(recon, truth, data_range)
    elif metric == "mse":
        r = recon.detach().double().reshape(recon.shape[0], -1)
        t = truth.detach().double().to(r.device).reshape(truth.shape[0], -1)
        cost = torch.cdist(r, t).pow(2) / r.shape[1]
    else:
        raise ValueError(f"metric must be 'psnr' or 'mse', got {metric!r}")
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    order = np.argsort(cols)
    return torch.as_tensor(rows[order], dtype=torch.long), torch.as_tensor(cols[order], dtype=torch.long)


def label_recovery_accuracy(predicted: torch.Tensor, true: torch.Tensor) -> float:
    """Fraction of the true labels recovered, order-free: the multiset overlap
    ``sum_c min(#pred_c, #true_c) / len(true)``. predicted, true: ``LongTensor[B]``
    (any lengths; a batch-label attack recovers counts per class, not which image has which).
    """
    p = torch.as_tensor(predicted).long().reshape(-1).cpu()
    t = torch.as_tensor(true).long().reshape(-1).cpu()
    if t.numel() == 0:
        return float("nan")
    k = int(max(p.max().item() if p.numel() else 0, t.max().item())) + 1
    overlap = torch.minimum(torch.bincount(p, minlength=k), torch.bincount(t, minlength=k)).sum()
    return float(overlap) / t.numel()


def save_grid(originals: torch.Tensor, reconstructions: torch.Tensor, path: str | Path,
              titles: list[str] | None = None, max_images: int = 16) -> Path:
    """Write a PNG: originals ``[B, C, H, W]`` on the top row, reconstructions (same order,
    i.e. after :func:`match_reconstructions`) below. ``titles``: one caption per column
    (e.g. PSNR). Uses matplotlib's Agg canvas directly, so the global backend is untouched.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [originals[:max_images], reconstructions[:max_images]]
    n = max(int(r.shape[0]) for r in rows)
    fig = Figure(figsize=(1.4 * n + 0.6, 3.1), dpi=120)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, n, squeeze=False)
    for i, (row, label) in enumerate(zip(rows, ["original", "reconstruction"])):
        for j in range(n):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= row.shape[0]:
                ax.axis("off")
                continue
            img = row[j].detach().float().cpu().clamp(0, 1)
            if img.dim() == 3 and img.shape[0] == 1:
                ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
            elif img.dim() == 3:
                ax.imshow(img[:3].permute(1, 2, 0).numpy())
            else:
                ax.imshow(img.reshape(1, -1).numpy(), cmap="gray", vmin=0, vmax=1, aspect="auto")
            if j == 0:
                ax.set_ylabel(label, fontsize=8)
            if i == 1 and titles is not None and j < len(titles):
                ax.set_title(titles[j], fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    return path


def tabular_errors(recon: torch.Tensor, truth: torch.Tensor, tol: float = 0.1) -> dict:
    """Scores for reconstructed tabular records ``[R, F]`` against ``[T, F]`` (standardised):
    after MSE matching, ``feature_abs_error`` (``Tensor[F]``, mean over matched records),
    ``mean_abs_error`` (float), ``records_recovered`` (matched records whose every feature is
    within ``tol`` standardised units) and ``records_total`` (len(truth)).
    """
    ri, ti = match_reconstructions(recon, truth, metric="mse")
    err = (recon.detach().double().cpu()[ri] - truth.detach().double().cpu()[ti]).abs()
    return {
        "feature_abs_error": err.mean(dim=0),
        "mean_abs_error": float(err.mean()) if err.numel() else math.nan,
        "records_recovered": int((err.max(dim=1).values <= tol).sum()) if err.numel() else 0,
        "records_total": int(truth.shape[0]),
    }

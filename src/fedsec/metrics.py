"""Clinical metrics from per-patient scores: loss, accuracy, AUROC, sensitivity,
specificity and balanced accuracy.
AUROC is the exact Mann-Whitney statistic (``binary_auroc``), equal to MONAI's
``compute_roc_auc`` and scikit-learn's ``roc_auc_score``.

Binary tasks: scores are P(class 1) and the default threshold is 0.5. Multi-class tasks:
scores are softmax rows; sensitivity / specificity / AUROC are one-vs-rest macro averages.
Multi-label tasks: per-label sigmoid scores, macro over labels.
"""

from __future__ import annotations

import math

import torch

METRIC_KEYS = ("loss", "accuracy", "auroc", "sensitivity", "specificity", "balanced_accuracy")


def binary_auroc(scores: torch.Tensor, truth: torch.Tensor) -> float:
    """AUROC of one score column against 0/1 truth: the Mann-Whitney U statistic over
    n_pos * n_neg, tied scores counting one half (midranks). NaN unless both classes occur.

    Written here rather than taken from MONAI (``monai.metrics.compute_roc_auc``) or
    scikit-learn on purpose: importing either costs 2.5-4.5 s of a two-hospital CI run whose
    whole target is 6 s (docs/engines.md, "Start-up"), and both compute this same exact
    statistic. tests/unit/test_metrics.py checks equality with both on random scores with
    ties."""
    s = scores.detach().reshape(-1).double().cpu()
    t = truth.detach().reshape(-1).cpu() > 0.5
    n_pos = int(t.sum())
    n_neg = int(t.numel()) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = torch.unique(s, sorted=True, return_inverse=True, return_counts=True)
    end = counts.cumsum(0).double()  # 1-based rank of each distinct value's last copy
    midrank = end - (counts.double() - 1.0) / 2.0
    rank_sum = float(midrank[inverse][t].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def _auroc(scores: torch.Tensor, onehot: torch.Tensor) -> float:
    """Macro AUROC over columns with both classes present; NaN if none has both."""
    cols = [k for k in range(onehot.shape[1]) if 0 < onehot[:, k].sum() < onehot.shape[0]]
    if not cols:
        return float("nan")
    vals = [binary_auroc(scores[:, k], onehot[:, k]) for k in cols]
    return sum(vals) / len(vals)


def _sens_spec(pred: torch.Tensor, truth: torch.Tensor) -> tuple[float, float]:
    """pred/truth: bool [N, K] one-vs-rest decisions; macro over columns that have positives
    (sensitivity) / negatives (specificity)."""
    sens, spec = [], []
    for k in range(truth.shape[1]):
        t, p = truth[:, k], pred[:, k]
        pos, neg = int(t.sum()), int((~t).sum())
        if pos:
            sens.append(int((p & t).sum()) / pos)
        if neg:
            spec.append(int((~p & ~t).sum()) / neg)
    mean = lambda v: sum(v) / len(v) if v else float("nan")  # noqa: E731
    return mean(sens), mean(spec)


def classification_metrics(scores: torch.Tensor, labels: torch.Tensor, loss: float | None = None,
                           multilabel: bool = False, threshold: float = 0.5) -> dict[str, float]:
    """scores: [N, K] probabilities (softmax rows, or sigmoid per label if multilabel).
    labels: int [N] class indices, or float [N, K] 0/1 if multilabel.
    Returns the METRIC_KEYS (loss passed through; NaN when not computable)."""
    scores = scores.detach().float().cpu()
    n, k = scores.shape
    out = {"loss": float(loss) if loss is not None else float("nan")}
    if n == 0:
        return {key: float("nan") for key in METRIC_KEYS}
    if multilabel:
        truth = labels.float().cpu() > 0.5
        pred = scores >= threshold
        out["accuracy"] = float((pred == truth).float().mean())
        out["auroc"] = _auroc(scores, truth.float())
        sens, spec = _sens_spec(pred, truth)
    else:
        labels = labels.long().cpu()
        onehot = torch.nn.functional.one_hot(labels, k).bool()
        if k == 2:
            pred1 = scores[:, 1] >= threshold
            out["accuracy"] = float((pred1.long() == labels).float().mean())
            out["auroc"] = _auroc(scores[:, 1:2], onehot[:, 1:2].float())
            sens, spec = _sens_spec(pred1[:, None], onehot[:, 1:2])
        else:
            pred_cls = scores.argmax(1)
            out["accuracy"] = float((pred_cls == labels).float().mean())
            out["auroc"] = _auroc(scores, onehot.float())
            sens, spec = _sens_spec(torch.nn.functional.one_hot(pred_cls, k).bool(), onehot)
    out["sensitivity"], out["specificity"] = sens, spec
    if not multilabel and k > 2:
        out["balanced_accuracy"] = sens  # mean per-class recall, the usual multi-class definition
    else:
        out["balanced_accuracy"] = (sens + spec) / 2 if not (math.isnan(sens) or math.isnan(spec)) else float("nan")
    return out


def undefined_reasons(labels: torch.Tensor, metrics: dict, multilabel: bool = False) -> dict[str, str]:
    """metric -> why it is undefined (NaN) on these test records, for each NaN metric of
    ``metrics`` (``classification_metrics``' result) but the loss. A hospital whose test
    records are all one class has no AUROC (nothing to rank against), a binary task's
    specificity needs negatives and its sensitivity positives; balanced accuracy needs both.
    -> {} when every metric is defined."""
    nan = [k for k, v in metrics.items() if k != "loss" and (v is None or (isinstance(v, float) and math.isnan(v)))]
    if not nan:
        return {}
    n = int(labels.shape[0])
    if n == 0:
        return {k: "it has no test records" for k in nan}
    if multilabel:
        truth = labels.float().cpu() > 0.5
        mixed = [k for k in range(truth.shape[1]) if 0 < int(truth[:, k].sum()) < n]
        why = (f"none of its {n} test records' labels has both present and absent cases" if not mixed
               else f"its {n} test records lack cases for this metric")
        return {k: why for k in nan}
    classes = sorted(int(c) for c in torch.unique(labels.long().cpu()))
    if len(classes) == 1:
        why = f"its {n} test records are all one class ({classes[0]})"
    else:
        why = f"its {n} test records hold only classes {classes}"
    out = {k: why for k in nan}
    if "sensitivity" in out and classes == [0]:
        out["sensitivity"] = f"its {n} test records are all one class (0): no positive record to detect"
    if "specificity" in out and classes == [1]:
        out["specificity"] = f"its {n} test records are all one class (1): no negative record to clear"
    return out

"""EHR tables -> a FederatedDataset: per-hospital fixed train/test split, standardisation
fitted on training rows only (never on test rows), one hospital per site.

The heart-disease task and a user's own CSV (``ehr_csv``) both go through
:func:`federate_table`, so the same code serves the embedded data and consortium data.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import torch

from fedsec.data.base import FederatedDataset, Split
from fedsec.errors import DataError

# The split is part of the dataset, not of the experiment: it does not change with the
# scenario seed, so runs with different seeds are scored on the same patients.
SPLIT_SEED = 42


def train_test_indices(n: int, test_fraction: float, split_seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """A fixed random split of ``n`` rows; ``ceil(test_fraction * n)`` rows go to test
    (sklearn's convention: on the heart data, FLamby's per-centre sizes, not its rows)."""
    n_test = int(math.ceil(test_fraction * n))
    if n_test >= n or n_test < 1:
        raise DataError(f"a hospital with {n} rows cannot be split with test_fraction={test_fraction}")
    perm = np.random.default_rng(split_seed).permutation(n)
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def federate_table(
    features: list[np.ndarray],
    labels: list[np.ndarray],
    hospitals: list[str],
    feature_names: list[str],
    class_names: list[str],
    test_fraction: float = 0.34,
    normalize: str = "pooled",
    split_seed: int = SPLIT_SEED,
    feature_stats: dict | None = None,
) -> FederatedDataset:
    """features[i]: float [n_i, F] of hospital i (no missing values); labels[i]: int [n_i].

    normalize: 'pooled' standardises with the mean/std of all hospitals' *training* rows
    (what a consortium computes once with a secure sum), 'site' with each hospital's own
    training rows (population std; FLamby's exact per-centre variant is the heart task's
    ``preprocessing: flamby``, :mod:`fedsec.data.heart`), 'none' leaves values as they are.
    feature_stats: ``{"mean": [F], "std": [F]}``, the pooled statistics given (a deployment
    node holding only its own rows gets them from the server, which combined every
    hospital's moments: :func:`pooled_moments`); 'pooled' then uses them as they are.
    The dataset's ``info["train_moments"]`` holds each hospital's (count, mean, M2) of its
    raw training rows, the only thing a hospital shares for pooled statistics.
    """
    if normalize not in ("pooled", "site", "none"):
        raise DataError(f"normalize must be 'pooled', 'site' or 'none', got '{normalize}'")
    parts = []
    for x, y, name in zip(features, labels, hospitals):
        if len(x) < 2:
            raise DataError(f"hospital '{name}' has {len(x)} usable rows; at least 2 are needed")
        tr, te = train_test_indices(len(x), test_fraction, split_seed)
        parts.append((x[tr], y[tr], x[te], y[te]))
    moments = [moments_of(p[0]) for p in parts]
    if normalize == "pooled":
        if feature_stats is not None:
            mean, std = _given_stats(feature_stats, features[0].shape[1])
        else:
            mean, std = stats_from_moments(moments)
        stats = [(mean, std)] * len(parts)
    elif normalize == "site":
        stats = [(p[0].mean(0), p[0].std(0)) for p in parts]
    else:
        stats = [(np.zeros(features[0].shape[1]), np.ones(features[0].shape[1]))] * len(parts)
    train, test = [], []
    for (xtr, ytr, xte, yte), (mu, sd) in zip(parts, stats):
        sd = np.where(sd > 1e-8, sd, 1.0)  # a constant column (e.g. chol at Switzerland) stays 0
        train.append(Split(torch.tensor((xtr - mu) / sd, dtype=torch.float32), torch.tensor(ytr, dtype=torch.long)))
        test.append(Split(torch.tensor((xte - mu) / sd, dtype=torch.float32), torch.tensor(yte, dtype=torch.long)))
    return FederatedDataset(
        hospitals=list(hospitals), train=train, test=test, num_classes=len(class_names),
        input_shape=(len(feature_names),), class_names=list(class_names),
        feature_names=list(feature_names), modality="tabular",
        info={"train_moments": [{"n": n, "mean": m.tolist(), "m2": m2.tolist()} for n, m, m2 in moments]},
    )


def moments_of(x: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """Rows [n, F] -> (n, mean [F], M2 [F]: the sum of squared deviations from the mean)."""
    mean = x.mean(0)
    return len(x), mean, ((x - mean) ** 2).sum(0)


def stats_from_moments(moments) -> tuple[np.ndarray, np.ndarray]:
    """Every hospital's (n, mean, M2), in hospital order -> the pooled (mean, population std),
    combined pairwise (Chan, Golub & LeVeque 1979), so that the server of a deployment, which
    sees only these moments, computes exactly what a simulation holding every row does."""
    n, mean, m2 = 0, None, None
    for nb, mb, m2b in moments:
        mb, m2b = np.asarray(mb, dtype=np.float64), np.asarray(m2b, dtype=np.float64)
        if mean is None:
            n, mean, m2 = int(nb), mb.copy(), m2b.copy()
            continue
        total = n + int(nb)
        delta = mb - mean
        mean = mean + delta * (int(nb) / total)
        m2 = m2 + m2b + delta ** 2 * (n * int(nb) / total)
        n = total
    return mean, np.sqrt(m2 / n)


def _given_stats(stats: dict, num_features: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        mean = np.asarray(stats["mean"], dtype=np.float64)
        std = np.asarray(stats["std"], dtype=np.float64)
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(f"task.options.feature_stats: expected {{mean: [...], std: [...]}} ({err})") from None
    if mean.shape != (num_features,) or std.shape != (num_features,):
        raise DataError(f"task.options.feature_stats: mean and std need {num_features} values each, got "
                        f"{mean.size} and {std.size}")
    if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std >= 0).all()):
        raise DataError("task.options.feature_stats: values must be finite and std >= 0")
    return mean, std


def read_ehr_csv(
    path: str | Path,
    hospital_column: str = "hospital",
    label_column: str = "label",
    feature_columns: list[str] | None = None,
    missing: str = "drop",
    positive_labels: list | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray], list[str], list[str], list[str]]:
    """Read a user's EHR table: one row per patient, a hospital column, a label column and
    numeric feature columns (default: every other column). Empty cells, 'NA', 'NaN' and '?'
    are missing; ``missing='drop'`` drops such rows, ``'mean'`` fills with the hospital's
    column mean over its rows (documented leakage-free only if test rows have none missing).

    Returns per-hospital features, labels, hospital names (in first-seen order), feature
    names and class names. ``positive_labels`` turns the label into binary (value in list -> 1).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: EHR CSV file not found")
    with path.open(newline="") as fh:
        reader = csv.reader(fh)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise DataError(f"{path}: the file is empty; expected a header row") from None
        rows = [r for r in reader if r and any(c.strip() for c in r)]
    for col, what in ((hospital_column, "hospital_column"), (label_column, "label_column")):
        if col not in header:
            raise DataError(f"{path}: no column '{col}' (task.options.{what}); columns are {', '.join(header)}")
    if feature_columns is None:
        feature_columns = [h for h in header if h not in (hospital_column, label_column)]
    for col in feature_columns:
        if col not in header:
            raise DataError(f"{path}: feature column '{col}' not in the header ({', '.join(header)})")
    if not feature_columns:
        raise DataError(f"{path}: no feature columns besides '{hospital_column}' and '{label_column}'")
    hi, li = header.index(hospital_column), header.index(label_column)
    fi = [header.index(c) for c in feature_columns]
    missing_tokens = {"", "na", "nan", "?", "null", "none"}

    raw_labels = [r[li].strip() for r in rows]
    if positive_labels is not None:
        pos = {str(p) for p in positive_labels}
        label_values = ["0", "1"]
        label_map = None
    else:
        label_values = sorted(set(raw_labels), key=lambda v: (not _is_number(v), float(v) if _is_number(v) else 0, v))
        label_map = {v: i for i, v in enumerate(label_values)}
    if len(label_values) < 2:
        raise DataError(f"{path}: column '{label_column}' has a single value; a classifier needs two classes")

    by_site: dict[str, tuple[list, list]] = {}
    for lineno, (r, lab) in enumerate(zip(rows, raw_labels), start=2):
        if len(r) != len(header):
            raise DataError(f"{path}: line {lineno} has {len(r)} fields, the header has {len(header)}")
        vals = []
        for j, c in zip(fi, feature_columns):
            cell = r[j].strip()
            if cell.lower() in missing_tokens:
                vals.append(np.nan)
            elif _is_number(cell):
                vals.append(float(cell))
            else:
                raise DataError(f"{path}: line {lineno}, column '{c}': '{cell}' is not a number")
        y = (1 if lab in pos else 0) if positive_labels is not None else label_map[lab]
        xs, ys = by_site.setdefault(r[hi].strip(), ([], []))
        xs.append(vals)
        ys.append(y)

    feats, labs, names = [], [], []
    for site, (xs, ys) in by_site.items():
        x = np.asarray(xs, dtype=np.float64)
        y = np.asarray(ys, dtype=np.int64)
        if missing == "drop":
            keep = ~np.isnan(x).any(1)
            x, y = x[keep], y[keep]
        elif missing == "mean":
            col_mean = np.nanmean(np.where(np.isnan(x).all(0, keepdims=True), 0.0, x), axis=0)
            x = np.where(np.isnan(x), col_mean, x)
        else:
            raise DataError(f"missing must be 'drop' or 'mean', got '{missing}' (task.options.missing)")
        feats.append(x)
        labs.append(y)
        names.append(site)
    return feats, labs, names, list(feature_columns), [str(v) for v in label_values]


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False

"""UCI Heart Disease (Cleveland, Hungary, Switzerland, VA Long Beach), the embedded EHR default.

Two preprocessings (``task.options.preprocessing``); both drop ``slope``, ``ca`` and ``thal``
(mostly missing outside Cleveland), drop rows with a missing value in the 10 remaining
features (740 of 920 rows remain), use the binary target ``num > 0`` and keep
``chol == 0`` (every Switzerland row) as recorded.

``fedsec`` (the default): the 10 features as numbers (``cp`` and ``restecg`` as codes), a
fixed per-hospital random split with ceil(0.34 n) test rows (seed 42, not stratified), and
standardisation with statistics of training rows only (``normalize``: pooled over the
hospitals by default). Its split sizes equal FLamby's, but not its rows.

``flamby``: exactly FLamby's Fed-Heart-Disease (``flamby/datasets/fed_heart_disease/
dataset.py``, owkin/FLamby): ``cp`` and ``restecg`` one-hot encoded with the first level
dropped (13 features), each hospital split by scikit-learn's ``train_test_split``
(train_size 0.66, random_state 43, stratified on the label when both classes have more
than 2 rows), features standardised per hospital with its training rows' mean and
unbiased std, computed in float32, ``(x - mean) / (std + 1e-9)``.

Data: UCI Machine Learning Repository, CC BY 4.0 (Janosi, Steinbrunn, Pfisterer, Detrano,
1988); see files/heart_disease/heart-disease.names and docs/data.md.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fedsec.data.base import FederatedDataset, Split
from fedsec.data.tabular import _given_stats, federate_table, moments_of
from fedsec.errors import DataError

FILES_DIR = Path(__file__).parent / "files" / "heart_disease"
SITES = {
    "cleveland": "processed.cleveland.data",
    "hungary": "processed.hungarian.data",
    "switzerland": "processed.switzerland.data",
    "va": "processed.va.data",
}
COLUMNS = ["age", "sex", "cp", "trestbps", "chol", "fbs", "restecg", "thalach", "exang",
           "oldpeak", "slope", "ca", "thal", "num"]
DROPPED = ("slope", "ca", "thal")
FEATURES = [c for c in COLUMNS[:-1] if c not in DROPPED]
CLASS_NAMES = ["no disease", "disease"]
PREPROCESSINGS = ("fedsec", "flamby")

# FLamby: pandas.get_dummies(columns=[cp, restecg], drop_first=True) on the four hospitals'
# rows together. Its levels are those of the UCI data dictionary (cp 1-4, restecg 0-2), all
# present in the pooled rows, so fixing them here gives the same columns to a node that
# holds only its own hospital's file. The dummies follow the 8 other features, as there.
FLAMBY_ONE_HOT = {"cp": (1.0, 2.0, 3.0, 4.0), "restecg": (0.0, 1.0, 2.0)}
FLAMBY_FEATURES = ([c for c in FEATURES if c not in FLAMBY_ONE_HOT]
                   + [f"{c}_{int(v)}" for c, levels in FLAMBY_ONE_HOT.items() for v in levels[1:]])
FLAMBY_TRAIN_FRACTION = 0.66
FLAMBY_SPLIT_SEED = 43


def read_site(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One UCI 'processed' file -> (features [n, 10] float, label [n] int 0/1), rows with a
    missing ('?') feature dropped."""
    if not path.is_file():
        raise DataError(f"{path}: heart-disease file not found (expected the UCI 'processed' layout)")
    keep = [COLUMNS.index(c) for c in FEATURES]
    xs, ys = [], []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        cells = [c.strip() for c in line.split(",")]
        if len(cells) != len(COLUMNS):
            raise DataError(f"{path}: line {lineno} has {len(cells)} values, expected {len(COLUMNS)}")
        picked = [cells[i] for i in keep]
        if "?" in picked or cells[-1] == "?":
            continue
        xs.append([float(c) for c in picked])
        ys.append(int(float(cells[-1]) > 0))
    return np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.int64)


def load_heart_disease(sites: list[str] | None = None, data_dir: str | Path | None = None,
                       normalize: str | None = None, test_fraction: float | None = None,
                       feature_stats: dict | None = None, preprocessing: str = "fedsec") -> FederatedDataset:
    """The natural four-hospital split (or the named ``sites``), one hospital per source.

    preprocessing: 'fedsec' (default) or 'flamby' (see the module's doc). normalize: for
    'fedsec' 'pooled' (default), 'site' or 'none'; for 'flamby' 'site' (default, FLamby's
    federated datasets), 'pooled' (FLamby's pooled dataset, its centralised baseline) or
    'none'."""
    if preprocessing not in PREPROCESSINGS:
        raise DataError(f"task.options.preprocessing must be one of {', '.join(PREPROCESSINGS)}, "
                        f"got '{preprocessing}'")
    data_dir = Path(data_dir) if data_dir else FILES_DIR
    sites = list(sites) if sites else list(SITES)
    feats, labs = [], []
    for s in sites:
        if s not in SITES:
            raise DataError(f"unknown heart-disease site '{s}'; sites are {', '.join(SITES)}")
        x, y = read_site(data_dir / SITES[s])
        feats.append(x)
        labs.append(y)
    if preprocessing == "flamby":
        if test_fraction is not None:
            raise DataError("task.options.test_fraction: preprocessing 'flamby' uses FLamby's fixed split "
                            f"(train_size {FLAMBY_TRAIN_FRACTION}); leave test_fraction unset")
        return flamby_federate(feats, labs, sites, normalize or "site", feature_stats)
    return federate_table(feats, labs, sites, FEATURES, CLASS_NAMES,
                          test_fraction=0.34 if test_fraction is None else test_fraction,
                          normalize=normalize or "pooled", feature_stats=feature_stats)


def flamby_encode(x: np.ndarray, where: str = "") -> np.ndarray:
    """[n, 10] rows in FEATURES order -> [n, 13] in FLAMBY_FEATURES order (one-hot cp and
    restecg, first level dropped)."""
    plain = x[:, [FEATURES.index(c) for c in FEATURES if c not in FLAMBY_ONE_HOT]]
    dummies = []
    for col, levels in FLAMBY_ONE_HOT.items():
        v = x[:, FEATURES.index(col)]
        odd = sorted(set(v.tolist()) - set(levels))
        if odd:
            raise DataError(f"{where}column '{col}' has value(s) {odd}; the UCI codes are "
                            f"{', '.join(str(int(lv)) for lv in levels)}")
        dummies += [(v == lv).astype(np.float64)[:, None] for lv in levels[1:]]
    return np.concatenate([plain] + dummies, axis=1)


def flamby_split(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FLamby's split of one hospital's rows (in file order) -> sorted (train, test) indices."""
    from sklearn.model_selection import train_test_split

    levels = np.unique(y)
    stratify = y if len(levels) > 1 and all((y == lv).sum() > 2 for lv in levels) else None
    tr, te = train_test_split(np.arange(len(y)), test_size=1.0 - FLAMBY_TRAIN_FRACTION,
                              train_size=FLAMBY_TRAIN_FRACTION, random_state=FLAMBY_SPLIT_SEED,
                              shuffle=True, stratify=stratify)
    return np.sort(tr), np.sort(te)


def flamby_federate(features: list[np.ndarray], labels: list[np.ndarray], hospitals: list[str],
                    normalize: str = "site", feature_stats: dict | None = None) -> FederatedDataset:
    """FLamby's Fed-Heart-Disease from each hospital's raw rows (see the module's doc).

    normalize 'site' needs no other hospital's data (a deployment node standardises with
    its own training rows; it shares no moments, so the server pools nothing). 'pooled'
    uses the training rows of every hospital given, or ``feature_stats`` (a deployment's
    server computes them from the hospitals' moments: population std, where FLamby's is
    unbiased, a factor sqrt(n / (n - 1)) apart, 0.1 % for the 486 training rows)."""
    if normalize not in ("site", "pooled", "none"):
        raise DataError(f"task.options.normalize must be 'site', 'pooled' or 'none', got '{normalize}'")
    parts = []
    for x, y, name in zip(features, labels, hospitals):
        if len(x) < 3:
            raise DataError(f"hospital '{name}' has {len(x)} usable rows; FLamby's split needs at least 3")
        x13 = flamby_encode(x, where=f"hospital '{name}': ")
        tr, te = flamby_split(y)
        # float32 from here on, as FLamby's tensors: its statistics are float32 torch reductions
        parts.append((torch.tensor(x13[tr], dtype=torch.float32), torch.tensor(y[tr]),
                      torch.tensor(x13[te], dtype=torch.float32), torch.tensor(y[te])))
    nf = len(FLAMBY_FEATURES)
    if normalize == "site":
        stats = [(p[0].mean(0), p[0].std(0)) for p in parts]  # torch's std is unbiased, as FLamby's
    elif normalize == "pooled":
        if feature_stats is not None:
            mean, std = _given_stats(feature_stats, nf)
            mean, std = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
        else:
            pooled = torch.cat([p[0] for p in parts])
            mean, std = pooled.mean(0), pooled.std(0)
        stats = [(mean, std)] * len(parts)
    else:
        stats = [None] * len(parts)
    train, test = [], []
    for (xtr, ytr, xte, yte), ms in zip(parts, stats):
        if ms is not None:
            # FLamby adds 1e-9 to the std: a column constant in a hospital's training rows
            # (chol at Switzerland) is 0 there, and a test row that differs gets a huge value.
            mu, sd = ms
            xtr, xte = (xtr - mu) / (sd + 1e-9), (xte - mu) / (sd + 1e-9)
        train.append(Split(xtr, ytr.long()))
        test.append(Split(xte, yte.long()))
    info = {"preprocessing": "flamby", "normalize": normalize}
    if normalize == "pooled":
        info["train_moments"] = [{"n": n, "mean": m.tolist(), "m2": m2.tolist()}
                                 for n, m, m2 in (moments_of(p[0].double().numpy()) for p in parts)]
    return FederatedDataset(
        hospitals=list(hospitals), train=train, test=test, num_classes=len(CLASS_NAMES),
        input_shape=(nf,), class_names=list(CLASS_NAMES), feature_names=list(FLAMBY_FEATURES),
        modality="tabular", info=info,
    )

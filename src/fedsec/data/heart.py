"""UCI Heart Disease (Cleveland, Hungary, Switzerland, VA Long Beach), the embedded EHR default.

Preprocessing follows FLamby's Fed-Heart-Disease so results compare with its benchmark:
drop ``slope``, ``ca`` and ``thal`` (mostly missing outside Cleveland), drop rows with a
missing value in the 10 remaining features (740 of 920 rows remain), binary target
``num > 0``, a fixed per-hospital split with ceil(0.34 n) test rows (199/104, 172/89,
30/16, 85/45), features standardised with statistics of training rows only.
``chol == 0`` (every Switzerland row) is kept as recorded, as FLamby does.

Data: UCI Machine Learning Repository, CC BY 4.0 (Janosi, Steinbrunn, Pfisterer, Detrano,
1988); see files/heart_disease/heart-disease.names and docs/data.md.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedsec.data.base import FederatedDataset
from fedsec.data.tabular import federate_table
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
                       normalize: str = "pooled", test_fraction: float = 0.34,
                       feature_stats: dict | None = None) -> FederatedDataset:
    """The natural four-hospital split (or the named ``sites``), one hospital per source."""
    data_dir = Path(data_dir) if data_dir else FILES_DIR
    sites = list(sites) if sites else list(SITES)
    feats, labs = [], []
    for s in sites:
        if s not in SITES:
            raise DataError(f"unknown heart-disease site '{s}'; sites are {', '.join(SITES)}")
        x, y = read_site(data_dir / SITES[s])
        feats.append(x)
        labs.append(y)
    return federate_table(feats, labs, sites, FEATURES, ["no disease", "disease"],
                          test_fraction=test_fraction, normalize=normalize, feature_stats=feature_stats)

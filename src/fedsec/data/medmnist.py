"""MedMNIST v2 2D files read from disk (never downloaded).

A MedMNIST v2 ``.npz`` (what the ``medmnist`` package saves as ``{flag}.npz``, or
``{flag}_64.npz`` / ``_128`` / ``_224`` for the larger releases) holds six arrays:
``train_images``, ``train_labels``, ``val_images``, ``val_labels``, ``test_images``,
``test_labels``. Images are uint8 ``[N, H, W]`` (grayscale) or ``[N, H, W, 3]`` (RGB);
labels are ``[N, 1]`` class indices, or ``[N, K]`` 0/1 columns for a multi-label task
(ChestMNIST: 14 findings).

The embedded default is PneumoniaMNIST (paediatric chest X-rays of Kermany et al. 2018,
resized by MedMNIST v2, Yang et al. 2023; CC BY 4.0): label 0 normal, 1 pneumonia.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from fedsec.data.base import Split
from fedsec.errors import DataError

EMBEDDED_PNEUMONIA = Path(__file__).resolve().parent / "files" / "medmnist" / "pneumoniamnist.npz"
"""PneumoniaMNIST 28x28 (train 4708 / val 524 / test 624), shipped inside the package."""

SPLITS = ("train", "val", "test")

# Label names from the MedMNIST v2 release (medmnist/info.py), keyed by the flag that
# starts the file name. Multi-class lists are indexed by class; ChestMNIST's list is
# indexed by label column.
MEDMNIST_CLASS_NAMES: dict[str, list[str]] = {
    "pneumoniamnist": ["normal", "pneumonia"],
    "chestmnist": [
        "atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule",
        "pneumonia", "pneumothorax", "consolidation", "edema", "emphysema", "fibrosis",
        "pleural", "hernia",
    ],
    "breastmnist": ["malignant", "normal, benign"],
    "pathmnist": [
        "adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
        "normal colon mucosa", "cancer-associated stroma", "colorectal adenocarcinoma epithelium",
    ],
    "dermamnist": [
        "actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
        "benign keratosis-like lesions", "dermatofibroma", "melanoma", "melanocytic nevi",
        "vascular lesions",
    ],
    "octmnist": ["choroidal neovascularization", "diabetic macular edema", "drusen", "normal"],
    "retinamnist": ["grade_0", "grade_1", "grade_2", "grade_3", "grade_4"],
    "bloodmnist": [
        "basophil", "eosinophil", "erythroblast", "immature granulocytes", "lymphocyte",
        "monocyte", "neutrophil", "platelet",
    ],
    "tissuemnist": [
        "collecting duct, connecting tubule", "distal convoluted tubule",
        "glomerular endothelial cells", "interstitial endothelial cells", "leukocytes",
        "podocytes", "proximal tubule segments", "thick ascending limb",
    ],
    "organamnist": [
        "bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right",
        "liver", "lung-left", "lung-right", "pancreas", "spleen",
    ],
}
MEDMNIST_CLASS_NAMES["organcmnist"] = MEDMNIST_CLASS_NAMES["organamnist"]
MEDMNIST_CLASS_NAMES["organsmnist"] = MEDMNIST_CLASS_NAMES["organamnist"]

_FLAG = re.compile(r"^(?P<flag>[A-Za-z0-9]+?)(?:_(?P<size>\d+))?$")


def medmnist_flag(path: str | Path) -> str:
    """``".../chestmnist_64.npz"`` -> ``"chestmnist"`` (the name MedMNIST's INFO uses)."""
    stem = Path(path).stem
    m = _FLAG.match(stem)
    return (m.group("flag") if m else stem).lower()


def class_names_for(flag: str, num_classes: int) -> list[str]:
    """The release's names when they fit ``num_classes``, else ``class_0 .. class_{K-1}``."""
    known = MEDMNIST_CLASS_NAMES.get(flag)
    if known is not None and len(known) == num_classes:
        return list(known)
    return [f"class_{i}" for i in range(num_classes)]


def _images_to_tensor(arr: np.ndarray, path: Path, key: str) -> torch.Tensor:
    """uint8 ``[N, H, W]`` / ``[N, H, W, C]`` -> float32 ``[N, C, H, W]`` in [0, 1]."""
    expected = "uint8 [N, H, W] (grayscale) or [N, H, W, 3] (RGB)"
    if arr.ndim == 3:
        arr = arr[:, None, :, :]
    elif arr.ndim == 4 and arr.shape[-1] in (1, 3):
        arr = np.transpose(arr, (0, 3, 1, 2))
    elif arr.ndim == 4:
        raise DataError(
            f"{path}: '{key}' has shape {arr.shape}; expected {expected} "
            "(a 4-D array without a last channel axis of 1 or 3 looks like a 3-D MedMNIST volume, "
            "which this 2-D loader does not read)"
        )
    else:
        raise DataError(f"{path}: '{key}' has shape {arr.shape}; expected {expected}")
    if arr.dtype == np.uint8:
        x = torch.from_numpy(np.ascontiguousarray(arr)).to(torch.float32).div_(255.0)
    elif np.issubdtype(arr.dtype, np.floating):
        # Accepted so that a user can save pre-processed images; they must already be in [0, 1]
        # because every model and attack (trigger patches, PSNR) assumes that range.
        if arr.size and (np.nanmin(arr) < 0.0 or np.nanmax(arr) > 1.0 or np.isnan(arr).any()):
            raise DataError(f"{path}: '{key}' is floating point outside [0, 1]; expected {expected}")
        x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    else:
        raise DataError(f"{path}: '{key}' has dtype {arr.dtype}; expected {expected}")
    return x


def _check_labels(arr: np.ndarray, n: int, path: Path, key: str) -> np.ndarray:
    """Labels as int64 ``[N, K]`` (K=1 for multi-class)."""
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2 or arr.shape[0] != n:
        raise DataError(
            f"{path}: '{key}' has shape {arr.shape}; expected [N, 1] class indices or [N, K] 0/1 "
            f"multi-label columns with N={n} (the number of images)"
        )
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise DataError(f"{path}: '{key}' holds non-integer values; expected integer labels")
    elif not np.issubdtype(arr.dtype, np.integer) and arr.dtype != np.bool_:
        raise DataError(f"{path}: '{key}' has dtype {arr.dtype}; expected integer labels")
    out = arr.astype(np.int64)
    if out.size and out.min() < 0:
        raise DataError(f"{path}: '{key}' has negative labels; expected class indices >= 0")
    return out


def load_medmnist(path: str | Path) -> dict:
    """Read a MedMNIST v2 2-D ``.npz`` file.

    Returns a dict with
      - ``"train"``, ``"val"``, ``"test"``: :class:`Split` with ``x`` float32 ``[N, C, H, W]`` in
        [0, 1] and ``y`` int64 ``[N]`` (multi-class) or float32 ``[N, K]`` (multi-label);
        ``val`` is empty (``N=0``) when the file has no ``val_*`` arrays;
      - ``"flag"`` (e.g. ``"pneumoniamnist"``), ``"path"`` (str), ``"multilabel"`` (bool),
        ``"num_classes"`` (int: classes, or label columns when multi-label),
        ``"class_names"`` (list[str]), ``"input_shape"`` ``(C, H, W)``.

    Multi-label is detected from the labels having more than one column.
    Raises :class:`DataError` naming the path and what was expected.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(
            f"{path}: no such file; expected a MedMNIST v2 .npz (e.g. pneumoniamnist.npz, "
            "chestmnist_64.npz) already on disk — fedsec never downloads"
        )
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise DataError(f"{path}: cannot read as a .npz file ({err})") from err

    required = ["train_images", "train_labels", "test_images", "test_labels"]
    missing = [k for k in required if k not in arrays]
    has_val = [k in arrays for k in ("val_images", "val_labels")]
    if any(has_val) and not all(has_val):
        missing.append("val_labels" if has_val[0] else "val_images")
    if missing:
        raise DataError(
            f"{path}: missing key(s) {', '.join(repr(k) for k in missing)}; expected the MedMNIST v2 "
            "keys train_images, train_labels, val_images, val_labels, test_images, test_labels "
            f"(found: {', '.join(sorted(arrays)) or 'none'})"
        )

    raw: dict[str, tuple[torch.Tensor, np.ndarray]] = {}
    for split in SPLITS:
        if f"{split}_images" not in arrays:
            continue
        x = _images_to_tensor(arrays[f"{split}_images"], path, f"{split}_images")
        y = _check_labels(arrays[f"{split}_labels"], x.shape[0], path, f"{split}_labels")
        raw[split] = (x, y)

    shapes = {s: tuple(x.shape[1:]) for s, (x, _) in raw.items()}
    if len(set(shapes.values())) > 1:
        raise DataError(f"{path}: image shapes differ between splits {shapes}; expected one [C, H, W]")
    cols = {s: y.shape[1] for s, (_, y) in raw.items()}
    if len(set(cols.values())) > 1:
        raise DataError(f"{path}: label columns differ between splits {cols}; expected the same K")

    k = cols["train"]
    multilabel = k > 1
    if multilabel:
        bad = [s for s, (_, y) in raw.items() if y.size and y.max() > 1]
        if bad:
            raise DataError(
                f"{path}: '{bad[0]}_labels' has {k} columns but values other than 0/1; expected "
                "[N, K] 0/1 multi-label columns or [N, 1] class indices"
            )
        num_classes = k
    else:
        top = max(int(y.max()) if y.size else -1 for _, y in raw.values()) + 1
        known = MEDMNIST_CLASS_NAMES.get(medmnist_flag(path))
        num_classes = len(known) if known is not None and top <= len(known) else top
    flag = medmnist_flag(path)

    def as_split(x: torch.Tensor, y: np.ndarray) -> Split:
        yt = torch.from_numpy(y.astype(np.float32)) if multilabel else torch.from_numpy(y[:, 0].copy())
        return Split(x, yt)

    out: dict = {s: as_split(*raw[s]) for s in raw}
    if "val" not in out:
        c, h, w = shapes["train"]
        out["val"] = Split(
            torch.zeros((0, c, h, w)),
            torch.zeros((0, k)) if multilabel else torch.zeros((0,), dtype=torch.long),
        )
    out.update(
        flag=flag,
        path=str(path),
        multilabel=multilabel,
        num_classes=num_classes,
        class_names=class_names_for(flag, num_classes),
        input_shape=shapes["train"],
    )
    return out

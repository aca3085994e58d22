"""Imaging tasks as a :class:`FederatedDataset`: load, partition into hospitals, apply each
hospital's scanner, and set aside the server's clean root set.

Splits: the official train split is divided between hospitals for training and the
official test split for testing (the union of the hospitals' test parts is the whole
official test split, seen through each hospital's scanner). The official val split is
not trained on; it supplies the server's root set (FLTrust) when ``root_fraction > 0``
and, with ``merge_val=True``, whatever the root set does not take joins the training data.
"""

from __future__ import annotations

import numpy as np
import torch

from fedsec.data.base import FederatedDataset, Split
from fedsec.data.medmnist import EMBEDDED_PNEUMONIA, load_medmnist
from fedsec.data.partition import make_partitioner, stratum_labels
from fedsec.data.shift import apply_acquisition_shift, site_profile
from fedsec.errors import FedsecError

IMAGING_SOURCES = ("pneumonia", "medmnist", "mednist")


def _resize(split: Split, size: int) -> Split:
    """``[N, C, H, W]`` -> ``[N, C, size, size]`` with MONAI's Resize (area averaging when
    shrinking, bilinear when enlarging), treating N*C as channels so the batch is one call."""
    from monai.transforms import Resize

    n, c, h, w = split.x.shape
    if (h, w) == (size, size) or n == 0:
        return Split(split.x.new_zeros((0, c, size, size)), split.y) if n == 0 else split
    mode = "area" if size < min(h, w) else "bilinear"
    x = Resize((size, size), mode=mode)(split.x.reshape(n * c, h, w))
    x = torch.as_tensor(x).as_subclass(torch.Tensor).reshape(n, c, size, size).clamp_(0.0, 1.0)
    return Split(x.contiguous(), split.y)


def stratified_sample(labels, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a seeded sample of ``round(fraction * N)`` (at least 1) items with
    the class mix of ``labels`` (``[N]`` or multi-label ``[N, K]``, by :func:`stratum_labels`)."""
    strata = stratum_labels(labels)
    n = len(strata)
    if n == 0 or fraction <= 0:
        return np.zeros(0, dtype=np.int64)
    want = min(n, max(1, int(round(fraction * n))))
    rng = np.random.default_rng([int(seed) % 2**63, 0x2007])
    classes, counts = np.unique(strata, return_counts=True)
    # Largest-remainder apportionment, so the sample has exactly `want` items.
    quota = counts * want / n
    take = np.floor(quota).astype(int)
    for i in np.argsort(-(quota - take), kind="stable")[: want - take.sum()]:
        take[i] += 1
    chosen = [rng.permutation(np.flatnonzero(strata == c))[:t] for c, t in zip(classes, take)]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def _complement(n: int, index: np.ndarray) -> np.ndarray:
    keep = np.ones(n, dtype=bool)
    keep[index] = False
    return np.flatnonzero(keep)


def build_imaging_dataset(
    source: str,
    path: str | None,
    hospitals: int,
    partition: dict,
    shift_strength: float,
    seed: int,
    root_fraction: float = 0.0,
    image_size: int | None = None,
    *,
    merge_val: bool = False,
    test_fraction: float = 0.2,
    val_fraction: float = 0.1,
    sites: bool | None = None,
) -> FederatedDataset:
    """Build an imaging task's hospitals.

    Args:
        source: ``"pneumonia"`` (embedded PneumoniaMNIST; ``path`` may point at another copy,
            e.g. ``pneumoniamnist_64.npz``), ``"medmnist"`` (``path`` = any MedMNIST v2 2-D
            ``.npz``) or ``"mednist"`` (``path`` = a ``root/<class>/`` folder; with
            ``partition.name == "natural"`` a ``root/<site>/<class>/`` folder).
        hospitals: number of hospitals (``federation.hospitals``).
        partition: ``{"name": "dirichlet", "alpha": 0.5, ...}`` (``federation.partition``).
        shift_strength: acquisition-shift strength in [0, 1]; 0 = no shift.
        seed: drives the partition, the scanners, the root sample (and mednist's split).
        root_fraction: share of the val split kept as the server's clean root set (0 = none).
        image_size: resize to ``image_size x image_size`` (mednist default 64; MedMNIST keeps
            its file's size when ``None``).
        merge_val: add the val samples not taken by the root set to the training data.
        test_fraction / val_fraction: mednist only (a folder has no official split).
        sites: mednist only: read ``root/<site>/<class>/``; ``None`` = exactly when the
            partition is ``natural`` (other partitions then ignore the site labels).

    Returns a :class:`FederatedDataset` with ``modality="image"``, ``x`` float32
    ``[N, C, H, W]`` in [0, 1], ``y`` int64 ``[N]`` or float32 ``[N, K]`` (multi-label);
    ``info`` holds the source, the partition options and each hospital's scanner profile.
    """
    if source not in IMAGING_SOURCES:
        raise FedsecError(
            f"task.name={source!r} is not an imaging source; expected one of {', '.join(IMAGING_SOURCES)}"
        )
    if not isinstance(partition, dict) or "name" not in partition:
        raise FedsecError(f"federation.partition={partition!r}; expected a mapping with a 'name' key")
    if not 0.0 <= float(root_fraction) <= 1.0:
        raise FedsecError(f"root_fraction={root_fraction!r}; expected a number in [0, 1]")
    options = {k: v for k, v in partition.items() if k != "name"}
    partitioner = make_partitioner(partition["name"], **options)
    natural = partition["name"] == "natural"

    if sites is not None and source != "mednist":
        raise FedsecError(f"task.options.sites is a mednist option; source '{source}' has no site folders")
    if source == "mednist":
        if path is None:
            raise FedsecError("task.path is required for source 'mednist' (a root/<class>/<images> folder)")
        from fedsec.data.mednist import load_mednist

        data = load_mednist(
            path, image_size=image_size or 64, test_fraction=test_fraction,
            val_fraction=val_fraction, seed=seed, sites=natural if sites is None else bool(sites),
        )
    else:
        if source == "medmnist" and path is None:
            raise FedsecError("task.path is required for source 'medmnist' (a MedMNIST v2 .npz file)")
        data = load_medmnist(path if path is not None else EMBEDDED_PNEUMONIA)
        if image_size is not None:
            for name in ("train", "val", "test"):
                data[name] = _resize(data[name], image_size)
    train, val, test = data["train"], data["val"], data["test"]
    train_sites, val_sites, test_sites = (data.get(f"{s}_sites") for s in ("train", "val", "test"))

    root = None
    if root_fraction > 0:
        if len(val) == 0:
            raise FedsecError(
                f"root_fraction={root_fraction} needs a val split, and {data['path']} has none; "
                "set root_fraction=0"
            )
        pick = stratified_sample(val.y.numpy(), root_fraction, seed)
        root = val.subset(pick)
        rest = _complement(len(val), pick)
        val = val.subset(rest)
        val_sites = None if val_sites is None else val_sites[rest]
    if merge_val and len(val):
        train = Split.concat([train, val])
        if train_sites is not None:
            train_sites = np.concatenate([train_sites, val_sites])

    train_parts, test_parts = partitioner.split(
        train.y.numpy(), test.y.numpy(), hospitals, seed, train_sites=train_sites, test_sites=test_sites
    )
    names = partitioner.hospital_names(hospitals, train_sites, test_sites)

    profiles, train_splits, test_splits = [], [], []
    for site, (tr, te) in enumerate(zip(train_parts, test_parts)):
        profiles.append(site_profile(site, shift_strength, seed))
        # Separate noise streams for train and test: with one stream, test image i would
        # carry exactly the noise pattern of training image i, a pattern a model can memorise.
        train_splits.append(_shifted(train.subset(tr), site, shift_strength, seed, stream=0))
        test_splits.append(_shifted(test.subset(te), site, shift_strength, seed, stream=1))

    return FederatedDataset(
        hospitals=names,
        train=train_splits,
        test=test_splits,
        num_classes=int(data["num_classes"]),
        input_shape=tuple(int(d) for d in train.x.shape[1:]),
        multilabel=bool(data["multilabel"]),
        class_names=list(data["class_names"]),
        modality="image",
        root=root,
        info={
            "source": source,
            "path": data["path"],
            "flag": data["flag"],
            "partition": {"name": partition["name"], **partitioner.options()},
            "acquisition_shift": profiles,
            "root_size": 0 if root is None else len(root),
            "merge_val": bool(merge_val),
        },
    )


def _shifted(split: Split, site: int, strength: float, seed: int, stream: int) -> Split:
    return Split(apply_acquisition_shift(split.x, site, strength, seed, stream=stream), split.y)

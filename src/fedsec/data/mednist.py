"""A MedNIST-style image folder on disk, loaded through MONAI transforms.

Layouts (class and site folders are sorted by name; files by name within a folder):

    root/<class>/<image files>              (``sites=False``)
    root/<site>/<class>/<image files>       (``sites=True``: the ``natural`` hospital split)

Images (png, jpeg, bmp, tiff, gif) go through ``LoadImage`` (PIL reader) ->
``EnsureChannelFirst`` -> ``ScaleIntensity`` (per-image min-max to [0, 1]) -> ``Resize``.
``monai.apps.MedNISTDataset`` is not used: it downloads, and with ``download=False`` it only
reads its own ``MedNIST/`` layout with its own split. Nothing here touches the network.

The train / val / test split is stratified by class (and by site with ``sites=True``) and
seeded, so the same folder and seed always give the same split.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fedsec.data.base import Split
from fedsec.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif"}

# PIL modes that hold one intensity per pixel (L: 8-bit, I;16: 16-bit X-ray PNGs, I / F:
# 32-bit); everything else (RGB, RGBA, P palettes, CMYK) is treated as colour.
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


def _subdirs(folder: Path) -> list[Path]:
    subdirs = (p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    return sorted(subdirs, key=lambda p: p.name)


def _image_files(folder: Path) -> list[Path]:
    images = (
        p for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )
    return sorted(images, key=lambda p: p.name)


def scan_image_tree(
    root: str | Path, sites: bool = False
) -> tuple[list[Path], list[str], list[str], list[str | None]]:
    """List the images under ``root`` in a deterministic order.

    Returns ``(files, labels, class_names, site_of_file)``: ``labels[i]`` is the class folder
    name of ``files[i]``; ``class_names`` is the sorted union of class folders;
    ``site_of_file[i]`` is the site folder name (``None`` when ``sites=False``).
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: no such folder; expected a MedNIST-style tree root/<class>/<images>")
    layout = "root/<site>/<class>/<images>" if sites else "root/<class>/<images>"
    groups: list[tuple[str | None, Path]] = []
    if sites:
        site_dirs = _subdirs(root)
        if not site_dirs:
            raise DataError(f"{root}: no site folders; expected {layout}")
        for site in site_dirs:
            class_dirs = _subdirs(site)
            if not class_dirs:
                raise DataError(f"{site}: no class folders; expected {layout}")
            groups += [(site.name, c) for c in class_dirs]
    else:
        class_dirs = _subdirs(root)
        if not class_dirs:
            raise DataError(f"{root}: no class folders; expected {layout}")
        groups = [(None, c) for c in class_dirs]

    files: list[Path] = []
    labels: list[str] = []
    site_of: list[str | None] = []
    for site, class_dir in groups:
        found = _image_files(class_dir)
        if not found:
            raise DataError(
                f"{class_dir}: empty class folder; expected image files "
                f"({', '.join(sorted(IMAGE_SUFFIXES))}) in {layout}"
            )
        files += found
        labels += [class_dir.name] * len(found)
        site_of += [site] * len(found)
    class_names = sorted(set(labels))
    return files, labels, class_names, site_of


def _detect_channels(first: Path) -> int:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(first) as im:
            return 1 if im.mode in _GRAY_MODES else 3
    except (OSError, UnidentifiedImageError) as err:
        raise DataError(f"{first}: cannot read image ({err})") from err


def _pil_converter(channels: int):
    """Make every file the same number of channels, so a folder mixing grayscale and RGB
    PNGs (or RGBA screenshots) still stacks into one ``[N, C, H, W]`` tensor."""

    def convert(im):
        if channels == 1:
            return im if im.mode in ("L", "I", "I;16", "F") else im.convert("L")
        return im if im.mode == "RGB" else im.convert("RGB")

    return convert


def _loader(channels: int, image_size: int):
    from monai.data import PILReader
    from monai.transforms import Compose, EnsureChannelFirst, LoadImage, Resize, ScaleIntensity

    return Compose(
        [
            # reverse_indexing=False keeps numpy's (row, column) order, so images are not
            # transposed relative to how they look in a viewer.
            LoadImage(
                reader=PILReader(converter=_pil_converter(channels), reverse_indexing=False),
                image_only=True,
            ),
            EnsureChannelFirst(),
            ScaleIntensity(minv=0.0, maxv=1.0),
            Resize((image_size, image_size), mode="area"),
        ]
    )


def _stratified_split(
    strata: np.ndarray, test_fraction: float, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded per-stratum shuffle; ``round(fraction * n)`` of each stratum to test / val,
    keeping at least one sample of a stratum with >= 2 samples in train and test."""
    rng = np.random.default_rng([int(seed) % 2**63, 0x3ED157])
    train, val, test = [], [], []
    for s in np.unique(strata):
        idx = rng.permutation(np.flatnonzero(strata == s))
        n = len(idx)
        n_test = int(round(test_fraction * n))
        if test_fraction > 0 and n >= 2:
            n_test = min(max(n_test, 1), n - 1)
        n_val = min(int(round(val_fraction * n)), n - n_test - 1) if val_fraction > 0 else 0
        n_val = max(n_val, 0)
        test.append(idx[:n_test])
        val.append(idx[n_test : n_test + n_val])
        train.append(idx[n_test + n_val :])
    return tuple(np.sort(np.concatenate(p)).astype(np.int64) for p in (train, val, test))


def load_mednist(
    root: str | Path,
    image_size: int = 64,
    test_fraction: float = 0.2,
    val_fraction: float = 0.1,
    seed: int = 0,
    sites: bool = False,
    channels: int | None = None,
) -> dict:
    """Load a MedNIST-style folder and split it.

    Args:
        root: the folder (see the module docstring for the layouts).
        image_size: every image is resized to ``image_size x image_size``.
        test_fraction / val_fraction: share of each class (per site) held out for test / val.
        seed: the split's seed.
        sites: read ``root/<site>/<class>/...`` and return per-sample site names.
        channels: 1 (grayscale) or 3 (RGB); ``None`` takes it from the first file.

    Returns the same keys as :func:`fedsec.data.medmnist.load_medmnist` (``train``, ``val``,
    ``test`` :class:`Split` with ``x`` float32 ``[N, C, S, S]`` in [0, 1] and ``y`` int64
    ``[N]``; ``class_names``, ``num_classes``, ``multilabel`` (False), ``input_shape``,
    ``path``, ``flag`` = ``"mednist"``) plus ``train_sites`` / ``val_sites`` /
    ``test_sites`` (``np.ndarray`` of site names, or ``None``) and ``train_files`` /
    ``val_files`` / ``test_files`` (lists of paths).
    """
    if not 0.0 <= test_fraction < 1.0 or not 0.0 <= val_fraction < 1.0 or test_fraction + val_fraction >= 1.0:
        raise DataError(
            f"{root}: test_fraction={test_fraction}, val_fraction={val_fraction}; expected fractions in "
            "[0, 1) that leave some training data"
        )
    if not isinstance(image_size, int) or image_size < 1:
        raise DataError(f"{root}: image_size={image_size!r}; expected a positive integer")
    files, labels, class_names, site_of = scan_image_tree(root, sites=sites)
    if channels is None:
        channels = _detect_channels(files[0])
    if channels not in (1, 3):
        raise DataError(f"{root}: channels={channels!r}; expected 1 (grayscale) or 3 (RGB)")

    load = _loader(channels, image_size)
    images = []
    for f in files:
        try:
            img = load(str(f))
        except Exception as err:  # MONAI wraps reader errors in RuntimeError; PIL raises OSError
            cause = err.__cause__ or err
            raise DataError(f"{f}: cannot read image ({type(cause).__name__}: {cause})") from err
        images.append(torch.as_tensor(img, dtype=torch.float32).as_subclass(torch.Tensor))
    x = torch.stack(images)
    y = torch.tensor([class_names.index(c) for c in labels], dtype=torch.long)

    site_arr = np.asarray(site_of, dtype=object) if sites else None
    strata = np.asarray(
        [f"{s}/{c}" for s, c in zip(site_of, labels)] if sites else labels, dtype=object
    ).astype(str)
    tr, va, te = _stratified_split(strata, test_fraction, val_fraction, seed)
    out: dict = {}
    for name, idx in (("train", tr), ("val", va), ("test", te)):
        out[name] = Split(x[torch.as_tensor(idx)], y[torch.as_tensor(idx)])
        out[f"{name}_sites"] = None if site_arr is None else site_arr[idx].astype(str)
        out[f"{name}_files"] = [str(files[i]) for i in idx]
    out.update(
        flag="mednist",
        path=str(Path(root).expanduser()),
        multilabel=False,
        num_classes=len(class_names),
        class_names=class_names,
        input_shape=tuple(x.shape[1:]),
    )
    return out

"""Imaging data: MedMNIST / MedNIST loaders, hospital partitioners, acquisition shift and
the glue that builds a FederatedDataset. Fast, no Ray, no network: every file is written
into tmp_path except the embedded PneumoniaMNIST."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedsec.data.base import FederatedDataset
from fedsec.data.imaging import build_imaging_dataset, stratified_sample
from fedsec.data.medmnist import EMBEDDED_PNEUMONIA, load_medmnist
from fedsec.data.partition import PARTITIONERS, make_partitioner, stratum_labels
from fedsec.data.shift import apply_acquisition_shift, apply_profile, site_profile
from fedsec.errors import DataError, FedsecError

# ----------------------------------------------------------------------------- helpers


def _labels(n: int, k: int, seed: int, p=None) -> np.ndarray:
    return np.random.default_rng(seed).choice(k, size=n, p=p)


def _write_npz(path, *, n=(30, 10, 12), hw=(8, 8), rgb=False, k_labels=1, n_classes=3, drop=(), **override):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, size in zip(("train", "val", "test"), n):
        shape = (size, *hw, 3) if rgb else (size, *hw)
        arrays[f"{split}_images"] = rng.integers(0, 256, size=shape, dtype=np.uint8)
        if k_labels == 1:
            arrays[f"{split}_labels"] = rng.integers(0, n_classes, size=(size, 1)).astype(np.uint8)
        else:
            arrays[f"{split}_labels"] = (rng.random((size, k_labels)) < 0.2).astype(np.uint8)
    arrays.update(override)
    for key in drop:
        arrays.pop(key)
    np.savez(path, **arrays)
    return path, arrays


def _write_png(path, array):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _tree(root, classes=("AbdomenCT", "Hand"), per_class=6, size=(12, 10), sites=None, seed=0):
    rng = np.random.default_rng(seed)
    prefixes = [root / s for s in sites] if sites else [root]
    for base in prefixes:
        for ci, c in enumerate(classes):
            for i in range(per_class):
                img = rng.integers(0, 256, size=size, dtype=np.uint8)
                img[0, 0], img[-1, -1] = 0, 255  # full range, so ScaleIntensity is a no-op check
                _write_png(base / c / f"{i:03d}.png", img)
    return root


def _tv(counts: np.ndarray, global_p: np.ndarray) -> float:
    p = counts / max(counts.sum(), 1)
    return 0.5 * float(np.abs(p - global_p).sum())


# ----------------------------------------------------------------------------- partition


@pytest.mark.parametrize("name,options", [("iid", {}), ("dirichlet", {"alpha": 0.3}), ("quantity", {"alpha": 1.0})])
def test_partition_covers_every_sample_once(name, options):
    train, test = _labels(500, 4, 0), _labels(120, 4, 1)
    tr, te = make_partitioner(name, **options).split(train, test, n_hospitals=6, seed=3)
    assert len(tr) == len(te) == 6
    for parts, n in ((tr, 500), (te, 120)):
        joined = np.concatenate(parts)
        assert len(joined) == n and np.array_equal(np.sort(joined), np.arange(n))  # disjoint + complete
        assert all(p.dtype == np.int64 and len(p) > 0 for p in parts)


@pytest.mark.parametrize("name", ["iid", "dirichlet", "quantity"])
def test_partition_is_deterministic_per_seed(name):
    train, test = _labels(400, 3, 0), _labels(90, 3, 1)
    part = make_partitioner(name)
    a, b, c = (part.split(train, test, 5, seed=s) for s in (7, 7, 8))
    assert all(np.array_equal(x, y) for x, y in zip(a[0] + a[1], b[0] + b[1]))
    assert not all(np.array_equal(x, y) for x, y in zip(a[0], c[0]))


def test_dirichlet_low_alpha_skews_more_than_high_alpha():
    train, test = _labels(2000, 5, 0), _labels(400, 5, 1)
    global_p = np.bincount(train, minlength=5) / len(train)

    def mean_tv(alpha):
        tvs = []
        for seed in range(5):
            tr, _ = make_partitioner("dirichlet", alpha=alpha).split(train, test, 8, seed)
            tvs += [_tv(np.bincount(train[p], minlength=5), global_p) for p in tr]
        return float(np.mean(tvs))

    low, high, iid = mean_tv(0.1), mean_tv(100.0), mean_tv(1e6)
    assert low > 0.4 and high < 0.1 and low > 4 * high and iid < 0.05
    # dirichlet keeps hospitals the same size: label skew only
    tr, _ = make_partitioner("dirichlet", alpha=0.1).split(train, test, 8, 0)
    assert max(map(len, tr)) - min(map(len, tr)) <= 1


def test_dirichlet_test_parts_follow_each_hospitals_training_shares():
    train, test = _labels(1500, 3, 0), _labels(600, 3, 1)
    tr, te = make_partitioner("dirichlet", alpha=0.3).split(train, test, 6, 0)
    train_total, test_total = np.bincount(train, minlength=3), np.bincount(test, minlength=3)
    for p, q in zip(tr, te):
        train_share = np.bincount(train[p], minlength=3) / train_total
        test_share = np.bincount(test[q], minlength=3) / test_total
        # the same share of each class, up to rounding by one sample per class
        assert np.all(np.abs(train_share - test_share) <= 1.0 / test_total + 1e-9)


def test_quantity_gives_unequal_sizes_and_iid_equal_ones():
    train, test = _labels(1000, 2, 0), _labels(200, 2, 1)
    tr, te = make_partitioner("quantity", alpha=0.5).split(train, test, 5, 0)
    sizes = np.array([len(p) for p in tr])
    assert sizes.max() > 2 * sizes.min()
    # a hospital's test share matches its training share, and labels are not skewed
    assert np.allclose([len(p) / 200 for p in te], sizes / 1000, atol=0.02)
    tr, _ = make_partitioner("iid").split(train, test, 5, 0)
    assert max(map(len, tr)) - min(map(len, tr)) <= 1


def test_empty_hospital_error_names_the_option():
    train, test = _labels(60, 2, 0), _labels(20, 2, 1)
    with pytest.raises(FedsecError) as err:
        make_partitioner("quantity", alpha=0.01).split(train, test, 20, 0)
    msg = str(err.value)
    assert "federation.partition.alpha=0.01" in msg and "hospital" in msg and "no training samples" in msg
    assert "federation.hospitals" in msg
    with pytest.raises(FedsecError, match=r"^federation.hospitals=30 leaves hospital \d+ with no test samples"):
        make_partitioner("iid").split(_labels(300, 2, 0), _labels(20, 2, 1), 30, 0)


def test_make_partitioner_rejects_unknown_names_and_options():
    assert set(PARTITIONERS) == {"iid", "dirichlet", "quantity", "natural"}
    with pytest.raises(FedsecError, match="did you mean 'dirichlet'"):
        make_partitioner("dirichlett")
    with pytest.raises(FedsecError, match=r"federation.partition.alpah.*did you mean 'alpha'"):
        make_partitioner("dirichlet", alpah=0.5)
    with pytest.raises(FedsecError, match="has no option 'alpha'; options: none"):
        make_partitioner("iid", alpha=1.0)
    with pytest.raises(FedsecError, match="federation.partition.alpha"):
        make_partitioner("dirichlet", alpha=0)
    with pytest.raises(FedsecError, match="federation.hospitals"):
        make_partitioner("iid").split(_labels(10, 2, 0), _labels(10, 2, 0), 0, 0)


def test_natural_partition_uses_the_sites():
    train_sites = np.array(["b", "a", "b", "c", "a", "c", "c"])
    test_sites = np.array(["a", "c", "b"])
    part = make_partitioner("natural")
    tr, te = part.split(np.zeros(7, int), np.zeros(3, int), 3, 0, train_sites, test_sites)
    assert part.hospital_names(3, train_sites, test_sites) == ["a", "b", "c"]
    assert [p.tolist() for p in tr] == [[1, 4], [0, 2], [3, 5, 6]]
    assert [p.tolist() for p in te] == [[0], [2], [1]]
    with pytest.raises(FedsecError, match="federation.hospitals=4 .*set federation.hospitals=3"):
        part.split(np.zeros(7, int), np.zeros(3, int), 4, 0, train_sites, test_sites)
    with pytest.raises(FedsecError, match="needs per-sample hospital sites"):
        part.split(np.zeros(7, int), np.zeros(3, int), 3, 0)
    with pytest.raises(FedsecError, match=r"hospital 1 \(site 'b'\) with no test samples"):
        part.split(np.zeros(7, int), np.zeros(2, int), 3, 0, train_sites, test_sites[:2])


def test_multilabel_partitions_by_first_positive_label():
    y = np.array([[0, 1, 1], [1, 0, 0], [0, 0, 0], [0, 0, 1]], dtype=np.float32)
    assert stratum_labels(y).tolist() == [1, 0, 3, 2]  # all-negative -> its own stratum K
    assert stratum_labels(np.array([[2], [0]])).tolist() == [2, 0]
    big = (np.random.default_rng(0).random((300, 5)) < 0.2).astype(np.float32)
    tr, te = make_partitioner("dirichlet", alpha=0.5).split(big, big[:100], 4, 0)
    assert np.array_equal(np.sort(np.concatenate(tr)), np.arange(300))


# ----------------------------------------------------------------------------- acquisition shift


def _smooth_images(n=64, c=1, hw=24, lo=0.2, hi=0.8, seed=0):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand((n, c, 4, 4), generator=g)
    x = torch.nn.functional.interpolate(coarse, size=(hw, hw), mode="bilinear", align_corners=True)
    return lo + (hi - lo) * x


def test_strength_zero_is_exactly_identity():
    x = torch.rand(5, 3, 16, 16)
    for site in range(4):
        y = apply_acquisition_shift(x, site, 0.0, seed=1)
        assert torch.equal(y, x) and y.data_ptr() != x.data_ptr()
    p = site_profile(2, 0.0, seed=1)
    assert (p["gain"], p["offset"], p["gamma"], p["noise_std"], p["blur_sigma"]) == (1.0, 0.0, 1.0, 0.0, 0.0)


def test_shift_is_deterministic_site_specific_and_clamped():
    x = torch.rand(8, 1, 16, 16)
    a = apply_acquisition_shift(x, 3, 0.8, seed=5)
    assert torch.equal(a, apply_acquisition_shift(x, 3, 0.8, seed=5))
    assert not torch.equal(a, apply_acquisition_shift(x, 4, 0.8, seed=5))
    assert not torch.equal(a, apply_acquisition_shift(x, 3, 0.8, seed=6))
    assert not torch.equal(a, apply_acquisition_shift(x, 3, 0.8, seed=5, stream=1))
    assert a.shape == x.shape and a.dtype == torch.float32 and a.min() >= 0 and a.max() <= 1
    with pytest.raises(FedsecError, match=r"\[0, 1\]"):
        apply_acquisition_shift(x, 0, 1.5, seed=0)


def test_profile_parameters_scale_with_strength():
    full, half = site_profile(7, 1.0, seed=0), site_profile(7, 0.5, seed=0)
    assert math.isclose(half["gain"] - 1, (full["gain"] - 1) / 2)
    assert math.isclose(half["offset"], full["offset"] / 2)
    assert math.isclose(math.log(half["gamma"]), math.log(full["gamma"]) / 2)
    assert math.isclose(half["noise_std"], full["noise_std"] / 2)
    assert math.isclose(half["blur_sigma"], full["blur_sigma"] / 2)
    assert 0.7 <= full["gain"] <= 1.3 and 0 <= full["blur_sigma"] <= 1.0
    profiles = [site_profile(s, 1.0, seed=0) for s in range(6)]
    assert len({round(p["gain"], 6) for p in profiles}) == 6  # each scanner its own


def test_shift_moves_pixel_mean_in_the_profiles_direction():
    x = _smooth_images()
    for site in range(6):
        prof = site_profile(site, 1.0, seed=0)
        y = apply_acquisition_shift(x, site, 1.0, seed=0)
        predicted = (prof["gain"] * x.pow(prof["gamma"]) + prof["offset"]).clamp(0, 1).mean() - x.mean()
        actual = y.mean() - x.mean()
        assert abs(float(actual - predicted)) < 0.01, (site, prof)
        if abs(float(predicted)) > 0.02:
            assert torch.sign(actual) == torch.sign(predicted)


def test_shift_components_act_in_their_direction():
    base = {"gain": 1.0, "offset": 0.0, "gamma": 1.0, "noise_std": 0.0, "blur_sigma": 0.0, "noise_seed": 1}
    x = _smooth_images()
    assert apply_profile(x, {**base, "gain": 1.2}).mean() > x.mean() + 0.05
    assert apply_profile(x, {**base, "offset": -0.1}).mean() < x.mean() - 0.09
    assert apply_profile(x, {**base, "gamma": 1.5}).mean() < x.mean() - 0.03
    flat = torch.full((4, 1, 16, 16), 0.5)
    noisy = apply_profile(flat, {**base, "noise_std": 0.05})
    assert abs(float(noisy.std()) - 0.05) < 0.005 and abs(float(noisy.mean()) - 0.5) < 0.005
    checker = (torch.arange(16)[:, None] + torch.arange(16)[None, :]).remainder(2).float().expand(2, 3, 16, 16)
    blurred = apply_profile(checker, {**base, "blur_sigma": 1.0})
    assert blurred.std() < 0.5 * checker.std() and abs(float(blurred.mean() - checker.mean())) < 0.02


# ----------------------------------------------------------------------------- MedMNIST loader


def test_medmnist_multiclass_grayscale(tmp_path):
    path, arrays = _write_npz(tmp_path / "bloodmnist_64.npz", n_classes=8)
    data = load_medmnist(path)
    assert data["flag"] == "bloodmnist" and not data["multilabel"] and data["num_classes"] == 8
    assert data["class_names"][0] == "basophil" and data["input_shape"] == (1, 8, 8)
    for split, n in (("train", 30), ("val", 10), ("test", 12)):
        s = data[split]
        assert s.x.shape == (n, 1, 8, 8) and s.x.dtype == torch.float32
        assert s.y.shape == (n,) and s.y.dtype == torch.int64
    assert torch.allclose(data["train"].x[:, 0], torch.from_numpy(arrays["train_images"]).float() / 255)
    assert data["test"].y.tolist() == arrays["test_labels"][:, 0].tolist()


def test_medmnist_rgb(tmp_path):
    path, arrays = _write_npz(tmp_path / "mystery.npz", rgb=True, n_classes=4)
    data = load_medmnist(path)
    assert data["train"].x.shape == (30, 3, 8, 8) and data["input_shape"] == (3, 8, 8)
    expected = torch.from_numpy(arrays["train_images"][2, 5, 1, :]).float() / 255
    assert torch.allclose(data["train"].x[2, :, 5, 1], expected)
    assert data["class_names"] == ["class_0", "class_1", "class_2", "class_3"]


def test_medmnist_multilabel_chest(tmp_path):
    path, arrays = _write_npz(tmp_path / "chestmnist.npz", k_labels=14)
    data = load_medmnist(path)
    assert data["multilabel"] and data["num_classes"] == 14
    assert data["class_names"][:2] == ["atelectasis", "cardiomegaly"] and data["class_names"][-1] == "hernia"
    y = data["train"].y
    assert y.shape == (30, 14) and y.dtype == torch.float32
    assert torch.equal(y, torch.from_numpy(arrays["train_labels"]).float())


def test_medmnist_errors_name_path_and_expectation(tmp_path):
    path, _ = _write_npz(tmp_path / "pathmnist.npz", drop=("test_labels",))
    with pytest.raises(DataError) as err:
        load_medmnist(path)
    assert "test_labels" in str(err.value) and str(path) in str(err.value)

    with pytest.raises(DataError, match="no such file.*never downloads"):
        load_medmnist(tmp_path / "nope.npz")
    bad = tmp_path / "junk.npz"
    bad.write_text("not a zip")
    with pytest.raises(DataError, match="junk.npz"):
        load_medmnist(bad)
    path, _ = _write_npz(tmp_path / "i32.npz", train_images=np.zeros((30, 8, 8), np.int32))
    with pytest.raises(DataError, match="train_images.*dtype int32.*expected uint8"):
        load_medmnist(path)
    path, _ = _write_npz(tmp_path / "rows.npz", train_labels=np.zeros((29, 1), np.uint8))
    with pytest.raises(DataError, match="train_labels.*N=30"):
        load_medmnist(path)
    path, _ = _write_npz(tmp_path / "vol.npz", train_images=np.zeros((30, 8, 8, 8), np.uint8))
    with pytest.raises(DataError, match="3-D MedMNIST"):
        load_medmnist(path)


def test_embedded_pneumonia_has_the_official_split():
    data = load_medmnist(EMBEDDED_PNEUMONIA)
    assert (len(data["train"]), len(data["val"]), len(data["test"])) == (4708, 524, 624)
    assert data["class_names"] == ["normal", "pneumonia"] and data["num_classes"] == 2
    assert data["input_shape"] == (1, 28, 28)
    assert np.bincount(data["train"].y.numpy()).tolist() == [1214, 3494]
    assert 0.0 <= float(data["train"].x.min()) and float(data["train"].x.max()) <= 1.0


# ----------------------------------------------------------------------------- MedNIST folders


def test_mednist_folder_loads_and_splits(tmp_path):
    from fedsec.data.mednist import load_mednist

    root = _tree(tmp_path / "mednist", per_class=10)
    rgb = np.zeros((9, 11, 3), np.uint8)
    rgb[..., 0] = 255
    _write_png(root / "Hand" / "zz_rgb.png", rgb)  # a colour file in a grayscale tree
    data = load_mednist(root, image_size=16, test_fraction=0.2, val_fraction=0.1, seed=0)
    assert data["class_names"] == ["AbdomenCT", "Hand"] and data["input_shape"] == (1, 16, 16)
    sizes = [len(data[s]) for s in ("train", "val", "test")]
    assert sum(sizes) == 21 and sizes[2] == 4 and sizes[1] == 2
    for s in ("train", "val", "test"):
        assert data[s].x.dtype == torch.float32 and data[s].y.dtype == torch.int64
        assert float(data[s].x.min()) >= 0 and float(data[s].x.max()) <= 1
    assert np.bincount(data["test"].y.numpy()).tolist() == [2, 2]  # stratified
    again = load_mednist(root, image_size=16, seed=0)
    assert again["test_files"] == data["test_files"] and torch.equal(again["train"].x, data["train"].x)
    other = load_mednist(root, image_size=16, seed=1)
    assert other["test_files"] != data["test_files"]


def test_mednist_sites_give_the_natural_split(tmp_path):
    root = _tree(tmp_path / "sites", per_class=5, sites=["hospital_a", "hospital_b", "hospital_c"])
    fd = build_imaging_dataset(
        "mednist", str(root), hospitals=3, partition={"name": "natural"}, shift_strength=0.3, seed=0,
        image_size=8, test_fraction=0.4,
    )
    assert fd.hospitals == ["hospital_a", "hospital_b", "hospital_c"]
    assert fd.input_shape == (1, 8, 8) and fd.modality == "image" and fd.num_classes == 2
    assert [len(s) for s in fd.test] == [4, 4, 4]
    assert sum(len(s) for s in fd.train) + sum(len(s) for s in fd.test) <= 30
    # the same tree with sites=True but a non-natural partition: sites read, then ignored
    fd = build_imaging_dataset(
        "mednist", str(root), hospitals=2, partition={"name": "iid"}, shift_strength=0.0, seed=0,
        image_size=8, sites=True,
    )
    assert fd.hospitals == ["hospital_0", "hospital_1"] and len(fd.union_test()) == 6  # 1 per site x class


def test_mednist_errors(tmp_path):
    from fedsec.data.mednist import load_mednist

    with pytest.raises(DataError, match="no such folder"):
        load_mednist(tmp_path / "missing")
    root = _tree(tmp_path / "t", per_class=3)
    (root / "Empty").mkdir()
    with pytest.raises(DataError, match=r"Empty: empty class folder"):
        load_mednist(root)
    (root / "Empty" / "broken.png").write_bytes(b"this is not a png")
    with pytest.raises(DataError, match=r"broken.png: cannot read image"):
        load_mednist(root, image_size=8)
    flat = tmp_path / "flat"
    flat.mkdir()
    with pytest.raises(DataError, match="no class folders"):
        load_mednist(flat)


# ----------------------------------------------------------------------------- build_imaging_dataset


def test_build_pneumonia_federation():
    fd = build_imaging_dataset(
        "pneumonia", None, hospitals=4, partition={"name": "dirichlet", "alpha": 0.5},
        shift_strength=0.5, seed=0, root_fraction=0.1,
    )
    assert isinstance(fd, FederatedDataset) and fd.modality == "image" and not fd.multilabel
    assert fd.input_shape == (1, 28, 28) and fd.class_names == ["normal", "pneumonia"] and fd.num_classes == 2
    assert sum(map(len, fd.train)) == 4708 and len(fd.union_test()) == 624
    assert np.bincount(fd.union_test().y.numpy()).tolist() == [234, 390]
    assert len(fd.root) == 52 and np.bincount(fd.root.y.numpy()).tolist() == [13, 39]
    assert len(fd.info["acquisition_shift"]) == 4 and fd.info["partition"] == {"name": "dirichlet", "alpha": 0.5}
    # each hospital looks through its own scanner
    means = [float(s.x.mean()) for s in fd.test]
    assert len({round(m, 4) for m in means}) == 4


def test_build_without_shift_keeps_the_official_test_images():
    official = load_medmnist(EMBEDDED_PNEUMONIA)["test"]
    fd = build_imaging_dataset("pneumonia", None, 3, {"name": "iid"}, 0.0, seed=1)
    union = fd.union_test()
    key = lambda x: torch.sort(x.flatten(1).sum(1)).values  # noqa: E731
    assert torch.allclose(key(union.x), key(official.x))
    assert fd.root is None


def test_build_medmnist_multilabel_resized_and_merged(tmp_path):
    path, _ = _write_npz(tmp_path / "chestmnist_64.npz", n=(80, 20, 30), k_labels=14)
    fd = build_imaging_dataset(
        "medmnist", str(path), 3, {"name": "dirichlet", "alpha": 1.0}, 0.2, seed=0,
        root_fraction=0.25, image_size=16, merge_val=True,
    )
    assert fd.multilabel and fd.num_classes == 14 and fd.input_shape == (1, 16, 16)
    assert fd.train[0].y.dtype == torch.float32 and fd.train[0].y.shape[1] == 14
    assert len(fd.root) == 5 and sum(map(len, fd.train)) == 80 + 15 and len(fd.union_test()) == 30


def test_build_errors_name_the_setting(tmp_path):
    with pytest.raises(FedsecError, match="task.path is required"):
        build_imaging_dataset("medmnist", None, 2, {"name": "iid"}, 0.0, 0)
    with pytest.raises(FedsecError, match="natural.*sites"):
        build_imaging_dataset("pneumonia", None, 2, {"name": "natural"}, 0.0, 0)
    with pytest.raises(FedsecError, match="federation.partition.alpha=0.001"):
        build_imaging_dataset("pneumonia", None, 200, {"name": "quantity", "alpha": 0.001}, 0.0, 0)
    with pytest.raises(FedsecError, match="not an imaging source"):
        build_imaging_dataset("heart", None, 2, {"name": "iid"}, 0.0, 0)


def test_stratified_root_sample():
    y = np.array([0] * 30 + [1] * 70)
    idx = stratified_sample(y, 0.1, seed=0)
    assert len(idx) == 10 and np.bincount(y[idx]).tolist() == [3, 7]
    assert np.array_equal(idx, stratified_sample(y, 0.1, seed=0))

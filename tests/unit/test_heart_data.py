"""Heart-disease and EHR CSV loaders: the fedsec and FLamby preprocessings, leakage-free standardisation, errors."""

import numpy as np
import pytest
import torch

from fedsec.data.heart import FEATURES, load_heart_disease
from fedsec.data.tabular import federate_table, read_ehr_csv
from fedsec.errors import DataError


def test_fedsec_split_sizes_and_features():
    d = load_heart_disease()
    assert d.hospitals == ["cleveland", "hungary", "switzerland", "va"]
    assert [(len(a), len(b)) for a, b in zip(d.train, d.test)] == [(199, 104), (172, 89), (30, 16), (85, 45)]
    assert FEATURES == ["age", "sex", "cp", "trestbps", "chol", "fbs", "restecg", "thalach", "exang", "oldpeak"]
    assert d.input_shape == (10,) and d.num_classes == 2
    assert set(torch.cat([s.y for s in d.train]).tolist()) == {0, 1}


def test_standardisation_uses_training_rows_only():
    d = load_heart_disease()
    train = torch.cat([s.x for s in d.train])
    assert torch.allclose(train.mean(0), torch.zeros(10), atol=1e-5)
    # the test rows were not part of the fit: their mean is not forced to zero
    assert torch.cat([s.x for s in d.test]).mean(0).abs().max() > 0.01


def test_site_normalisation_and_fixed_split():
    a, b = load_heart_disease(normalize="site"), load_heart_disease(normalize="site")
    assert torch.equal(a.test[1].x, b.test[1].x)
    assert torch.allclose(a.train[1].x.mean(0)[:3], torch.zeros(3), atol=1e-5)


def test_ehr_csv_reader(tmp_path):
    p = tmp_path / "ehr.csv"
    rows = ["site,age,bp,outcome"]
    for i in range(10):
        rows.append(f"A,{40 + i},{120 + i},{i % 2}")
        rows.append(f"B,{60 + i},{'' if i == 3 else 130 + i},{'yes' if i % 3 == 0 else 'no'}")
    p.write_text("\n".join(rows) + "\n")
    feats, labs, names, fnames, classes = read_ehr_csv(p, hospital_column="site", label_column="outcome")
    assert names == ["A", "B"] and fnames == ["age", "bp"]
    assert len(feats[1]) == 9  # the row with a missing bp is dropped
    assert classes == ["0", "1", "no", "yes"]
    d = federate_table(feats, labs, names, fnames, classes)
    assert [len(s) + len(t) for s, t in zip(d.train, d.test)] == [10, 9]


def test_ehr_csv_errors_name_column_and_path(tmp_path):
    p = tmp_path / "ehr.csv"
    p.write_text("site,age,label\nA,40,1\nA,x,0\n")
    with pytest.raises(DataError, match="hospital_column"):
        read_ehr_csv(p)
    with pytest.raises(DataError, match=r"line 3, column 'age': 'x' is not a number"):
        read_ehr_csv(p, hospital_column="site")
    with pytest.raises(DataError, match="not found"):
        read_ehr_csv(tmp_path / "missing.csv")


def test_a_node_holding_only_its_own_site_draws_the_simulation_s_splits():
    """A deployment node reads only its own site's file; seeded by its federation id, its
    validation split and membership holdout are the simulation's for that hospital."""
    import torch

    from fedsec.scenario import load_scenario
    from fedsec.tasks import build_task

    over = ["task.options.val_fraction=0.2", "attacks=[{preset: membership_loss}]"]
    whole = build_task(load_scenario({"task": {"name": "heart_disease", "model": "logistic"}}, over)).data
    own = build_task(load_scenario({"task": {"name": "heart_disease", "model": "logistic"},
                                    "federation": {"sites": ["switzerland"]}}, over), [2]).data
    assert own.hospitals == ["switzerland"]
    for a, b in ((whole.val[2], own.val[0]), (whole.holdout[2], own.holdout[0]), (whole.train[2], own.train[0])):
        assert torch.equal(a.y, b.y) and len(a) == len(b)
    unseeded = build_task(load_scenario({"task": {"name": "heart_disease", "model": "logistic"},
                                         "federation": {"sites": ["switzerland"]}}, over)).data
    assert not torch.equal(unseeded.holdout[0].y, own.holdout[0].y) or len(unseeded.val[0]) != len(own.val[0]) \
        or not torch.equal(unseeded.train[0].x, own.train[0].x)


def _flamby_reference(normalize_pooled: bool = False):
    """FLamby's HeartDiseaseRaw / FedHeartDisease preprocessing (owkin/FLamby,
    flamby/datasets/fed_heart_disease/dataset.py), its steps kept as written there (pandas,
    scikit-learn, float32 torch statistics), run on the shipped files: the oracle the
    'flamby' preprocessing must equal. -> {site: (x_train, y_train, x_test, y_test)}."""
    pd = pytest.importorskip("pandas")
    from sklearn.model_selection import train_test_split

    from fedsec.data.heart import FILES_DIR, SITES

    features, labels, centers, sets = pd.DataFrame(), pd.DataFrame(), [], []
    for c, name in enumerate(SITES):
        df = pd.read_csv(FILES_DIR / SITES[name], header=None)
        df = df.replace("?", np.nan).drop([10, 11, 12], axis=1).dropna(axis=0).apply(pd.to_numeric)
        center_x, center_y = df.iloc[:, :-1], df.iloc[:, -1]
        features = pd.concat((features, center_x), ignore_index=True)
        labels = pd.concat((labels, center_y), ignore_index=True)
        centers += [c] * center_x.shape[0]
        current = center_y.where(center_y == 0, 1, inplace=False)
        levels = np.unique(current)
        stratify = current if len(levels) > 1 and all((current == lv).sum() > 2 for lv in levels) else None
        _, idx_test = train_test_split(np.arange(len(center_x)), test_size=1.0 - 0.66, train_size=0.66,
                                       random_state=43, shuffle=True, stratify=stratify)
        sets += ["test" if i in idx_test else "train" for i in range(len(center_x))]
    features = pd.get_dummies(features, columns=[2, 6], drop_first=True)
    x = torch.from_numpy(features.values.astype(np.float32))
    y = torch.from_numpy((labels.values[:, 0] != 0).astype(np.int64))
    centers, is_train = torch.tensor(centers), torch.tensor([s == "train" for s in sets])
    out = {}
    for c, name in enumerate(SITES):
        fit = x[is_train] if normalize_pooled else x[is_train & (centers == c)]
        mean, std = fit.mean(0), fit.std(0)
        xn = (x - mean) / (std + 1e-9)
        tr, te = is_train & (centers == c), ~is_train & (centers == c)
        out[name] = (xn[tr], y[tr], xn[te], y[te])
    return out


def test_flamby_preprocessing_equals_flamby_s_code_on_the_shipped_files():
    from fedsec.data.heart import FLAMBY_FEATURES

    d = load_heart_disease(preprocessing="flamby")
    # FLamby's published per-centre sizes (its README: 199/104, 172/89, 30/16, 85/45)
    assert [(len(a), len(b)) for a, b in zip(d.train, d.test)] == [(199, 104), (172, 89), (30, 16), (85, 45)]
    assert d.input_shape == (13,) and d.feature_names == FLAMBY_FEATURES == [
        "age", "sex", "trestbps", "chol", "fbs", "thalach", "exang", "oldpeak",
        "cp_2", "cp_3", "cp_4", "restecg_1", "restecg_2"]
    ref = _flamby_reference()
    for i, site in enumerate(d.hospitals):
        xtr, ytr, xte, yte = ref[site]
        assert torch.equal(d.train[i].y, ytr) and torch.equal(d.test[i].y, yte)
        assert torch.equal(d.train[i].x, xtr) and torch.equal(d.test[i].x, xte)  # bit for bit
    pooled, ref_pooled = load_heart_disease(preprocessing="flamby", normalize="pooled"), _flamby_reference(True)
    for i, site in enumerate(pooled.hospitals):
        assert torch.equal(pooled.train[i].x, ref_pooled[site][0]) and torch.equal(pooled.test[i].x, ref_pooled[site][2])


def test_flamby_one_hot_columns_and_per_centre_standardisation():
    from fedsec.data.heart import FEATURES, read_site, FILES_DIR, SITES

    d = load_heart_disease(preprocessing="flamby")
    raw = load_heart_disease(preprocessing="flamby", normalize="none")
    dummies = slice(8, 13)
    for i, site in enumerate(d.hospitals):
        one_hot = torch.cat([raw.train[i].x, raw.test[i].x])[:, dummies]
        assert set(one_hot.unique().tolist()) <= {0.0, 1.0}
        # cp 1 and restecg 0 are the dropped reference levels: at most one dummy of each set
        assert one_hot[:, :3].sum(1).max() <= 1 and one_hot[:, 3:].sum(1).max() <= 1
        x, _ = read_site(FILES_DIR / SITES[site])
        assert one_hot[:, 0].sum() + one_hot[:, 1].sum() + one_hot[:, 2].sum() == (x[:, FEATURES.index("cp")] > 1).sum()
        # per-centre standardisation on the hospital's own training rows
        tr = d.train[i].x
        constant = raw.train[i].x.std(0) == 0  # chol at Switzerland (all 0): stays 0
        assert torch.allclose(tr.mean(0), torch.zeros(13), atol=1e-5)
        assert torch.allclose(tr.std(0)[~constant], torch.ones(int((~constant).sum())), atol=1e-5)
        assert (tr[:, constant] == 0).all()
    assert load_heart_disease(preprocessing="flamby").info["preprocessing"] == "flamby"


def test_flamby_mode_needs_no_other_hospital_and_shares_no_moments():
    """A deployment node holds one hospital's file: per-centre statistics are its own, so
    its rows equal the four-hospital build's, and it sends no moments for the server to pool."""
    whole = load_heart_disease(preprocessing="flamby")
    own = load_heart_disease(sites=["switzerland"], preprocessing="flamby")
    assert torch.equal(own.train[0].x, whole.train[2].x) and torch.equal(own.test[0].x, whole.test[2].x)
    assert "train_moments" not in own.info
    assert "train_moments" in load_heart_disease(preprocessing="flamby", normalize="pooled").info


def test_flamby_mode_errors_name_the_option():
    with pytest.raises(DataError, match="task.options.preprocessing"):
        load_heart_disease(preprocessing="uci")
    with pytest.raises(DataError, match="task.options.test_fraction"):
        load_heart_disease(preprocessing="flamby", test_fraction=0.2)
    with pytest.raises(DataError, match="task.options.normalize"):
        load_heart_disease(preprocessing="flamby", normalize="global")


def test_heart_flamby_scenario_has_flamby_s_benchmark_settings():
    """scenarios/heart_flamby.yaml: FLamby's FedAvg benchmark (common.py, config_heart_disease.json):
    batch 4, 100 local SGD steps, (486 // 4 // 4) * 50 // 100 = 15 rounds, lr 0.001 on its
    one-output sigmoid model = 0.0005 on fedsec's two-logit one, and its data."""
    from pathlib import Path

    from fedsec.scenario import load_scenario
    from fedsec.tasks import build_task

    s = load_scenario(Path(__file__).resolve().parents[2] / "scenarios" / "heart_flamby.yaml")
    loc = s.federation.local
    assert (s.federation.rounds, loc.steps, loc.batch_size, loc.optimizer, loc.lr) == \
        ((486 // 4 // 4) * 50 // 100, 100, 4, "sgd", 0.001 / 2)
    assert s.task.model == "logistic" and s.strategy["rule"] == "fedavg"  # sample-weighted, as FLamby's
    data = build_task(s).data
    assert data.input_shape == (13,) and sum(len(t) for t in data.train) == 486
    with pytest.raises(DataError, match="task.options.preprocessing"):
        build_task(load_scenario(Path(__file__).resolve().parents[2] / "scenarios" / "heart_flamby.yaml",
                                 ["task.options.preprocessing=FLamby"]))


def test_a_training_cap_is_a_seeded_draw_per_hospital():
    """task.options.max_train_per_hospital keeps a draw seeded by (seed, hospital id): the
    same records for the same seed, others for another seed (an inversion study over seeds
    sees different patients), and a deployment node draws the simulation's record."""
    from fedsec.scenario import load_scenario
    from fedsec.tasks import build_task

    spec = {"task": {"name": "heart_disease", "model": "logistic", "options": {"max_train_per_hospital": 1}}}
    full = build_task(load_scenario({"task": {"name": "heart_disease", "model": "logistic"}})).data

    def kept(seed, **more):
        return [s.x for s in build_task(load_scenario(dict(spec, seed=seed, **more))).data.train]

    a, again, b = kept(0), kept(0), kept(1)
    assert [len(x) for x in a] == [1, 1, 1, 1]
    assert all(torch.equal(x, y) for x, y in zip(a, again))
    assert sum(not torch.equal(x, y) for x, y in zip(a, b)) >= 3
    for h, x in enumerate(a + b):
        assert (full.train[h % 4].x == x).all(1).any()  # one of that hospital's own training records
    # the node standardises with its own statistics: compare which row it kept
    site = {"sites": ["switzerland"]}
    own = build_task(load_scenario(dict(spec, seed=1, federation=site)), [2]).data.train[0].x
    own_full = build_task(load_scenario({"task": spec["task"] | {"options": {}}, "federation": site}), [2]).data
    row = lambda x, rows: int((rows == x).all(1).nonzero()[0, 0])  # noqa: E731
    assert row(own, own_full.train[0].x) == row(b[2], full.train[2].x)

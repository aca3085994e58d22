"""Heart-disease and EHR CSV loaders: FLamby's split, leakage-free standardisation, errors."""

import numpy as np
import pytest
import torch

from fedsec.data.heart import FEATURES, load_heart_disease
from fedsec.data.tabular import federate_table, read_ehr_csv
from fedsec.errors import DataError


def test_flamby_split_sizes_and_features():
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

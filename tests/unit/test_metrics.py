"""Clinical metrics against values computed by hand."""

import math

import torch

from fedsec.metrics import classification_metrics


def test_binary_metrics_hand_computed():
    # 6 patients: labels 1,1,1,0,0,0; P(disease) below. Threshold 0.5 predicts 1,1,0,1,0,0.
    p1 = torch.tensor([0.9, 0.8, 0.3, 0.6, 0.2, 0.1])
    scores = torch.stack([1 - p1, p1], 1)
    labels = torch.tensor([1, 1, 1, 0, 0, 0])
    m = classification_metrics(scores, labels, loss=0.25)
    assert math.isclose(m["accuracy"], 4 / 6, rel_tol=1e-6)
    assert m["sensitivity"] == 2 / 3 and m["specificity"] == 2 / 3
    # AUROC: of the 9 positive/negative pairs only (0.3 vs 0.6) is mis-ordered -> 8/9.
    assert math.isclose(m["auroc"], 8 / 9, rel_tol=1e-6)
    assert math.isclose(m["balanced_accuracy"], 2 / 3)
    assert m["loss"] == 0.25


def test_multiclass_macro():
    scores = torch.tensor([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.6, 0.3, 0.1]])
    labels = torch.tensor([0, 1, 2, 1])
    m = classification_metrics(scores, labels)
    assert math.isclose(m["accuracy"], 3 / 4, rel_tol=1e-6)
    # per-class recall 1, 1/2, 1 -> macro 5/6 (= balanced accuracy for multi-class)
    assert math.isclose(m["sensitivity"], 5 / 6) and math.isclose(m["balanced_accuracy"], 5 / 6)
    # specificities: class0 2/3 (row 3 wrongly 0), class1 1, class2 1
    assert math.isclose(m["specificity"], (2 / 3 + 1 + 1) / 3)


def test_single_class_auroc_is_nan_not_crash():
    scores = torch.tensor([[0.3, 0.7], [0.6, 0.4]])
    m = classification_metrics(scores, torch.tensor([1, 1]))
    assert math.isnan(m["auroc"]) and m["sensitivity"] == 0.5 and math.isnan(m["specificity"])


def test_multilabel():
    scores = torch.tensor([[0.9, 0.2], [0.1, 0.7]])
    labels = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    m = classification_metrics(scores, labels, multilabel=True)
    assert math.isclose(m["accuracy"], 3 / 4, rel_tol=1e-6)
    assert m["sensitivity"] == 1.0  # only label 0 has a positive, and it is found


def test_auroc_equals_monai_and_sklearn_with_ties():
    """fedsec's AUROC (Mann-Whitney with midranks, no MONAI import) equals MONAI's
    compute_roc_auc and scikit-learn's roc_auc_score, ties included."""
    from monai.metrics import compute_roc_auc
    from sklearn.metrics import roc_auc_score

    from fedsec.metrics import binary_auroc

    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        n = int(torch.randint(2, 300, (1,), generator=g))
        # coarse scores force many ties; fine ones few
        levels = [3, 10, 1000][trial % 3]
        s = torch.randint(0, levels, (n,), generator=g).float() / levels
        t = (torch.rand(n, generator=g) < 0.3).float()
        t[0], t[1] = 0.0, 1.0  # both classes present
        ours = binary_auroc(s, t)
        assert abs(ours - float(compute_roc_auc(s, t))) < 1e-6  # MONAI sums in float32
        assert abs(ours - roc_auc_score(t.numpy(), s.numpy())) < 1e-9


def test_multiclass_auroc_is_macro_one_vs_rest_as_sklearn():
    from sklearn.metrics import roc_auc_score

    g = torch.Generator().manual_seed(1)
    scores = torch.softmax(torch.randn(200, 3, generator=g), 1)
    labels = torch.randint(0, 3, (200,), generator=g)
    m = classification_metrics(scores, labels)
    ref = roc_auc_score(labels.numpy(), scores.numpy(), multi_class="ovr", average="macro")
    assert abs(m["auroc"] - ref) < 1e-9


def test_auroc_one_class_is_nan_and_perfect_ranking_is_one():
    from fedsec.metrics import binary_auroc

    assert math.isnan(binary_auroc(torch.tensor([0.1, 0.2]), torch.tensor([1.0, 1.0])))
    assert binary_auroc(torch.tensor([0.1, 0.9, 0.8]), torch.tensor([0.0, 1.0, 1.0])) == 1.0
    assert binary_auroc(torch.tensor([0.5, 0.5]), torch.tensor([0.0, 1.0])) == 0.5

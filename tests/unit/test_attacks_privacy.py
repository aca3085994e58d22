"""Confidentiality attacks: leakage metrics, gradient inversion, membership inference (fast, no Ray)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from fedsec.attacks import inversion, leakage, membership, provenance
from fedsec.attacks.base import AttackContext
from fedsec.attacks.inversion import LocalTraining, flat_params, load_flat_params
from fedsec.data.base import Split

ROOT = Path(__file__).resolve().parents[2]


# --- helpers ---------------------------------------------------------------------------------


def tiny_cnn(classes: int = 3, bias: bool = True) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Sigmoid(), nn.Flatten(),
                         nn.Linear(4 * 64, classes, bias=bias))


def local_update(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float = 0.1, steps: int = 1,
                 batch_size: int | None = None) -> torch.Tensor:
    """What a hospital sends: local SGD on (x, y) in order, ``local - global`` flat."""
    m = copy.deepcopy(model)
    opt = torch.optim.SGD(m.parameters(), lr=lr)
    n = len(x)
    bs = batch_size or n
    batches = -(-n // bs)
    for t in range(steps):
        s = (t % batches) * bs
        out = m(x[s:s + bs])
        if out.shape[1] == 1:
            loss = F.binary_cross_entropy_with_logits(out.reshape(-1), y[s:s + bs].float())
        else:
            loss = F.cross_entropy(out, y[s:s + bs])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return flat_params(m) - flat_params(model)


# --- leakage metrics -------------------------------------------------------------------------


def test_psnr_of_constant_offset_is_20_db():
    ref = torch.rand(3, 1, 8, 8, dtype=torch.float64) * 0.9  # float64: the offset is exact to 1e-15
    per_image = leakage.psnr(ref + 0.1, ref, reduction="none")  # MSE = 0.01 -> 10 log10(1 / 0.01)
    assert torch.allclose(per_image, torch.full((3,), 20.0, dtype=torch.float64), atol=1e-9)
    assert leakage.psnr(ref + 0.1, ref) == pytest.approx(20.0, abs=1e-9)
    assert leakage.psnr(ref + 0.01, ref) == pytest.approx(40.0, abs=1e-9)
    six_db = 20 * torch.log10(torch.tensor(2.0, dtype=torch.float64)).item()
    assert leakage.psnr(ref + 0.1, ref, data_range=2.0) == pytest.approx(20.0 + six_db, abs=1e-9)
    assert leakage.psnr(ref, ref) == float("inf")


def test_psnr_mean_is_mean_of_per_image_values():
    ref = torch.zeros(2, 1, 4, 4)
    x = torch.stack([torch.full((1, 4, 4), 0.1), torch.full((1, 4, 4), 0.01)])
    assert leakage.psnr(x, ref) == pytest.approx(30.0, abs=1e-5)


def test_ssim_identical_is_one_and_lower_otherwise():
    x = torch.rand(2, 1, 28, 28)
    assert leakage.ssim(x, x) == pytest.approx(1.0, abs=1e-5)
    assert leakage.ssim(1 - x, x) < 0.5
    small = torch.rand(1, 1, 8, 8)  # smaller than the 11-px window: window shrinks
    assert leakage.ssim(small, small) == pytest.approx(1.0, abs=1e-5)
    assert leakage.ssim(x, x, reduction="none").shape == (2,)


def test_matching_undoes_a_permutation():
    truth = torch.rand(6, 1, 8, 8)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    recon = truth[perm] + 0.01 * torch.randn(6, 1, 8, 8)
    ri, ti = leakage.match_reconstructions(recon, truth)
    assert ti.tolist() == list(range(6))
    assert torch.equal(perm[ri], ti)
    assert leakage.psnr(recon[ri], truth[ti]) > 35
    # rectangular: more truths than reconstructions
    ri, ti = leakage.match_reconstructions(truth[[4, 1]], truth)
    assert sorted(ti.tolist()) == [1, 4] and torch.equal(truth[[4, 1]][ri], truth[ti])


def test_label_recovery_accuracy_is_order_free():
    assert leakage.label_recovery_accuracy(torch.tensor([1, 0, 2]), torch.tensor([0, 1, 2])) == 1.0
    # overlap min(1, 2) + min(3, 2) = 3 of 4
    assert leakage.label_recovery_accuracy(torch.tensor([1, 1, 1, 0]), torch.tensor([0, 0, 1, 1])) == 0.75


def test_save_grid_writes_a_png(tmp_path):
    x = torch.rand(3, 1, 8, 8)
    path = leakage.save_grid(x, x.flip(0), tmp_path / "sub" / "grid.png", titles=["a", "b", "c"])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tabular_errors():
    truth = torch.randn(3, 5)
    recon = truth[[2, 0, 1]].clone()
    recon[0, 1] += 0.5  # record 2, feature 1 off by 0.5
    err = leakage.tabular_errors(recon, truth, tol=0.1)
    assert err["records_recovered"] == 2 and err["records_total"] == 3
    assert err["feature_abs_error"][1] == pytest.approx(0.5 / 3)


# --- flat parameters and the local-SGD re-run -------------------------------------------------


def test_flat_params_round_trip_with_buffers():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    vec = flat_params(model)
    # BatchNorm's num_batches_tracked (int64) is not part of the vector
    assert vec.numel() == sum(v.numel() for v in model.state_dict().values() if v.is_floating_point())
    other = copy.deepcopy(model)
    load_flat_params(other, torch.arange(vec.numel(), dtype=torch.float32))
    assert torch.equal(flat_params(other), torch.arange(vec.numel(), dtype=torch.float32))


@pytest.mark.parametrize("steps,batch_size", [(1, None), (3, None), (4, 2)])
def test_simulated_local_sgd_reproduces_the_hospital_update(steps, batch_size):
    torch.manual_seed(0)
    model = tiny_cnn()
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 2, 1, 2])
    update = local_update(model, x, y, lr=0.1, steps=steps, batch_size=batch_size)
    sim = inversion._LocalSGD(model, flat_params(model), LocalTraining(0.1, steps, batch_size), torch.device("cpu"))
    for s, t in zip(sim.simulate(x, y), sim.target(update)):
        assert torch.allclose(s, t, atol=1e-6)


def test_local_training_from_hyperparameters():
    lt = LocalTraining.from_hyperparameters(lr=0.01, epochs=2, batch_size=4, num_samples=10)
    assert (lt.steps, lt.batch_size) == (6, 4)
    assert LocalTraining.from_hyperparameters(0.01, 1, 32, 8).batch_size == 8


# --- label recovery (iDLG) --------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("bias", [True, False])
def test_idlg_label_is_exact_for_one_sample(seed, bias):
    torch.manual_seed(seed)
    model = tiny_cnn(classes=5, bias=bias)
    for label in range(5):
        x, y = torch.rand(1, 1, 8, 8), torch.tensor([label])
        for steps in (1, 3):
            update = local_update(model, x, y, lr=0.05, steps=steps)
            got = inversion.infer_labels(model, flat_params(model), update, 1, (1, 8, 8), LocalTraining(0.05, steps))
            assert got.tolist() == [label]


def test_idlg_label_binary_single_logit():
    torch.manual_seed(0)
    model = nn.Linear(6, 1)
    for label in (0, 1):
        x, y = torch.randn(1, 6), torch.tensor([label])
        update = local_update(model, x, y, lr=0.1)
        got = inversion.infer_labels(model, flat_params(model), update, 1, (6,), LocalTraining(0.1))
        assert got.tolist() == [label]


def test_batch_label_counts_on_untrained_model():
    torch.manual_seed(0)
    model = tiny_cnn(classes=4)
    y = torch.tensor([0, 0, 3, 1, 3, 3])
    update = local_update(model, torch.rand(6, 1, 8, 8), y, lr=0.1)
    got = inversion.infer_labels(model, flat_params(model), update, 6, (1, 8, 8), LocalTraining(0.1))
    assert leakage.label_recovery_accuracy(got, y) >= 5 / 6


# --- image reconstruction ---------------------------------------------------------------------


def _single_image_problem(seed=0):
    torch.manual_seed(seed)
    model = tiny_cnn()
    x, y = torch.rand(1, 1, 8, 8), torch.tensor([2])
    return model, x, y, local_update(model, x, y, lr=0.1)


def test_inverting_gradients_beats_random_guess():
    model, x, y, update = _single_image_problem()
    baseline = leakage.psnr(torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(9)), x)
    result = inversion.inverting_gradients(model, flat_params(model), update, (1, 8, 8), 1, local=LocalTraining(0.1),
                                           iterations=300, lr=0.1, tv_weight=1e-3)
    assert result.labels.tolist() == [2]
    assert result.x.min() >= 0 and result.x.max() <= 1
    assert leakage.psnr(result.x, x) > baseline + 10  # ~25 dB vs ~8 dB


def test_inverting_gradients_restarts_keep_the_best_objective():
    model, x, y, update = _single_image_problem(1)
    one = inversion.inverting_gradients(model, flat_params(model), update, (1, 8, 8), 1, local=LocalTraining(0.1),
                                        iterations=30, restarts=1, seed=3)
    three = inversion.inverting_gradients(model, flat_params(model), update, (1, 8, 8), 1, local=LocalTraining(0.1),
                                          iterations=30, restarts=3, seed=3)
    assert three.objective <= one.objective + 1e-12 and three.iterations == 90


def test_dlg_and_idlg_recover_a_single_image():
    model, x, y, update = _single_image_problem()
    for attack in (inversion.dlg, inversion.idlg):
        result = attack(model, flat_params(model), update, (1, 8, 8), 1, local=LocalTraining(0.1), iterations=20)
        assert leakage.psnr(result.x, x) > 30, attack.__name__
        assert result.labels.tolist() == [2]


def test_multistep_inversion_runs_and_matches():
    torch.manual_seed(0)
    model = tiny_cnn()
    x, y = torch.rand(2, 1, 8, 8), torch.tensor([0, 1])
    # two local steps of one image each; a small lr as in practice (label counts are estimated
    # from the global model's predictions, which a large first step would invalidate)
    local = LocalTraining(lr=0.01, steps=2, batch_size=1)
    update = local_update(model, x, y, 0.01, steps=2, batch_size=1)
    result = inversion.inverting_gradients(model, flat_params(model), update, (1, 8, 8), 2, local=local,
                                           iterations=150, tv_weight=1e-3)
    ri, ti = leakage.match_reconstructions(result.x, x)
    assert leakage.psnr(result.x[ri], x[ti]) > 20  # ~29 dB
    assert sorted(result.labels.tolist()) == [0, 1]


# --- the observe hook -------------------------------------------------------------------------


def _ctx(model, truth, tmp_path, lr=0.1, epochs=1, batch_size=1, n=1):
    return AttackContext(server_round=2, extra={
        "model_fn": lambda: copy.deepcopy(model), "local": {"lr": lr, "epochs": epochs, "batch_size": batch_size},
        "num_samples": {3: n}, "truth": {3: truth}, "out_dir": str(tmp_path)})


def test_inverting_gradients_observe_hook(tmp_path):
    model, x, y, update = _single_image_problem()
    attack = inversion.InvertingGradientsAttack(target_hospital=3, target_round=2, iterations=200, tv_weight=1e-3)
    ctx = _ctx(model, Split(x, y), tmp_path)
    g = flat_params(model)
    assert attack.observe(1, {3: update}, update, g, ctx) == {}  # not the target round
    metrics = attack.observe(2, {3: update, 4: torch.zeros_like(update)}, update, g, ctx)
    assert metrics["psnr"] > 18 and metrics["label_acc"] == 1.0 and 0 < metrics["ssim"] <= 1
    assert metrics["seconds"] > 0 and metrics["on_aggregate"] == 0.0
    assert len(attack.artifacts) == 1 and attack.artifacts[0].exists()
    # secure aggregation: the server sees only the aggregate
    skip = inversion.InvertingGradientsAttack(target_hospital=3, target_round=2, on_secure_aggregation="skip")
    assert skip.observe(2, None, update, g, ctx) == {"blocked_by_secure_aggregation": 1.0}
    agg = inversion.InvertingGradientsAttack(target_hospital=3, target_round=2, iterations=5, save_grid=False)
    assert agg.observe(2, None, update, g, ctx)["on_aggregate"] == 1.0


# --- secure aggregation: the joint attack, scored against every participant -------------------


def _flat_images(values, side=4):
    return torch.stack([torch.full((1, side, side), float(v), dtype=torch.float64) for v in values])


def test_joint_scores_use_the_optimal_assignment_hand_computed():
    truth = _flat_images([0.2, 0.8])  # hospital 0's record, hospital 1's record
    recon = _flat_images([0.7, 0.25])  # in the "wrong" order on purpose
    s = inversion.joint_scores(recon, truth, torch.tensor([0, 1]))
    # 0.25 vs 0.2: MSE 0.0025 -> 26.0206 dB; 0.7 vs 0.8: MSE 0.01 -> 20 dB (index order would give 6.0 and 5.2 dB)
    assert s["psnr"] == pytest.approx((10 * math.log10(1 / 0.0025) + 20.0) / 2, abs=1e-6)
    assert s["psnr_by_hospital"] == pytest.approx({0: 10 * math.log10(1 / 0.0025), 1: 20.0}, abs=1e-6)
    assert s["images_scored"] == 2 and s["hospitals_scored"] == 2
    assert s["matched"].tolist() == [0, 1]


def test_joint_score_counts_every_participant_and_reports_the_nulls():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 8, 8, generator=g)
    truths = {h: Split(x[h:h + 1], torch.tensor([h % 2])) for h in range(4)}
    recon = torch.cat([x[:1], torch.rand(3, 1, 8, 8, generator=g)])  # hospital 0 perfect, the others not
    result = inversion.InversionResult(recon, torch.tensor([0, 0, 1, 1]), 0.0, 0.0, 0)
    m = inversion.InvertingGradientsAttack().score_joint(result, truths, (1, 8, 8), truths)
    assert m["participants"] == 4 and m["images_scored"] == 4 and m["hospitals_scored"] == 4
    ri, ti = leakage.match_reconstructions(recon, x)
    per_image = leakage.psnr(recon[ri], x[ti], reduction="none").clamp(max=100.0)
    assert m["psnr_by_hospital"][0] == 100.0  # the exact copy (clamped at 100 dB)
    assert m["psnr"] == pytest.approx(float(per_image.mean()))  # the mean over all four, not hospital 0's
    assert 20 < m["psnr"] < 40
    # nulls: each record against the mean of the *other* hospitals' records; the participants' average
    loo = torch.stack([(x.sum(0) - x[h]) / 3 for h in range(4)])
    assert m["psnr_null"] == pytest.approx(float(leakage.psnr(loo, x, reduction="none").mean()), abs=1e-5)
    blend = x.mean(0, keepdim=True).expand(4, 1, 8, 8)
    assert m["psnr_participants_mean"] == pytest.approx(float(leakage.psnr(blend, x, reduction="none").mean()),
                                                        abs=1e-5)
    assert m["stats"]["psnr"]["null"] == pytest.approx(m["psnr_null"]) and "ssim_null" in m
    assert m["label_acc"] == 1.0


def test_aggregate_training_reproduces_the_secure_aggregate():
    """The joint re-run on the true records gives the server's weighted mean of the updates."""
    torch.manual_seed(0)
    model = tiny_cnn()
    x, y = torch.rand(5, 1, 8, 8), torch.tensor([0, 1, 2, 1, 0])
    # hospital 0: 2 records, 2 epochs x batch 1 (4 steps); hospital 1: 1 record; hospital 2: 2 records, batch 2
    plan = [(0, slice(0, 2), LocalTraining(0.1, 4, 1), 2.0), (1, slice(2, 3), LocalTraining(0.1, 1, 1), 1.0),
            (2, slice(3, 5), LocalTraining(0.05, 1, 2), 2.0)]
    updates = [local_update(model, x[s], y[s], lr, steps, bs) for _, s, (lr, steps, bs), _ in
               [(h, s, (lt.lr, lt.steps, lt.batch_size), w) for h, s, lt, w in plan]]
    weights = torch.tensor([w for *_, w in plan])
    aggregate = (weights / weights.sum()) @ torch.stack(updates)
    local = inversion.AggregateTraining([inversion.Participant(h, lt, s.stop - s.start, w) for h, s, lt, w in plan])
    sim = inversion._LocalSGD(model, flat_params(model), local, torch.device("cpu"))
    got = torch.cat([u.reshape(-1) for u in sim.simulate(x, y)])
    want = torch.cat([t.reshape(-1) for t in sim.target(aggregate)])
    assert torch.allclose(got, want, atol=1e-6)


def test_observe_under_secure_aggregation_reconstructs_every_participant(tmp_path):
    torch.manual_seed(0)
    model = tiny_cnn()
    x, y = torch.rand(2, 1, 8, 8), torch.tensor([0, 1])
    updates = [local_update(model, x[h:h + 1], y[h:h + 1], lr=0.1) for h in range(2)]
    aggregate = torch.stack(updates).mean(0)  # hospitals 0 and 1 train; hospital 2 sits the round out
    ctx = AttackContext(server_round=1, participants=[0, 1], extra={
        "model_fn": lambda: copy.deepcopy(model), "local": {"lr": 0.1, "epochs": 1, "batch_size": 1},
        "num_samples": {h: 1 for h in range(3)}, "weights": {0: 1.0, 1: 1.0},
        "truth": {0: Split(x[:1], y[:1]), 1: Split(x[1:], y[1:]), 2: Split(torch.rand(3, 1, 8, 8), torch.tensor([0, 1, 2]))},
        "out_dir": str(tmp_path)})
    attack = inversion.InvertingGradientsAttack(target_hospital=0, iterations=300, tv_weight=1e-3)
    m = attack.observe(1, None, aggregate, flat_params(model), ctx)
    assert m["on_aggregate"] == 1.0 and m["num_images"] == 2 and m["participants"] == 2
    assert m["hospitals_scored"] == 2 and sorted(m["psnr_by_hospital"]) == [0, 1] and m["label_acc"] == 1.0
    # both come back, well above both nulls (measured: 29.7 and 25.9 dB vs 13.7 dB for the participants' average)
    assert min(m["psnr_by_hospital"].values()) > m["psnr_participants_mean"] + 8
    assert m["psnr"] > m["psnr_null"] + 8
    assert attack.artifacts and attack.artifacts[-1].name == "inversion_inverting_gradients_round1_aggregate.png"


# --- tabular (EHR) inversion ------------------------------------------------------------------


@pytest.mark.parametrize("outputs,steps", [(2, 1), (2, 5), (1, 1), (1, 4)])
def test_tabular_inversion_logistic_regression_single_record_is_exact(outputs, steps):
    torch.manual_seed(outputs * 10 + steps)
    model = nn.Linear(13, outputs)
    x, y = torch.randn(1, 13), torch.tensor([1])
    update = local_update(model, x, y, lr=0.05, steps=steps)
    result = inversion.tabular_inversion(model, flat_params(model), update, 13, 1, local=LocalTraining(0.05, steps))
    err = leakage.tabular_errors(result.x, x, tol=1e-3)
    assert err["records_recovered"] == 1 and err["mean_abs_error"] < 1e-4
    assert result.labels.tolist() == [1]


def test_tabular_inversion_observe_reports_feature_errors(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(13, 16), nn.ReLU(), nn.Linear(16, 2))
    x, y = torch.randn(1, 13), torch.tensor([0])
    update = local_update(model, x, y, lr=0.05, steps=3)
    attack = inversion.TabularInversionAttack(target_hospital=3, target_round=2, tol=0.01)
    metrics = attack.observe(2, {3: update}, update, flat_params(model), _ctx(model, Split(x, y), tmp_path, 0.05, 3))
    assert metrics["records_recovered"] == 1 and metrics["records_total"] == 1
    assert len(metrics["feature_abs_error"]) == 13 and max(metrics["feature_abs_error"]) < 1e-3
    assert metrics["label_acc"] == 1.0


def test_tabular_inversion_scores_against_the_population_mean_record(tmp_path):
    """The null: the mean record of the other hospitals, scored the same way (hand-computed);
    an exact recovery beats it with a paired effect below 0 on the error."""
    torch.manual_seed(0)
    model = nn.Linear(13, 2)
    x, y = torch.randn(1, 13), torch.tensor([1])
    others = torch.randn(5, 13) * 0.5 + 1.0
    update = local_update(model, x, y, lr=0.05, steps=1)
    ctx = _ctx(model, Split(x, y), tmp_path, 0.05, 1)
    ctx.extra["truth"] = {3: Split(x, y), 0: Split(others[:2], torch.tensor([0, 1])),
                          1: Split(others[2:], torch.tensor([0, 1, 0]))}
    m = inversion.TabularInversionAttack(target_hospital=3, target_round=2, tol=0.01).observe(
        2, {3: update}, update, flat_params(model), ctx)
    null = (others.double().mean(0) - x.double()).abs()
    assert m["mean_abs_error_null"] == pytest.approx(float(null.mean()), rel=1e-6)  # the mean record in float32
    assert m["records_recovered"] == 1 and m["records_recovered_null"] == 0
    st = m["stats"]["mean_abs_error"]
    assert st["null_kind"] == "population_mean" and st["effect"] == pytest.approx(m["mean_abs_error"] - float(null.mean()))
    assert st["effect"] < -0.5
    assert m["stats"]["records_recovered"]["value"] == 1.0 and m["stats"]["records_recovered"]["null"] == 0.0


def test_tabular_inversion_under_secure_aggregation_scores_every_participant():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(13, 16), nn.ReLU(), nn.Linear(16, 2))
    x, y = torch.randn(2, 13), torch.tensor([0, 1])
    aggregate = torch.stack([local_update(model, x[h:h + 1], y[h:h + 1], lr=0.05) for h in range(2)]).mean(0)
    ctx = AttackContext(server_round=2, participants=[0, 1], extra={
        "model_fn": lambda: copy.deepcopy(model), "local": {"lr": 0.05, "epochs": 1, "batch_size": 1},
        "num_samples": {0: 1, 1: 1}, "truth": {0: Split(x[:1], y[:1]), 1: Split(x[1:], y[1:])}})
    m = inversion.TabularInversionAttack(target_round=2, iterations=50).observe(2, None, aggregate,
                                                                                flat_params(model), ctx)
    assert m["on_aggregate"] == 1.0 and m["participants"] == 2 and m["num_images"] == 2
    assert m["records_total"] == 2 and len(m["feature_abs_error"]) == 13
    # the null: each record against the other participant's record (its hospital left out)
    assert m["mean_abs_error_null"] == pytest.approx(float((x[0] - x[1]).abs().mean()), rel=1e-6)
    assert m["stats"]["mean_abs_error"]["null_kind"] == "population_mean"


# --- membership inference ---------------------------------------------------------------------


def test_auroc_matches_sklearn():
    from sklearn.metrics import roc_auc_score

    g = torch.Generator().manual_seed(0)
    pos, neg = torch.randn(50, generator=g) + 0.5, torch.randint(0, 3, (40,), generator=g).float()  # with ties
    expected = roc_auc_score([1] * 50 + [0] * 40, torch.cat([pos, neg]).numpy())
    assert membership.auroc(pos, neg) == pytest.approx(expected)
    assert membership.advantage(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 1.0


def _overfit_toy():
    torch.manual_seed(0)
    # random labels over 10 classes: members are memorised, non-members are wrong 90% of the time
    members = Split(torch.randn(40, 10), torch.randint(0, 10, (40,)))
    non_members = Split(torch.randn(200, 10), torch.randint(0, 10, (200,)))
    model = nn.Sequential(nn.Linear(10, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(model(members.x), members.y).backward()
        opt.step()
    return model, members, non_members


@pytest.mark.parametrize("score", ["loss", "confidence"])
def test_membership_auroc_near_one_on_overfit_model(score):
    model, members, non_members = _overfit_toy()
    ctx = AttackContext(extra={"members": {0: members}, "holdout": {0: non_members}})
    metrics = membership.LossThresholdMIA(score=score).evaluate(model, non_members, ctx)
    assert metrics["auroc_h0"] > 0.95 and metrics["auroc_mean"] == metrics["auroc_h0"]
    assert metrics["advantage_h0"] > 0.8


def test_membership_auroc_near_half_on_untrained_model():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
    same = lambda n: Split(torch.randn(n, 10), torch.randint(0, 3, (n,)))  # noqa: E731
    ctx = AttackContext(extra={"members": {0: same(1000), 1: same(1000)},
                               "non_members": {0: same(1000), 1: same(1000)}})
    metrics = membership.LossThresholdMIA(target_hospital=[1], non_members="test").evaluate(model, same(1), ctx)
    assert set(metrics) == {"auroc_h1", "advantage_h1", "auroc_stratified_h1", "auroc_mean", "auroc_max",
                            "advantage_mean", "auroc_stratified_mean", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr",
                            "stats"}
    assert 0.44 < metrics["auroc_h1"] < 0.56


def test_calibrated_membership_on_overfit_model():
    model, members, non_members = _overfit_toy()
    ctx = AttackContext(extra={"members": {0: members}, "holdout": {0: non_members}})
    attack = membership.CalibratedLossMIA(ref_epochs=5)
    metrics = attack.evaluate(model, non_members, ctx)
    assert metrics["auroc_h0"] > 0.9
    assert 0 in attack._references  # trained once, reused next round
    assert attack.evaluate(model, non_members, ctx)["auroc_h0"] == metrics["auroc_h0"]


# --- presets ----------------------------------------------------------------------------------


PRESETS = {"dlg": inversion.INVERSION_ATTACKS, "idlg": inversion.INVERSION_ATTACKS,
           "inverting_gradients": inversion.INVERSION_ATTACKS, "tabular_inversion": inversion.INVERSION_ATTACKS,
           "membership_loss": membership.MEMBERSHIP_ATTACKS, "membership_calibrated": membership.MEMBERSHIP_ATTACKS,
           "record_provenance": {"record_provenance": provenance.RecordProvenance}}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_options_are_the_class_options(preset):
    doc = yaml.safe_load((ROOT / "attacks" / f"{preset}.yaml").read_text())
    cls = PRESETS[preset][doc["attack"]]
    assert doc["threat"]["goal"] == cls.goal == "confidentiality"
    assert doc["threat"]["adversary"] == "curious_server"
    options = {k: v for k, v in doc.items() if k not in ("attack", "description", "threat")}
    attack = cls(**options)
    assert attack.name == doc["attack"]

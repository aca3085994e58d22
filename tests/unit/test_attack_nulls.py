"""Every attack metric with its null and CI (issue 13.1), backdoor durability and main-task
cost (13.3), the membership protocol (13.4) and record provenance (issue 14.4)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fedsec.attacks import membership, nulls, provenance
from fedsec.attacks.base import AttackContext
from fedsec.data.base import FederatedDataset, Split

ROOT = Path(__file__).resolve().parents[2]


# --- value / null / effect / CI ----------------------------------------------------------------


def test_mean_stat_arithmetic_on_a_fixture():
    hits = np.array([1] * 30 + [0] * 70, dtype=float)
    null = np.array([1] * 20 + [0] * 80, dtype=float)  # paired: the first 20 hit under both
    s = nulls.mean_stat(hits, null, "untrained", seed=3)
    assert s["value"] == pytest.approx(0.30) and s["null"] == pytest.approx(0.20)
    assert s["effect"] == pytest.approx(0.10) and s["n"] == 100
    lo, hi = s["ci"]
    assert lo < 0.30 < hi and hi - lo < 0.25
    # the paired effect: each resample's value - null is the share of records 20..29 drawn
    elo, ehi = s["effect_ci"]
    assert 0.0 < elo < 0.10 < ehi
    assert s["at_floor"] is False
    assert nulls.mean_stat(hits, null, "untrained", seed=3) == s  # seeded
    same = nulls.mean_stat(hits, hits, "untrained")
    assert same["effect"] == 0.0 and same["effect_ci"] == [0.0, 0.0] and same["at_floor"] is True


def test_one_record_gives_no_interval():
    # one reconstructed image: every bootstrap resample is that image, so a "CI" would be the
    # point itself; the entry must say there is no interval rather than claim [x, x]
    s = nulls.mean_stat([28.1], [17.0], "population_mean")
    assert s["value"] == pytest.approx(28.1) and s["effect"] == pytest.approx(11.1) and s["n"] == 1
    assert s["ci"] is None and s["effect_ci"] is None and s["at_floor"] is None
    assert "no interval" in nulls.describe(s)
    assert nulls.mean_stat([28.1, 20.0], [17.0, 17.5], "population_mean")["effect_ci"] is not None


def test_stat_at_floor_follows_the_ci():
    assert nulls.stat(0.6, 0.5, [0.45, 0.7], [-0.05, 0.2])["at_floor"] is True
    assert nulls.stat(0.6, 0.5, [0.55, 0.7], [0.02, 0.2])["at_floor"] is False
    assert nulls.stat(0.6, 0.5, [0.45, 0.7])["at_floor"] is True  # no effect CI: the value's CI
    assert "at floor" in nulls.describe(nulls.stat(0.6, 0.5, [0.45, 0.7], [-0.05, 0.2], null_kind="untrained"))


def _round(r, asr, at_floor, extra=None):
    stats = {"asr": nulls.stat(asr, 0.2, [asr - 0.05, asr + 0.05],
                               [-0.01, 0.1] if at_floor else [0.05, 0.5], 100, "no_attack_run")}
    return {"round": r, "global": {"balanced_accuracy": 0.7}, "attack": {"asr": asr, "stats": stats, **(extra or {})}}


class _Scenario:
    def __init__(self, rounds, window, null_run=None):
        class F:
            pass
        self.federation = F()
        self.federation.rounds = rounds
        self.attacks = [{"attack": "ehr_trigger", "preset": "ehr_trigger", "rounds": window,
                         **({"null_run": null_run} if null_run else {})}]


def test_summary_attack_block_and_durability_on_a_fixture_run_record(tmp_path):
    asr = [0.9, 0.95, 0.97, 0.8, 0.6, 0.5, 0.3, 0.25]
    rounds = [_round(i + 1, a, at_floor=i + 1 >= 7) for i, a in enumerate(asr)]
    (tmp_path / "summary.json").write_text(json.dumps({"final": {"balanced_accuracy": 0.75, "auroc": 0.8}}))
    block = nulls.attack_summary(rounds, _Scenario(8, [1, 3], str(tmp_path)))
    assert block["asr"] == 0.25 and "stats" in block and "stats" not in block["stats"]
    s = block["stats"]["asr"]
    assert s["value"] == 0.25 and s["null"] == 0.2 and s["effect"] == pytest.approx(0.05)
    d = block["durability"]
    assert d["window"] == [1, 3] and d["at_end_of_attack"] == 0.97
    assert d["after"] == {"1": 0.8, "3": 0.5, "5": 0.25}
    assert d["rounds_to_floor"] == 4 and d["censored_after"] == 5  # round 7 = 3 + 4
    cost = block["main_task_cost"]["balanced_accuracy"]
    assert cost["cost"] == pytest.approx(0.05) and cost["no_attack"] == 0.75
    # a window that covers the whole run: no durability
    assert "durability" not in nulls.attack_summary(rounds, _Scenario(8, [1, 8]))
    # never back at the floor within the run
    never = [_round(i + 1, a, at_floor=False) for i, a in enumerate(asr)]
    assert nulls.attack_summary(never, _Scenario(8, [1, 3]))["durability"]["rounds_to_floor"] is None


def test_two_attacks_keep_both_stats():
    dst = {"a": 1.0, "stats": {"x": {"value": 1}}}
    nulls.merge_attack_metrics(dst, {"b": 2.0, "stats": {"y": {"value": 2}}})
    assert dst == {"a": 1.0, "b": 2.0, "stats": {"x": {"value": 1}, "y": {"value": 2}}}


# --- membership protocol ------------------------------------------------------------------------


def _dataset(seed=0):
    g = torch.Generator().manual_seed(seed)
    train = []
    for n, pos in ((120, 0.3), (60, 0.6), (31, 0.5)):
        y = (torch.rand(n, generator=g) < pos).long()
        train.append(Split(torch.randn(n, 5, generator=g), y))
    return FederatedDataset(["a", "b", "c"], train, [s.subset(range(5)) for s in train], 2, (5,))


def test_holdout_is_never_trained_on_and_is_label_stratified():
    data = _dataset()
    before = [s for s in data.train]
    membership.reserve_holdout(data, 0.25, seed=7)
    for h, (orig, train, held) in enumerate(zip(before, data.train, data.holdout)):
        assert len(train) + len(held) == len(orig)
        train_rows = {r.numpy().tobytes() for r in train.x}
        assert not any(r.numpy().tobytes() in train_rows for r in held.x)  # never in training
        for c in (0, 1):  # each label's share reserved: round(0.25 * n_c)
            n_c = int((orig.y == c).sum())
            assert int((held.y == c).sum()) == max(1, round(0.25 * n_c)) if n_c >= 2 else 0
    again = _dataset()
    membership.reserve_holdout(again, 0.25, seed=7)
    assert all(torch.equal(a.x, b.x) for a, b in zip(again.holdout, data.holdout))  # server == hospitals


def test_heart_task_reserves_the_holdout_from_training():
    from fedsec.scenario import load_scenario
    from fedsec.tasks import build_task

    plain = build_task(load_scenario(ROOT / "scenarios" / "heart_fedavg.yaml"))
    s = load_scenario(ROOT / "scenarios" / "heart_fedavg.yaml", ["attacks=membership_loss"])
    task = build_task(s)
    for h in range(4):
        assert len(task.data.train[h]) + len(task.data.holdout[h]) == len(plain.data.train[h])
        assert len(task.data.holdout[h]) == pytest.approx(0.2 * len(plain.data.train[h]), abs=2)
    old = build_task(load_scenario(ROOT / "scenarios" / "heart_fedavg.yaml",
                                   ["attacks=membership_loss", "attacks[0].non_members=test"]))
    assert old.data.holdout is None and len(old.data.train[0]) == len(plain.data.train[0])


def _heart_ctx(seed=0):
    from fedsec.scenario import load_scenario
    from fedsec.tasks import build_task

    s = load_scenario(ROOT / "scenarios" / "heart_fedavg.yaml", ["attacks=membership_loss", f"seed={seed}"])
    task = build_task(s)
    extra = {"members": dict(enumerate(task.data.train)), "holdout": dict(enumerate(task.data.holdout)),
             "model_fn": task.make_model, "scenario": s}
    # the run's last round: the bootstrap CIs are computed there (earlier rounds: value and null only)
    return task, AttackContext(s.federation.rounds, extra=extra, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_untrained_model_auroc_ci_includes_half(seed):
    task, ctx = _heart_ctx(seed)
    untrained = task.make_model(seed=100 + seed)
    out = membership.LossThresholdMIA().evaluate(untrained, None, ctx)
    for name in ("auroc_mean", "auroc_stratified_mean"):
        s = out["stats"][name]
        assert s["ci"][0] <= 0.5 <= s["ci"][1], (name, s)
        assert s["null_ci"][0] <= 0.5 <= s["null_ci"][1], (name, s)
        assert s["null_kind"] == "untrained"
    assert 0.0 <= out["tpr_at_1pct_fpr"] <= 1.0
    ctx.server_round = 1
    early = membership.LossThresholdMIA().evaluate(untrained, None, ctx)["stats"]["auroc_mean"]
    assert early["ci"] is None and early["value"] == pytest.approx(out["stats"]["auroc_mean"]["value"])


def test_label_stratified_auroc_weights_each_label_by_its_pairs():
    """A skewed hospital: label 1 has 4 members and 4 non-members with scores that do not
    separate them (AUROC 0.5 within the label); label 0 has 2 members and ONE non-member, which
    happens to score lowest (AUROC 1.0 within the label). Pairs of the same label: 16 and 2, so
    the stratified AUROC is (0.5 * 16 + 1.0 * 2) / 18 = 5/9, not the unweighted (0.5 + 1.0) / 2."""
    s_in = np.array([1.0, 4.0, 5.0, 8.0, 0.5, 0.6])
    s_out = np.array([2.0, 3.0, 6.0, 7.0, 0.1])  # label 1: members win 0 + 2 + 2 + 4 = 8 of 16 pairs
    y_in, y_out = np.array([1, 1, 1, 1, 0, 0]), np.array([1, 1, 1, 1, 0])
    sets = {0: {"s_in": s_in, "s_out": s_out, "n_in": s_in * 0, "n_out": s_out * 0, "y_in": y_in, "y_out": y_out}}
    plain, stats = membership.mia_stats(sets, seed=0, n_boot=20)
    assert plain["auroc_stratified_h0"] == pytest.approx(5 / 9)
    assert stats["auroc_stratified_mean"]["value"] == pytest.approx(5 / 9)
    # the untrained null (all scores tied) is exactly 0.5 in every resample
    assert stats["auroc_stratified_mean"]["null"] == pytest.approx(0.5)
    assert stats["auroc_stratified_mean"]["null_ci"] == pytest.approx([0.5, 0.5])


def test_membership_effect_ci_excludes_zero_on_an_overfit_model():
    from tests.unit.test_attacks_privacy import _overfit_toy

    model, members, non_members = _overfit_toy()
    out = membership.LossThresholdMIA().evaluate(model, None, AttackContext(extra={
        "members": {0: members}, "holdout": {0: non_members}}))
    s = out["stats"]["auroc_mean"]
    assert s["value"] > 0.95 and s["effect_ci"][0] > 0.2 and s["at_floor"] is False
    assert out["tpr_at_1pct_fpr"] > 0.5


def test_tpr_at_fpr_on_a_fixture():
    pos = np.array([[5.0, 4.0, 3.0, 0.5]])
    neg = np.array([np.arange(100) / 100.0])  # 0.00 .. 0.99
    # FPR <= 1%: threshold 0.98 (one non-member above it); 3 of 4 members above
    assert membership._tpr_rows(pos, neg, 0.01)[0] == 0.75
    assert membership._tpr_rows(pos, neg, 0.001)[0] == 0.75  # threshold 0.99
    assert membership._auroc_rows(pos, neg)[0] == pytest.approx((3 + 0.505) / 4)  # 0.5 beats 0.00-0.49, ties 0.50


# --- record provenance --------------------------------------------------------------------------


def _provenance_fixture():
    g = torch.Generator().manual_seed(0)
    means = torch.tensor([[2.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 2.0, 0]])
    truth = {}
    for h, n in enumerate((80, 50, 30)):
        x = torch.randn(n, 4, generator=g) + means[h]
        # each hospital its own outcome rule: the update that fits a record best is its own
        y = [(x[:, 3] > 0), (x[:, 3] < 0), torch.ones(n, dtype=torch.bool)][h]
        truth[h] = Split(x, y.long())
    make = lambda seed=None: (torch.manual_seed(seed) if seed is not None else None, nn.Linear(4, 2))[1]  # noqa
    glob = make(0)
    from fedsec.attacks.inversion import flat_params

    g0 = flat_params(glob)
    updates = {}
    for h, split in truth.items():
        m = make(0)
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        for _ in range(20):
            opt.zero_grad()
            F.cross_entropy(m(split.x), split.y).backward()
            opt.step()
        updates[h] = flat_params(m) - g0
    ctx = AttackContext(1, extra={"truth": truth, "model_fn": make, "num_samples": {h: len(s) for h, s in truth.items()}},
                        generator=torch.Generator().manual_seed(1))
    return updates, g0, ctx


def test_provenance_beats_its_null_when_updates_carry_the_records():
    updates, g0, ctx = _provenance_fixture()
    out = provenance.RecordProvenance().observe(1, updates, None, g0, ctx)
    assert out["provenance_null"] == pytest.approx(80 / 160)  # always guess the largest hospital
    assert out["provenance_null_random"] == pytest.approx((80**2 + 50**2 + 30**2) / 160**2)
    s = out["stats"]["provenance_acc"]
    assert s["value"] == out["provenance_acc"] and s["null"] == out["provenance_null"]
    assert s["value"] > 0.6 and s["effect_ci"][0] > 0.05 and s["at_floor"] is False


def test_provenance_is_at_its_null_on_untrained_updates():
    updates, g0, ctx = _provenance_fixture()
    zero = {h: torch.zeros_like(u) for h, u in updates.items()}  # nothing learnt: the guess is the null's
    out = provenance.RecordProvenance().observe(1, zero, None, g0, ctx)
    s = out["stats"]["provenance_acc"]
    assert s["value"] == s["null"] == 0.5 and s["at_floor"] is True
    assert provenance.RecordProvenance().observe(1, None, torch.zeros(10), g0, ctx) == {
        "blocked_by_secure_aggregation": 1.0}


# --- one real run (inline engine, seconds) ------------------------------------------------------


def test_backdoor_run_records_floor_durability_and_main_task_cost(tmp_path):
    import fedsec

    base = ROOT / "scenarios" / "heart_fedavg.yaml"
    common = ["engine.name=inline", "federation.rounds=6"]
    clean = fedsec.run(str(base), overrides=common, out=tmp_path / "clean", progress=False)
    assert clean["attack"] == {}
    run = fedsec.run(str(base), overrides=common + [
        "attacks=ehr_trigger", "attacks[0].hospitals=[3]", "attacks[0].rounds=[1,3]",
        f"attacks[0].null_run={tmp_path / 'clean'}"], out=tmp_path / "bd", progress=False)
    a = run["attack"]
    s = a["stats"]["asr"]
    assert s["null_kind"] == "no_attack_run" and s["value"] == pytest.approx(a["asr"])
    assert s["effect"] == pytest.approx(s["value"] - s["null"])
    assert s["ci"][0] <= s["value"] <= s["ci"][1]
    assert a["durability"]["window"] == [1, 3] and set(a["durability"]["after"]) == {"1", "3"}
    ba = a["stats"]["main_task_balanced_accuracy"]
    assert ba["null"] == pytest.approx(clean["final"]["balanced_accuracy"], abs=1e-6)
    assert ba["value"] == pytest.approx(run["final"]["balanced_accuracy"], abs=1e-6)
    assert a["main_task_cost"]["balanced_accuracy"]["cost"] == pytest.approx(-ba["effect"], abs=1e-6)
    on_disk = json.loads((tmp_path / "bd" / "summary.json").read_text())
    assert on_disk["attack"]["stats"]["asr"]["null"] == pytest.approx(s["null"])


# --- inversion: the population-mean reconstruction ----------------------------------------------


def test_inversion_null_is_the_population_mean_image():
    from fedsec.attacks import inversion

    g = torch.Generator().manual_seed(0)
    truth = {h: Split(torch.rand(4, 1, 8, 8, generator=g), torch.zeros(4, dtype=torch.long)) for h in range(3)}
    mean = inversion.population_mean(truth, 0, (1, 8, 8))
    assert torch.allclose(mean, torch.cat([truth[1].x, truth[2].x]).mean(0))  # the target's images left out
    attack = inversion.InvertingGradientsAttack()
    target = truth[0]
    good = inversion.InversionResult(x=target.x + 0.01 * torch.randn(4, 1, 8, 8, generator=g),
                                     labels=target.y, objective=0.0, seconds=0.0, iterations=0)
    s = attack.score(good, target, (1, 8, 8), mean)["stats"]["psnr"]
    assert s["null_kind"] == "population_mean" and s["value"] > 35 and s["null"] < 15
    assert s["effect"] == pytest.approx(s["value"] - s["null"]) and s["at_floor"] is False
    blurry = inversion.InversionResult(x=mean.expand(4, 1, 8, 8).clone(), labels=target.y, objective=0.0, seconds=0.0, iterations=0)
    s = attack.score(blurry, target, (1, 8, 8), mean)["stats"]["psnr"]
    assert s["effect"] == pytest.approx(0.0, abs=1e-9) and s["at_floor"] is True


def test_null_run_that_is_not_a_run_is_a_scenario_error(tmp_path):
    from fedsec.errors import ScenarioError
    from fedsec.scenario import load_scenario

    with pytest.raises(ScenarioError) as err:
        load_scenario(ROOT / "scenarios" / "heart_fedavg.yaml",
                      ["attacks=ehr_trigger", "attacks[0].hospitals=[3]", f"attacks[0].null_run={tmp_path}"])
    assert "null_run" in str(err.value) and "summary.json" in str(err.value)

"""Robust aggregation rules against their papers' definitions, on inputs small enough to check
by hand, plus the properties each defense promises and the errors a user sees."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedsec.errors import FedsecError
from fedsec.strategies import coordinatewise
from fedsec.strategies.base import RuleContext
from fedsec.strategies.coordinatewise import (
    coordinate_mean_around_median,
    coordinate_median,
    coordinate_trimmed_mean,
)
from fedsec.strategies.geometry import squared_distances
from fedsec.strategies.rules import RULES, make_rule, rule_options
from fedsec.strategies.trust import FoolsGold

T = torch.tensor


def ones(n: int) -> torch.Tensor:
    return torch.ones(n)


def ctx(**kw) -> RuleContext:
    kw.setdefault("generator", torch.Generator().manual_seed(0))
    return RuleContext(**kw)


# Five points in the plane; squared distances (rows = points):
#   a(0,0): b 1, c 4, d 8, e 200      b(1,0): a 1, c 5, d 5, e 181
#   c(0,2): a 4, b 5, d 4, e 164      d(2,2): a 8, b 5, c 4, e 128
#   e(10,10): a 200, b 181, c 164, d 128
# With f = 1 each score sums the n - f - 2 = 2 nearest: [1+4, 1+5, 4+4, 4+5, 128+164].
KRUM_POINTS = T([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [2.0, 2.0], [10.0, 10.0]])
KRUM_SCORES = [5.0, 6.0, 8.0, 9.0, 292.0]


def test_krum_scores_and_choice_match_hand_computation():
    res = make_rule("krum", num_malicious=1)(KRUM_POINTS, ones(5))
    assert res.info["scores"] == pytest.approx(KRUM_SCORES)
    assert res.update.tolist() == [0.0, 0.0]
    assert res.info["selected"] == [0]
    assert res.flagged == [1, 2, 3, 4]


def test_multi_krum_averages_the_m_best_scores():
    res = make_rule("multi_krum", num_malicious=1, num_selected=3)(KRUM_POINTS, ones(5))
    assert res.update.tolist() == pytest.approx([1 / 3, 2 / 3])
    assert res.flagged == [3, 4]
    # Default m = n - f = 4 drops only the outlier; weighted by samples unless weighted=false.
    res = make_rule("multi_krum", num_malicious=1)(KRUM_POINTS, T([1.0, 1.0, 1.0, 5.0, 1.0]))
    assert res.flagged == [4]
    assert res.update.tolist() == pytest.approx([(1 + 10) / 8, (2 + 10) / 8])
    res = make_rule("multi_krum", num_malicious=1, weighted=False)(KRUM_POINTS, T([1.0, 1.0, 1.0, 5.0, 1.0]))
    assert res.update.tolist() == pytest.approx([3 / 4, 4 / 4])


def test_num_malicious_defaults_to_the_context():
    rule = make_rule("krum")
    assert rule(KRUM_POINTS, ones(5), ctx(num_malicious=1)).info["scores"] == pytest.approx(KRUM_SCORES)
    # f = 0: three neighbours each; a: 1+4+8.
    assert rule(KRUM_POINTS, ones(5), ctx(num_malicious=0)).info["scores"][0] == pytest.approx(13.0)


def test_krum_and_multi_krum_agree_with_flower():
    from flwr.server.strategy.aggregate import aggregate_krum

    g = torch.Generator().manual_seed(1)
    x = torch.randn(11, 40, generator=g)
    x[:2] += 3.0  # two shifted hospitals
    results = [([row.numpy().astype(np.float64)], 10) for row in x]
    for m in (1, 5):
        expected = aggregate_krum(results, num_malicious=2, to_keep=m if m > 1 else 0)[0]
        name = "krum" if m == 1 else "multi_krum"
        opts = {"num_malicious": 2} | ({"num_selected": m} if m > 1 else {})
        got = make_rule(name, **opts)(x, ones(11)).update
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_coordinate_median_of_known_matrix():
    even = T([[1.0, 10.0], [2.0, 20.0], [3.0, -5.0], [100.0, 0.0]])
    assert make_rule("median")(even, ones(4)).update.tolist() == [2.5, 5.0]
    odd = torch.cat([even, T([[4.0, 7.0]])])
    res = make_rule("median")(odd, ones(5))
    assert res.update.tolist() == [3.0, 7.0]
    assert res.flagged == []


def test_trimmed_mean_of_known_matrix():
    x = T([[1.0, -50.0], [2.0, 0.0], [3.0, 1.0], [4.0, 2.0], [100.0, 3.0]])
    res = make_rule("trimmed_mean", trim=1)(x, ones(5))
    assert res.update.tolist() == [3.0, 1.0]  # mean(2,3,4), mean(0,1,2)
    assert res.flagged == []
    # beta = 0.2 of 5 rows cuts int(1.0) = 1 from each end: the same.
    assert make_rule("trimmed_mean", beta=0.2)(x, ones(5)).update.tolist() == [3.0, 1.0]
    # beta = 0.3 of 5 still cuts int(1.5) = 1 (floor, as scipy and Flower).
    assert make_rule("trimmed_mean", beta=0.3)(x, ones(5)).info["trim"] == 1


def test_order_statistics_with_ties_and_the_smallest_sizes():
    # Duplicates (e.g. several hospitals sending 0) must not shift the selected ranks.
    x = T([[1.0, 3.0], [1.0, 3.0], [3.0, 3.0], [4.0, 0.0]])
    assert make_rule("median")(x, ones(4)).update.tolist() == [2.0, 3.0]
    assert make_rule("trimmed_mean", trim=1)(x, ones(4)).update.tolist() == [2.0, 3.0]
    # n - 2*trim = 1: the trimmed mean is the median.
    y = T([[5.0], [-7.0], [2.0]])
    assert make_rule("trimmed_mean", trim=1)(y, ones(3)).update.tolist() == [2.0]
    g = torch.Generator().manual_seed(17)
    z = torch.randint(-3, 4, (12, 500), generator=g).float()  # many ties per column
    np.testing.assert_allclose(coordinate_median(z).numpy(), np.median(z.numpy(), axis=0))
    expected = np.sort(z.numpy(), axis=0)[3:9].mean(axis=0)
    np.testing.assert_allclose(coordinate_trimmed_mean(z, 3).numpy(), expected, rtol=1e-6)


def test_trimmed_mean_without_trimming_is_the_mean():
    x = torch.randn(7, 33, generator=torch.Generator().manual_seed(2))
    for rule in (make_rule("trimmed_mean", beta=0.0), make_rule("trimmed_mean", trim=0)):
        torch.testing.assert_close(rule(x, ones(7)).update, x.mean(0))


def test_coordinatewise_rules_agree_with_numpy_and_flower():
    from flwr.serverapp.strategy.bulyan import aggregate_n_closest_weights
    from flwr.serverapp.strategy.fedtrimmedavg import trim_mean

    for n in (6, 7, 20):
        x = torch.randn(n, 3001, generator=torch.Generator().manual_seed(n))
        xn = x.numpy()
        np.testing.assert_allclose(coordinate_median(x).numpy(), np.median(xn, axis=0), rtol=1e-6)
        expected = trim_mean(xn, 2 / n + 1e-9)  # Flower cuts int(beta * n) = 2 from each end
        np.testing.assert_allclose(coordinate_trimmed_mean(x, 2).numpy(), expected, rtol=1e-5, atol=1e-6)
        med = [np.median(xn, axis=0)]
        expected = aggregate_n_closest_weights(med, [[row] for row in xn], n - 2)[0]
        np.testing.assert_allclose(coordinate_mean_around_median(x, n - 2).numpy(), expected, rtol=1e-5, atol=1e-6)


def test_torch_sort_path_matches_numpy_partition_path(monkeypatch):
    # The numpy selection runs on CPU; other devices take torch.sort. Both must agree.
    x = torch.randn(9, 5000, generator=torch.Generator().manual_seed(3))
    fast = (coordinate_median(x), coordinate_trimmed_mean(x, 2), coordinate_mean_around_median(x, 5))
    monkeypatch.setattr(coordinatewise, "_NUMPY_DTYPES", ())
    slow = (coordinate_median(x), coordinate_trimmed_mean(x, 2), coordinate_mean_around_median(x, 5))
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b)


def test_median_is_bounded_when_two_of_five_rows_are_arbitrary():
    g = torch.Generator().manual_seed(4)
    benign = torch.randn(3, 50, generator=g)
    x = torch.cat([benign, torch.full((2, 50), 1e6)])
    out = make_rule("median")(x, ones(5)).update
    assert bool((out >= benign.min(0).values).all()) and bool((out <= benign.max(0).values).all())
    # Two rows at +1e6 and the trimmed mean (trim 2) does the same; the mean does not.
    assert float(make_rule("trimmed_mean", trim=2)(x, ones(5)).update.abs().max()) < 10
    assert float(make_rule("fedavg")(x, ones(5)).update.min()) > 1e5


def test_bulyan_on_a_line_by_hand():
    # 1-D points 0, 1, 2, 3, 4, 45, 100 with f = 1: theta = 5 picks, beta = 3 values kept.
    # Recursive Krum (k = m - f - 2 nearest, at least 1, on the m rows left):
    #   m=7, k=4: scores 30, 15, 10, 15, 30, big, big           -> pick 2
    #   m=6, k=3: 0:26, 1:14, 3:14, 4:26; tie 1/3 goes to the smaller total distance (3)
    #   m=5, k=2: 0:17, 1:10, 4:25                               -> pick 1
    #   m=4, k=1: 0:16, 4:16 tie; 4 is closer to 45 and 100      -> pick 4
    #   m=3, k=1: 0:2025, 45:2025 tie (mutual nearest); 45 is closer to 100 -> pick 45
    # Picks 1, 2, 3, 4, 45: median 3, the 3 values closest to it are 2, 3, 4 -> 3.
    x = T([[0.0], [1.0], [2.0], [3.0], [4.0], [45.0], [100.0]])
    res = make_rule("bulyan", num_malicious=1)(x, ones(7))
    assert res.info["selected"] == [2, 3, 1, 4, 5]
    assert res.update.tolist() == [3.0]
    assert res.flagged == [0, 6]
    assert (res.info["theta"], res.info["beta"]) == (5, 3)


def test_bulyan_coordinate_step_by_hand():
    x = T([[0.0], [2.9], [3.0], [3.2], [10.0]])
    assert coordinate_mean_around_median(x, 3).item() == pytest.approx((2.9 + 3.0 + 3.2) / 3)
    # Uneven drops: the median of [-9, 0, 1, 1.2, 1.3, 8] is 1.1; the 3 farthest are -9, 8 and
    # 0 (two below, one above), leaving 1, 1.2, 1.3.
    y = T([[-9.0], [0.0], [1.0], [1.2], [1.3], [8.0]])
    assert coordinate_mean_around_median(y, 3).item() == pytest.approx((1.0 + 1.2 + 1.3) / 3)


@pytest.mark.parametrize("m,keep", [(7, 3), (8, 2), (9, 1), (12, 6), (40, 30), (41, 31)])
def test_bulyan_coordinate_step_matches_flower_for_every_drop_count(m, keep):
    # keep <= m/2 takes the all-rows path, the others the candidates-only path.
    from flwr.serverapp.strategy.bulyan import aggregate_n_closest_weights

    x = torch.randn(m, 2000, generator=torch.Generator().manual_seed(m), dtype=torch.float64)
    xn = x.numpy()
    expected = aggregate_n_closest_weights([np.median(xn, axis=0)], [[row] for row in xn], keep)[0]
    np.testing.assert_allclose(coordinate_mean_around_median(x, keep).numpy(), expected, rtol=1e-10, atol=1e-12)


def test_bulyan_agrees_with_flower_recursive_bulyan():
    from flwr.server.strategy.aggregate import aggregate_bulyan, aggregate_krum

    # Flower's legacy aggregate_bulyan is the paper's recursive Krum (the Message-API Bulyan
    # picks theta rows in one pass). f = 3 keeps >= 2 neighbours in every score, so there are
    # no exact ties for the two implementations to break differently.
    g = torch.Generator().manual_seed(5)
    x = torch.randn(15, 30, generator=g)
    x[:3] += 4.0
    results = [([row.numpy().astype(np.float64)], 1) for row in x]
    expected = aggregate_bulyan(results, num_malicious=3, aggregation_rule=aggregate_krum, to_keep=0)[0]
    got = make_rule("bulyan", num_malicious=3)(x, ones(15))
    np.testing.assert_allclose(got.update.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert len(got.flagged) == 2 * 3 and got.info["theta"] == 15 - 2 * 3


def test_geometric_median_of_a_quadrilateral_is_where_the_diagonals_cross():
    # For four points in convex position the geometric median is the diagonals' crossing:
    # (0,0)-(3,3) is y = x, (4,0)-(0,1) is y = 1 - x/4, so (0.8, 0.8).
    x = T([[0.0, 0.0], [4.0, 0.0], [3.0, 3.0], [0.0, 1.0]], dtype=torch.float64)
    res = make_rule("geometric_median", max_iterations=2000, tol=0.0, nu=1e-12)(x, ones(4))
    assert res.update.tolist() == pytest.approx([0.8, 0.8], abs=1e-4)


def test_geometric_median_ignores_a_far_outlier_and_uses_weights():
    x = T([[0.0, 0.0], [2.0, 0.0], [1.0, 1.0], [1e6, 1e6]])
    out = make_rule("geometric_median", max_iterations=200)(x, ones(4)).update
    assert float(out.norm()) < 3.0
    # Collinear 0, 1, 10 with weights 1, 1, 3: the weighted median point is 10.
    line = T([[0.0], [1.0], [10.0]], dtype=torch.float64)
    out = make_rule("geometric_median", max_iterations=500, tol=0.0)(line, T([1.0, 1.0, 3.0])).update
    assert out.item() == pytest.approx(10.0, abs=1e-3)


def test_norm_bounding_by_hand_and_bound_holds():
    x = T([[3.0, 4.0], [0.0, 1.0]])
    res = make_rule("norm_bounding", max_norm=1.0)(x, ones(2))
    assert res.update.tolist() == pytest.approx([0.3, 0.9])  # mean of (0.6, 0.8) and (0, 1)
    assert res.info["clipped"] == [0]
    y = torch.randn(10, 100, generator=torch.Generator().manual_seed(6)) * 50
    for m in (0.1, 1.0, 7.0):
        out = make_rule("norm_bounding", max_norm=m)(y, torch.arange(1.0, 11.0)).update
        assert float(out.norm()) <= m * (1 + 1e-5)
    # Default bound: the median norm of the round.
    res = make_rule("norm_bounding")(T([[1.0, 0.0], [0.0, 2.0], [0.0, -30.0]]), ones(3))
    assert res.info["max_norm"] == 2.0
    assert res.update.tolist() == pytest.approx([1 / 3, 0.0], abs=1e-6)


def test_centered_clipping_by_hand_and_state_between_rounds():
    x = T([[3.0, 4.0], [0.0, 0.5]])
    rule = make_rule("centered_clipping", tau=1.0, iterations=1)
    first = rule(x, ones(2)).update
    assert first.tolist() == pytest.approx([0.3, 0.65])  # from v = 0: (0.6, 0.8) and (0, 0.5)
    second = rule(x, ones(2)).update
    d0 = x[0] - first
    expected = first + (d0 / d0.norm() + (x[1] - first)) / 2  # row 0 clipped, row 1 not
    torch.testing.assert_close(second, expected)
    rule.reset()
    torch.testing.assert_close(rule(x, ones(2)).update, first)


def test_centered_clipping_moves_at_most_tau_per_iteration():
    y = torch.randn(8, 64, generator=torch.Generator().manual_seed(7)) * 100
    out = make_rule("centered_clipping", tau=2.0, iterations=3)(y, ones(8)).update
    assert float(out.norm()) <= 3 * 2.0 + 1e-4


def test_fltrust_by_hand():
    root = T([1.0, 0.0])
    x = T([[2.0, 0.0], [0.0, 3.0], [-5.0, 0.0], [1.0, 1.0]])
    res = make_rule("fltrust")(x, ones(4), ctx(root_update=root))
    c = 1 / math.sqrt(2)
    assert res.info["trust"] == pytest.approx([1.0, 0.0, 0.0, c])
    # (1 * (1, 0) + c * (c, c)) / (1 + c): each update rescaled to |root| = 1.
    assert res.update.tolist() == pytest.approx([1.5 / (1 + c), 0.5 / (1 + c)], rel=1e-6)
    assert res.flagged == [1, 2]


def test_fltrust_gives_zero_trust_to_the_opposite_of_the_root_update():
    g = torch.Generator().manual_seed(8)
    root = torch.randn(200, generator=g)
    benign = root + 0.3 * torch.randn(4, 200, generator=g)
    x = torch.cat([benign, -10 * root[None]])
    res = make_rule("fltrust")(x, ones(5), ctx(root_update=root))
    assert res.info["trust"][4] == 0.0 and res.flagged == [4]
    # Magnitudes are normalised to the root's: a 1000x benign update gains nothing.
    x[0] *= 1000
    assert float(make_rule("fltrust")(x, ones(5), ctx(root_update=root)).update.norm()) <= float(root.norm()) * 1.0001
    # All updates opposite: no trust, no step.
    res = make_rule("fltrust")(-benign, ones(4), ctx(root_update=root))
    assert res.flagged == [0, 1, 2, 3] and float(res.update.abs().max()) == 0.0


def test_foolsgold_weights_from_a_known_similarity_matrix():
    # Reference-code arithmetic: clients 0 and 1 are 0.9-similar, 2 is alone. After pardoning,
    # w = 1 - max cs = [0.1, 0.1, 1]; 1 -> 0.99; logit + 0.5 gives [-1.70, -1.70, 5.10] -> [0, 0, 1].
    cos = T([[1.0, 0.9, 0.0], [0.9, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    assert FoolsGold.weights_from_similarity(cos, 1.0).tolist() == [0.0, 0.0, 1.0]
    # Pardoning: 2 is 0.5-similar to sybil 0 (max 0.9); its similarity is scaled by 0.5/0.9.
    cos = T([[1.0, 0.9, 0.5], [0.9, 1.0, 0.0], [0.5, 0.0, 1.0]], dtype=torch.float64)
    w = FoolsGold.weights_from_similarity(cos, 1.0)
    assert w[2].item() == 1.0 and w[0].item() == 0.0


def test_foolsgold_zeroes_identical_sybils_and_remembers_history():
    g = torch.Generator().manual_seed(9)
    honest = torch.randn(4, 300, generator=g)
    sybil = torch.randn(1, 300, generator=g)
    x = torch.cat([honest, sybil, sybil, sybil])
    rule = make_rule("foolsgold")
    res = rule(x, ones(7), ctx(client_ids=[10, 11, 12, 13, 20, 21, 22]))
    w = res.info["weights"]
    assert w[4:] == [0.0, 0.0, 0.0] and min(w[:4]) > 0.5
    assert res.flagged == [4, 5, 6]
    torch.testing.assert_close(res.update, (T(w) @ x) / 7)
    # Next round the sybils disguise their update with noise; their summed history still
    # points the same way, so they stay at 0 (a fresh rule, without history, is fooled).
    x2 = torch.cat([torch.randn(4, 300, generator=g), sybil + 1.0 * torch.randn(3, 300, generator=g)])
    ids = [10, 11, 12, 13, 20, 21, 22]
    assert rule(x2, ones(7), ctx(client_ids=ids)).info["weights"][4:] == [0.0, 0.0, 0.0]
    fresh = make_rule("foolsgold")(x2, ones(7), ctx(client_ids=ids)).info["weights"]
    assert min(fresh[4:]) > 0.0


def _flame_round(seed: int):
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(500, generator=g)
    benign = direction + 0.5 * torch.randn(7, 500, generator=g)
    attack = -3 * direction + 0.5 * torch.randn(2, 500, generator=g)
    return torch.cat([benign, attack]), benign


def test_flame_flags_the_outlier_direction_and_clips_to_the_median_norm():
    x, benign = _flame_round(10)
    res = make_rule("flame", noise_lambda=0.0)(x, ones(9), ctx())
    # HDBSCAN with one cluster keeps only its core (as the paper's hdbscan setting does), so a
    # benign straggler may be flagged too; the opposite-direction pair always is.
    assert {7, 8} <= set(res.flagged)
    admitted = res.info["admitted"]
    assert len(admitted) >= 9 // 2 + 1 and not {7, 8} & set(admitted)
    median_norm = float(x.norm(dim=1).median())
    assert res.info["clip_norm"] == pytest.approx(median_norm, rel=1e-5)
    expected = torch.stack([x[i] * min(1.0, median_norm / float(x[i].norm())) for i in admitted]).mean(0)
    torch.testing.assert_close(res.update, expected, rtol=1e-5, atol=1e-5)


def test_flame_noise_comes_from_the_round_generator():
    x, _ = _flame_round(11)
    rule = make_rule("flame", noise_lambda=0.01)
    a = rule(x, ones(9), ctx(generator=torch.Generator().manual_seed(3))).update
    b = rule(x, ones(9), ctx(generator=torch.Generator().manual_seed(3))).update
    c = rule(x, ones(9), ctx(generator=torch.Generator().manual_seed(4))).update
    quiet = make_rule("flame", noise_lambda=0.0)(x, ones(9)).update
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)
    std = float((a - quiet).std())
    assert std == pytest.approx(0.01 * float(x.norm(dim=1).median()), rel=0.2)


def test_dnc_removes_the_colluding_outliers():
    g = torch.Generator().manual_seed(12)
    benign = torch.randn(8, 20000, generator=g)
    shift = torch.randn(20000, generator=g)
    x = torch.cat([benign, benign.mean(0) + 2.0 * shift[None], benign.mean(0) + 2.2 * shift[None]])
    rule = make_rule("dnc", num_malicious=2, subsample_dim=1000)
    res = rule(x, ones(10), ctx(generator=torch.Generator().manual_seed(0)))
    assert res.flagged == [8, 9]
    torch.testing.assert_close(res.update, benign.mean(0))
    # c = 0.5 removes int(0.5 * 2) = 1 per iteration.
    res = make_rule("dnc", num_malicious=2, filter_fraction=0.5)(x, ones(10), ctx())
    assert len(res.flagged) == 1 and res.flagged[0] in (8, 9)


def test_dnc_is_reproducible_from_the_generator():
    x = torch.randn(12, 50000, generator=torch.Generator().manual_seed(13))
    rule = make_rule("dnc", num_malicious=3, iterations=2, subsample_dim=500)
    a = rule(x, ones(12), ctx(generator=torch.Generator().manual_seed(1)))
    b = rule(x, ones(12), ctx(generator=torch.Generator().manual_seed(1)))
    assert a.flagged == b.flagged and torch.equal(a.update, b.update)
    assert 3 <= len(a.flagged) <= 6


def test_fedavg_is_the_weighted_mean_and_sum_only():
    x = T([[1.0, 0.0], [0.0, 4.0]])
    assert make_rule("fedavg")(x, T([3.0, 1.0])).update.tolist() == [0.75, 1.0]
    assert RULES.get("fedavg").needs_individual_updates is False
    assert all(cls.needs_individual_updates for name, cls in RULES.items() if name != "fedavg")
    with pytest.raises(FedsecError, match="sum to 0"):
        make_rule("fedavg")(x, T([0.0, 0.0]))


def _permutation_cases():
    return [
        ("fedavg", {}),
        ("krum", {"num_malicious": 1}),
        ("multi_krum", {"num_malicious": 1}),
        ("bulyan", {"num_malicious": 1}),
        ("median", {}),
        ("trimmed_mean", {"trim": 2}),
        ("geometric_median", {}),
        ("norm_bounding", {}),
        ("centered_clipping", {"tau": 1.0, "iterations": 3}),
        ("fltrust", {}),
        ("foolsgold", {}),
        ("flame", {"noise_lambda": 0.0}),
        ("dnc", {"num_malicious": 1, "subsample_dim": 64}),
    ]


@pytest.mark.parametrize("name,options", _permutation_cases())
def test_rules_are_invariant_to_row_order(name, options):
    g = torch.Generator().manual_seed(14)
    x = torch.randn(9, 256, generator=g, dtype=torch.float64)
    x[0] += 5.0
    w = torch.arange(1.0, 10.0, dtype=torch.float64)
    perm = torch.randperm(9, generator=g)
    root = x[1:].mean(0)
    a = make_rule(name, **options)(x, w, ctx(root_update=root, generator=torch.Generator().manual_seed(2)))
    b = make_rule(name, **options)(x[perm], w[perm], ctx(root_update=root, generator=torch.Generator().manual_seed(2)))
    torch.testing.assert_close(a.update, b.update)
    assert sorted(a.flagged) == sorted(int(perm[i]) for i in b.flagged)


def test_every_registered_rule_runs_on_its_defaults():
    x = torch.randn(11, 300, generator=torch.Generator().manual_seed(15))
    for name in RULES:
        res = make_rule(name)(x, ones(11), ctx(root_update=x.mean(0), num_malicious=2))
        assert res.update.shape == (300,) and bool(torch.isfinite(res.update).all()), name
        assert all(0 <= i < 11 for i in res.flagged), name


def test_distances_survive_a_huge_update():
    # |x|^2 + |y|^2 - 2x.y in float32 around the mean would lose the benign distances when one
    # row is 1e6; measured from the median-norm row they stay exact to float32 precision.
    g = torch.Generator().manual_seed(16)
    x = torch.randn(6, 1000, generator=g)
    x[5] = 1e6
    got = squared_distances(x)[:5, :5]
    exact = torch.cdist(x[:5].double(), x[:5].double()) ** 2
    torch.testing.assert_close(got, exact, rtol=1e-4, atol=1e-2)


def test_unknown_rule_suggests_the_closest_name():
    with pytest.raises(FedsecError, match=r"unknown aggregation rule 'krun' \(did you mean 'krum'\?\)"):
        make_rule("krun")
    with pytest.raises(FedsecError, match="available: .*bulyan"):
        make_rule("zzz")


def test_unknown_option_names_it_and_lists_the_valid_ones():
    expected = r"no option 'betta' \(did you mean 'beta'\?\); options: num_malicious, trim, beta"
    with pytest.raises(FedsecError, match=expected):
        make_rule("trimmed_mean", betta=0.1)
    with pytest.raises(FedsecError, match="'median' has no option 'trim'; options: none"):
        make_rule("median", trim=1)
    assert rule_options("dnc") == {
        "num_malicious": None, "filter_fraction": 1.0, "iterations": 1, "subsample_dim": 10000
    }


@pytest.mark.parametrize(
    "name,options,n,match",
    [
        ("krum", {"num_malicious": 1}, 4, r"n > 2f \+ 2 .* f = 1.* n = 4"),
        ("multi_krum", {"num_malicious": 2}, 6, r"n > 2f \+ 2"),
        ("multi_krum", {"num_malicious": 1, "num_selected": 9}, 5, "num_selected = 9 is more than the 5"),
        ("bulyan", {"num_malicious": 1}, 6, r"n >= 4f \+ 3 .* f = 1.* n = 6"),
        ("trimmed_mean", {"trim": 3}, 6, r"n - 2\*trim >= 1"),
        ("dnc", {"num_malicious": 5}, 5, r"needs n > c \* f"),
    ],
)
def test_conditions_on_n_are_explained(name, options, n, match):
    with pytest.raises(FedsecError, match=match):
        make_rule(name, **options)(torch.randn(n, 4), ones(n))


@pytest.mark.parametrize(
    "name,options,match",
    [
        ("trimmed_mean", {"beta": 0.5}, r"'beta' must be in \[0, 0.5\)"),
        ("trimmed_mean", {"beta": "0.1"}, "option 'beta' expected float | null, got '0.1'"),
        ("trimmed_mean", {"trim": -1}, "'trim' must be an integer >= 0"),
        ("krum", {"num_malicious": -1}, "'num_malicious' must be an integer >= 0"),
        ("krum", {"num_malicious": True}, "option 'num_malicious' expected int | null, got True"),
        ("norm_bounding", {"max_norm": 0}, "'max_norm' must be a number > 0"),
        ("centered_clipping", {"iterations": 0}, "'iterations' must be an integer >= 1"),
        ("flame", {"noise_lambda": "high"}, "option 'noise_lambda' expected float, got 'high'"),
        ("multi_krum", {"weighted": "yes"}, "option 'weighted' expected bool, got 'yes'"),
    ],
)
def test_bad_option_values_are_rejected_with_the_rule_named(name, options, match):
    with pytest.raises(FedsecError, match=f"aggregation rule '{name}'.*{match}"):
        make_rule(name, **options)


def test_fltrust_without_a_root_update_says_what_is_missing():
    with pytest.raises(FedsecError, match="root_update"):
        make_rule("fltrust")(torch.randn(3, 4), ones(3))


# ---- one finite but enormous update (issue 13) --------------------------------------------


def _huge_round(norm: float, n_benign: int = 8, d: int = 200, seed: int = 21):
    """n_benign rows around a common direction and one attacker row of L2 norm ``norm``
    (float32, all finite) pointing in a random direction."""
    g = torch.Generator().manual_seed(seed)
    mu = 0.1 * torch.randn(d, generator=g)
    benign = mu + 0.5 * torch.randn(n_benign, d, generator=g)
    direction = torch.randn(d, generator=g, dtype=torch.float64)
    attack = (direction / direction.norm() * norm).float()
    assert bool(torch.isfinite(attack).all())
    return torch.cat([benign, attack[None]]), benign


def _exact_geometric_median(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A reference independent of the rule's coefficient algebra: plain Weiszfeld in float64
    over the d coordinates, from the benign mean, until the iterate stops moving in float64."""
    x, w = x.double(), w.double() / w.sum()
    v = x[:-1].mean(0)
    for _ in range(100000):
        dist = (x - v).norm(dim=1).clamp(min=1e-300)
        beta = w / dist
        new = beta @ x / beta.sum()
        if float((new - v).norm()) <= 1e-15 * float(dist.median()):
            return new
        v = new
    raise AssertionError("reference Weiszfeld did not converge")


def _in_benign_box(out: torch.Tensor, benign: torch.Tensor) -> bool:
    """Each coordinate inside [min, max] of the benign rows' values (float32 slack)."""
    lo, hi = benign.min(0).values, benign.max(0).values
    slack = 1e-5 * (hi - lo).abs().max()
    return bool(((out >= lo - slack) & (out <= hi + slack)).all())


def _check_huge(name: str, res, x: torch.Tensor, benign: torch.Tensor, w: torch.Tensor) -> None:
    """What each rule promises when one of nine updates is arbitrary (f = 1).

    radius: the largest distance of a benign update to the benign mean. A defense "holds" if
    the attacker moves its output by less than the benign updates already disagree.
    """
    out = res.update.double()
    mean = benign.double().mean(0)
    radius = float((benign.double() - mean).norm(dim=1).max())
    attacker = x.shape[0] - 1
    off = float((out - mean).norm())
    if name in ("fedavg", "freerider_filter"):
        # No defense (the free-rider filter bounds nothing and, without history, flags nothing
        # but zero updates): the exact weighted mean, attacker included (finite, not NaN or inf).
        torch.testing.assert_close(out, (w.double() / w.sum()) @ x.double(), rtol=1e-5, atol=0.0)
    elif name == "foolsgold":
        # FoolsGold judges directions, never magnitudes: the weights must be those of the same
        # directions at a harmless scale (before the fix, float32 overflow zeroed every one),
        # and the output exactly sum w_i u_i / n.
        small = x.clone()
        small[attacker] = small[attacker] / small[attacker].norm()
        expected_w = make_rule("foolsgold")(small, w, ctx()).info["weights"]
        assert res.info["weights"] == pytest.approx(expected_w, abs=1e-9)
        assert min(res.info["weights"][:attacker]) > 0
        torch.testing.assert_close(out, (T(res.info["weights"]).double() / 9) @ x.double(), rtol=1e-5, atol=1e-3)
    elif name in ("krum", "multi_krum", "bulyan", "dnc"):
        # Selection rules: the attacker is never selected, so the output is built from benign
        # rows only (a benign row, or coordinate-wise inside the benign values).
        assert attacker in res.flagged, name
        assert _in_benign_box(res.update, benign), name
    elif name in ("median", "trimmed_mean", "size_aware"):
        # Coordinate-wise rules with f = 1: per coordinate, one value is cut or outvoted, so
        # every coordinate stays within the benign values (Yin et al. 2018; size_aware: the
        # attacker's capped weight <= the weight trimmed at each end).
        assert _in_benign_box(res.update, benign), name
    elif name == "geometric_median":
        # The exact geometric median (breakdown point 1/2) within 1e-6 of the benign radius.
        exact = _exact_geometric_median(x, w)
        assert float((out - exact).norm()) <= 1e-6 * radius
        assert off <= radius
    elif name in ("norm_bounding", "centered_clipping", "fltrust", "flame"):
        # Magnitude-bounding rules: the attacker's row is clipped (to the median norm, to tau
        # around the centre, to |root update|), so it moves the mean by at most that bound / n.
        assert off <= radius, (name, off, radius)
    else:
        raise AssertionError(f"rule '{name}' has no stated promise in this test: add one")
    assert off <= radius or name in ("fedavg", "foolsgold", "freerider_filter"), (name, off, radius)


@pytest.mark.parametrize("name", sorted(RULES))
def test_every_rule_survives_one_finite_update_of_norm_1e22(name):
    x, benign = _huge_round(1e22)
    w = ones(9)
    res = make_rule(name)(x, w, ctx(root_update=benign.mean(0), num_malicious=1, client_ids=list(range(9))))
    assert res.update.shape == (200,) and bool(torch.isfinite(res.update).all()), name
    _check_huge(name, res, x, benign, w)


@pytest.mark.parametrize("name", sorted(RULES))
def test_every_rule_stays_finite_with_two_updates_at_the_float32_maximum(name):
    # f = 2 of 11: both attackers send 3.4e38 in every coordinate (norm 4.8e39), so even a
    # float32 sum of two of their values overflows.
    g = torch.Generator().manual_seed(28)
    benign = 0.1 * torch.randn(200, generator=g) + 0.5 * torch.randn(9, 200, generator=g)
    big = torch.full((2, 200), torch.finfo(torch.float32).max)
    x = torch.cat([benign, big])
    res = make_rule(name)(x, ones(11), ctx(root_update=benign.mean(0), num_malicious=2, client_ids=list(range(11))))
    assert bool(torch.isfinite(res.update).all()), name
    if name not in ("fedavg", "foolsgold", "freerider_filter"):  # the rules that do not bound magnitudes
        mean = benign.double().mean(0)
        radius = float((benign.double() - mean).norm(dim=1).max())
        assert float((res.update.double() - mean).norm()) <= radius, name


def _preset(name: str) -> dict:
    import yaml
    from pathlib import Path

    spec = yaml.safe_load((Path(__file__).resolve().parents[2] / "strategies" / f"{name}.yaml").read_text())
    return {k: v for k, v in spec.items() if k not in ("rule", "description")}


@pytest.mark.parametrize("norm", [1e12, 1e22])
def test_geometric_median_preset_matches_the_exact_geometric_median(norm):
    x, benign = _huge_round(norm, d=50, seed=22)
    w = torch.arange(1.0, 10.0)
    res = make_rule("geometric_median", **_preset("geometric_median"))(x, w)
    exact = _exact_geometric_median(x, w)
    assert res.info["converged"]
    radius = float((benign.double() - benign.double().mean(0)).norm(dim=1).max())
    # float32 output of a float64 computation: 1e-6 of the benign spread.
    assert float((res.update.double() - exact).norm()) <= 1e-6 * radius
    # Optimality, independently of any algorithm: the weighted unit vectors to the updates
    # sum to (almost) zero at the geometric median.
    v = res.update.double()
    diff = v - x.double()
    grad = ((w.double() / w.sum())[:, None] * diff / diff.norm(dim=1, keepdim=True)).sum(0)
    assert float(grad.norm()) < 1e-4
    # The old preset (10 iterations from the mean, relative objective change) ended 2.5e4 away
    # for norm 1e12; the exact median is within the benign updates' spread.
    assert float((res.update.double() - benign.double().mean(0)).norm()) <= radius


def test_geometry_is_finite_for_any_finite_float32_update():
    from fedsec.strategies.geometry import cosine_similarities, row_norms

    x = torch.randn(4, 1000, generator=torch.Generator().manual_seed(23))
    x[3] = torch.finfo(torch.float32).max  # every entry 3.4e38: norm 1.1e40
    dist = squared_distances(x)
    cos, norms = cosine_similarities(x)
    assert bool(torch.isfinite(dist).all() and torch.isfinite(cos).all() and torch.isfinite(norms).all())
    assert float(row_norms(x)[3]) == pytest.approx(3.4028234663852886e38 * math.sqrt(1000), rel=1e-12)
    exact = torch.cdist(x[:3].double(), x[:3].double()) ** 2
    torch.testing.assert_close(dist[:3, :3], exact, rtol=1e-9, atol=1e-9)


def test_foolsgold_weights_do_not_depend_on_the_rounding_of_a_self_cosine():
    # Hospital 0 is dissimilar to everyone (negative cosines): the maximum of its row is its
    # own similarity minus 1. Rounded to 1 - 1e-16 that was -1e-16, below hospital 1's 0, and
    # pardoning divided by the 0: hospital 0 got weight 0. As the reference code (epsilon,
    # diagonal 1 - 1) the weights are identical whatever the rounding.
    base = T([[1.0, -0.5, -0.4, -0.3],
              [-0.5, 1.0, 0.6, 0.1],
              [-0.4, 0.6, 1.0, 0.2],
              [-0.3, 0.1, 0.2, 1.0]], dtype=torch.float64)
    w = FoolsGold.weights_from_similarity(base, 1.0)
    assert w[0].item() == 1.0
    for self_cos in (1.0 - 1e-16, 1.0 + 2.3e-16, 1.0 - 3e-16):
        cos = base.clone()
        cos[0, 0] = self_cos
        cos[2, 2] = 2.0 - self_cos
        assert torch.equal(FoolsGold.weights_from_similarity(cos, 1.0), w), self_cos


def test_foolsgold_logit_and_pardoning_match_the_reference_code():
    # ML/code/model_aggregator.py::foolsgold of DistributedML/FoolsGold, transcribed in numpy.
    def reference(cs_in):
        n = cs_in.shape[0]
        eps = 1e-5
        cs = cs_in - np.eye(n)
        maxcs = np.max(cs, axis=1) + eps
        for i in range(n):
            for j in range(n):
                if i != j and maxcs[i] < maxcs[j]:
                    cs[i][j] = cs[i][j] * maxcs[i] / maxcs[j]
        wv = 1 - np.max(cs, axis=1)
        wv[wv > 1] = 1
        wv[wv < 0] = 0
        wv = wv / np.max(wv)
        wv[wv == 1] = 0.99
        wv = np.log(wv / (1 - wv) + eps) + 0.5
        wv[(np.isinf(wv) + wv > 1)] = 1
        wv[wv < 0] = 0
        return wv

    g = torch.Generator().manual_seed(24)
    for _ in range(20):
        feats = torch.randn(7, 30, generator=g, dtype=torch.float64)
        feats[4:] = feats[4] + 0.3 * torch.randn(3, 30, generator=g, dtype=torch.float64)  # sybils
        unit = feats / feats.norm(dim=1, keepdim=True)
        cos = unit @ unit.T
        cos.fill_diagonal_(1.0)
        np.testing.assert_allclose(FoolsGold.weights_from_similarity(cos, 1.0).numpy(), reference(cos.numpy()),
                                   rtol=1e-12, atol=1e-12)


def test_trimmed_mean_trims_f_by_default():
    g = torch.Generator().manual_seed(25)
    benign = torch.randn(6, 40, generator=g)
    x = torch.cat([benign, torch.full((2, 40), 1e6)])
    res = make_rule("trimmed_mean")(x, ones(8), ctx(num_malicious=2))
    assert res.info["trim"] == 2
    assert _in_benign_box(res.update, benign)
    # num_malicious given to the rule wins over the scenario's count.
    assert make_rule("trimmed_mean", num_malicious=3)(x, ones(8), ctx(num_malicious=2)).info["trim"] == 3
    # No attacker declared: f = 0, nothing trimmed (the mean).
    torch.testing.assert_close(make_rule("trimmed_mean")(benign, ones(6), ctx()).update, benign.mean(0))


def test_trimmed_mean_refuses_to_trim_fewer_than_f():
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(26))
    with pytest.raises(FedsecError, match=r"aggregation rule 'trimmed_mean': option 'trim': trim = 1 .*f = 2"):
        make_rule("trimmed_mean", trim=1)(x, ones(8), ctx(num_malicious=2))
    # Flower's beta = 0.2 of 8 hospitals trims 1 < 2: refused too, naming beta.
    with pytest.raises(FedsecError, match=r"option 'beta': beta = 0.2 trims floor\(0.2 \* 8\) = 1 .*f = 2"):
        make_rule("trimmed_mean", beta=0.2)(x, ones(8), ctx(num_malicious=2))
    assert make_rule("trimmed_mean", trim=3)(x, ones(8), ctx(num_malicious=2)).info["trim"] == 3


@pytest.mark.parametrize("name", ["fedavg", "median", "geometric_median"])
@pytest.mark.parametrize("bad", [float("nan"), -1.0, float("inf")])
def test_nan_or_negative_sample_counts_are_refused_naming_the_hospital(name, bad):
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(27))
    w = T([5.0, bad, 7.0])
    with pytest.raises(FedsecError, match=rf"'{name}': sample counts must be finite and >= 0; got hospital 11 \(row 1\)"):
        make_rule(name)(x, w, ctx(client_ids=[10, 11, 12]))
    with pytest.raises(FedsecError, match=r"got row 1: "):
        make_rule(name)(x, w)


def test_a_scenario_trimming_fewer_than_its_attackers_is_refused_before_it_runs():
    from pathlib import Path

    from fedsec.errors import ScenarioError
    from fedsec.scenario import load_scenario

    heart = str(Path(__file__).resolve().parents[2] / "scenarios" / "heart_fedavg.yaml")
    attacks = "attacks=[{preset: gaussian, hospitals: [2, 3]}]"
    with pytest.raises(ScenarioError, match=r"key 'strategy.trim': .*'trim' = 1 trims fewer values at each end "
                                            r"than the f = 2"):
        load_scenario(heart, ["strategy={rule: trimmed_mean, trim: 1}", attacks])
    # trim = f = 2 of 4 hospitals leaves nothing to average: refused too, naming the bound
    with pytest.raises(ScenarioError, match=r"key 'strategy': trimmed_mean tolerates .* needs at least 5 hospitals"):
        load_scenario(heart, ["strategy={preset: trimmed_mean}", attacks])
    one = "attacks=[{preset: gaussian, hospitals: [3]}]"
    assert load_scenario(heart, ["strategy={preset: trimmed_mean}", one]).strategy["rule"] == "trimmed_mean"
    load_scenario(heart, ["strategy={rule: trimmed_mean, trim: 1}", one])

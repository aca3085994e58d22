"""Attacks that adapt to the defense in force (fedsec.attacks.adaptive, fedsec.attacks.defense):
they read the rule's declared bound, stay inside it, search their scale against the rule, beat
their fixed-scale counterparts, and never touch a test split."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsec.attacks import ATTACKS, make_attack
from fedsec.attacks.adaptive import deviation, search_scale
from fedsec.attacks.base import AttackContext
from fedsec.attacks.defense import Defense, defense_from_context, defense_in_force
from fedsec.errors import FedsecError
from fedsec.registry import RULES
from fedsec.strategies.rules import make_rule

ROOT = Path(__file__).resolve().parents[2]
ADAPTIVE = ("adaptive_alie", "adaptive_ipm", "adaptive_min_max", "adaptive_min_sum", "adaptive_fang",
            "bounded_ehr_trigger", "bounded_badnets", "flame_evading_ehr_trigger", "flame_evading_badnets")


def heart_scenario(tmp_path, strategy: str, privacy: str = "{}", attack: str = "ehr_trigger"):
    from fedsec.scenario import load_scenario

    path = tmp_path / "s.yaml"
    path.write_text(f"""
name: t
task: {{name: heart_disease, model: logistic}}
federation: {{partition: {{name: natural}}, rounds: 2, local: {{epochs: 1, batch_size: 8, lr: 0.05}}}}
strategy: {strategy}
attacks: [{{preset: {attack}, hospitals: [3]}}]
privacy: {privacy}
engine: {{name: inline}}
""")
    return load_scenario(path)


def coalition_ctx(defense: Defense, server_round: int = 1) -> AttackContext:
    return AttackContext(server_round, None, [9], 10, None, torch.Generator().manual_seed(0),
                         extra={"defense": defense})


def moved(attack_name: str, benign: torch.Tensor, defense: Defense, n_malicious: int = 1, **options) -> float:
    """How far the defense's aggregate of benign + forged rows lands from the benign mean."""
    attack = make_attack(attack_name, **options)
    forged = attack.collude(benign, n_malicious, coalition_ctx(defense))
    agg = defense.simulate(torch.cat([benign, forged]))
    return deviation(agg, benign.mean(dim=0))


# --- reading the defense ---------------------------------------------------------------------
def test_rules_declare_their_norm_bound():
    assert make_rule("norm_bounding", max_norm=2.5).bound() == 2.5
    assert make_rule("norm_bounding").bound() == "median"
    assert make_rule("flame").bound() == "median"
    assert make_rule("centered_clipping", tau=3.0).bound() == 3.0
    assert make_rule("median").bound() is None and make_rule("fedavg").bound() is None


def test_defense_in_force_reads_the_scenario_and_the_rules_declaration(tmp_path):
    d = defense_in_force(heart_scenario(tmp_path, "{preset: norm_bounding, max_norm: 2.5}"))
    assert (d.rule, d.norm_bound, d.central_dp_clip) == ("norm_bounding", 2.5, None)
    assert d.options["max_norm"] == 2.5 and d.options["noise_std"] == 0.0  # declared default filled in
    assert d.clip() == 2.5 and d.names == ("norm_bounding",)
    # central DP (with FedAvg, the only rule it allows): its clipping norm is the bound
    c = defense_in_force(heart_scenario(tmp_path, "fedavg", "{central_dp: {noise_multiplier: 0.1, clipping_norm: 1.5}}"))
    assert (c.rule, c.norm_bound, c.central_dp_clip, c.central_dp_side) == ("fedavg", None, 1.5, "server")
    assert c.clip() == 1.5 and c.names == ("fedavg", "central_dp")
    f = defense_in_force(heart_scenario(tmp_path, "flame"))
    assert f.norm_bound == "median" and f.clip() is None and f.clip(0.7) == 0.7
    t = defense_in_force(heart_scenario(tmp_path, "trimmed_mean"))
    assert (t.rule, t.num_malicious, t.norm_bound) == ("trimmed_mean", 1, None)  # f from the attack entry
    # the client side reads the same thing from its context's scenario
    s = heart_scenario(tmp_path, "{preset: norm_bounding, max_norm: 4.0}")
    assert defense_from_context(AttackContext(extra={"scenario": s})).clip() == 4.0
    with pytest.raises(FedsecError, match="defense"):
        defense_from_context(AttackContext())


def test_defense_simulation_is_the_rule_in_force():
    rows = torch.tensor([[1.0, 0.0], [0.0, 3.0], [0.0, 0.5]])
    d = Defense.of("norm_bounding", max_norm=1.0)
    assert torch.allclose(d.simulate(rows), torch.tensor([1.0, 1.5]) / 3)
    dp = Defense.of(central_dp_clip=0.5)  # FedAvg behind central DP's clipping
    assert torch.allclose(dp.simulate(rows), torch.tensor([0.5, 1.0]) / 3)
    assert torch.allclose(Defense.of("median").simulate(rows), torch.tensor([0.0, 0.5]))


def test_every_adaptive_attack_declares_registered_targets():
    for name in ADAPTIVE:
        targets = ATTACKS.get(name).spec().targets
        assert targets, name
        assert all(t in RULES or t == "central_dp" for t in targets), (name, targets)
    assert ATTACKS.get("alie").spec().targets == ()  # the fixed-scale attacks adapt to nothing
    assert "flame" in ATTACKS.get("flame_evading_ehr_trigger").spec().targets
    assert "norm_bounding" in ATTACKS.get("bounded_ehr_trigger").spec().targets


# --- the scale search ------------------------------------------------------------------------
def test_search_scale_finds_an_interior_maximum_and_the_smallest_of_a_plateau():
    s, v = search_scale(lambda x: -(x - 3.0) ** 2, 0.0, 10.0)
    assert abs(s - 3.0) < 0.01 and v > -1e-4
    s, v = search_scale(lambda x: min(x, 1.0), 0.0, 10.0)
    assert abs(s - 1.0) < 0.01 and v == pytest.approx(1.0)


def test_adaptive_ipm_eps_is_the_smallest_the_norm_bound_lets_through_in_full():
    # benign rows 0.5 (d = 1), norm bounding M = 1: the forged -0.5 eps counts up to norm 1, so
    # the aggregate (1.5 - min(0.5 eps, 1)) / 4 moves at most 0.375 from 0.5, first at eps = 2
    benign = torch.full((3, 1), 0.5)
    d = Defense.of("norm_bounding", max_norm=1.0)
    a = make_attack("adaptive_ipm")
    a.collude(benign, 1, coalition_ctx(d))
    assert abs(a.last_scale - 2.0) < 0.02 and a.last_deviation == pytest.approx(0.375)
    assert a.last_rule == "norm_bounding"


def test_adaptive_alie_z_is_the_hand_computed_optimum_against_the_median():
    # benign 1, 2, 3, 4 (mean 2.5, std sqrt(5/3)) and one forged 2.5 - z std: the median of the
    # five is the forged value while it lies in [2, 2.5], then stays at 2 -> z* = 0.5 / std
    benign = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    a = make_attack("adaptive_alie", direction="sign_std")
    a.collude(benign, 1, coalition_ctx(Defense.of("median")))
    assert abs(a.last_scale - 0.5 / math.sqrt(5 / 3)) < 0.01 and a.last_deviation == pytest.approx(0.5)


def test_adaptive_min_max_gamma_against_the_median_stays_inside_min_maxs_range():
    benign = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    a = make_attack("adaptive_min_max", perturbation="unit_vec")
    a.collude(benign, 1, coalition_ctx(Defense.of("median")))
    # min-max: |2.5 - gamma - 4| <= 3 (the benign diameter) -> gamma <= 1.5; the median moves
    # with the forged value down to 2, i.e. gamma* = 0.5
    assert a.last_gamma_agnostic == pytest.approx(1.5, abs=1e-4)
    assert abs(a.last_scale - 0.5) < 0.01 and a.last_deviation == pytest.approx(0.5)


def test_adaptive_fang_lambda_is_the_smallest_the_norm_bound_lets_through_in_full():
    benign = torch.full((3, 1), 0.5)  # unit = max |b| / sqrt(d) = 0.5: forged -0.5 s, clipped at 1
    a = make_attack("adaptive_fang", form="krum")
    a.collude(benign, 1, coalition_ctx(Defense.of("norm_bounding", max_norm=1.0)))
    assert abs(a.last_scale - 2.0) < 0.02 and a.last_deviation == pytest.approx(0.375)


# --- adaptive beats fixed --------------------------------------------------------------------
def synthetic(n=3, d=40, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.3 + 0.2 * torch.randn(n, d, generator=g)  # updates that agree on a direction


@pytest.mark.parametrize("seed", [0, 1])
def test_adaptive_coalitions_move_the_robust_aggregate_more_than_their_fixed_counterparts(seed):
    benign = synthetic(seed=seed)
    median, nb = Defense.of("median", num_malicious=1), Defense.of("norm_bounding", num_malicious=1)
    trimmed = Defense.of("trimmed_mean", num_malicious=1)
    # 3 benign + 1 attacker: ALIE's z_max is 0 (it sends the benign mean)
    assert moved("adaptive_alie", benign, median) > 1.5 * moved("alie", benign, median)
    assert moved("adaptive_ipm", benign, nb) > 1.5 * moved("ipm", benign, nb)
    assert moved("adaptive_min_max", benign, trimmed) >= moved("min_max", benign, trimmed) - 1e-9
    # norm bounding at the median norm: min-max's stealthy gamma is far below what the clip lets count
    assert moved("adaptive_min_max", benign, nb, stay_inside=False) > 1.5 * moved("min_max", benign, nb)
    assert moved("adaptive_fang", benign, nb, form="median") > 1.5 * moved("fang_median", benign, nb)
    flame = Defense.of("flame", num_malicious=1)  # FLAME admits the tuned ALIE row
    assert moved("adaptive_alie", benign, flame) > 1.5 * moved("alie", benign, flame)


def test_sign_direction_moves_a_two_logit_head_where_minus_std_cancels():
    # a two-class linear head: the two logit rows get opposite updates (w1 = -w0), so -std
    # shifts both logits equally (the margin w0 - w1 does not move); -sign(mean) * std does
    g = torch.Generator().manual_seed(3)
    w0 = 0.3 + 0.1 * torch.randn(4, 5, generator=g)
    benign = torch.cat([w0, -w0], dim=1)
    d = Defense.of("fedavg", num_malicious=1)  # the plain mean: the case the issue reports

    def margin_move(direction):
        a = make_attack("adaptive_alie", direction=direction)
        agg = d.simulate(torch.cat([benign, a.collude(benign, 1, coalition_ctx(d))]))
        ref = benign.mean(dim=0)
        return float(((agg[:5] - agg[5:]) - (ref[:5] - ref[5:])).abs().max())

    assert margin_move("std") < 1e-6
    assert margin_move("sign_std") > 0.05


# --- malicious hospitals: bounds and cosine -----------------------------------------------------
class _NoTestSplit:
    """A dataset whose test split must not be read by an attack's tuning."""

    def __init__(self, data):
        self._data = data

    def __getattr__(self, name):
        if name == "test":
            raise AssertionError("an attack read the test split")
        return getattr(self._data, name)


@pytest.fixture(scope="module")
def heart_task():
    from fedsec.scenario import load_scenario
    from fedsec.tasks import build_task

    s = load_scenario(ROOT / "scenarios" / "heart_sweep.yaml", ["engine.name=inline"])
    task = build_task(s)
    return s, dataclasses.replace(task, data=_NoTestSplit(task.data))


def poisoned_round(attack_name: str, defense_strategy: str, tmp_path, heart_task, privacy="{}", **options):
    """Hospital 3's round under ``attack_name``: (global, sent update, honest update, attack)."""
    from fedsec.core.params import flatten_state
    from fedsec.core.training import train_local

    base, task = heart_task
    scenario = heart_scenario(tmp_path, defense_strategy, privacy)
    scenario.federation.local = base.federation.local
    attack = make_attack(attack_name, **options)
    data = task.data.train[3]
    poisoned = attack.poison_data(data, np.random.default_rng(0), AttackContext(1, 3, [3], 4, task))
    model = task.make_model(seed=0)
    g = flatten_state(model.state_dict())
    train_local(model, poisoned, task, scenario.federation.local, torch.Generator().manual_seed(5))
    local = flatten_state(model.state_dict())
    ctx = AttackContext(1, 3, [3], 4, task, torch.Generator().manual_seed(7), extra={"scenario": scenario})
    sent = attack.poison_update(g, local, ctx) - g
    honest = attack.honest_update(g, ctx)
    return g, sent, honest, attack, local - g


def test_bounded_backdoor_fills_norm_boundings_bound_and_no_more(tmp_path, heart_task):
    _, sent, _, a, raw = poisoned_round("bounded_ehr_trigger", "{preset: norm_bounding, max_norm: 0.5}",
                                        tmp_path, heart_task)
    assert float(sent.norm()) <= 0.5 and float(sent.norm()) == pytest.approx(0.99 * 0.5, rel=1e-4)
    assert float(torch.nn.functional.cosine_similarity(sent, raw, dim=0)) > 0.9999  # same direction
    # central DP's clipping norm (server-side clipping of every row)
    _, sent, _, _, _ = poisoned_round("bounded_ehr_trigger", "fedavg", tmp_path, heart_task,
                                      "{central_dp: {noise_multiplier: 0.1, clipping_norm: 0.2}}")
    assert float(sent.norm()) == pytest.approx(0.99 * 0.2, rel=1e-4)
    # a median bound (FLAME) is estimated by the hospital's own honest update
    _, sent, honest, _, _ = poisoned_round("bounded_ehr_trigger", "flame", tmp_path, heart_task)
    assert float(sent.norm()) == pytest.approx(0.99 * float(honest.norm()), rel=1e-4)


def test_flame_evading_backdoor_meets_its_cosine_and_norm(tmp_path, heart_task):
    _, sent, honest, a, raw = poisoned_round("flame_evading_ehr_trigger", "flame", tmp_path, heart_task,
                                             min_cosine=0.95)
    cos = float(torch.nn.functional.cosine_similarity(sent.double(), honest.double(), dim=0))
    assert cos >= 0.95 - 1e-6
    assert float(sent.norm()) <= float(honest.norm())
    assert float(torch.nn.functional.cosine_similarity(raw, honest, dim=0)) < 0.95  # the constraint did work
    assert 0 < a.last_mix < 1


def test_bounded_backdoor_gets_more_through_norm_bounding_than_fixed_constrain_and_scale():
    # norm bounding M = 3: the fixed preset projects onto norm 1.0; the bounded one uses 3
    g = torch.zeros(20)
    local = torch.full((20,), 0.05)  # a backdoor update of norm 0.22
    benign = torch.full((3, 20), 0.02)
    d = Defense.of("norm_bounding", max_norm=3.0)
    fixed = make_attack("constrain_and_scale", gamma=4.0, norm_bound=1.0)
    bounded = make_attack("bounded_ehr_trigger")
    ctx = AttackContext(1, 3, [3], 4, None, extra={"defense": d})
    direction = local / local.norm()

    def pushed(update):
        return float(d.simulate(torch.cat([benign, update[None]])) @ direction)

    assert float(bounded.poison_update(g, local, ctx).norm()) <= 3.0
    assert pushed(bounded.poison_update(g, local, ctx)) > 2 * pushed(fixed.poison_update(g, local, ctx))


def test_tuning_never_reads_the_test_split(tmp_path, heart_task):
    # the task's test split raises when read (heart_task): every client-side adaptive attack
    # tunes on the hospital's own training rows only
    for name in ("bounded_ehr_trigger", "flame_evading_ehr_trigger"):
        _, sent, honest, _, _ = poisoned_round(name, "flame", tmp_path, heart_task)
        assert honest is not None and torch.isfinite(sent).all()
    with pytest.raises(AssertionError, match="test split"):
        heart_task[1].data.test


# --- bad options -----------------------------------------------------------------------------
@pytest.mark.parametrize("attack,override,key", [
    ("adaptive_alie", "attacks.0.max_scale=-1", "max_scale"),
    ("adaptive_alie", "attacks.0.direction=up", "direction"),
    ("bounded_ehr_trigger", "attacks.0.margin=1.5", "margin"),
    ("flame_evading_ehr_trigger", "attacks.0.min_cosine=2", "min_cosine"),
    ("adaptive_min_max", "attacks.0.stay_insid=true", "stay_insid"),
])
def test_bad_options_exit_2_naming_the_key(attack, override, key, capsys):
    from fedsec.cli import main

    code = main(["validate", str(ROOT / "scenarios" / "heart_sweep.yaml"), f"attacks={attack}", override])
    out = capsys.readouterr()
    assert code == 2 and f"attacks[0].{key}" in out.out + out.err


def test_two_malicious_hospitals_sharing_the_attack_each_train_on_their_own_rows(heart_task):
    # the inline engine runs every hospital in one process, with one attack instance
    from fedsec.core.params import flatten_state

    base, task = heart_task
    g = flatten_state(task.make_model(seed=0).state_dict())

    def honest(attack, hospital):
        ctx = AttackContext(2, hospital, [2, 3], 4, task, torch.Generator().manual_seed(11), extra={"scenario": base})
        return attack.honest_update(g, ctx)

    shared = make_attack("bounded_ehr_trigger")
    for h in (2, 3):
        shared.poison_data(task.data.train[h], np.random.default_rng(0), AttackContext(1, h, [2, 3], 4, task))
    alone = make_attack("bounded_ehr_trigger")
    alone.poison_data(task.data.train[2], np.random.default_rng(0), AttackContext(1, 2, [2, 3], 4, task))
    assert torch.equal(honest(shared, 2), honest(alone, 2))
    assert not torch.equal(honest(shared, 2), honest(shared, 3))

"""DP-SGD through Opacus: the epsilon fedsec reports is Opacus's for the same history, noise
buys privacy, it changes the update, and models Opacus cannot train fail clearly."""

import math
import warnings

import pytest
import torch
from flwr.app import RecordDict
from opacus.accountants import RDPAccountant
from opacus.data_loader import DPDataLoader
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedsec.data.base import Split
from fedsec.errors import FedsecError
from fedsec.privacy.dp_sgd import DPConfig, count_participation, epsilon, plan, sampling, train_dp_sgd
from fedsec.scenario import LocalConfig

LOCAL = LocalConfig(epochs=2, batch_size=4, lr=0.05)


class Toy:
    """The part of a fedsec Task that training uses."""

    model_name = "toy"

    @staticmethod
    def loss(logits, y, reduction="mean"):
        return nn.functional.cross_entropy(logits, y, reduction=reduction)


def data(n=40, f=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, f, generator=g)
    return Split(x, (x[:, 0] > 0).long())


def model(seed=0, bn=False):
    torch.manual_seed(seed)
    layers = [nn.Linear(5, 8)] + ([nn.BatchNorm1d(8)] if bn else []) + [nn.ReLU(), nn.Linear(8, 2)]
    return nn.Sequential(*layers)


def run(dp, participations=1, seed=0, m=None, split=None):
    m = m or model()
    return m, train_dp_sgd(m, split or data(), Toy(), LOCAL, DPConfig.parse(dp),
                           generator=torch.Generator().manual_seed(seed), participations=participations,
                           planned_rounds=10)


def test_reported_epsilon_is_opacus_accountant_for_the_same_history():
    z, rounds = 1.3, 3
    _, res = run({"noise_multiplier": z, "max_grad_norm": 1.0, "delta": 1e-3}, participations=rounds)
    # independently: 40 records, batch 4 -> q = 1/10, 10 steps per epoch, 2 epochs per round
    assert res.sample_rate == pytest.approx(0.1) and res.steps == 20
    acc = RDPAccountant()
    acc.history = [(z, 0.1, 20 * rounds)]
    assert res.epsilon == pytest.approx(acc.get_epsilon(delta=1e-3), rel=1e-12)
    # ... which is also what Opacus's own accountant records while training round after round
    from opacus import PrivacyEngine

    m = model()
    with pytest.warns(UserWarning, match="Secure RNG"):
        engine = PrivacyEngine(accountant="rdp")
    loader = DataLoader(TensorDataset(data().x, data().y), batch_size=4)
    dm, opt, dl = engine.make_private(module=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.05),
                                      data_loader=loader, noise_multiplier=z, max_grad_norm=1.0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Full backward hook.*")
        for _ in range(2 * rounds):
            for xb, yb in dl:
                opt.zero_grad()
                out = dm(xb)
                (Toy.loss(out, yb) if len(xb) else out.sum() * 0).backward()
                opt.step()
    assert res.epsilon == pytest.approx(engine.get_epsilon(1e-3), rel=1e-9)


def test_epsilon_is_finite_and_falls_with_more_noise():
    eps = [run({"noise_multiplier": z, "delta": 1e-3}, participations=5)[1].epsilon for z in (0.7, 1.0, 2.0, 4.0)]
    assert all(math.isfinite(e) and e > 0 for e in eps)
    assert eps == sorted(eps, reverse=True) and eps[0] > 2 * eps[-1]
    assert run({"noise_multiplier": 0.0})[1].epsilon == math.inf  # clipping only: no guarantee
    assert epsilon(1.0, 0.1, 0, 1e-3) == 0.0


def test_noise_changes_the_update_and_the_seed_fixes_it():
    base = {k: v.clone() for k, v in model().state_dict().items()}
    _, clipped = run({"noise_multiplier": 0.0, "max_grad_norm": 1.0})
    _, noisy = run({"noise_multiplier": 1.0, "max_grad_norm": 1.0})
    _, again = run({"noise_multiplier": 1.0, "max_grad_norm": 1.0})
    delta = lambda s: torch.cat([(s[k] - base[k]).flatten() for k in base])  # noqa: E731
    assert (delta(noisy.state) - delta(clipped.state)).norm() > 0.1 * delta(clipped.state).norm()
    for k in base:
        assert torch.equal(noisy.state[k], again.state[k])  # same seed, same sampling and noise
    assert list(noisy.state) == list(base)  # plain keys, no "_module." prefix
    _, other = run({"noise_multiplier": 1.0}, seed=1)
    assert not torch.equal(delta(other.state), delta(noisy.state))


def test_hooks_are_removed_and_the_model_trains_again():
    m, _ = run({"noise_multiplier": 1.0})
    assert not any(mod._forward_hooks or mod._backward_hooks for mod in m.modules())
    run({"noise_multiplier": 1.0}, m=m)  # a second round on the same object works


def test_model_opacus_cannot_train_is_a_clear_error():
    with pytest.raises(FedsecError, match=r"Opacus cannot train task.model 'toy'.*BatchNorm.*"
                                          r"task.model_options.opacus: true"):
        run({"noise_multiplier": 1.0}, m=model(bn=True))


def test_target_epsilon_sets_the_noise_for_the_planned_rounds():
    dp = DPConfig.parse({"target_epsilon": 1.0, "delta": 1e-3})
    p = plan(dp, 40, LOCAL, planned_rounds=10)
    assert p.noise_multiplier > 1
    assert epsilon(p.noise_multiplier, p.sample_rate, p.steps_per_round * 10, 1e-3) == pytest.approx(1.0, abs=0.01)
    _, res = run({"target_epsilon": 1.0, "delta": 1e-3}, participations=10)
    assert res.epsilon == pytest.approx(1.0, abs=0.01)


def test_options_and_defaults():
    with pytest.raises(FedsecError, match=r"privacy\.dp_sgd\.max_grad: unknown option; did you mean 'max_grad_norm'"):
        DPConfig.parse({"noise_multiplier": 1.0, "max_grad": 1.0})
    with pytest.raises(FedsecError, match="exactly one of noise_multiplier"):
        DPConfig.parse({"noise_multiplier": 1.0, "target_epsilon": 1.0})
    with pytest.raises(FedsecError, match=r"privacy\.dp_sgd\.accountant"):
        DPConfig.parse({"noise_multiplier": 1.0, "accountant": "moments"})
    dp = DPConfig.parse({"noise_multiplier": 1.0})
    assert dp.poisson and dp.accountant == "rdp" and dp.max_grad_norm == 1.0
    assert dp.delta_for(199) == 1e-3 and dp.delta_for(10_000) == pytest.approx(10_000 ** -1.1)


def test_steps_follow_opacus_poisson_loader():
    for n in (30, 85, 172, 199, 370, 371):  # 371 / 4 -> 93 batches: Opacus takes 92 steps
        loader = DataLoader(TensorDataset(torch.zeros(n, 1)), batch_size=4)
        q, steps = sampling(n, 4)
        assert q == 1 / len(loader) and steps == len(DPDataLoader.from_data_loader(loader))


def test_participation_is_counted_in_the_node_state():
    state = RecordDict()
    assert count_participation(state, 1) == 1
    assert count_participation(state, 3) == 2  # not selected in round 2
    assert count_participation(state, 3) == 2  # a retried message does not count twice
    assert count_participation(RecordDict(), 5) == 5  # no history (resumed run): upper bound


def test_fixed_steps_per_round_are_taken_and_accounted():
    # local.steps = 25 with 10 Poisson steps per epoch: the loop runs into a third pass and
    # stops at 25; epsilon is the accountant's for exactly 25 steps per round.
    from dataclasses import replace

    m = model()
    res = train_dp_sgd(m, data(), Toy(), replace(LOCAL, steps=25), DPConfig.parse({"noise_multiplier": 1.3, "delta": 1e-3}),
                       generator=torch.Generator().manual_seed(0), participations=2, planned_rounds=10)
    assert res.steps == 25
    acc = RDPAccountant()
    acc.history = [(1.3, 0.1, 50)]
    assert res.epsilon == pytest.approx(acc.get_epsilon(delta=1e-3), rel=1e-12)
    assert plan(DPConfig.parse({"noise_multiplier": 1.3}), 40, replace(LOCAL, steps=25), 10).steps_per_round == 25


def test_a_hospital_is_charged_only_for_the_rounds_it_trained_in():
    # Fresh run: the server's ledger says 0 rounds so far, so a first selection in round 3
    # is charged 1 round, not 3 (the old "every earlier round" upper bound).
    state = RecordDict()
    assert count_participation(state, 3, charged_before=0) == 1
    assert count_participation(state, 5, charged_before=1) == 2  # not selected in round 4
    # Resumed run: the node's state is gone; the server's ledger (from rounds.jsonl) says 2.
    assert count_participation(RecordDict(), 7, charged_before=2) == 3
    # A reply the server lost still counts in the node's own state: the larger count wins.
    state = RecordDict()
    for r in (1, 2, 3):
        count_participation(state, r, charged_before=0)
    assert count_participation(state, 4, charged_before=1) == 4


def test_ledger_keeps_every_round_and_its_maximum():
    from fedsec.privacy.dp_sgd import EpsilonLedger, summarise

    records = [
        {"round": 1, "privacy": {"dp_sgd": {"epsilon": {"a": 1.0, "b": 1.2}, "rounds": {"a": 1, "b": 1}}}},
        {"round": 2, "privacy": {"dp_sgd": {"epsilon": {"b": 1.9, "c": 1.5}, "rounds": {"b": 2, "c": 1}}}},
        {"round": 3, "privacy": {"dp_sgd": {"epsilon": {"a": 1.4}, "rounds": {"a": 2}}}},
    ]
    ledger = EpsilonLedger.from_rounds(records)
    assert {h: e["epsilon"] for h, e in ledger.entries.items()} == {"a": 1.4, "b": 1.9, "c": 1.5}
    assert ledger.entries["b"]["last_round"] == 2 and ledger.charged(["a", "b", "c", "d"]) == [2, 2, 1, 0]
    out = summarise(records)
    assert out["epsilon_max"] == 1.9  # b's, although b did not train in the last round
    assert out["epsilon"] == {"a": 1.4, "b": 1.9, "c": 1.5}
    assert summarise([{"round": 1}]) is None
    # b selected in rounds 4 and 5 without a counted reply (crash, timeout): it may have
    # trained, so a node that lost its state is told 2 + 2 rounds; a counted reply resets that.
    records += [{"round": 4, "selected": ["a", "b"], "privacy": {"dp_sgd": {"epsilon": {"a": 1.6}, "rounds": {"a": 3}}}},
                {"round": 5, "selected": ["b"], "privacy": {"dp_sgd": {"epsilon": {}}}}]
    ledger = EpsilonLedger.from_rounds(records)
    assert ledger.charged(["a", "b", "c"]) == [3, 4, 1]
    assert summarise(records)["unconfirmed_rounds"] == {"b": 2}
    ledger.record_round(6, ["b"], {"b": {"dp-epsilon": 2.5, "dp-rounds": 5}})
    assert ledger.charged(["b"]) == [5] and ledger.epsilon_max() == 2.5


def test_explicit_delta_must_be_below_one_over_n():
    from fedsec.privacy.dp_sgd import check_delta

    dp = DPConfig.parse({"noise_multiplier": 1.0, "delta": 1e-3})
    check_delta(dp, {"cleveland": 199, "va": 120})  # 1e-3 < 1/199
    # The CXR privacy table's case: delta 1e-3 with 1,177 records (1/N = 8.5e-4).
    with pytest.raises(FedsecError, match=r"privacy\.dp_sgd\.delta: 0\.001 is not below 1/N for site-a \(N = 1177, "
                                          r"1/N = 0\.00085\).*delta < 0\.00085"):
        check_delta(dp, {"site-a": 1177, "site-b": 900})
    check_delta(DPConfig.parse({"noise_multiplier": 1.0}), {"site-a": 10**6})  # default: min(1e-3, N^-1.1)


def test_explicit_delta_too_large_stops_the_run_before_training(tmp_path, capsys):
    from pathlib import Path

    from fedsec.cli import main

    heart = Path(__file__).resolve().parents[2] / "scenarios" / "heart_fedavg.yaml"
    code = main(["run", str(heart), "privacy.dp_sgd={noise_multiplier: 1.0, delta: 0.01}", "--out", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert "privacy.dp_sgd.delta: 0.01 is not below 1/N for" in err
    assert not (tmp_path / "rounds.jsonl").exists()


@pytest.mark.ray
def test_ray_accounting_with_half_the_hospitals_per_round(tmp_path):
    """Heart, 4 hospitals, fraction_train 0.5, seed 0: rounds 1-4 train {switzerland, va},
    {switzerland, va}, {cleveland, switzerland}, {hungary, va}. The run stops after round 2 and
    is resumed to round 4 (the nodes' state is then new: the server's ledger, rebuilt from
    rounds.jsonl, tells them what they have spent)."""
    import json
    from pathlib import Path

    import fedsec
    from fedsec.scenario import load_scenario
    from fedsec.tasks import build_task

    heart = str(Path(__file__).resolve().parents[2] / "scenarios" / "heart_fedavg.yaml")
    over = ["federation.fraction_train=0.5", "federation.fraction_evaluate=1.0", "seed=0",
            "privacy.dp_sgd={noise_multiplier: 1.0}"]
    fedsec.run(heart, overrides=over + ["federation.rounds=2"], out=tmp_path, progress=False)
    summary = fedsec.run(None, overrides=["federation.rounds=4"], resume=tmp_path, progress=False)
    rounds = [json.loads(line) for line in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    assert [sorted(r["selected"]) for r in rounds] == [["switzerland", "va"], ["switzerland", "va"],
                                                      ["cleveland", "switzerland"], ["hungary", "va"]]

    # Independently: hospital h after k rounds of training has Opacus's epsilon for k rounds.
    scenario = load_scenario(heart, over + ["federation.rounds=4"])
    task = build_task(scenario)
    dp = DPConfig.parse({"noise_multiplier": 1.0})
    sizes = dict(zip(task.data.hospitals, (len(s) for s in task.data.train)))

    def expected(h, k):
        p = plan(dp, sizes[h], scenario.federation.local, 4)
        return epsilon(p.noise_multiplier, p.sample_rate, p.steps_per_round * k, p.delta)

    trained_so_far = {h: 0 for h in sizes}
    ledger = {}
    for rec in rounds:
        block = rec["privacy"]["dp_sgd"]
        assert set(block["epsilon"]) == set(rec["selected"])  # only the round's hospitals move
        for h in rec["selected"]:
            trained_so_far[h] += 1
            assert block["rounds"][h] == trained_so_far[h]
            assert block["epsilon"][h] == pytest.approx(expected(h, trained_so_far[h]), rel=1e-9)
            ledger[h] = block["epsilon"][h]
        assert block["epsilon_max"] == pytest.approx(max(ledger.values()), rel=1e-12)
    # cleveland first trains in round 3: charged 1 round, not 3.
    assert rounds[2]["privacy"]["dp_sgd"]["rounds"]["cleveland"] == 1
    dp_summary = summary["privacy"]["dp_sgd"]
    assert dp_summary["epsilon"] == pytest.approx(ledger, rel=1e-12)
    assert dp_summary["epsilon_max"] == pytest.approx(max(ledger.values()), rel=1e-12)
    assert {h: e["rounds"] for h, e in dp_summary["ledger"].items()} == trained_so_far
    # ... which is switzerland's from round 3, above anything the last round's hospitals reached.
    assert dp_summary["epsilon_max"] > max(rounds[-1]["privacy"]["dp_sgd"]["epsilon"].values())

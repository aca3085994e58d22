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

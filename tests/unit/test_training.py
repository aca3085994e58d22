"""Local training: ``local.epochs`` full passes, or exactly ``local.steps`` mini-batch steps
(FedSGD when 1), counted by the optimizer itself."""

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from fedsec.data.base import Split
from fedsec.errors import FedsecError
from fedsec.core.training import train_local
from fedsec.scenario import LocalConfig, load_scenario


QUICKSTART = Path(__file__).resolve().parents[2] / "scenarios" / "quickstart.yaml"


class Toy:
    multilabel = False

    @staticmethod
    def loss(logits, y, reduction="mean"):
        return nn.functional.cross_entropy(logits, y, reduction=reduction)


def _counted_run(local, n=10):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = []
    opt.register_step_post_hook(lambda *_: calls.append(1))
    x = torch.randn(n, 3)
    stats = train_local(model, Split(x, (x[:, 0] > 0).long()), Toy(), local, torch.Generator().manual_seed(0),
                        optimizer=opt)
    return stats["steps"], len(calls)


@pytest.mark.parametrize("epochs,batch_size,n", [(1, 4, 10), (3, 4, 10), (2, 32, 10)])
def test_epochs_are_full_passes(epochs, batch_size, n):
    assert _counted_run(LocalConfig(epochs=epochs, batch_size=batch_size), n) == (epochs * math.ceil(n / batch_size),) * 2


@pytest.mark.parametrize("steps", [1, 2, 7])
def test_steps_are_exact_and_override_epochs(steps):
    # 10 records in batches of 4 = 3 steps per pass: 7 steps run into a third pass
    assert _counted_run(LocalConfig(epochs=5, batch_size=4, steps=steps)) == (steps, steps)


def test_steps_on_no_data_stop():
    assert _counted_run(LocalConfig(steps=3), n=0) == (0, 0)


def test_bad_steps_name_the_key():
    with pytest.raises(FedsecError, match=r"federation\.local\.steps"):
        load_scenario(QUICKSTART, ["federation.local.steps=0"])
    s = load_scenario(QUICKSTART, ["federation.local.steps=1"])
    assert s.federation.local.steps == 1


def test_pooled_baseline_sees_as_many_samples_as_a_fixed_step_federation():
    from fedsec.baseline import centralised

    s = load_scenario(QUICKSTART, ["federation.local.steps=20", "federation.rounds=6"])
    res = centralised(s)
    seen = 6 * 20 * s.federation.local.batch_size * 2  # rounds x steps x batch x 2 hospitals
    assert res["epochs"] == math.ceil(seen / res["train_rows"]) and res["epochs"] > 1
    assert centralised(load_scenario(QUICKSTART, ["federation.rounds=3"]))["epochs"] == 3  # rounds x epochs


def test_stack_flat_reads_flower_arrays_in_place_and_equals_flattening():
    import numpy as np
    import pytest
    from flwr.app import Array, ArrayRecord

    from fedsec.core.params import flatten_state, stack_flat

    rng = np.random.default_rng(0)
    states = [{"w": torch.from_numpy(rng.normal(size=(3, 4)).astype(np.float32)),
               "b": torch.from_numpy(rng.normal(size=5).astype(np.float32)),
               "n": torch.tensor(7)} for _ in range(3)]
    records = [ArrayRecord(s) for s in states]
    g = torch.arange(17, dtype=torch.float32)
    got = stack_flat(records, ["w", "b"], 17, minus=g)
    want = torch.stack([flatten_state(s) for s in states]) - g
    assert torch.equal(got, want)
    # other dtypes are cast to float32, a Fortran-ordered array is flattened in C order
    f64 = rng.normal(size=(3, 4))
    odd = {"w": Array(np.asfortranarray(f64)), "b": Array(np.ones(5, dtype=np.float16))}
    row = stack_flat([odd], ["w", "b"], 17)[0]
    assert torch.equal(row[:12], torch.from_numpy(f64.reshape(-1).astype(np.float32)))
    assert torch.equal(row[12:], torch.ones(5))
    with pytest.raises(ValueError, match="record 0: 12 values, the model has 17"):
        stack_flat([{"w": Array(f64)}], ["w"], 17)
    with pytest.raises(ValueError, match="overruns"):
        stack_flat([{"w": Array(f64)}], ["w"], 10)

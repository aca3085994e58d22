"""Update compression: top-k pruning keeps exactly k entries, quantisation error is bounded."""

import pytest
import torch

from fedsec.errors import FedsecError
from fedsec.privacy.compression import CompressionConfig, compress_state, compress_update, quantisation_step


def vectors(d=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    glob = torch.randn(d, generator=g)
    return glob, glob + 0.01 * torch.randn(d, generator=g)


@pytest.mark.parametrize("ratio", [0.001, 0.1, 0.25, 0.5, 0.999])
def test_topk_keeps_exactly_k_largest_entries(ratio):
    glob, local = vectors()
    out = compress_update(glob, local, {"keep_ratio": ratio})
    kept = (out - glob) != 0
    k = CompressionConfig(keep_ratio=ratio).kept(1000)
    assert int(kept.sum()) == k == max(1, round(ratio * 1000))
    update = local - glob
    # the survivors are the k largest magnitudes, unchanged
    assert torch.equal(kept.nonzero().flatten().sort().values,
                       torch.topk(update.abs(), k).indices.sort().values)
    torch.testing.assert_close(out[kept], local[kept])
    assert torch.equal(out[~kept], glob[~kept])


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
def test_quantisation_error_is_at_most_half_a_step(bits):
    glob, local = vectors(seed=1)
    out = compress_update(glob, local, {"bits": bits})
    update = (local - glob).double()
    step = quantisation_step(update, bits)
    assert step == pytest.approx(float(update.abs().max()) / (2 ** (bits - 1) - 1))
    err = ((out - glob).double() - update).abs().max()
    assert err <= step / 2 + 1e-6  # + float32 rounding of global + update
    levels = torch.unique(torch.round((out - glob).double() / step))
    assert len(levels) <= 2 ** bits - 1


def test_pruning_then_quantisation_and_state_dicts():
    glob, local = vectors(d=200, seed=2)
    out = compress_update(glob, local, {"keep_ratio": 0.1, "bits": 4})
    assert int(((out - glob) != 0).sum()) <= 20
    g_state = {"w": glob[:150].reshape(10, 15), "b": glob[150:], "n": torch.tensor(7)}
    l_state = {"w": local[:150].reshape(10, 15), "b": local[150:], "n": torch.tensor(8)}
    s = compress_state(g_state, l_state, {"keep_ratio": 0.1, "bits": 4})
    assert s["w"].shape == (10, 15) and int(s["n"]) == 8
    torch.testing.assert_close(torch.cat([s["w"].flatten(), s["b"]]), out)


def test_options():
    with pytest.raises(FedsecError, match=r"privacy\.compression\.keep_ratio"):
        CompressionConfig.parse({"keep_ratio": 0.0})
    with pytest.raises(FedsecError, match=r"privacy\.compression\.bits"):
        CompressionConfig.parse({"bits": 1})
    with pytest.raises(FedsecError, match=r"privacy\.compression\.topk: unknown option"):
        CompressionConfig.parse({"topk": 0.1})
    with pytest.raises(FedsecError, match="sent unchanged"):
        CompressionConfig.parse({})

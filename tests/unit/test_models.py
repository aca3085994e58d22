"""Every model builds, maps [N, C, H, W] / [N, F] to [N, K] logits, and its `opacus: true`
variant is one Opacus can train."""

import pytest
import torch
from opacus.validators import ModuleValidator

from fedsec.errors import FedsecError
from fedsec.models import build_model

IMAGE_MODELS = [("small_cnn", 28), ("resnet10", 28), ("resnet18", 28), ("densenet121", 32), ("efficientnet_b0", 64)]


@pytest.mark.parametrize("name,size", IMAGE_MODELS)
def test_image_models_forward_and_opacus_variant(name, size):
    x = torch.rand(3, 1, size, size)
    plain = build_model(name, (1, size, size), 2, seed=0)
    assert plain(x).shape == (3, 2)
    options = {} if name == "small_cnn" else {"opacus": True}
    private = build_model(name, (1, size, size), 2, options, seed=0)
    assert private(x).shape == (3, 2)
    assert ModuleValidator.validate(private, strict=False) == []
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in private.modules())


def test_monai_nets_without_opacus_option_are_not_opacus_ready():
    net = build_model("resnet10", (1, 28, 28), 2)
    assert ModuleValidator.validate(net, strict=False), "BatchNorm must be reported: the option is needed"


@pytest.mark.parametrize("name", ["logistic", "mlp"])
def test_tabular_models(name):
    m = build_model(name, (10,), 2, {"hidden": [16, 8]} if name == "mlp" else {}, seed=0)
    assert m(torch.rand(5, 10)).shape == (5, 2)


def test_seed_fixes_initialisation():
    a = build_model("small_cnn", (1, 28, 28), 2, seed=3).state_dict()
    b = build_model("small_cnn", (1, 28, 28), 2, seed=3).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_too_small_images_and_bad_options_are_clear_errors():
    with pytest.raises(FedsecError, match=r"densenet121 needs images of at least 32x32.*image_size"):
        build_model("densenet121", (1, 28, 28), 2)
    with pytest.raises(FedsecError, match="task.model_options"):
        build_model("mlp", (10,), 2, {"hiden": [4]})

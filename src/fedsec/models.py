"""Model factory: logistic regression and an MLP for EHR tables, a small CNN for CPU imaging,
and MONAI networks by name.

Every model maps ``x`` to logits ``[N, num_classes]`` (a binary task has 2 logits, so one
loss and one metric path serve binary, multi-class and, with BCE, multi-label tasks).

``opacus: true`` in ``task.model_options`` gives the variant Opacus can train: no in-place
activations on hooked outputs and GroupNorm instead of BatchNorm (MONAI nets otherwise fail
with "output of BackwardHookFunction is a view and is being modified inplace").
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fedsec.errors import FedsecError
from fedsec.registry import MODELS


@MODELS.register("logistic")
class LogisticRegression(nn.Module):
    """x [N, F] -> logits [N, K]: a single linear layer (softmax regression; K=2 is logistic)."""

    def __init__(self, input_shape, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(int(math.prod(input_shape)), num_classes)

    def forward(self, x):
        return self.linear(x.flatten(1))


@MODELS.register("mlp")
class MLP(nn.Module):
    """x [N, F] -> logits [N, K]; ``hidden`` widths, ReLU (not in place: Opacus-safe)."""

    def __init__(self, input_shape, num_classes: int, hidden: list[int] | tuple[int, ...] = (32,),
                 dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        width = int(math.prod(input_shape))
        for h in hidden:
            layers += [nn.Linear(width, int(h)), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = int(h)
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x.flatten(1))


@MODELS.register("small_cnn")
class SmallCNN(nn.Module):
    """Images [N, C, H, W] -> logits [N, K]. Two conv blocks + a linear head; trains in
    seconds per epoch on CPU at 28x28. GroupNorm (not BatchNorm) so that federated averaging
    has no running statistics to mix and Opacus can train it unchanged."""

    def __init__(self, input_shape, num_classes: int, channels: tuple[int, int] = (16, 32),
                 hidden: int = 64, norm: bool = True, act: str = "relu"):
        super().__init__()
        c, h, w = input_shape
        c1, c2 = channels
        activation = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}[act]

        def block(cin, cout):
            layers = [nn.Conv2d(cin, cout, 3, padding=1)]
            if norm:
                layers.append(nn.GroupNorm(min(4, cout), cout))
            return layers + [activation(), nn.MaxPool2d(2)]

        self.features = nn.Sequential(*block(c, c1), *block(c1, c2))
        flat = c2 * (h // 4) * (w // 4)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(flat, hidden), activation(), nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.head(self.features(x))


def _opacus_fix(model: nn.Module) -> nn.Module:
    from opacus.validators import ModuleValidator

    return ModuleValidator.fix(model)


@MODELS.register("densenet121")
def monai_densenet121(input_shape, num_classes: int, opacus: bool = False, **kw):
    """MONAI DenseNet121 (2D); ``opacus: true`` gives the GroupNorm, not-in-place variant DP-SGD needs."""
    from monai.networks.nets import DenseNet121

    act = ("relu", {"inplace": False}) if opacus else ("relu", {"inplace": True})
    net = DenseNet121(spatial_dims=2, in_channels=input_shape[0], out_channels=num_classes, act=act, **kw)
    return _opacus_fix(net) if opacus else net


def _monai_resnet(depth: int):
    def build(input_shape, num_classes: int, opacus: bool = False, **kw):
        """MONAI ResNet (2D); ``opacus: true`` gives the GroupNorm, not-in-place variant DP-SGD needs."""
        from monai.networks.nets import ResNet
        from monai.networks.nets.resnet import ResNetBlock, get_inplanes

        layers = {10: [1, 1, 1, 1], 18: [2, 2, 2, 2]}[depth]
        act = ("relu", {"inplace": False}) if opacus else ("relu", {"inplace": True})
        net = ResNet(block=ResNetBlock, layers=layers, block_inplanes=get_inplanes(), spatial_dims=2,
                     n_input_channels=input_shape[0], num_classes=num_classes, act=act, **kw)
        return _opacus_fix(net) if opacus else net

    return build


monai_resnet10 = MODELS.register("resnet10", _monai_resnet(10))
monai_resnet18 = MODELS.register("resnet18", _monai_resnet(18))


@MODELS.register("efficientnet_b0")
def monai_efficientnet_b0(input_shape, num_classes: int, opacus: bool = False, **kw):
    """MONAI EfficientNet-B0 (2D, no pretrained weights); ``opacus: true`` for DP-SGD."""
    from monai.networks.nets import EfficientNetBN

    net = EfficientNetBN("efficientnet-b0", pretrained=False, progress=False, spatial_dims=2,
                         in_channels=input_shape[0], num_classes=num_classes, **kw)
    if opacus:
        net = _opacus_fix(net)
    return net


# Smallest image side each MONAI net runs at (their stem + four stride-2 stages shrink a
# 28x28 MedMNIST image to nothing); measured with a forward pass.
MIN_IMAGE_SIZE = {"densenet121": 32, "efficientnet_b0": 64}


def build_model(name: str, input_shape, num_classes: int, options: dict | None = None,
                seed: int | None = None) -> nn.Module:
    """The model ``name`` with ``options`` (task.model_options), initialised from ``seed``."""
    factory = MODELS.get(name, key="task.model")
    need = MIN_IMAGE_SIZE.get(name)
    if need and len(input_shape) == 3 and min(input_shape[1:]) < need:
        raise FedsecError(f"task.model: {name} needs images of at least {need}x{need}, the task's are "
                          f"{input_shape[1]}x{input_shape[2]}; set task.options.image_size: {need} (or more), "
                          "use a MedMNIST file of that size, or pick small_cnn / resnet10")
    options = dict(options or {})
    if seed is not None:
        from fedsec.core.training import seed_global_rng

        seed_global_rng(seed)
    try:
        model = factory(tuple(input_shape), int(num_classes), **options)
    except TypeError as err:
        raise FedsecError(f"task.model_options: {name} does not take these options ({err})") from None
    return model

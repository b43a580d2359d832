"""The embedded model: a compact torchvision-style ResNet trained on :mod:`naflow_fx.data.shapes`.

Its weights ship in the package (``shapes_resnet.pt``, float32 state dict, loaded with
``weights_only=True``) with a JSON sidecar recording the recipe, the held-out accuracy and the
training time; ``python -m naflow_fx.zoo.train_shapes --out DIR`` reproduces them from the seed.

The architecture follows torchvision's ResNet (``conv1, bn1, relu, maxpool, layer1..layer4,
avgpool, fc`` with BasicBlocks named ``conv1, bn1, relu, conv2, bn2, downsample``), narrower
(16, 32, 64, 128 channels) and with ``layer4`` at stride 1, so that a 96×96 input keeps a 6×6
last feature map.

Example:
    >>> import torch
    >>> from naflow_fx.zoo.shapes import shapes_resnet, shapes_embedding
    >>> from naflow_fx.data.shapes import CLASSES, make_shapes, normalize
    >>> model = shapes_resnet()                      # trained weights, eval mode
    >>> batch = make_shapes(8, seed=1)               # held-out images
    >>> pred = model(normalize(batch.images)).argmax(1)
    >>> bool((pred == batch.labels).float().mean() >= 0.75)
    True
    >>> shapes_embedding()(normalize(batch.images)).shape   # the pooled features, for similarity
    torch.Size([8, 128])
"""

from __future__ import annotations

import json
import os
from importlib import resources
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from .._io import load_state_dict_file
from ..data.shapes import CLASSES
from ..errors import InputTypeError

__all__ = ["ShapesResNet", "shapes_resnet", "shapes_embedding", "weights_info", "WEIGHTS_FILE", "INFO_FILE"]

WEIGHTS_FILE = "shapes_resnet.pt"
INFO_FILE = "shapes_resnet.json"


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: two 3×3 convs with BN, identity or 1×1 projection shortcut."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ShapesResNet(nn.Module):
    """A compact ResNet for 96×96 inputs: stride-2 5×5 stem, max-pool, four BasicBlock stages.

    Args:
        widths: channels of ``layer1..layer4``.
        blocks: BasicBlocks per stage.
        num_classes: outputs of ``fc`` (``len(CLASSES)``).
    """

    if TYPE_CHECKING:  # made in a loop with setattr: declared for type checkers (model.layer4[-1]), and
        # only for them: TorchScript reads a module's class annotations, and cannot resolve these strings
        layer1: nn.Sequential
        layer2: nn.Sequential
        layer3: nn.Sequential
        layer4: nn.Sequential

    def __init__(
        self,
        widths: tuple[int, int, int, int] = (16, 32, 64, 128),
        blocks: tuple[int, int, int, int] = (1, 1, 1, 1),
        num_classes: int = len(CLASSES),
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 5, 2, 2, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        strides = (1, 2, 2, 1)
        inplanes = widths[0]
        for i, (width, n, stride) in enumerate(zip(widths, blocks, strides), start=1):
            stage = [BasicBlock(inplanes if k == 0 else width, width, stride if k == 0 else 1) for k in range(n)]
            setattr(self, f"layer{i}", nn.Sequential(*stage))
            inplanes = width
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x: Tensor) -> Tensor:
        """The last feature map, ``[B, 128, H/16, W/16]``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))


class _Embedding(nn.Module):
    """A classifier's pooled features (everything up to ``fc``) as an embedding."""

    def __init__(self, model: ShapesResNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return torch.flatten(self.model.avgpool(self.model.features(x)), 1)


def weights_info() -> dict:
    """The shipped weights' sidecar: recipe, held-out accuracy, training time, versions."""
    return json.loads(resources.files(__package__).joinpath(INFO_FILE).read_text())


def shapes_resnet(pretrained: bool = True, weights: str | os.PathLike[str] | None = None) -> ShapesResNet:
    """The embedded shapes classifier in eval mode.

    Args:
        pretrained: load the shipped weights (False: random initialisation).
        weights: a state-dict file to load instead of the shipped one (e.g. from ``train_shapes``);
            a file that is missing, unreadable or made for another architecture raises an
            :class:`~naflow_fx.errors.InputError`.
    """
    fn = "shapes_resnet"
    if not isinstance(pretrained, (bool, np.bool_)):
        raise InputTypeError(f"{fn}: pretrained must be True or False, got {type(pretrained).__name__} {pretrained!r}")
    if weights is not None and not isinstance(weights, (str, os.PathLike)):
        raise InputTypeError(
            f"{fn}: weights must be the path of a state-dict file (str or os.PathLike) or None, got "
            f"{type(weights).__name__}"
        )
    model = ShapesResNet()
    if weights is not None:
        load_state_dict_file(
            model,
            os.fspath(weights),
            "ShapesResNet",
            prefix=f"{fn}: ",
            missing_hint="pass an existing state-dict file (weights=None: the shipped ones)",
            mismatch_hint="pass a state dict saved from ShapesResNet (python -m naflow_fx.zoo.train_shapes writes one)",
        )
    elif pretrained:
        with resources.as_file(resources.files(__package__).joinpath(WEIGHTS_FILE)) as path:
            state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    return model.eval()


def shapes_embedding(pretrained: bool = True, weights: str | os.PathLike[str] | None = None) -> nn.Module:
    """The embedded model's pooled 128-d features (for :class:`~naflow_fx.SimilarityTarget`)."""
    return _Embedding(shapes_resnet(pretrained, weights)).eval()

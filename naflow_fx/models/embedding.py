"""Embedding networks for similarity explanations (random weights; nothing is downloaded).

Each model outputs an embedding ``Tensor[B, D]`` (no classifier), to be explained with
:class:`~naflow_fx.SimilarityTarget` against a reference embedding (paper §III-C):

* :func:`npid_resnet` — a torchvision ResNet-18/50 trunk, ``fc`` replaced by ``Linear(→dim)`` and the
  output L2-normalised by the hand-written ``x / x.pow(2).sum(1, keepdim=True).pow(0.5)`` (as in
  the NPID code of Wu et al., "Unsupervised Feature Learning via Non-Parametric Instance
  Discrimination", 2018);
* :func:`ms_resnet50` — ResNet-50 + ``Linear(→512)`` + ``F.normalize`` (the metric-learning setup of
  Wang et al., "Multi-Similarity Loss with General Pair Weighting", 2019);
* :func:`conv4_encoder` — the few-shot Conv-4: 4 × [conv3×3 → BN → ReLU → maxpool2] → flatten;
* :func:`resnet12` — the MetaBaseline ResNet-12 (Chen et al., "Meta-Baseline", 2021): four residual
  blocks of three 3×3 conv-BN-LeakyReLU(0.1) with a 1×1 conv-BN shortcut and a 2×2 max-pool,
  then global average pooling.

The ResNets keep torchvision's module names (``conv1`` … ``layer4``, ``avgpool``, ``fc``), so
NAFlow's last layer ``N`` is the output of ``layer4`` as for the classifiers. Weights use PyTorch's
(or the original code's) default initialisation; BatchNorm running statistics are the defaults.

Example:
    >>> import torch
    >>> from naflow_fx.models import conv4_encoder, resnet12
    >>> conv4_encoder(hidden=8).eval()(torch.randn(2, 3, 32, 32)).shape  # 8 channels × 2 × 2
    torch.Size([2, 32])
    >>> resnet12(channels=(4, 8, 8, 16)).eval()(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 16])
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, InputTypeError, optional
from .attention import _four_positive, _positive

torchvision = optional("torchvision", "naflow_fx.models")

__all__ = [
    "L2Norm",
    "EmbeddingResNet",
    "npid_resnet",
    "ms_resnet50",
    "Conv4Encoder",
    "conv4_encoder",
    "ResNet12Block",
    "ResNet12",
    "resnet12",
]


class L2Norm(nn.Module):
    """L2 normalisation of ``[B, D]`` embeddings, written out by hand as in the NPID code.

    ``x / x.pow(2).sum(1, keepdim=True).pow(0.5)``; ``functional=True`` uses ``F.normalize`` instead
    (identical up to ``F.normalize``'s ``eps`` clamp of the norm).

    Example:
        >>> import torch
        >>> L2Norm()(torch.tensor([[3.0, 4.0]]))
        tensor([[0.6000, 0.8000]])
    """

    def __init__(self, functional: bool = False) -> None:
        super().__init__()
        self.functional = functional

    def forward(self, x: Tensor) -> Tensor:
        if self.functional:
            return F.normalize(x, dim=1)
        norm = x.pow(2).sum(1, keepdim=True).pow(0.5)
        return x / norm

    def extra_repr(self) -> str:
        return "functional=True" if self.functional else ""


class EmbeddingResNet(nn.Module):
    """A torchvision ResNet trunk with an embedding head: ``… layer4 → avgpool → fc (→ D) → l2norm``.

    Args:
        trunk: a torchvision :class:`~torchvision.models.ResNet`; its modules are reused (its ``fc``
            is dropped).
        dim: the embedding dimension ``D``.
        functional_norm: ``False`` for the hand-written ``pow(0.5)`` normalisation, ``True`` for
            ``F.normalize``; ``None`` for no normalisation (raw embeddings).
    """

    if TYPE_CHECKING:  # the trunk's modules, added with add_module: declared for type checkers only (as
        # in ShapesResNet: TorchScript reads class annotations, and cannot resolve these strings)
        conv1: nn.Module
        bn1: nn.Module
        relu: nn.Module
        maxpool: nn.Module
        layer1: nn.Sequential
        layer2: nn.Sequential
        layer3: nn.Sequential
        layer4: nn.Sequential
        avgpool: nn.Module

    def __init__(self, trunk: torchvision.models.ResNet, dim: int, functional_norm: bool | None = False) -> None:
        super().__init__()
        dim = _positive(dim, "dim", "EmbeddingResNet", " (the embedding dimension)")
        if functional_norm is not None and not isinstance(functional_norm, bool):
            raise InputTypeError(
                f"EmbeddingResNet: functional_norm must be True, False or None, got {type(functional_norm).__name__}"
            )
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool"):
            self.add_module(name, getattr(trunk, name))
        self.fc = nn.Linear(trunk.fc.in_features, dim)
        self.l2norm = None if functional_norm is None else L2Norm(functional=functional_norm)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.fc(torch.flatten(self.avgpool(x), 1))
        return self.l2norm(x) if self.l2norm is not None else x


def npid_resnet(depth: int = 18, dim: int = 128) -> EmbeddingResNet:
    """NPID-like embedding ResNet-18/50: ``fc → Linear(→dim)``, hand-written L2 normalisation, random weights.

    Example:
        >>> import torch
        >>> model = npid_resnet(18, dim=16).eval()
        >>> v = model(torch.randn(2, 3, 32, 32))
        >>> v.shape, torch.allclose(v.norm(dim=1), torch.ones(2))
        (torch.Size([2, 16]), True)
    """
    builders = {18: torchvision.models.resnet18, 50: torchvision.models.resnet50}
    if isinstance(depth, bool) or not isinstance(depth, numbers.Integral) or int(depth) not in builders:
        raise ConfigError(f"npid_resnet: depth must be 18 or 50 (ResNet-18 or ResNet-50), got {depth!r}")
    dim = _positive(dim, "dim", "npid_resnet", " (the embedding dimension, 128 in NPID)")
    return EmbeddingResNet(builders[int(depth)](weights=None), dim, functional_norm=False)


def ms_resnet50(dim: int = 512) -> EmbeddingResNet:
    """Multi-similarity-loss-like embedding ResNet-50: ``Linear(→dim)`` + ``F.normalize``, random weights.

    Example:
        >>> import torch
        >>> model = ms_resnet50(dim=8).eval()
        >>> model.l2norm
        L2Norm(functional=True)
        >>> model(torch.randn(1, 3, 32, 32)).shape
        torch.Size([1, 8])
    """
    dim = _positive(dim, "dim", "ms_resnet50", " (the embedding dimension, 512 in the paper)")
    return EmbeddingResNet(torchvision.models.resnet50(weights=None), dim, functional_norm=True)


class Conv4Encoder(nn.Module):
    """The few-shot Conv-4: 4 × [conv3×3(hidden) → BN → ReLU → maxpool2] → flatten.

    ``encoder`` is one flat ``nn.Sequential``, so layers are named ``encoder.0`` … ``encoder.15``
    (``encoder.15``, the last max-pool, is NAFlow's last layer ``N``). The embedding has
    ``hidden · (H/16) · (W/16)`` dimensions (1600 at 84 × 84 with ``hidden=64``).
    """

    def __init__(self, hidden: int = 64, in_channels: int = 3) -> None:
        super().__init__()
        hidden = _positive(hidden, "hidden", "Conv4Encoder", " (channels of every conv, 64 in the few-shot Conv-4)")
        in_channels = _positive(in_channels, "in_channels", "Conv4Encoder", " (3 for RGB images)")
        layers: list[nn.Module] = []
        cin = in_channels
        for _ in range(4):
            layers += [nn.Conv2d(cin, hidden, 3, padding=1), nn.BatchNorm2d(hidden), nn.ReLU(), nn.MaxPool2d(2)]
            cin = hidden
        self.encoder = nn.Sequential(*layers)
        self.out_dim = hidden

    def forward(self, x: Tensor) -> Tensor:
        return torch.flatten(self.encoder(x), 1)


def conv4_encoder(hidden: int = 64, in_channels: int = 3) -> Conv4Encoder:
    """The few-shot Conv-4 encoder (embedding = flattened features), random weights.

    Example:
        >>> import torch
        >>> conv4_encoder(hidden=4).eval()(torch.randn(1, 3, 84, 84)).shape  # 4 × 5 × 5
        torch.Size([1, 100])
    """
    return Conv4Encoder(hidden, in_channels)


def _conv3x3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1, bias=False)


class ResNet12Block(nn.Module):
    """MetaBaseline's residual block: 3 × (conv3×3 → BN), LeakyReLU between, 1×1 conv-BN shortcut,
    add, LeakyReLU, 2×2 max-pool. One LeakyReLU module is called three times (as in the original)."""

    def __init__(self, inplanes: int, planes: int, leaky: float = 0.1) -> None:
        super().__init__()
        self.relu = nn.LeakyReLU(leaky)
        self.conv1 = _conv3x3(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv3x3(planes, planes)
        self.bn3 = nn.BatchNorm2d(planes)
        self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, bias=False), nn.BatchNorm2d(planes))
        self.maxpool = nn.MaxPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = out + self.downsample(x)
        return self.maxpool(self.relu(out))


class ResNet12(nn.Module):
    """MetaBaseline's ResNet-12: ``layer1`` … ``layer4`` (:class:`ResNet12Block`) → global average pool.

    The output is the ``channels[3]``-dimensional embedding (640 by default). Convolutions use
    MetaBaseline's Kaiming-normal (fan-out, leaky ReLU) initialisation, BatchNorm weight 1 and bias 0.
    """

    def __init__(self, channels: Sequence[int] = (64, 160, 320, 640), leaky: float = 0.1) -> None:
        super().__init__()
        channels = list(_four_positive(channels, "channels", "stage width", "(64, 160, 320, 640)", "ResNet12"))
        if isinstance(leaky, bool) or not isinstance(leaky, numbers.Real) or not math.isfinite(leaky):
            raise ConfigError(f"ResNet12: leaky (the LeakyReLU slope, 0.1) must be a finite number, got {leaky!r}")
        cin = 3
        for k, planes in enumerate(channels, start=1):
            self.add_module(f"layer{k}", ResNet12Block(cin, planes, leaky))
            cin = planes
        self.out_dim = cin
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.flatten(2).mean(2)


def resnet12(leaky: float = 0.1, channels: Sequence[int] = (64, 160, 320, 640)) -> ResNet12:
    """The MetaBaseline ResNet-12 embedding network, random weights (smaller ``channels`` for tests).

    Example:
        >>> import torch
        >>> model = resnet12(channels=(4, 4, 8, 8)).eval()
        >>> [name for name, _ in model.named_children()]
        ['layer1', 'layer2', 'layer3', 'layer4']
        >>> model(torch.randn(1, 3, 32, 32)).shape
        torch.Size([1, 8])
    """
    return ResNet12(channels, leaky)

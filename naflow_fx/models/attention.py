"""ResNet-50 with attention modules: CBAM, BAM and squeeze-excitation, written from the papers.

* :class:`SEModule` — Hu et al., "Squeeze-and-Excitation Networks" (2018).
* :class:`CBAM` — Woo et al., "CBAM: Convolutional Block Attention Module" (2018).
* :class:`BAM` — Park et al., "BAM: Bottleneck Attention Module" (2018).

The networks reuse torchvision's :class:`~torchvision.models.resnet.Bottleneck` (ResNet v1.5:
stride on the 3×3 conv) and add the attention module to the residual branch, after ``bn3`` and
before the identity is added (CBAM, SE), or after stages 1–3 (BAM). Every model ends in
global-average-pool + linear, so NAFlow's last layer ``N`` (the output of ``layer4``) is Grad-CAM's
layer (invariant I1).

Attention submodules are named so that their layers are recognisable in ``NAFlow.layers``:

* CBAM: ``layer1.0.cbam.channel.mlp.0`` … ``layer1.0.cbam.spatial.conv``, ``….spatial.bn``;
* SE: ``layer1.0.se.reduce``, ``layer1.0.se.expand``;
* BAM: ``bam1.channel.mlp.0`` …, ``bam1.spatial.reduce``, ``bam1.spatial.dilated1`` …

``layers`` and ``width`` shrink the network (``layers=(1, 1, 1, 1), width=16``) for fast tests.
Weights are random (PyTorch's default initialisation); nothing is downloaded.

Example:
    >>> import torch
    >>> from naflow_fx.models import resnet50_cbam
    >>> model = resnet50_cbam(num_classes=5, layers=(1, 1, 1, 1), width=8).eval()
    >>> model(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 5])
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, InputTypeError, optional
from ..fewshot import _count

_resnet = optional("torchvision.models.resnet", "naflow_fx.models")
Bottleneck, conv1x1 = _resnet.Bottleneck, _resnet.conv1x1

__all__ = [
    "SEModule",
    "ChannelGate",
    "SpatialGate",
    "CBAM",
    "BAMChannelGate",
    "BAMSpatialGate",
    "BAM",
    "AttentionBottleneck",
    "AttentionResNet",
    "resnet50_cbam",
    "resnet50_bam",
    "se_resnet50",
]


def _positive(value: object, name: str, fn: str, what: str = "") -> int:
    """``value`` as a positive int (numpy integers too, not bools or floats), else a :class:`ConfigError`."""
    return _count(value, f"{fn}: {name} must be a positive int{what}", "", ConfigError)


def _hidden(channels: int, reduction: int, fn: str = "attention module") -> int:
    channels = _positive(channels, "channels", fn)
    reduction = _positive(reduction, "reduction", fn, " (the hidden width is channels // reduction, at least 1)")
    return max(1, channels // reduction)


def _four_positive(values: object, name: str, each: str, example: str, fn: str) -> tuple[int, int, int, int]:
    """``values`` as 4 positive ints, one ``each`` per stage (any sequence, e.g. a tuple or a numpy array)."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__") or not hasattr(values, "__iter__"):
        raise InputTypeError(
            f"{fn}: {name} must be a sequence of 4 {each}s, e.g. {example}, got {type(values).__name__} {values!r}"
        )
    if len(values) != 4:
        raise ConfigError(f"{fn}: {name} must be 4 positive {each}s, one per stage, got {tuple(values)}")
    return tuple(_positive(n, f"every {each} in {name}", fn) for n in values)  # type: ignore[return-value]


def _check_resnet(fn: str, layers: object, num_classes: object, width: object, reduction: object = 1) -> tuple:
    """The checked ``(layers, num_classes, width)`` of an :class:`AttentionResNet` (and its ``reduction``)."""
    out = (
        _four_positive(layers, "layers", "block count", "(3, 4, 6, 3)", fn),
        _positive(num_classes, "num_classes", fn, " (the classifier's outputs)"),
        _positive(width, "width", fn, " (stage 1's bottleneck channels; 64 in ResNet-50)"),
    )
    _positive(reduction, "reduction", fn, " (the attention MLP's hidden width is channels // reduction)")
    return out


# ------------------------------------------------------------------------------------ SE (Hu et al.)


class SEModule(nn.Module):
    """Squeeze-excitation: ``x · σ(W₂ ReLU(W₁ GAP(x)))``, the MLP as 1×1 convolutions.

    Args:
        channels: channels of ``x``.
        reduction: the MLP's hidden width is ``channels // reduction`` (at least 1).

    Example:
        >>> import torch
        >>> se = SEModule(32, reduction=8)
        >>> x = torch.randn(2, 32, 5, 5)
        >>> y = se(x)
        >>> y.shape, bool(((y / x - 0.5).abs() <= 0.5).all())  # a gate in (0, 1) per channel
        (torch.Size([2, 32, 5, 5]), True)
    """

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = _hidden(channels, reduction, "SEModule")
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, hidden, 1)
        self.relu = nn.ReLU(inplace=True)
        self.expand = nn.Conv2d(hidden, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        s = self.gate(self.expand(self.relu(self.reduce(self.pool(x)))))
        return x * s


# ---------------------------------------------------------------------------------- CBAM (Woo et al.)


class ChannelGate(nn.Module):
    """CBAM's channel attention: ``x · σ(MLP(AvgPool(x)) + MLP(MaxPool(x)))`` with one shared MLP.

    The MLP (``mlp.0`` reduce, ``mlp.1`` ReLU, ``mlp.2`` expand) is written with 1×1 convolutions,
    the same map as the paper's fully connected layers on the pooled ``C×1×1`` descriptors.

    Example:
        >>> import torch
        >>> gate = ChannelGate(16, reduction=4)
        >>> gate(torch.randn(1, 16, 6, 6)).shape
        torch.Size([1, 16, 6, 6])
    """

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = _hidden(channels, reduction, "ChannelGate")
        self.mlp = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        avg = self.mlp(F.adaptive_avg_pool2d(x, 1))
        mx = self.mlp(F.adaptive_max_pool2d(x, 1))
        return x * torch.sigmoid(avg + mx)


class SpatialGate(nn.Module):
    """CBAM's spatial attention: ``x · σ(BN(conv₇ₓ₇([max_c x; mean_c x])))``.

    The two descriptors are the maximum and the mean over channels, ``torch.max(x, dim=1,
    keepdim=True)[0]`` and ``torch.mean(x, dim=1, keepdim=True)``, concatenated along channels.

    Example:
        >>> import torch
        >>> gate = SpatialGate(kernel_size=7)
        >>> gate(torch.randn(1, 16, 6, 6)).shape
        torch.Size([1, 16, 6, 6])
    """

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        kernel_size = _positive(kernel_size, "kernel_size", "SpatialGate", " and odd (7 in the paper)")
        if kernel_size % 2 == 0:
            raise ConfigError(
                f"SpatialGate: kernel_size must be odd (7 in the paper), got {kernel_size}: an even kernel with "
                "padding kernel_size // 2 changes the map's size"
            )
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(1)

    def forward(self, x: Tensor) -> Tensor:
        pooled = torch.cat([torch.max(x, dim=1, keepdim=True)[0], torch.mean(x, dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.bn(self.conv(pooled)))


class CBAM(nn.Module):
    """Convolutional Block Attention Module: channel gate, then spatial gate (sequential, as in the paper).

    Args:
        channels: channels of ``x``.
        reduction: hidden width of the channel MLP is ``channels // reduction`` (at least 1).
        kernel_size: the spatial gate's convolution (7 in the paper).

    Example:
        >>> import torch
        >>> cbam = CBAM(32, reduction=16)
        >>> [name for name, _ in cbam.named_children()]
        ['channel', 'spatial']
        >>> cbam(torch.randn(2, 32, 8, 8)).shape
        torch.Size([2, 32, 8, 8])
    """

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7) -> None:
        super().__init__()
        self.channel = ChannelGate(channels, reduction)
        self.spatial = SpatialGate(kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.spatial(self.channel(x))


# ---------------------------------------------------------------------------------- BAM (Park et al.)


class BAMChannelGate(nn.Module):
    """BAM's channel branch ``M_c(x) = BN(W₁ ReLU(BN(W₀ GAP(x))))`` as a ``B×C×1×1`` tensor.

    ``mlp`` is ``Linear → BatchNorm1d → ReLU → Linear → BatchNorm1d`` (the paper batch-normalises
    the MLP's output before it is added to the spatial branch).
    """

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = _hidden(channels, reduction, "BAMChannelGate")
        self.mlp = nn.Sequential(
            nn.Linear(channels, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, channels),
            nn.BatchNorm1d(channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))[:, :, None, None]


class BAMSpatialGate(nn.Module):
    """BAM's spatial branch ``M_s(x)``: 1×1 reduce → two dilated 3×3 convs → 1×1 to one channel (``B×1×H×W``).

    BatchNorm and ReLU follow the reduce and each dilated conv; the final 1×1 conv has a bias and
    no normalisation.
    """

    def __init__(self, channels: int, reduction: int = 16, dilation: int = 4) -> None:
        super().__init__()
        hidden = _hidden(channels, reduction, "BAMSpatialGate")
        dilation = _positive(dilation, "dilation", "BAMSpatialGate", " (4 in the paper)")
        layers: OrderedDict[str, nn.Module] = OrderedDict(
            reduce=nn.Conv2d(channels, hidden, 1),
            reduce_bn=nn.BatchNorm2d(hidden),
            reduce_relu=nn.ReLU(inplace=True),
        )
        for i in (1, 2):
            layers[f"dilated{i}"] = nn.Conv2d(hidden, hidden, 3, padding=dilation, dilation=dilation)
            layers[f"dilated{i}_bn"] = nn.BatchNorm2d(hidden)
            layers[f"dilated{i}_relu"] = nn.ReLU(inplace=True)
        layers["project"] = nn.Conv2d(hidden, 1, 1)
        self.body = nn.Sequential(layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class BAM(nn.Module):
    """Bottleneck Attention Module: ``(1 + σ(M_c(x) + M_s(x))) · x``, the two branches broadcast-added.

    Args:
        channels: channels of ``x``.
        reduction: hidden width of both branches is ``channels // reduction`` (at least 1).
        dilation: dilation of the spatial branch's 3×3 convolutions (4 in the paper).

    Example:
        >>> import torch
        >>> bam = BAM(32, reduction=16).eval()
        >>> x = torch.randn(2, 32, 8, 8)
        >>> y = bam(x)
        >>> y.shape, bool(((y / x - 1.5).abs() <= 0.5).all())  # a gain in (1, 2) per neuron
        (torch.Size([2, 32, 8, 8]), True)
    """

    def __init__(self, channels: int, reduction: int = 16, dilation: int = 4) -> None:
        super().__init__()
        self.channel = BAMChannelGate(channels, reduction)
        self.spatial = BAMSpatialGate(channels, reduction, dilation)

    def forward(self, x: Tensor) -> Tensor:
        att = torch.sigmoid(self.channel(x) + self.spatial(x))
        return (1 + att) * x


# ------------------------------------------------------------------------------------- the networks


class AttentionBottleneck(Bottleneck):
    """torchvision's Bottleneck with an optional attention module on the residual branch.

    ``out = ReLU(A(bn3(conv3(…))) + identity)``; the module ``A`` is registered under
    ``attention_name`` (e.g. ``"cbam"`` or ``"se"``) so its layers read ``layer1.0.cbam.…``.

    Example:
        >>> import torch
        >>> block = AttentionBottleneck(16, 4, attention=("se", lambda c: SEModule(c, 4)))
        >>> block.attention_name, block(torch.randn(1, 16, 4, 4)).shape
        ('se', torch.Size([1, 16, 4, 4]))
    """

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: Callable[..., nn.Module] | None = None,
        attention: tuple[str, Callable[[int], nn.Module]] | None = None,
    ) -> None:
        super().__init__(inplanes, planes, stride, downsample, groups, base_width, dilation, norm_layer)
        self.attention_name: str | None = None
        if attention is not None:
            name, factory = attention
            self.attention_name = name
            self.add_module(name, factory(planes * self.expansion))

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.attention_name is not None:
            out = getattr(self, self.attention_name)(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class AttentionResNet(nn.Module):
    """A Bottleneck ResNet (torchvision layout and names) with attention in blocks and/or between stages.

    Args:
        layers: blocks per stage (``(3, 4, 6, 3)`` is ResNet-50).
        num_classes: size of the linear head.
        width: channels of the stem and of stage 1's bottleneck (64 in ResNet-50); stage ``k``
            has ``width · 2^(k−1)`` bottleneck channels and 4× as many output channels.
        block_attention: ``(name, factory)``; ``factory(channels)`` builds the module each block
            applies to its residual branch, registered as ``layerK.J.<name>``.
        stage_attention: ``(name, factory)``; a module applied after each of stages 1–3,
            registered as ``<name>1``, ``<name>2``, ``<name>3`` (BAM's placement).
    """

    def __init__(
        self,
        layers: Sequence[int] = (3, 4, 6, 3),
        num_classes: int = 1000,
        width: int = 64,
        block_attention: tuple[str, Callable[[int], nn.Module]] | None = None,
        stage_attention: tuple[str, Callable[[int], nn.Module]] | None = None,
    ) -> None:
        super().__init__()
        layers, num_classes, width = _check_resnet("AttentionResNet", layers, num_classes, width)
        expansion = AttentionBottleneck.expansion
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.stage_attention_name = stage_attention[0] if stage_attention is not None else None
        for k, blocks in enumerate(layers, start=1):
            planes = width * 2 ** (k - 1)
            self.add_module(f"layer{k}", self._make_layer(planes, int(blocks), 1 if k == 1 else 2, block_attention))
            if stage_attention is not None and k < 4:
                name, factory = stage_attention
                self.add_module(f"{name}{k}", factory(planes * expansion))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8 * expansion, num_classes)

        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int, attention) -> nn.Sequential:
        expansion = AttentionBottleneck.expansion
        downsample = None
        if stride != 1 or self.inplanes != planes * expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * expansion, stride), nn.BatchNorm2d(planes * expansion)
            )
        # planes · (base_width / 64) is the bottleneck width: base_width = 64 keeps it at ``planes``
        layers = [AttentionBottleneck(self.inplanes, planes, stride, downsample, attention=attention)]
        self.inplanes = planes * expansion
        layers += [AttentionBottleneck(self.inplanes, planes, attention=attention) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for k in (1, 2, 3, 4):
            x = getattr(self, f"layer{k}")(x)
            if self.stage_attention_name is not None and k < 4:
                x = getattr(self, f"{self.stage_attention_name}{k}")(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet50_cbam(
    num_classes: int = 1000, layers: Sequence[int] = (3, 4, 6, 3), width: int = 64, reduction: int = 16
) -> AttentionResNet:
    """ResNet-50 + CBAM in every bottleneck (Woo et al. 2018), random weights.

    Example:
        >>> import torch
        >>> model = resnet50_cbam(num_classes=3, layers=(1, 1, 1, 1), width=8).eval()
        >>> "layer1.0.cbam.spatial.conv" in dict(model.named_modules())
        True
        >>> model(torch.randn(1, 3, 32, 32)).shape
        torch.Size([1, 3])
    """
    layers, num_classes, width = _check_resnet("resnet50_cbam", layers, num_classes, width, reduction)
    return AttentionResNet(layers, num_classes, width, block_attention=("cbam", lambda c: CBAM(c, reduction)))


def resnet50_bam(
    num_classes: int = 1000, layers: Sequence[int] = (3, 4, 6, 3), width: int = 64, reduction: int = 16
) -> AttentionResNet:
    """ResNet-50 + BAM after stages 1, 2 and 3 (``bam1``, ``bam2``, ``bam3``; Park et al. 2018), random weights.

    Example:
        >>> import torch
        >>> model = resnet50_bam(num_classes=3, layers=(1, 1, 1, 1), width=8).eval()
        >>> [name for name, _ in model.named_children() if name.startswith("bam")]
        ['bam1', 'bam2', 'bam3']
        >>> model(torch.randn(1, 3, 32, 32)).shape
        torch.Size([1, 3])
    """
    layers, num_classes, width = _check_resnet("resnet50_bam", layers, num_classes, width, reduction)
    return AttentionResNet(layers, num_classes, width, stage_attention=("bam", lambda c: BAM(c, reduction)))


def se_resnet50(
    num_classes: int = 1000, layers: Sequence[int] = (3, 4, 6, 3), width: int = 64, reduction: int = 16
) -> AttentionResNet:
    """SE-ResNet-50: squeeze-excitation in every bottleneck (Hu et al. 2018), random weights.

    Example:
        >>> import torch
        >>> model = se_resnet50(num_classes=3, layers=(1, 1, 1, 1), width=8).eval()
        >>> "layer4.0.se.expand" in dict(model.named_modules())
        True
        >>> model(torch.randn(1, 3, 32, 32)).shape
        torch.Size([1, 3])
    """
    layers, num_classes, width = _check_resnet("se_resnet50", layers, num_classes, width, reduction)
    return AttentionResNet(layers, num_classes, width, block_attention=("se", lambda c: SEModule(c, reduction)))

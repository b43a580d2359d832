"""Small, deterministic test models for the model-level tests.

Every builder seeds its own RNG (without disturbing the global one), gives BatchNorm layers
non-trivial affine parameters and running statistics (a few train-mode passes on random data),
and returns the model in eval mode unless asked otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "seeded",
    "warm_batchnorm",
    "conv4",
    "conv64f",
    "PReLUNet",
    "InvertibleNet",
    "GapLinearNet",
    "StridedNet",
    "ResidualNet",
    "TwoUnsupportedOps",
    "DataDependentBranch",
]


def seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` under ``torch.manual_seed(seed)`` without changing the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def tiny_cnn(num_classes: int = 3, seed: int = 0) -> nn.Module:
    """Two padded 3×3 convs with ReLUs, pooled, and a linear head: a flow's smallest useful model."""

    def build() -> nn.Module:
        layers = [nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()]
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes)).eval()

    return seeded(seed, build)


def warm_batchnorm(model: nn.Module, input_shape: Sequence[int], steps: int = 3, seed: int = 0) -> nn.Module:
    """Randomise BN affine parameters and fill running stats with train-mode passes; return ``model.eval()``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                with torch.no_grad():
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
                m.momentum = 0.5
        model.train()
        with torch.no_grad():
            for _ in range(steps):
                model(2.0 * torch.randn(*input_shape) + 0.5)
    return model.eval()


def _conv_block(cin: int, cout: int, act: Callable[[], nn.Module]) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), act(), nn.MaxPool2d(2)]


class FewShotEncoder(nn.Module):
    """4 × [conv3×3(hidden) → BN → act → maxpool2] → flatten (→ optional linear head).

    ``features`` is one flat ``nn.Sequential`` so layer names are ``features.0`` … ``features.15``.
    """

    def __init__(self, hidden: int, in_channels: int, act: Callable[[], nn.Module], num_classes: int | None):
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for _ in range(4):
            layers += _conv_block(cin, hidden, act)
            cin = hidden
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(hidden, num_classes) if num_classes else None

    def forward(self, x):
        x = torch.flatten(self.features(x), 1)
        return self.head(x) if self.head is not None else x


def conv4(hidden: int = 64, in_channels: int = 3, num_classes: int | None = None, size: int = 16, seed: int = 0):
    """The Conv-4 few-shot encoder (ReLU). Outputs the flattened embedding (or logits with a head)."""
    model = seeded(seed, lambda: FewShotEncoder(hidden, in_channels, nn.ReLU, num_classes))
    return warm_batchnorm(model, (8, in_channels, size, size), seed=seed + 1)


def conv64f(hidden: int = 64, in_channels: int = 3, num_classes: int | None = None, size: int = 16, seed: int = 0):
    """The Conv-64F few-shot encoder: Conv-4 with LeakyReLU(0.2)."""
    model = seeded(seed, lambda: FewShotEncoder(hidden, in_channels, lambda: nn.LeakyReLU(0.2), num_classes))
    return warm_batchnorm(model, (8, in_channels, size, size), seed=seed + 1)


class PReLUNet(nn.Module):
    """conv → BN → PReLU(per channel) → maxpool → conv → PReLU(shared) → GAP → linear."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.act1 = nn.PReLU(16, init=0.1)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.act2 = nn.PReLU(init=0.3)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)
        with torch.no_grad():  # distinct per-channel slopes, all non-zero
            self.act1.weight.uniform_(0.05, 0.5)

    def forward(self, x):
        x = self.pool(self.act1(self.bn1(self.conv1(x))))
        x = self.act2(self.conv2(x))
        return self.fc(torch.flatten(self.gap(x), 1))

    @classmethod
    def build(cls, num_classes: int = 5, size: int = 16, seed: int = 0) -> PReLUNet:
        model = seeded(seed, lambda: cls(num_classes))
        return warm_batchnorm(model, (8, 3, size, size), seed=seed + 1)


class InvertibleNet(nn.Module):
    """LeakyReLU / BN / conv with q ≥ p at every conv (channels non-decreasing, stride 1, same padding).

    Every stage is injective and nothing is abandoned (LeakyReLU slopes and BN scales are non-zero),
    so with ``damping=0`` the flow must reconstruct every layer's activation exactly (I2).
    Layers: conv1, bn1, act1, conv2, bn2, act2, conv3, bn3, act3 (= N) → GAP → fc.
    """

    def __init__(self, channels: Sequence[int] = (3, 4, 6, 6), num_classes: int = 4, slope: float = 0.2):
        super().__init__()
        assert all(a <= b for a, b in zip(channels, channels[1:])), "channels must be non-decreasing"
        blocks = []
        for i, (cin, cout) in enumerate(zip(channels, channels[1:]), start=1):
            self.add_module(f"conv{i}", nn.Conv2d(cin, cout, 3, padding=1))
            self.add_module(f"bn{i}", nn.BatchNorm2d(cout))
            self.add_module(f"act{i}", nn.LeakyReLU(slope))
            blocks.append(i)
        self._blocks = blocks
        self.fc = nn.Linear(channels[-1], num_classes)

    def forward(self, x):
        for i in self._blocks:
            x = getattr(self, f"act{i}")(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x)))
        return self.fc(x.mean((2, 3)))

    @classmethod
    def build(cls, size: int = 8, seed: int = 0, **kwargs) -> InvertibleNet:
        model = seeded(seed, lambda: cls(**kwargs))
        return warm_batchnorm(model, (8, 3, size, size), seed=seed + 1)


class GapLinearNet(nn.Module):
    """conv → BN → ReLU → conv → ReLU (= N, full input resolution) → global average pool → linear."""

    def __init__(self, num_classes: int = 6):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, num_classes)

    def forward(self, x):
        x = self.relu2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.fc(torch.flatten(self.gap(x), 1))

    @classmethod
    def build(cls, size: int = 12, seed: int = 0) -> GapLinearNet:
        model = seeded(seed, lambda: cls())
        return warm_batchnorm(model, (8, 3, size, size), seed=seed + 1)


class StridedNet(nn.Module):
    """conv1 (3→4) → LeakyReLU → conv2 (4→4, stride 2: q < p) = N → GAP → linear.

    The solve of conv2 is under-determined, so ``B_{act}`` is the minimum-norm solution (I3).
    """

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.LeakyReLU(0.1)
        self.conv2 = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.fc(self.conv2(self.act(self.conv1(x))).mean((2, 3)))

    @classmethod
    def build(cls, seed: int = 0) -> StridedNet:
        return seeded(seed, lambda: cls()).eval()


class ResidualNet(nn.Module):
    """A stem and one basic residual block, written with in-place ops or without.

    ``inplace=True`` uses ``nn.ReLU(inplace=True)``, ``out.relu_()`` and ``out += identity``; the
    out-of-place twin computes the same function with the same parameter names.
    """

    def __init__(self, inplace: bool, num_classes: int = 5):
        super().__init__()
        self.inplace = inplace
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stem_bn = nn.BatchNorm2d(8)
        self.stem_relu = nn.ReLU(inplace=inplace)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        x = self.stem_relu(self.stem_bn(self.stem(x)))
        identity = x
        out = self.bn1(self.conv1(x))
        if self.inplace:
            out.relu_()
        else:
            out = torch.relu(out)
        out = self.bn2(self.conv2(out))
        if self.inplace:
            out += identity
            out = F.relu(out, inplace=True)
        else:
            out = out + identity
            out = F.relu(out)
        out = self.pool(out)
        return self.fc(out.mean((2, 3)))

    @classmethod
    def pair(cls, size: int = 8, seed: int = 0) -> tuple[ResidualNet, ResidualNet]:
        """``(in_place_model, out_of_place_model)`` with identical parameters and buffers."""
        a = seeded(seed, lambda: cls(inplace=False))
        warm_batchnorm(a, (8, 3, size, size), seed=seed + 1)
        b = cls(inplace=True)
        b.load_state_dict(a.state_dict())
        return b.eval(), a.eval()


class TwoUnsupportedOps(nn.Module):
    """Two different ops without an inverse rule (cumsum, flip) on the feature path before N."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = torch.cumsum(self.conv1(x), dim=3)
        x = torch.flip(self.conv2(x), dims=(2,))
        x = self.relu(x)
        return self.fc(x.mean((2, 3)))


class DataDependentBranch(nn.Module):
    """A Python branch on a tensor value: ``torch.fx`` cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = self.conv(x)
        if x.sum() > 0:
            x = torch.relu(x)
        return self.fc(x.mean((2, 3)))


def silu_chain(stages: int = 5, seed: int = 0) -> nn.Module:
    """1×1 convs with weights ×1e-3 into SiLUs at their flat point: each inverse amplifies ~1e6, so
    with ``damping=0`` five stages overflow float32 (non-finite maps) and three do not."""

    def build() -> nn.Module:
        layers: list[nn.Module] = [nn.Conv2d(3, 4, 1)]
        for _ in range(stages):
            layers += [nn.SiLU(), nn.Conv2d(4, 4, 1)]
        return nn.Sequential(*layers, nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()

    model = seeded(seed, build)
    with torch.no_grad():
        for conv in model[:-4:2]:
            conv.weight.mul_(1e-3)
            conv.bias.fill_(-1.2784645)  # SiLU'(a) = 0 here
    return model

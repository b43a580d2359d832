"""The exceptions naflow_fx raises. Every one says what was wrong and what to do."""

from __future__ import annotations

import difflib
import importlib
import sys
import warnings
from collections.abc import Iterable, Sequence
from types import ModuleType

__all__ = [
    "NAFlowError",
    "UnsupportedModelError",
    "UnsupportedOpError",
    "InputError",
    "InputTypeError",
    "TargetError",
    "ConfigError",
    "MissingDependencyError",
    "NumericalWarning",
    "ZeroMapsWarning",
]


class NAFlowError(Exception):
    """Base class of every error naflow_fx raises on purpose."""


class UnsupportedModelError(NAFlowError):
    """The model cannot be traced or has a shape naflow_fx cannot explain."""


class UnsupportedOpError(NAFlowError):
    """One or more graph nodes have no inverse rule (all of them are listed)."""


class InputError(NAFlowError, ValueError):
    """An input batch (or example input) is malformed: rank, channels, dtype, NaN/Inf, empty."""


class TargetError(NAFlowError, ValueError):
    """A target is out of range, of the wrong length, or returns the wrong shape."""


class InputTypeError(NAFlowError, TypeError):
    """An argument has the wrong type (e.g. the input is not a tensor)."""


class ConfigError(NAFlowError, ValueError):
    """An option of ``compile_naflow`` (solver, damping, tol, max_iter, reduction, fallback) is invalid."""


class MissingDependencyError(NAFlowError, ImportError):
    """A package of the ``vision`` extra (torchvision, Pillow, matplotlib, tqdm) is not installed."""


_PACKAGES = {"PIL": "pillow"}  # import name → pip name, where they differ


def optional(module: str, purpose: str) -> ModuleType:
    """Import ``module``, a part of the ``vision`` extra, or say how to install it.

    ``purpose`` names what needs it (``"naflow_fx.viz"``, ``"naflow explain"``).

    Example:
        >>> optional("matplotlib.pyplot", "a figure").__name__
        'matplotlib.pyplot'
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        root = module.partition(".")[0]
        package = _PACKAGES.get(root, root)
        raise MissingDependencyError(
            f"{purpose} needs {package}, which is not installed: pip install 'naflow-fx[vision]' (or pip install "
            f"{package})",
            name=exc.name,
        ) from None


class ZeroMapsWarning(UserWarning):
    """Every map of a sample is zero at every layer: its score ignores the last layer, or is nowhere positive."""


class NumericalWarning(RuntimeWarning):
    """A flow's maps are not to be trusted as they are: they are non-finite (NaN/Inf, the back-propagated
    feature maps overflowed), or least-squares solves stopped at ``max_iter`` before ``tol``."""


def warn_at_caller(message: Warning | str, category: type[Warning] | None = None) -> None:
    """``warnings.warn``, shown at the first line outside naflow_fx: the user's call.

    However deep in the library the warning arises (``nf(x)`` itself, or ``explain_episode``
    calling it), it names the user's file and line, and the user's warning filters apply there.
    """
    frame, level = sys._getframe(1), 2  # level 2: the function that called this one
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] in ("naflow_fx", "contextlib"):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def channels_last_hint(x: object, channels: int | None = None) -> str:
    """A hint when ``x`` looks like an image in channels-last layout (``[B, H, W, C]`` or ``[H, W, C]``,
    as PIL, numpy and OpenCV give it), else ``""``: its last dim holds ``channels`` (1 or 3 when unknown)
    and its channel dim does not.

    Example:
        >>> import torch
        >>> print(channels_last_hint(torch.zeros(64, 64, 3, dtype=torch.uint8), 3))  # doctest: +ELLIPSIS
        ; it looks like one image in channels-last layout [H, W, C]: pass x.permute(2, 0, 1).unsqueeze(0), as floats ...
        >>> channels_last_hint(torch.zeros(2, 3, 64, 64), 3)
        ''
    """
    import torch  # lazily: the exceptions import without torch

    if not isinstance(x, torch.Tensor) or x.dim() not in (3, 4):
        return ""
    wanted = (1, 3) if channels is None else (channels,)
    channel_dim = 1 if x.dim() == 4 else 0
    if x.shape[-1] not in wanted or x.shape[channel_dim] in wanted:
        return ""
    if x.dim() == 4:
        hint = "; it looks like a batch in channels-last layout [B, H, W, C]: pass x.permute(0, 3, 1, 2)"
    else:
        hint = "; it looks like one image in channels-last layout [H, W, C]: pass x.permute(2, 0, 1).unsqueeze(0)"
    if not x.is_floating_point():
        hint += ", as floats normalised as the model expects (e.g. x.float() / 255, then its mean and std)"
    return hint


def did_you_mean(name: object, choices: Iterable[str]) -> str:
    """``" (did you mean 'a' or 'b'?)"`` for the choices closest to ``name`` (any case), else ``""``.

    Example:
        >>> did_you_mean("layer4.1.relu2", ["layer4.1.relu", "layer4.1.relu#2", "fc"])
        " (did you mean 'layer4.1.relu#2' or 'layer4.1.relu'?)"
        >>> did_you_mean("Layer1", ["layer1", "LAYER1", "Layer1"])  # one spelling per name, never the name itself
        " (did you mean 'layer1'?)"
    """
    spelled: dict[str, str] = {}  # case-folded → the first spelling; the name itself is no suggestion
    for choice in choices:
        if choice != str(name):
            spelled.setdefault(choice.casefold(), choice)
    close = [spelled[c] for c in difflib.get_close_matches(str(name).casefold(), list(spelled), n=3, cutoff=0.6)]
    if not close:
        return ""
    quoted = [repr(c) for c in close]
    return f" (did you mean {quoted[0] if len(quoted) == 1 else ', '.join(quoted[:-1]) + ' or ' + quoted[-1]}?)"


def elided(names: Sequence[str], most: int = 16) -> str:
    """``names`` joined by commas, the middle elided past ``most`` with the count kept.

    Example:
        >>> elided([f"l{i}" for i in range(20)], most=4)
        'l0, l1, …, l18, l19 (20 in all)'
    """
    if len(names) <= most:
        return ", ".join(names)
    return f"{', '.join([*names[: most // 2], '…', *names[len(names) - most // 2 :]])} ({len(names)} in all)"

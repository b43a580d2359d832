"""The exceptions naflow_fx raises. Every one says what was wrong and what to do."""

from __future__ import annotations

import importlib
import sys
import warnings
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

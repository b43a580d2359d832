"""The exceptions naflow_fx raises. Every one says what was wrong and what to do."""

from __future__ import annotations

__all__ = [
    "NAFlowError",
    "UnsupportedModelError",
    "UnsupportedOpError",
    "InputError",
    "InputTypeError",
    "TargetError",
    "ConfigError",
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


class ZeroMapsWarning(UserWarning):
    """Every map of a sample is zero at every layer: its score ignores the last layer, or is nowhere positive."""


class NumericalWarning(RuntimeWarning):
    """A flow gave non-finite (NaN/Inf) maps: the back-propagated feature maps overflowed."""

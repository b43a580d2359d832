"""naflow_fx: layer-by-layer NAFlow explanations of CNNs, compiled with torch.fx.

>>> from naflow_fx import compile_naflow, ClassTarget
"""

from .api import NAFlow, compile_naflow
from .errors import (
    ConfigError,
    InputError,
    InputTypeError,
    MissingDependencyError,
    NAFlowError,
    NumericalWarning,
    TargetError,
    UnsupportedModelError,
    UnsupportedOpError,
    ZeroMapsWarning,
)
from .result import FlowResult, LayerMaps
from .similarity import SimilarityTarget
from .solvers import SolverConfig, SolveRecord
from .targets import ClassTarget

__version__ = "0.1.0"

__all__ = [
    "compile_naflow",
    "NAFlow",
    "FlowResult",
    "LayerMaps",
    "ClassTarget",
    "SimilarityTarget",
    "SolverConfig",
    "SolveRecord",
    "NAFlowError",
    "MissingDependencyError",
    "UnsupportedModelError",
    "UnsupportedOpError",
    "InputError",
    "InputTypeError",
    "TargetError",
    "ConfigError",
    "NumericalWarning",
    "ZeroMapsWarning",
]

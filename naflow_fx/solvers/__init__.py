"""Least-squares solvers: dense SVD (oracle), matrix-free CGLS, and the context that picks one."""

from .context import SolverConfig, SolverContext, SolveRecord, relative_residual
from .dense import dense_solve, svd_solve
from .iterative import IterativeResult, cgls
from .linearize import linearize_graph
from .operator import LinearOperator, linear_map, linearized_map

__all__ = [
    "SolverConfig",
    "SolverContext",
    "SolveRecord",
    "relative_residual",
    "dense_solve",
    "svd_solve",
    "IterativeResult",
    "cgls",
    "LinearOperator",
    "linear_map",
    "linearized_map",
    "linearize_graph",
]

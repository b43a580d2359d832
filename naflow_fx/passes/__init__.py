"""The compiler passes, one file each: check_scope → normalize → propagate_shapes → partition_stages →
assign_inverse_rules → codegen (emit_recorder, emit_inverse)."""

from .assign_rules import InverseStep, assign_inverse_rules
from .codegen import InverseProgram, emit_inverse, emit_recorder
from .independence import first_mixing_node
from .normalize import normalize
from .partition import Plan, Stage, partition_stages
from .scope import check_scope
from .shape_prop import propagate_shapes

__all__ = [
    "check_scope",
    "normalize",
    "propagate_shapes",
    "partition_stages",
    "assign_inverse_rules",
    "emit_recorder",
    "emit_inverse",
    "first_mixing_node",
    "InverseStep",
    "InverseProgram",
    "Plan",
    "Stage",
]

"""Are residual regions better conditioned than their convolutions alone? (spec §4)

    python benchmarks/experiments/region_vs_conv.py --model resnet18    # 35 s
    python benchmarks/experiments/region_vs_conv.py --model resnet50    # 65 s

Spec §4 asks to measure whether the region solves of residual blocks (``I + J_F``) are better
conditioned than a lone square convolution before deciding where to invert per op and where per
region. For every residual region of one flow (random weights, 224×224, batch 1) this script
gives the CGLS iterations of the region solve as the flow runs it, and for every convolution in
that region the iterations of the same damped problem (λ = damping · σ_max, the library's
stopping rule) for that convolution alone, with two right-hand sides: its recorded output
without bias (a consistent system, as when nothing downstream was abandoned), and that output
zeroed where it is negative (about half of it: a stand-in for what a ReLU's abandoning does to a
right-hand side, which makes the system inconsistent).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from regions_common import zoo_regions

from naflow_fx.solvers.context import SolverConfig, SolverContext
from naflow_fx.solvers.iterative import cgls
from naflow_fx.solvers.operator import linear_map


def conv_inputs(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[nn.Conv2d, torch.Tensor, torch.Tensor]]:
    """``{name: (conv, its recorded input, its recorded output)}`` for every Conv2d."""
    seen: dict[str, tuple] = {}
    hooks = [
        m.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, (m, i[0].detach(), o.detach())))
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d)
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def conv_iterations(conv: nn.Conv2d, inp: torch.Tensor, out: torch.Tensor, masked: bool) -> int:
    w = conv.weight.detach()

    def fn(v: torch.Tensor) -> torch.Tensor:
        return F.conv2d(v, w.to(v.dtype), None, conv.stride, conv.padding, conv.dilation, conv.groups)

    op = linear_map(fn, inp)
    rhs = fn(inp)
    if masked:
        rhs = rhs * (out > 0)  # a stand-in for abandoning (the real ReLU mask comes after the batch norm)
    ctx = SolverContext(SolverConfig())
    lam = ctx.config.damping * ctx.sigma_max(op, rhs)
    return cgls(op, rhs, lam, tol=ctx.config.tol, max_iter=ctx.config.max_iter).iterations


def main() -> None:
    args, model, x, regions = zoo_regions(__doc__)
    convs = conv_inputs(model, x)
    ctx = SolverContext(SolverConfig())
    print(f"{args.model}, {args.size}×{args.size}, batch 1, damping 1e-2, tol 1e-4\n")
    print("| region | region solve: CGLS iterations | its convolutions alone: iterations (recorded output · masked) |")
    print("|---|---|---|")
    for name, (op, rhs, lam) in regions.items():
        block = name.rsplit(".", 1)[0]  # "layer1.0.add" → "layer1.0"
        its = cgls(op, rhs, lam, tol=ctx.config.tol, max_iter=ctx.config.max_iter).iterations
        cells = []
        for conv_name, (conv, inp, out) in convs.items():
            if conv_name.startswith(block + "."):
                k = "×".join(map(str, conv.kernel_size))
                stride = f", stride {conv.stride[0]}" if conv.stride[0] > 1 else ""
                plain, masked = conv_iterations(conv, inp, out, False), conv_iterations(conv, inp, out, True)
                short = conv_name[len(block) + 1 :]
                cells.append(f"{short} ({conv.in_channels}→{conv.out_channels} {k}{stride}): {plain} · {masked}")
        print(f"| `{block}` | {its} | {'; '.join(cells)} |")


if __name__ == "__main__":
    main()

"""The ``naflow`` command line: ``naflow demo`` and ``naflow inspect``.

Every error the user can fix is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import torch

from .errors import NAFlowError

__all__ = ["main", "synthetic_images"]

_EPILOG_DEMO = """examples:
  naflow demo                         # vgg11_bn (random weights) at 128x128, writes naflow-demo/
  naflow demo --model alexnet --size 96 --out /tmp/demo
"""

_EPILOG_INSPECT = """examples:
  naflow inspect --model vgg11_bn --size 64
  naflow inspect --model alexnet --no-code
"""


class CLIError(Exception):
    """A user-fixable problem: printed as one line, exit code 2."""


def synthetic_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Deterministic test images ``[n, 3, size, size]`` in [0, 1]: a disc and a square on a gradient.

    Example:
        >>> synthetic_images(2, 32).shape
        torch.Size([2, 3, 32, 32])
    """
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    out = []
    for _ in range(n):
        c = torch.rand(3, 2, generator=gen)
        img = c[:, :1, None] * xx + c[:, 1:, None] * yy
        cx, cy, r = torch.rand(3, generator=gen) * torch.tensor([0.5, 0.5, 0.12]) + torch.tensor([0.25, 0.25, 0.1])
        disc = ((xx - cx) ** 2 + (yy - cy) ** 2) < r**2
        img[:, disc] = torch.rand(3, 1, generator=gen)
        sx, sy = (torch.rand(2, generator=gen) * 0.6 + 0.1).tolist()
        square = (xx > sx) & (xx < sx + 0.2) & (yy > sy) & (yy < sy + 0.2)
        img[:, square] = torch.rand(3, 1, generator=gen)
        out.append(img.clamp(0, 1))
    return torch.stack(out)


_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def _torchvision_model(name: str) -> torch.nn.Module:
    try:
        import torchvision
    except ImportError:
        raise CLIError("torchvision is not installed: pip install 'naflow-fx[vision]'") from None
    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        close = [m for m in available if m.startswith(name[:3])][:8]
        raise CLIError(
            f"unknown model {name!r}; torchvision classification models include: {', '.join(close or available[:8])}"
        )
    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None).eval()


def _cmd_demo(args: argparse.Namespace) -> int:
    from . import compile_naflow
    from .viz import flow_grid

    model = _torchvision_model(args.model)
    images = synthetic_images(args.images, args.size)
    x = (images - _MEAN) / _STD
    start = time.perf_counter()
    nf = compile_naflow(model, x[:1])
    compile_s = time.perf_counter() - start
    print(f"{args.model} (random weights), input {args.size}x{args.size}, compiled in {compile_s:.2f}s: {nf}")
    print(nf.layer_table())
    start = time.perf_counter()
    flow = nf(x)
    flow_s = time.perf_counter() - start
    print(f"\nflow over {len(flow.layers)} layers, batch {x.shape[0]}: {flow_s:.1f}s. Solver diagnostics:")
    print(flow.format_diagnostics())
    cam = nf.gradcam(x, target=flow.classes)
    path = f"{args.out}/flow_grid.png"
    flow_grid(images, [flow, cam], path, row_labels=["NAFlow", "Grad-CAM"])
    print(f"\nwrote {path}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from . import compile_naflow

    model = _torchvision_model(args.model)
    nf = compile_naflow(model, (1, 3, args.size, args.size))
    plan = nf.plan
    nodes = {n.name: n for n in nf.graph_module.graph.nodes}
    print(f"{args.model}: {len(plan.stages)} stages, last layer {nf.last_layer!r}\n")
    print(f"{'stage':>5} {'kind':<7} {'input':<24} {'output':<24} inverse")
    for s in plan.stages:
        step = nodes[s.output].meta["naflow.inverse"]
        name = nodes[s.output].meta.get("naflow.name", s.output)
        src = nodes[s.input].meta.get("naflow.name", s.input)
        kind = "region" if s.is_region else "op"
        print(f"{s.index:>5} {kind:<7} {src:<24} {name:<24} {step.rule_name}")
    print()
    print(nf.layer_table())
    if not args.no_code:
        print("\n# generated inverse network (nf.inverse.code):")
        print(nf.inverse.code)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="naflow", description="Layer-by-layer NAFlow explanations of CNNs.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="explain a torchvision CNN on synthetic images and write a figure",
        epilog=_EPILOG_DEMO,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--model", default="vgg11_bn", help="torchvision model name (random weights)")
    demo.add_argument("--size", type=int, default=128, help="input size in pixels (default 128)")
    demo.add_argument("--images", type=int, default=2, help="number of synthetic images (default 2)")
    demo.add_argument("--out", default="naflow-demo", help="output folder (default naflow-demo)")
    demo.set_defaults(func=_cmd_demo)
    insp = sub.add_parser(
        "inspect",
        help="print the stages, inverse rules and generated inverse network of a model",
        epilog=_EPILOG_INSPECT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    insp.add_argument("--model", required=True, help="torchvision model name")
    insp.add_argument("--size", type=int, default=64, help="input size used for shapes (default 64)")
    insp.add_argument("--no-code", action="store_true", help="do not print the generated code")
    insp.set_defaults(func=_cmd_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``naflow`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (CLIError, NAFlowError) as exc:
        first = str(exc).splitlines()[0]
        print(f"naflow: error: {first}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

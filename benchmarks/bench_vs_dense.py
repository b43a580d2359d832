"""naflow_fx against the dense approach of the authors' code, on AlexNet at growing input sizes.

The dense approach builds each layer's Jacobian as the authors' code does, one autograd call per
output row (``torch.autograd.grad`` of one output element), then solves the least-squares system
(``torch.linalg.lstsq``, minimum norm). It runs inside the same NAFlow pipeline (the same
abandoning, coefficients and closed-form inverses for ReLU, pooling and the like), only its
``solve`` differs, so both produce maps of the same problem: the default damped least squares
(λ = 1e-2·σ_max, computed the same way for both), which the dense side solves as one
``lstsq`` of ``[J; λI] x = [b; 0]``. (Without damping the comparison is meaningless: the exact
pseudo-inverse of an abandoned, inconsistent system amplifies the smallest singular values.)

Sizes grow until the dense approach runs out of time (``--budget`` seconds for one flow) or of
memory (its largest Jacobian would need more than ``--max-gib``); the table reports both times,
their ratio and the smallest per-layer Pearson r between the two flows' maps.

    python benchmarks/bench_vs_dense.py                      # sizes 64, 72, 80, 88, 96, 128, 160, 224
    python benchmarks/bench_vs_dense.py --sizes 64,80 --budget 120
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch
import torchvision

import naflow_fx.api as api
from naflow_fx import compile_naflow
from naflow_fx._io import atomic_write_text
from naflow_fx.solvers import SolverContext
from naflow_fx.solvers.context import relative_residual

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_vs_gradcam import _pearson


class RowwiseDenseContext(SolverContext):
    """A solver context whose every least-squares solve is the authors' dense one."""

    jacobian_rows = 0

    def solve(self, op, rhs, *, damped: bool = True, key=None):
        batch = rhs.shape[0]
        q, p = op.size
        if key is None and self._current is not None:
            key = self._current.layer
        lam = torch.zeros(batch, dtype=torch.float64)
        if damped and self.config.damping > 0:  # the same λ as naflow_fx's solve (NOTE [damping])
            lam = self.config.damping * self.sigma_max(op, rhs, key).double().cpu()
        v = torch.zeros((batch, *op.in_shape), dtype=rhs.dtype, device=rhs.device, requires_grad=True)
        with torch.enable_grad():
            y = op.matvec(v).reshape(batch, -1)
            jac = torch.empty(batch, q, p, dtype=torch.float64)
            for i in range(q):  # one autograd call per output row (every sample's row i at once)
                (row,) = torch.autograd.grad(y[:, i].sum(), v, retain_graph=i < q - 1)
                jac[:, i] = row.reshape(batch, p).cpu()
        RowwiseDenseContext.jacobian_rows += q
        # min ||J x − b||² + λ²||x||² as one least-squares system [J; λI] x = [b; 0]
        eye = torch.eye(p, dtype=torch.float64).expand(batch, p, p) * lam.view(-1, 1, 1)
        system = torch.cat([jac, eye], 1)
        rhs64 = torch.cat([rhs.reshape(batch, q, 1).double().cpu(), torch.zeros(batch, p, 1, dtype=torch.float64)], 1)
        x = torch.linalg.lstsq(system, rhs64, driver="gelsd").solution
        rec = self._record()
        rec.method, rec.iterations, rec.damping = "dense rows", q, float(lam.max())
        x = x.reshape(batch, *op.in_shape).to(rhs.dtype).to(rhs.device)
        rec.residual = relative_residual(op.matvec(x), rhs)
        return x


def largest_jacobian_gib(nf) -> float:
    """GiB of the largest dense system ``[J; λI]`` (float64, (q + p) × p), over the conv/linear stages."""
    from naflow_fx.passes.shape_prop import tensor_meta

    nodes = {n.name: n for n in nf.graph_module.graph.nodes}
    worst = 0
    for stage in nf.plan.stages:
        q = tensor_meta(nodes[stage.output]).shape[1:].numel()
        p = tensor_meta(nodes[stage.input]).shape[1:].numel()
        if nodes[stage.output].meta["naflow.inverse"].rule_name in ("conv2d_inverse", "linear_inverse"):
            worst = max(worst, (q + p) * p)
    return worst * 8 / 2**30


def pearson_min(a, b) -> float:
    """The smallest per-layer, per-sample Pearson r between two flows' maps."""
    return min(_pearson(a.maps[name], b.maps[name]) for name in a.layers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="64,72,80,88,96,128,160,224", help="input sides, in order (≥ 63)")
    parser.add_argument("--budget", type=float, default=600.0, help="seconds allowed for one dense flow (600)")
    parser.add_argument("--max-gib", type=float, default=12.0, help="memory allowed for one dense system (GiB, 12)")
    parser.add_argument("--out", default="benchmarks/results/vs_dense", help="output stem for .md and .json")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = torchvision.models.alexnet(weights=None).eval()
    rows = []
    dense_ok = True
    for size in (int(s) for s in args.sizes.split(",")):
        x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
        nf = compile_naflow(model, x)  # default damping; the dense solves use the same λ
        start = time.perf_counter()
        ours = nf(x)
        ours_s = time.perf_counter() - start
        row = {"size": size, "naflow_s": ours_s, "layers": len(ours.layers), "jacobian_gib": largest_jacobian_gib(nf)}
        if dense_ok and row["jacobian_gib"] > args.max_gib:
            row["dense"] = f"out of memory: a {row['jacobian_gib']:.0f} GiB system"
            dense_ok = False
        elif dense_ok:
            api.SolverContext = RowwiseDenseContext  # the pipeline's solves become the authors' dense ones
            RowwiseDenseContext.jacobian_rows = 0
            try:
                start = time.perf_counter()
                dense = nf(x)
                row["dense_s"] = time.perf_counter() - start
            finally:
                api.SolverContext = SolverContext
            row["jacobian_rows"] = RowwiseDenseContext.jacobian_rows
            row["ratio"] = row["dense_s"] / ours_s
            row["pearson_min"] = pearson_min(ours, dense)
            if row["dense_s"] > args.budget:
                dense_ok = False  # the next size would take longer still
        else:
            row["dense"] = "not run (the previous size exceeded the time or memory budget)"
        rows.append(row)
        print(json.dumps(row))
    head = "| input | layers | naflow_fx s | dense s | dense / naflow_fx | min Pearson r | largest dense system |"
    lines = [head, "|" + "---|" * 7]
    for r in rows:
        if "dense_s" in r:
            cells = f"{r['dense_s']:.1f} | {r['ratio']:.0f}× | {r['pearson_min']:.4f}"
        else:
            cells = f"{r['dense']} | – | –"
        lines.append(
            f"| {r['size']}×{r['size']} | {r['layers']} | {r['naflow_s']:.2f} | {cells} | {r['jacobian_gib']:.2f} GiB |"
        )
    machine = f"AlexNet (random weights), batch 1, CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"
    text = machine + "\n\n" + "\n".join(lines)
    print(text)
    atomic_write_text(args.out + ".md", text + "\n")
    meta = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "date": time.strftime("%Y-%m-%d")}
    atomic_write_text(args.out + ".json", json.dumps({"machine": meta, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

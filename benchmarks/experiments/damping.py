"""Experiment: how much do the maps change with ``damping``, on the trained shapes ResNet?

The spec (§4) asks for the default damping to be chosen by measurement on a trained model: how
stable are the maps as damping varies? Every solved inverse is the Tikhonov pseudo-inverse
``(JᵀJ + λ²I)⁻¹Jᵀ`` with ``λ = damping · σ_max(J)``. A small damping is closer to the exact
pseudo-inverse but amplifies the directions J barely sees; a large one is cheaper to solve
(CGLS needs on the order of 1/damping iterations) but pulls every BPFM towards zero along the
weak directions.

Part 1 (the decision): the embedded, trained shapes ResNet on held-out images (seed 1), each
explained for its predicted class, in float64 and solved to ``tol=1e-9``, so that what differs
between the columns is the damping and not solver error. For each damping it prints:

- the Pearson r of every layer's map against the maps at the smallest damping (the closest to
  the exact pseudo-inverse) and against the default 1e-2: the smallest per-layer mean over the
  images, and the smallest single (layer, image) value;
- the mean share of the maps' mass on the object's ground-truth mask (``energy_on_mask``), over
  all layers and over the layers before ``layer3``;
- the cost at the default float32 settings (``tol=1e-4``): CGLS iterations and seconds.

Part 2 (``--speed-model resnet50``): the cost of one random-weight torchvision model's flow at
224×224, batch 1, for each of ``--speed-dampings``, at the default float32 settings, against
pytorch-grad-cam's Grad-CAM over every conv in the same run (as in ``bench_vs_gradcam.py``).

    python benchmarks/experiments/damping.py --images 40
    python benchmarks/experiments/damping.py --images 0 --speed-model resnet50 --speed-dampings 1e-2,3e-2,1e-1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_vs_gradcam import _build, timed_flow, worker

from naflow_fx import compile_naflow
from naflow_fx.data.shapes import make_shapes, normalize
from naflow_fx.metrics import energy_on_mask
from naflow_fx.result import LayerMaps
from naflow_fx.zoo.shapes import shapes_resnet


def _pearson_per_image(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson r of two ``[B, h, w]`` maps, per image (1 where both are constant, 0 where one is)."""
    u = a.flatten(1).double()
    v = b.flatten(1).double()
    u, v = u - u.mean(1, keepdim=True), v - v.mean(1, keepdim=True)
    den = u.norm(dim=1) * v.norm(dim=1)
    r = (u * v).sum(1) / den.clamp_min(1e-300)
    both_flat = (u.norm(dim=1) == 0) & (v.norm(dim=1) == 0)
    return torch.where(both_flat, torch.ones_like(r), torch.where(den == 0, torch.zeros_like(r), r))


def _flows(model, x, damping, batch, **kw):
    """Maps (per layer, concatenated over the batches), CGLS iterations and seconds of one damping."""
    nf = compile_naflow(model, x[:1], damping=damping, **kw)
    maps: dict[str, list[torch.Tensor]] = {n: [] for n in nf.layers}
    its, seconds, unconverged = 0, 0.0, 0
    for i in range(0, len(x), batch):
        start = time.perf_counter()
        flow = nf(x[i : i + batch], keep="maps")
        seconds += time.perf_counter() - start
        its += sum(r.iterations for r in flow.diagnostics.values())
        unconverged += sum(not r.converged for r in flow.diagnostics.values())
        for n in nf.layers:
            maps[n].append(flow.maps[n])
    return nf.layers, {n: torch.cat(m) for n, m in maps.items()}, its, seconds, unconverged


def _layer_maps(layers: list[str], maps: dict[str, torch.Tensor], size: tuple[int, int]) -> LayerMaps:
    """A result ``energy_on_mask`` accepts, around maps gathered from several flows (batches)."""
    b = next(iter(maps.values())).shape[0]
    return LayerMaps(layers, maps, torch.zeros(b, 1), torch.zeros(b), None, size, "naflow")


def _r_summary(maps, ref, layers) -> dict:
    rs = {n: _pearson_per_image(maps[n], ref[n]) for n in layers}
    worst = min(rs, key=lambda n: float(rs[n].mean()))
    return {
        "min_layer_mean_r": float(rs[worst].mean()),
        "at": worst,
        "min_r": min(float(r.min()) for r in rs.values()),
        "per_layer_mean_r": {n: float(r.mean()) for n, r in rs.items()},
    }


def _cell(c: dict | None) -> str:
    return "–" if c is None else f"{c['min_layer_mean_r']:.3f} (`{c['at']}`) · {c['min_r']:.2f}"


def _diff(d: list[float] | None) -> str:
    return "–" if d is None else f"{d[0]:+.3f} ± {d[1]:.3f}"


def shapes_part(n_images: int, dampings: list[float], batch: int, figure: str | None) -> list[dict]:
    data = make_shapes(n_images, seed=1)
    x = normalize(data.images)
    exact = {}
    for d in dampings:
        layers, maps, its, secs, bad = _flows(shapes_resnet().double(), x.double(), d, batch, tol=1e-9, max_iter=5000)
        exact[d] = maps
        note = f", {bad} steps not converged" if bad else ""
        print(f"  damping {d:g}: float64 reference ({its} CGLS iterations, {secs:.1f} s{note})", flush=True)
    rows, per_image = [], {}
    for d in dampings:
        maps = exact[d]
        row: dict = {"damping": d}
        row["vs_smallest"] = _r_summary(maps, exact[dampings[0]], layers)
        row["vs_default"] = _r_summary(maps, exact[1e-2], layers) if 1e-2 in exact else None
        shares = energy_on_mask(
            _layer_maps(layers, {n: m.float() for n, m in maps.items()}, tuple(x.shape[-2:])), data.masks
        )
        early = [n for n in layers if not n.startswith(("layer3", "layer4"))]
        per_image[d] = torch.stack([shares[n] for n in layers]).mean(0)  # [images], mean over layers
        row["mask_share_all"] = float(per_image[d].mean())
        row["mask_share_early"] = float(torch.stack([shares[n].mean() for n in early]).mean())
        _, maps32, its, secs, bad = _flows(shapes_resnet(), x, d, batch)
        row["float32"] = {"iterations": its, "seconds": secs, "unconverged_steps": bad}
        row["float32_vs_float64"] = _r_summary(maps32, maps, layers)
        rows.append(row)
    if 1e-2 in per_image:
        for row in rows:  # paired over the images: the share's difference to damping 1e-2, ± 1.96 standard errors
            diff = (per_image[row["damping"]] - per_image[1e-2]).double()
            half = 1.96 * float(diff.std()) / len(diff) ** 0.5 if len(diff) > 1 else float("nan")
            row["mask_share_minus_default"] = [float(diff.mean()), half]
    area = float(data.masks.float().flatten(1).mean(1).mean())
    print(f"\nshapes ResNet (trained), {n_images} held-out images (seed 1), 96×96, batch {batch}, {len(layers)} layers")
    print(f"reference maps: float64, tol=1e-9; mask area (a uniform map's share) {area:.2f}")
    print("r cells: the smallest per-layer mean Pearson r over the images (at that layer) · the smallest single r\n")
    print(
        f"| damping | r vs {dampings[0]:g} | r vs 1e-2 | default float32 solve vs float64 (r) "
        "| mask share: all layers · before `layer3` | share − share at 1e-2 (95 % CI) "
        "| float32 CGLS iterations | float32 s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        f32 = r["float32"]
        print(
            f"| {r['damping']:g} | {_cell(r['vs_smallest'])} | {_cell(r['vs_default'])} | "
            f"{_cell(r['float32_vs_float64'])} | {r['mask_share_all']:.3f} · {r['mask_share_early']:.3f} | "
            f"{_diff(r.get('mask_share_minus_default'))} | "
            f"{f32['iterations']} | {f32['seconds']:.1f} |"
        )
    if 1e-2 in exact:
        print("\nper layer: mean Pearson r against damping 1e-2\n")
        print("| layer | " + " | ".join(f"{d:g}" for d in dampings) + " |")
        print("|---|" + "---:|" * len(dampings))
        for n in layers:
            cells = [f"{r['vs_default']['per_layer_mean_r'][n]:.3f}" for r in rows]
            print(f"| `{n}` | " + " | ".join(cells) + " |")
    if figure:
        _figure(figure, x, data, exact, dampings, layers)
    return rows


def _figure(path: str, x, data, exact, dampings, layers, image: int = 0) -> None:
    """One image's maps at a few layers (columns) for each damping (rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from naflow_fx._io import atomic_write

    cols = [n for n in layers if n.split(".")[-1] == "relu" or n == "maxpool"]
    rgb = data.images[image].permute(1, 2, 0).numpy()
    fig, axes = plt.subplots(
        len(dampings), len(cols) + 1, figsize=(1.6 * (len(cols) + 1), 1.7 * len(dampings)), squeeze=False
    )
    for i, d in enumerate(dampings):
        axes[i, 0].imshow(rgb)
        axes[i, 0].set_ylabel(f"damping {d:g}", fontsize=8)
        for j, n in enumerate(cols, start=1):
            m = exact[d][n][image].float()
            axes[i, j].imshow(m / m.max().clamp_min(1e-12), cmap="jet", vmin=0, vmax=1)
            if i == 0:
                axes[i, j].set_title(n, fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110))
    plt.close(fig)
    print(f"\nfigure: {path}")


def speed_part(name: str, size: int, dampings: list[float]) -> list[dict]:
    model, x, _ = _build(name, 1, size, "cpu")
    pgc = worker({"model": name, "batch": 1, "size": size, "device": "cpu", "method": "pgc", "repeats": 5})
    print(f"  pytorch-grad-cam over the {pgc['conv_layers']} convs: {pgc['seconds']:.3f} s", flush=True)
    rows = []
    for d in dampings:
        flow, secs = timed_flow(model, x, damping=d)
        its = sum(r.iterations for r in flow.diagnostics.values())
        rows.append({"damping": d, "seconds": secs, "iterations": its, "pgc_seconds": pgc["seconds"]})
        print(f"  {name} damping {d:g}: {its} CGLS iterations, {secs:.1f} s", flush=True)
    print(f"\n{name} (random weights), {size}×{size}, batch 1, float32 defaults, {torch.get_num_threads()} threads\n")
    print(f"pytorch-grad-cam over every conv: {pgc['seconds']:.3f} s (median of 5 calls, same run)\n")
    print("| damping | CGLS iterations | flow s | NAFlow / pytorch-grad-cam |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['damping']:g} | {r['iterations']} | {r['seconds']:.1f} | {r['seconds'] / pgc['seconds']:.0f}× |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=40, help="held-out shapes images (0: skip part 1)")
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--dampings", default="1e-3,3e-3,1e-2,3e-2,1e-1,3e-1")
    parser.add_argument("--speed-model", default=None, help="e.g. resnet50 (part 2; random weights)")
    parser.add_argument("--speed-size", type=int, default=224)
    parser.add_argument("--speed-dampings", default="1e-2,3e-2,1e-1")
    parser.add_argument("--figure", default=None, help="write a PNG of one image's maps per damping here")
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    out: dict = {"threads": torch.get_num_threads(), "torch": torch.__version__}
    if args.images:
        dampings = sorted(float(d) for d in args.dampings.split(","))
        out["shapes"] = shapes_part(args.images, dampings, args.batch, args.figure)
    if args.speed_model:
        dampings = sorted(float(d) for d in args.speed_dampings.split(","))
        out["speed"] = speed_part(args.speed_model, args.speed_size, dampings)
    if args.out:
        from naflow_fx._io import atomic_write_text

        atomic_write_text(args.out, json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

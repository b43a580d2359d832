"""Zoo report: compile every torchvision classification model and run one flow.

For each model of ``torchvision.models.list_models(module=torchvision.models)`` (random weights,
eval mode, a small input it accepts) it compiles the model, runs one NAFlow over every layer and
writes a Markdown table: model, compiled, layers with maps, largest per-layer relative residual,
compile and flow seconds, and the error message when it fails.

    python benchmarks/zoo.py --out docs/zoo.md            # the whole zoo (long)
    python benchmarks/zoo.py --models resnet18 vgg11_bn   # a few
    python benchmarks/zoo.py --timm --out docs/zoo_timm.md   # one model per timm CNN family (pip install timm)
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
import warnings

import torch
import torchvision

from naflow_fx import NAFlowError, compile_naflow
from naflow_fx._io import atomic_write_text

# Inputs per family: the smallest size the model accepts with spatial maps left at its last stage.
SIZES = {"inception_v3": 96, "googlenet": 64}
DEFAULT_SIZE = 64
# One model per CNN family of timm (not a dependency: ``pip install timm``), the smallest variant.
TIMM_MODELS = (
    "resnet18", "resnet50d", "seresnext26d_32x4d", "resnest14d", "res2net50_26w_4s", "resnetv2_50x1_bit",
    "nf_resnet26", "nfnet_l0", "regnety_002", "efficientnet_b0", "tf_efficientnet_b0", "mobilenetv3_large_100",
    "mixnet_s", "ghostnet_100", "rexnet_100", "convnext_atto", "densenet121", "dla34", "dpn68", "cspresnet50",
    "selecsls42b", "hrnet_w18_small", "xception41", "inception_v3", "vgg11",
)  # fmt: skip


def torchvision_model(name: str) -> torch.nn.Module:
    return torchvision.models.get_model(name, weights=None)


def timm_model(name: str) -> torch.nn.Module:
    import timm

    return timm.create_model(name, pretrained=False)


def _package_paths(text: str) -> str:
    """File paths in a message from where the package begins (``timm/layers/padding.py``), not this machine's."""
    return re.sub(r"/\S+/((?:timm|torchvision|torch)/)", r"\1", text)


def run_one(name: str, size: int, max_iter: int, build=torchvision_model) -> dict:
    torch.manual_seed(0)
    row = dict(model=name, size=size, compiled="no", layers=0, residual="", compile_s="", flow_s="", error="")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = build(name).eval()
        start = time.perf_counter()
        nf = compile_naflow(model, (1, 3, size, size), max_iter=max_iter)
        row["compile_s"] = f"{time.perf_counter() - start:.1f}"
        row["compiled"] = "yes"
        start = time.perf_counter()
        flow = nf(torch.rand(1, 3, size, size))
        row["flow_s"] = f"{time.perf_counter() - start:.1f}"
        finite = all(bool(torch.isfinite(m).all()) for m in flow.maps.values())
        row["layers"] = len(flow.layers) if finite else f"{len(flow.layers)} (non-finite maps)"
        row["residual"] = f"{max((r.residual for r in flow.diagnostics.values()), default=0.0):.2e}"
    except NAFlowError as exc:
        row["error"] = f"{type(exc).__name__}: {_package_paths(str(exc).splitlines()[0])[:400]}"
    except Exception as exc:  # the report records every failure
        row["error"] = f"unexpected {type(exc).__name__}: {str(exc).splitlines()[0][:400]}"
    return row


OUT_OF_SCOPE = (
    "Transformer models (ViT, Swin, MaxViT) are out of scope and fail at compile time, before any "
    "shape propagation, with one `UnsupportedModelError` naming the attention node. What it would take: "
    "an inverse for dot-product attention (a softmax over products of two activations), which the "
    "NAFlow paper does not define; the generic linearised rule could solve an attention block as a "
    "region, but its maps would no longer be NAFlow's."
)


def summary(rows: list[dict]) -> str:
    done = [r for r in rows if r["compiled"] == "yes" and isinstance(r["layers"], int)]
    failed = [r for r in rows if r not in done]
    attention = [r for r in failed if "self-attention" in r["error"]]
    other = [r["model"] for r in failed if r not in attention]
    lines = [
        "",
        f"**{len(done)} of {len(rows)} models** compile and give finite maps for every layer; "
        f"{len(attention)} are self-attention models rejected by design"
        + (f"; other failures: {', '.join(other)}." if other else "; no other failures."),
        "",
        OUT_OF_SCOPE,
    ]
    return "\n".join(lines) + "\n"


def to_markdown(rows: list[dict], header: str) -> str:
    cols = ["model", "size", "compiled", "layers", "residual", "compile_s", "flow_s", "error"]
    titles = ["model", "input", "compiled", "layers with maps", "max residual", "compile s", "flow s", "error"]
    out = [header, "", "| " + " | ".join(titles) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(str(r[c]).replace("|", "\\|") for c in cols) + " |")
    return "\n".join(out) + "\n" + summary(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", help="model names (default: every classification model)")
    parser.add_argument("--max-iter", type=int, default=100, help="CGLS iteration cap per solve (default 100)")
    parser.add_argument("--out", help="write the Markdown table here (atomically)")
    parser.add_argument("--timm", action="store_true", help="timm models (default: one per CNN family)")
    args = parser.parse_args(argv)
    build = torchvision_model
    if args.timm:
        try:
            import timm
        except ImportError:
            parser.error("--timm needs timm: pip install timm")
        build = timm_model
        names = args.models or list(TIMM_MODELS)
        source = f"timm {timm.__version__} (`python benchmarks/zoo.py --timm --out docs/zoo_timm.md`)"
    else:
        names = args.models or torchvision.models.list_models(module=torchvision.models)
        command = "python benchmarks/zoo.py" + ("" if args.models is None else " --models " + " ".join(names))
        command += f" --out {args.out}" if args.out else ""
        source = f"torchvision {torchvision.__version__} (`{command}`)"
    header = (
        f"# Zoo report\n\nModels of {source}, on {os.cpu_count()} CPU "
        f"cores ({torch.get_num_threads()} torch thread(s)), torch {torch.__version__}: random weights, eval mode, "
        f"batch 1, a {DEFAULT_SIZE}×{DEFAULT_SIZE} input unless the model needs more, CGLS "
        f"max_iter={args.max_iter}, every layer explained (`layers=\"all\"`). 'max residual' is the largest "
        "per-layer relative residual `||J B_u − (B_w − θ)|| / ||B_w − θ||`; it is not 0 because after "
        "abandoning `B_w` is generally not in the range of `J` (docs/naflow.md, decision 8)."
    )
    rows = []
    for name in names:
        row = run_one(name, SIZES.get(name, DEFAULT_SIZE), args.max_iter, build)
        rows.append(row)
        print(" | ".join(str(v) for v in row.values()), flush=True)
        if args.out:  # rewritten after every model, so a long run can be watched and never half-written
            atomic_write_text(args.out, to_markdown(rows, header))
    if not args.out:
        sys.stdout.write(to_markdown(rows, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())

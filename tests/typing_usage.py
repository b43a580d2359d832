"""Documented usage, for a type checker: test_typing.py runs mypy on this file, and runs it.

The package ships ``py.typed``, so its annotations are a promise to its users' type checkers: each
call below is one that README.md, docs/ or a docstring shows or allows, and each ``assert_type``
pins a return type. A call flagged here is a valid call the annotations reject.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor, nn
from typing_extensions import assert_type

from naflow_fx import ClassTarget, FlowResult, LayerMaps, SimilarityTarget, SolveRecord, compile_naflow
from naflow_fx.cli import load_images
from naflow_fx.export import save_maps, summary
from naflow_fx.fewshot import explain_episode
from naflow_fx.knn import explain_knn
from naflow_fx.metrics import mask_energy
from naflow_fx.models import npid_resnet
from naflow_fx.result import concat
from naflow_fx.retrieval import explain_match
from naflow_fx.viz import atomic_savefig, flow_grid
from naflow_fx.zoo.shapes import shapes_embedding, shapes_resnet


def classifier_usage(x: Tensor, images: Tensor, masks: Tensor, out: Path) -> None:
    model = shapes_resnet()
    nf = compile_naflow(model, x[:1], layers=[model.layer4[-1]])  # pytorch-grad-cam's target_layers
    compile_naflow(model, x[:1], last_layer=model.layer3, layers=model.layer2)  # one block module
    compile_naflow(model, x[:1], layers={"layer1", "layer2"})  # any iterable of names
    assert_type(nf.last_layer, str)
    labels = np.arange(len(x))  # the bundled samples' classes, as a numpy array
    flow = nf(x, ClassTarget(list(labels)))  # numpy integers count as ints
    assert_type(flow, FlowResult)
    nf(x[:1], ClassTarget(labels[0]))
    nf(x[:1], ClassTarget(np.int64(0)))
    nf(x, ClassTarget([np.int64(i) for i in range(len(x))]))
    nf(x, ClassTarget(list(torch.arange(len(x)))))  # ClassTarget's docstring: list(labels) works

    class Bar:  # tqdm's update() returns a value
        def update(self, n: int = 1) -> bool | None:
            return None

    bar = Bar()
    nf(x, progress=lambda record: bar.update())

    def on_step(record: SolveRecord) -> None:
        print(record.layer, record.iterations)

    nf(x, progress=on_step)
    joined = concat([nf(x[:1]), nf(x[1:])])  # docs/naflow.md, decision 27
    assert_type(joined, FlowResult)
    print(joined.bpfm, joined.diagnostics)
    assert_type(concat([nf.gradcam(x[:1]), nf.gradcam(x[1:])]), LayerMaps)
    figure = flow_grid(images, [flow, nf.gradcam(x)], out / "grid.png", dpi=96.5)
    assert_type(figure, Figure)
    atomic_savefig(figure, out / "grid.pdf")
    print(mask_energy(flow, masks))  # one result, or a list
    files = [out / f"{i}.png" for i in range(len(x))]
    load_images(files, 224)
    save_maps(flow, out / "maps.npz", images=files, extra={"seed": 0})
    summary(flow, extra={"seed": 0})


def similarity_usage(support: Tensor, query: Tensor, out: Path) -> None:
    model = npid_resnet(18).eval()  # README "Embedding models"
    nf = compile_naflow(model, torch.randn(1, 3, 64, 64), last_layer=model.layer4, layers=[model.layer3[-1]])
    nf(query[:1], SimilarityTarget(model(support).detach()[0]))
    encoder: nn.Module = shapes_embedding()
    labels = np.array([0, 0, 1, 1])
    episode = explain_episode(encoder, support, list(labels), query, classes=labels[2])  # numpy integers
    compiled = episode.naflow  # compiled once, reused below (as the docstrings advise)
    explain_episode(compiled, support, labels, query[:1], classes=1, explain_support=False)
    explain_episode(compiled, support, labels, query[:1], classes=torch.tensor([0, 1]), explain_support=False)
    assert_type(episode.plot(np.int64(0), out / "episode.png"), Figure)
    episode.query_flow(labels[2])
    episode.support_flow(np.int64(0))
    match = explain_match(compiled, query[:1], support, k=np.int64(2))
    match.pair(np.int64(0), np.int64(1))
    assert_type(match.plot(0), Figure)
    assert_type(match.k, int)
    explain_knn(compiled, query[:1], torch.randn(6, 128), list(np.arange(6) % 2), k=np.int64(3))

"""The package ships py.typed: documented usage (tests/typing_usage.py) type-checks with mypy, and runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import typing_usage
from PIL import Image

from naflow_fx.data.shapes import normalize, samples
from naflow_fx.models import npid_resnet
from naflow_fx.zoo.shapes import shapes_resnet

ROOT = Path(__file__).resolve().parents[1]


def test_documented_usage_type_checks(tmp_path, monkeypatch):
    mypy = pytest.importorskip("mypy.api")
    monkeypatch.setenv("MYPYPATH", str(ROOT))  # this checkout's naflow_fx, whichever one is installed
    stdout, stderr, status = mypy.run(
        [
            str(ROOT / "tests" / "typing_usage.py"),
            "--config-file=",  # no user or machine mypy configuration: this test's flags only
            "--follow-imports=silent",  # errors in this file only: the library's own are not the question
            "--cache-dir",
            str(tmp_path / "mypy-cache"),
            "--no-error-summary",
            "--show-error-codes",
        ]
    )
    assert status == 0 and not stdout.strip(), stdout + stderr


def test_documented_usage_runs(tmp_path):
    """What the type checker accepts above is also what the library accepts (and returns) at run time."""
    batch = samples()
    x = normalize(batch.images)[:4]
    for i, image in enumerate(batch.float_images()[:4]):  # the image files load_images reads
        Image.fromarray((image.permute(1, 2, 0) * 255).byte().numpy()).save(tmp_path / f"{i}.png")
    with torch.random.fork_rng(devices=[]):  # random weights and banks, the same whatever ran before
        torch.manual_seed(0)
        typing_usage.classifier_usage(x, batch.float_images()[:4], batch.masks[:4], tmp_path)
        typing_usage.similarity_usage(x, normalize(batch.images)[5:7], tmp_path)
    assert {"grid.png", "grid.pdf", "maps.npz", "episode.png"} <= {p.name for p in tmp_path.iterdir()}


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_the_declarations_for_type_checkers_leave_the_models_scriptable():
    """ShapesResNet's and EmbeddingResNet's layer declarations are for type checkers only: TorchScript reads
    a module's class annotations and could not resolve them (``Unknown type annotation: 'nn.Sequential'``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        models, x = [shapes_resnet(), npid_resnet(18).eval()], torch.randn(1, 3, 64, 64)
    for model in models:
        torch.testing.assert_close(torch.jit.script(model)(x), model(x))

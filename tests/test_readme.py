"""The README's Python examples run as written, each on its own."""

from __future__ import annotations

import re
from pathlib import Path

from PIL import Image

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = blocks[0]
    assert len([line for line in example.splitlines() if line.strip()]) <= 10
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(example, "README.md", "exec"), scope)
    flow = scope["flow"]
    assert flow.maps["layer2.0.relu#2"].shape == (10, 12, 12)
    assert (flow.classes == scope["batch"].labels).all()  # the bundled samples are classified correctly
    assert Image.open(tmp_path / "grid.png").size[1] > 1000


def test_every_other_readme_python_block_runs_on_its_own(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)[1:]
    assert blocks, "the README has only its quick-start example"
    monkeypatch.chdir(tmp_path)
    for i, block in enumerate(blocks, start=2):
        exec(compile(block, f"README.md python block {i}", "exec"), {})  # its own imports, nothing shared

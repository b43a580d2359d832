"""The scripts in examples/ run as the README says (``python examples/<name>.py``), offline, at small sizes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    # this checkout's naflow_fx, as in the tests' own process (the script's folder comes first on its path)
    pythonpath = os.pathsep.join([str(EXAMPLES.parent), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = os.environ | {"OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "PYTHONPATH": pythonpath}
    command = [sys.executable, str(EXAMPLES / f"{name}.py"), *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize(
    ("name", "args", "figures"),
    [
        ("fewshot", ["--ways", "2", "--shots", "1", "--plot", "1"], ["fewshot_query0.png"]),
        (
            "fewshot",
            ["--arch", "conv4", "--ways", "2", "--shots", "1", "--plot", "2"],
            ["fewshot_query0.png", "fewshot_query1.png"],
        ),
        ("retrieval", ["--classes", "2", "--per-class", "2", "--queries", "1", "--k", "2"], ["retrieval_query0.png"]),
    ],
    ids=["fewshot-shapes", "fewshot-conv4", "retrieval-shapes"],
)
def test_example_writes_its_figures_to_examples_out(tmp_path, name, args, figures):
    done = run_example(name, *args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "examples-out"  # the README's folder, under the current directory
    assert sorted(p.name for p in out.iterdir()) == figures
    for figure in figures:
        assert f"wrote {os.path.join('examples-out', figure)}" in done.stdout
        width, height = Image.open(out / figure).size
        assert width > 500 and height > 200  # a grid of query/support (or match) rows, one column per block


def test_example_refuses_bad_arguments_before_any_work(tmp_path):
    done = run_example("retrieval", "--k", "0", cwd=tmp_path)
    assert done.returncode == 2 and "--k" in done.stderr
    assert not (tmp_path / "examples-out").exists()

"""The ``naflow`` command line, through its entry function: outputs, and every error case (one line, exit 2)."""

from __future__ import annotations

import errno
import inspect
import json
import os
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from naflow_fx import compile_naflow
from naflow_fx.cli import CLIError, ModelSpec, _class_index, build_parser, load_images, main
from naflow_fx.data.shapes import CLASSES, sample_paths
from naflow_fx.export import load_maps
from naflow_fx.solvers import SolverConfig
from naflow_fx.zoo.shapes import shapes_resnet


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("naflow: error: ")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# ---------------------------------------------------------------------------------------- working runs


def test_explain_with_the_embedded_model_writes_every_output(capsys, tmp_path):
    star = sample_paths()[CLASSES.index("star")]
    code, out, err = run(capsys, "explain", star, "--model", "shapes", "--out", str(tmp_path), "--layers", "blocks")
    assert code == 0, err
    assert "predicted 'star'" in out and "explained 'star'" in out
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["flow.gif", "flow_grid.png", "gradcam.json", "gradcam.npz", "naflow.json", "naflow.npz"]
    maps, meta = load_maps(tmp_path / "naflow.npz")
    assert meta["model"] == "shapes" and meta["samples"][0]["image"] == star  # the path as given
    assert meta["samples"][0]["target_name"] == "star"
    assert list(maps)[-1] == "layer4.0.relu#2" and all(m.shape[0] == 1 for m in maps.values())
    assert Image.open(tmp_path / "flow_grid.png").size[0] > 300


@pytest.mark.parametrize(("fmt", "magic"), [("pdf", b"%PDF"), ("svg", b"<?xml")])
def test_figure_format_writes_a_vector_grid_for_papers(capsys, tmp_path, fmt, magic):
    star = sample_paths()[CLASSES.index("star")]
    args = ("explain", star, "--model", "shapes", "--out", str(tmp_path), "--layers", "blocks", "-q")
    code, _, err = run(capsys, *args, "--figure-format", fmt)
    assert code == 0, err
    grid = tmp_path / f"flow_grid.{fmt}"
    assert grid.read_bytes().startswith(magic) and not (tmp_path / "flow_grid.png").exists()
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([*args, "--figure-format", "bmp"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "--figure-format: invalid choice: 'bmp'" in err, err


def test_target_by_class_name(capsys, tmp_path):
    heart = sample_paths()[CLASSES.index("heart")]
    code, out, err = run(capsys, "explain", heart, "--model", "shapes", "--out", str(tmp_path), "--target", "Star")
    assert code == 0, err
    assert "explained 'star'" in out
    assert load_maps(tmp_path / "naflow.npz")[1]["samples"][0]["target_name"] == "star"
    code, _, err = run(capsys, "explain", heart, "--model", "shapes", "--target", "starr")
    assert_one_line_error(code, err, "--target 'starr' is not a class of shapes", "did you mean 'star'")
    code, _, err = run(capsys, "explain", heart, "--model", "resnet18", "--size", "32", "--target", "tiger cat")
    assert_one_line_error(code, err, "carries no class names", "--weights DEFAULT", "pass a class index")
    from torchvision.models import ResNet50_Weights

    imagenet = ModelSpec(nn.Identity(), "resnet50", class_names=ResNet50_Weights.DEFAULT.meta["categories"])
    assert _class_index(imagenet, "Tiger Cat") == 282 and _class_index(imagenet, 281) == 281
    with pytest.raises(CLIError, match="did you mean 'tabby'"):
        _class_index(imagenet, "tabby cats")


def test_solver_options_reach_the_flow_and_its_sidecar(capsys, tmp_path):
    star = sample_paths()[CLASSES.index("star")]
    base = ("explain", star, "--model", "shapes", "--layers", "blocks", "--compare", "none", "--quiet")
    code, _, err = run(capsys, *base, "--out", str(tmp_path / "default"))
    assert code == 0, err
    code, _, err = run(capsys, *base, "--out", str(tmp_path / "damped"), "--damping", "0.1", "--tol", "1e-3")
    assert code == 0, err
    maps_default, meta_default = load_maps(tmp_path / "default" / "naflow.npz")
    maps_damped, meta_damped = load_maps(tmp_path / "damped" / "naflow.npz")
    assert meta_default["options"] == {**asdict(SolverConfig())}
    assert meta_damped["options"] == {**asdict(SolverConfig()), "damping": 0.1, "tol": 1e-3}
    # λ = damping · σ_max of the same Jacobian: ten times larger, and the shallow maps change
    lam = {d["inverse_of"]: d["damping"] for d in meta_default["diagnostics"] if d["method"] == "cgls"}
    lam_damped = {d["inverse_of"]: d["damping"] for d in meta_damped["diagnostics"] if d["method"] == "cgls"}
    assert lam and lam.keys() == lam_damped.keys()
    for layer in lam:
        assert lam_damped[layer] == pytest.approx(10 * lam[layer], rel=0.05)
    assert not torch.allclose(torch.as_tensor(maps_default["maxpool"]), torch.as_tensor(maps_damped["maxpool"]))


def test_cli_solver_defaults_are_compile_naflows():
    signature = inspect.signature(compile_naflow).parameters
    args = build_parser().parse_args(["explain", "x.png", "--model", "shapes"])
    for field in ("solver", "damping", "tol", "max_iter"):
        assert getattr(args, field) == getattr(SolverConfig(), field) == signature[field].default, field


def test_explain_with_a_torchvision_architecture_without_weights(capsys, tmp_path):
    paths = sample_paths()[:2]
    code, out, err = run(
        capsys,
        *("explain", *paths, "--model", "resnet18", "--size", "32", "--layers", "layer3.0.relu#2,layer4.1.relu#2"),
        *("--compare", "gradcam,layercam", "--target", "3", "--out", str(tmp_path), "--quiet"),
    )
    assert code == 0, err
    assert out == ""  # --quiet
    _, meta = load_maps(tmp_path / "layercam.npz")
    assert [s["target"] for s in meta["samples"]] == [3, 3]
    _, meta = load_maps(tmp_path / "naflow.npz")
    assert meta["model"] == "resnet18" and meta["input_size"] == [32, 32]
    assert [layer["name"] for layer in meta["layers"]] == ["layer3.0.relu#2", "layer4.1.relu#2"]


def test_non_finite_maps_are_one_error_line_and_nothing_is_written(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(os.path.dirname(__file__))  # tests/models.py
    argv = ("explain", sample_paths()[0], "--model", "models:silu_chain", "--size", "16", "--out", "o", "-q")
    code, _, err = run(capsys, *argv, "--damping", "0")
    assert_one_line_error(code, err, "maps of 1 of 12 layers contain NaN or Inf, from '0' down", "--damping")
    assert not (tmp_path / "o").exists() or not os.listdir(tmp_path / "o")


def test_greyscale_models_and_input_statistics(capsys, tmp_path, monkeypatch):
    (tmp_path / "greynets.py").write_text(
        "import torch\n"
        "def build(channels=1):\n"
        "    torch.manual_seed(0)\n"
        "    nn = torch.nn\n"
        "    return nn.Sequential(nn.Conv2d(channels, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),\n"
        "                         nn.Linear(4, 3))\n"
        "def rgba():\n"
        "    return build(4)\n"
    )
    monkeypatch.chdir(tmp_path)
    img = sample_paths()[0]
    base = ("explain", img, "--model", "greynets:build", "--size", "32")
    code, out, err = run(capsys, *base, "--out", "a")
    assert code == 0, err
    assert "gets the images' luma, mean 0.449, std 0.226; pass --mean and --std" in out
    sidecar = json.loads((tmp_path / "a" / "naflow.json").read_text())
    assert sidecar["input"]["channels"] == 1 and sidecar["input"]["std"] == [pytest.approx(0.226)]
    code, out, err = run(capsys, *base, "--out", "b", "--mean", "0.1307", "--std", "0.3081")
    assert code == 0, err and "--mean" not in out
    assert json.loads((tmp_path / "b" / "naflow.json").read_text())["input"]["mean"] == [0.1307]
    # the statistics reach the model: other statistics, other maps
    maps = [np.load(tmp_path / d / "naflow.npz") for d in ("a", "b")]
    assert any(not np.allclose(maps[0][k], maps[1][k]) for k in maps[0].files)
    code, _, err = run(capsys, *base, "--mean", "0.1,0.2")
    assert_one_line_error(code, err, "--mean has 2 values but build takes 1 channel(s)")
    code, _, err = run(capsys, "explain", img, "--model", "shapes", "--std", "1,0,1")
    assert_one_line_error(code, err, "--std must be positive")
    code, _, err = run(capsys, "explain", img, "--model", "greynets:rgba", "--size", "32")
    assert_one_line_error(code, err, "rgba takes 4-channel input", "explain it from Python")
    code, out, err = run(capsys, "inspect", "--model", "greynets:build", "--size", "32", "--no-code")
    assert code == 0 and "build at 32x32" in out, err
    with pytest.raises(SystemExit):
        main(["explain", img, "--model", "shapes", "--mean", "nan"])
    assert "need finite numbers separated by commas" in capsys.readouterr().err


def test_inspect_columns_fit_long_layer_names(capsys):
    code, out, err = run(capsys, "inspect", "--model", "densenet121", "--size", "32", "--no-code")
    assert code == 0, err
    table = out.split("\n\n")[1].splitlines()  # the stage table: header and one row per stage
    assert max(len(line.split()[3]) for line in table[1:]) > 24  # names longer than the old fixed width
    assert len({line.index(line.split()[-1]) for line in table}) == 1  # every row's rule in one column


def test_explain_with_module_callable_and_saved_model(capsys, tmp_path, monkeypatch):
    (tmp_path / "mynets.py").write_text(
        "import torch\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),\n"
        "                               torch.nn.Flatten(), torch.nn.Linear(4, 3))\n"
    )
    monkeypatch.chdir(tmp_path)
    img = sample_paths()[0]
    code, out, err = run(capsys, "explain", img, "--model", "mynets:build", "--size", "32", "--out", "a", "-q")
    assert code == 0, err
    assert (tmp_path / "a" / "naflow.npz").exists()
    torch.save(shapes_resnet(), tmp_path / "whole.pt")
    code, out, err = run(capsys, "explain", img, "--model", "whole.pt", "--size", "96", "--out", "b", "-q")
    assert code == 0, err
    torch.save(shapes_resnet().state_dict(), tmp_path / "shapes_state.pt")
    code, out, err = run(capsys, "explain", img, "--model", "shapes", "--weights", "shapes_state.pt", "--out", "c")
    assert code == 0, err and "predicted 'circle'" in out


def test_inspect_prints_stages_rules_and_code(capsys):
    code, out, err = run(capsys, "inspect", "--model", "shapes")
    assert code == 0, err
    assert "stage" in out and "region_inverse" in out and "conv2d_inverse" in out
    assert "def forward" in out  # the generated inverse network
    code, out, err = run(capsys, "inspect", "--model", "shapes", "--no-code")
    assert code == 0 and "def forward" not in out


def test_every_command_has_help_with_examples(capsys):
    for command in ("demo", "explain", "inspect"):
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args([command, "--help"])
        assert exc.value.code == 0
        out = capsys.readouterr().out
        assert "examples:" in out and f"naflow {command}" in out


def test_console_script_entry_point_runs():
    proc = subprocess.run(
        [sys.executable, "-m", "naflow_fx.cli", "explain", "nope.png", "--model", "shapes"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "naflow: error: image not found: nope.png; check the path"


# ---------------------------------------------------------------------------------------- error cases


def test_missing_image(capsys, tmp_path):
    code, _, err = run(capsys, "explain", str(tmp_path / "nope.png"), "--model", "shapes")
    assert_one_line_error(code, err, "image not found", "nope.png")


def test_unreadable_image(capsys, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("this is not a PNG")
    code, _, err = run(capsys, "explain", str(bad), "--model", "shapes")
    assert_one_line_error(code, err, "cannot read image", "bad.png", "pass a PNG")


def test_unknown_model_name(capsys):
    code, _, err = run(capsys, "explain", sample_paths()[0], "--model", "resnet19")
    assert_one_line_error(code, err, "unknown model 'resnet19'", "resnet18")
    code, _, err = run(capsys, "inspect", "--model", "resnet19")
    assert_one_line_error(code, err, "unknown model")
    code, _, err = run(capsys, "inspect", "--model", "efficientnetb0")  # the closest names first
    assert_one_line_error(code, err, "unknown model 'efficientnetb0' (did you mean 'efficientnet_b0'")


def test_module_callable_that_does_not_import(capsys):
    code, _, err = run(capsys, "explain", sample_paths()[0], "--model", "no_such_package.models:build")
    assert_one_line_error(code, err, "cannot import 'no_such_package.models'", "install its package")
    code, _, err = run(capsys, "explain", sample_paths()[0], "--model", "naflow_fx.zoo.shapes:no_such_factory")
    assert_one_line_error(code, err, "has no attribute 'no_such_factory'")
    code, _, err = run(capsys, "explain", sample_paths()[0], "--model", "naflow_fx.data.shapes:CLASSES")
    assert_one_line_error(code, err, "not a torch.nn.Module")


def test_weights_that_do_not_match(capsys, tmp_path):
    other = tmp_path / "other.pt"
    torch.save({"conv1.weight": torch.zeros(8, 3, 3, 3), "head.weight": torch.zeros(2, 8)}, other)
    code, _, err = run(capsys, "explain", sample_paths()[0], "--model", "shapes", "--weights", str(other))
    assert_one_line_error(code, err, "do not match model shapes", "missing", "unexpected", "another shape")
    code, _, err = run(capsys, "explain", sample_paths()[0], "--model", "resnet18", "--weights", "IMAGENET2K_V9")
    assert_one_line_error(code, err, "IMAGENET2K_V9", "IMAGENET1K_V1")
    code, _, err = run(capsys, "explain", sample_paths()[0], "--model", "shapes", "--weights", str(tmp_path / "x.pt"))
    assert_one_line_error(code, err, "weights file not found", "pass an existing state-dict file")
    assert "torchvision" not in err  # shapes takes no torchvision weights
    code, _, err = run(capsys, "explain", sample_paths()[0], "--model", "resnet18", "--weights", str(tmp_path / "x.pt"))
    assert_one_line_error(code, err, "weights file not found", "or a torchvision weights name")
    state_as_model = tmp_path / "state.pt"
    torch.save(shapes_resnet().state_dict(), state_as_model)
    code, _, err = run(capsys, "explain", sample_paths()[0], "--model", str(state_as_model))
    assert_one_line_error(code, err, "holds a state dict", "--weights FILE")


def test_torchvision_weights_names_for_a_model_without_them(capsys, tmp_path, monkeypatch):
    img = sample_paths()[0]
    for weights in ("DEFAULT", "IMAGENET1K_V1", "ResNet18_Weights.DEFAULT"):
        code, _, err = run(capsys, "explain", img, "--model", "shapes", "--weights", weights)
        assert_one_line_error(code, err, f"--weights {weights}", "shapes model already ships trained weights")
        assert "state-dict file" in err and "not found" not in err
    monkeypatch.chdir(tmp_path)
    torch.save(shapes_resnet(), "whole.pt")
    for model in ("naflow_fx.zoo.shapes:shapes_resnet", "whole.pt"):
        code, _, err = run(capsys, "explain", img, "--model", model, "--weights", "DEFAULT")
        assert_one_line_error(code, err, "--weights DEFAULT", "torchvision weights", f"for --model {model}")
        assert "state-dict file" in err
    code, _, err = run(capsys, "inspect", "--model", "shapes", "--weights", "DEFAULT")
    assert_one_line_error(code, err, "already ships trained weights")
    torch.save(shapes_resnet().state_dict(), "DEFAULT")  # a file of that name is a file
    code, _, err = run(capsys, "inspect", "--model", "shapes", "--weights", "DEFAULT", "--no-code")
    assert code == 0, err


def test_out_of_range_target(capsys, tmp_path):
    code, _, err = run(
        capsys, "explain", sample_paths()[0], "--model", "shapes", "--target", "10", "--out", str(tmp_path)
    )
    assert_one_line_error(code, err, "--target 10 is out of range", "10 classes (0–9)")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_other_user_errors(capsys):
    img = sample_paths()[0]
    if not torch.cuda.is_available():
        code, _, err = run(capsys, "explain", img, "--model", "shapes", "--device", "cuda")
        assert_one_line_error(code, err, "CUDA is not available", "--device cpu")
    code, _, err = run(capsys, "explain", img, "--model", "shapes", "--size", "0")
    assert_one_line_error(code, err, "--size 0 is too small")
    code, _, err = run(capsys, "explain", img, "--model", "shapes", "--layers", "layer9.conv")
    assert_one_line_error(code, err, "layer9.conv")
    code, _, err = run(capsys, "explain", img, "--model", "shapes", "--layers", " , ")
    assert_one_line_error(code, err, "layers is empty", "'layer4.0.relu#2'")
    for flag, value in (("--damping", "-1"), ("--damping", "nan"), ("--tol", "0"), ("--max-iter", "0")):
        code, _, err = run(capsys, "explain", img, "--model", "shapes", flag, value)
        assert_one_line_error(code, err, flag, value if value != "-1" else "-1.0")
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["explain", img, "--model", "shapes", "--compare", "scorecam"])
    assert exc.value.code == 2
    capsys.readouterr()
    for argv, needle in (
        (["explain", img, "--model", "shapes", "--size", "abc"], "argument --size: invalid int value: 'abc'"),
        (["explain", img], "the following arguments are required: --model"),
        (["explain", img, "--model", "shapes", "--bogus"], "unrecognized arguments: --bogus"),
        (["nonsense"], "argument command: invalid choice: 'nonsense'"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.count("\n") == 1 and err.startswith("naflow: error: "), err
        assert needle in err and "--help')" in err, err


def test_demo_writes_grid_gif_npz_and_reports_mask_energy(capsys, tmp_path):
    code, out, err = run(capsys, "demo", "--images", "2", "--out", str(tmp_path))
    assert code == 0, err
    assert "held-out accuracy" in out and "share of each map's mass on the object" in out
    names = sorted(p.name for p in tmp_path.iterdir())
    assert {"flow_grid.png", "flow.gif", "naflow.npz", "naflow.json", "gradcam.npz", "gradcam.json"} <= set(names)
    meta = json.loads((tmp_path / "naflow.json").read_text())
    assert [s["image"] for s in meta["samples"]] == ["circle.png", "square.png"]


def test_unusable_out_folder_fails_before_the_flow(capsys, tmp_path):
    img = sample_paths()[0]
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    cases = [(a_file, "is a file, not a folder"), (a_file / "sub", f"{a_file} is a file")]
    if os.path.isdir("/proc"):  # Linux: nobody, root included, can create files there
        cases.append(("/proc/naflow-out", "cannot write in /proc"))
    for out, expected in cases:
        code, out_text, err = run(capsys, "explain", img, "--model", "shapes", "--out", str(out))
        assert_one_line_error(code, err, f"--out {out}", expected)
        assert "compiled" not in out_text  # refused before any work was done
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]
    code, _, err = run(capsys, "explain", img, "--model", "shapes", "--out", str(tmp_path / "new" / "deeper"), "-q")
    assert code == 0, err
    assert (tmp_path / "new" / "deeper" / "flow_grid.png").is_file()


def _failing_maps_files(monkeypatch, error: BaseException) -> None:
    """The CLI's sidecars fail to write with ``error``, after the grid and the GIF were written."""
    import naflow_fx.export

    real = naflow_fx.export.maps_files

    def maps_files(*args, **kwargs):
        npz, side, files = real(*args, **kwargs)

        def fail(tmp: str) -> None:
            with open(tmp, "w") as fh:
                fh.write("{")  # part of it
            raise error

        return npz, side, [(side, fail), *files[1:]]

    monkeypatch.setattr(naflow_fx.export, "maps_files", maps_files)


def test_a_failed_write_is_one_line_and_changes_no_result_file(capsys, tmp_path, monkeypatch):
    """A run's files are replaced all together or not at all: a new grid beside the maps of an earlier run
    (or a lone grid) would describe two runs."""
    argv = ("explain", sample_paths()[0], "--model", "shapes", "--out", str(tmp_path), "-q")
    assert run(capsys, *argv)[0] == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    _failing_maps_files(monkeypatch, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    code, _, err = run(capsys, *argv, "--damping", "3e-2")  # other maps than before
    assert_one_line_error(code, err, "writing the results failed", "No space left on device", "nothing was written")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temporary left, nothing replaced
    fresh = tmp_path / "fresh"
    code, _, err = run(capsys, *argv[:-3], "--out", str(fresh), "-q")
    assert code == 2 and not fresh.exists() or list(fresh.iterdir()) == []


def test_ctrl_c_is_one_line_exit_130_and_changes_no_result_file(capsys, tmp_path, monkeypatch):
    argv = ("explain", sample_paths()[0], "--model", "shapes", "--out", str(tmp_path), "-q")
    assert run(capsys, *argv)[0] == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    _failing_maps_files(monkeypatch, KeyboardInterrupt())
    code, _, err = run(capsys, *argv, "--damping", "3e-2")
    assert code == 130 and err.strip() == "naflow: interrupted; no result file was written or changed"
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_errors_that_list_things_keep_their_detail_lines(capsys):
    code, _, err = run(capsys, "inspect", "--model", "models:TwoUnsupportedOps", "--size", "16")
    lines = err.strip().splitlines()
    assert code == 2 and "Traceback" not in err
    assert lines[0] == "naflow: error: 2 node(s) between the input and the last layer have no inverse rule:"
    assert all(line.startswith("  ") for line in lines[1:])
    assert "torch.cumsum" in err and "torch.flip" in err and "What to do" in err
    code, out, err = run(
        capsys, "inspect", "--model", "models:TwoUnsupportedOps", "--size", "16", "--fallback", "linearize"
    )
    assert code == 0, err
    assert "linearize" in out


def test_example_input_the_model_rejects_names_the_layer_and_the_cause(capsys):
    code, _, err = run(capsys, "inspect", "--model", "alexnet", "--size", "16")
    assert_one_line_error(code, err, "at features.5 (MaxPool2d)", "Output size is too small", "large enough")


def test_cli_argument_checks(capsys):
    img = sample_paths()[0]
    for flag in ("1", "0", "x"):
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args(["explain", img, "--model", "shapes", "--max-columns", flag])
        assert exc.value.code == 2
    capsys.readouterr()  # argparse's usage messages
    args = build_parser().parse_args(["explain", img, "--model", "shapes", "--compare", "gradcam,gradcam,layercam"])
    assert args.compare == ["gradcam", "layercam"]  # each baseline once
    for device, needle in (("foo", "is not a device"), ("meta", "holds no data")):
        code, _, err = run(capsys, "explain", img, "--model", "shapes", "--device", device)
        assert_one_line_error(code, err, f"--device {device}" if device == "meta" else "--device 'foo'", needle)
    code, _, err = run(capsys, "explain", img, "--model", "shapes", "--size", "100000")
    assert_one_line_error(code, err, "--size 100000 is too large", "at most 2048")


def test_load_images_crops_before_resampling_and_reads_high_bit_depths(tmp_path, monkeypatch):
    from PIL import Image

    from naflow_fx.cli import CLIError, load_images

    thin = tmp_path / "thin.png"
    Image.new("L", (1, 20000), 200).save(thin)  # once scaled whole to 224 on its short side: 4.5 GB
    x = load_images([str(thin)], 224)
    assert x.shape == (1, 3, 224, 224) and torch.allclose(x, torch.full_like(x, 200 / 255))
    deep = tmp_path / "deep.png"
    Image.fromarray(torch.full((8, 8), 30000, dtype=torch.int32).numpy().astype("uint16")).save(deep)
    assert Image.open(deep).mode.startswith("I;16")
    torch.testing.assert_close(load_images([str(deep)], 16), torch.full((1, 3, 16, 16), 30000 / 65535))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(CLIError, match="more pixels than PIL's safety limit.*downscale it first"):
        load_images(sample_paths()[:1], 64)


def test_load_images_follows_the_exif_orientation(tmp_path):
    from naflow_fx.cli import load_images

    pixels = np.zeros((20, 40, 3), np.uint8)  # 40 wide, 20 high: red left half, blue right half
    pixels[:, :20, 0] = 255
    pixels[:, 20:, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: shown turned 90° clockwise, the red half on top
    for name, kwargs in (("photo.png", {}), ("photo.jpg", {"quality": 95})):
        path = tmp_path / name
        Image.fromarray(pixels).save(path, exif=exif, **kwargs)
        assert Image.open(path).size == (40, 20) and Image.open(path).getexif()[0x0112] == 6
        x = load_images([str(path)], 16, "stretch")[0]
        top, bottom = x[:, :8], x[:, 8:]
        assert top[0].mean() > 0.9 and top[2].mean() < 0.1, name  # red on top
        assert bottom[2].mean() > 0.9 and bottom[0].mean() < 0.1, name  # blue below
        assert torch.allclose(x[:, :, :8], x[:, :, 8:], atol=0.1), name  # the same left and right
    square = tmp_path / "square.png"
    Image.fromarray(pixels[:, 10:30]).save(square, exif=exif)  # 20 x 20: turned, not just stretched
    x = load_images([str(square)], 16)[0]
    assert x[0, :8].mean() > 0.9 and x[2, 8:].mean() > 0.9
    plain = tmp_path / "plain.png"
    Image.fromarray(pixels).save(plain)  # no tag: as stored
    x = load_images([str(plain)], 16, "stretch")[0]
    assert x[0, :, :8].mean() > 0.9 and x[2, :, 8:].mean() > 0.9


def test_load_images_shows_transparency_on_white_and_says_so(tmp_path):
    from naflow_fx.cli import load_images

    icon = np.zeros((16, 16, 4), np.uint8)  # a black square on a transparent background
    icon[4:12, 4:12, 3] = 255
    path = tmp_path / "icon.png"
    Image.fromarray(icon, "RGBA").save(path)
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0])
    palette.paste(1, (0, 0, 8, 16))  # left half red, right half palette entry 0, declared transparent
    palette.save(tmp_path / "palette.png", transparency=0)
    notes = []
    x = load_images([str(path), str(tmp_path / "palette.png")], 16, "stretch", notes=notes)
    assert float(x[0, :, 6:10, 6:10].max()) == 0 and float(x[0, :, :2].min()) == 1  # the square, on white
    assert float(x[1, 0, :, :6].min()) > 0.99 and float(x[1, 1:, :, :6].max()) < 0.01  # red
    assert float(x[1, :, :, 10:].min()) == 1  # transparent: white, not palette entry 0's black
    assert notes == [
        f"{p} has transparent pixels: they are explained as white" for p in (path, tmp_path / "palette.png")
    ]
    opaque = tmp_path / "opaque.png"
    Image.fromarray(np.full((8, 8, 4), 255, np.uint8), "RGBA").save(opaque)
    notes.clear()
    load_images([str(opaque)], 8, notes=notes)
    assert notes == []  # an alpha channel with nothing transparent is not worth a note


def test_load_images_crops_torchvision_models_as_their_evaluation_transform(tmp_path):
    from naflow_fx.cli import load_images, load_model

    pixels = np.zeros((256, 256, 3), np.uint8)
    pixels[..., 1] = 255  # green, inside a red frame 16 pixels wide: what Resize(256) + CenterCrop(224) drops
    pixels[:16], pixels[-16:], pixels[:, :16], pixels[:, -16:] = (255, 0, 0), (255, 0, 0), (255, 0, 0), (255, 0, 0)
    path = tmp_path / "framed.png"
    Image.fromarray(pixels).save(path)
    spec = load_model("resnet18")
    assert spec.crop_fraction == 224 / 256 and load_model("shapes").crop_fraction == 1.0
    x = load_images([str(path)], 224, spec.resize, spec.crop_fraction)[0]
    assert float(x[0].max()) < 0.01 and float(x[1].min()) > 0.99  # no frame left
    whole = load_images([str(path)], 224)[0]  # the whole central square, frame included
    assert float(whole[0].max()) > 0.99


def test_load_images_refuses_values_it_cannot_read_as_intensities(tmp_path):
    from naflow_fx.cli import CLIError, load_images

    def save(name, array, mode=None):
        path = tmp_path / name
        Image.fromarray(array, mode).save(path)
        return str(path)

    nan = np.ones((8, 8), np.float32)
    nan[4, 5] = np.nan  # not the first pixel: PIL's extrema skip NaN unless they start on it
    with pytest.raises(CLIError, match=r"nan.tif: it has NaN or infinite pixel values"):
        load_images([save("nan.tif", nan)], 8)
    with pytest.raises(CLIError, match=r"negative.tif: its values go down to -1, .*scaled to \[0, 1\]"):
        load_images([save("negative.tif", np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8))], 8)
    with pytest.raises(CLIError, match=r"wide.tif: its values reach 131070, beyond 16 bits"):
        load_images([save("wide.tif", np.full((8, 8), 131070, np.int32))], 8)
    notes = []
    dim = load_images([save("dim.tif", np.full((8, 8), 1000, np.float32))], 8, notes=notes)
    torch.testing.assert_close(dim, torch.full((1, 3, 8, 8), 1000 / 65535))
    assert notes == [
        f"{tmp_path / 'dim.tif'} uses values up to 1000 of the 0–65535 range it is read from, so it looks dark"
    ]
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    notes.clear()
    first = load_images([str(tmp_path / "anim.gif")], 8, notes=notes)[0]
    assert float(first[0].min()) > 0.9 and notes == [
        f"{tmp_path / 'anim.gif'} has 2 frames or pages; the first one is explained"
    ]
    frames[0].save(tmp_path / "photo.jpg", "MPO", save_all=True, append_images=frames[1:])  # a camera's JPEG
    notes.clear()
    assert Image.open(tmp_path / "photo.jpg").n_frames == 2
    load_images([str(tmp_path / "photo.jpg")], 8, notes=notes)
    assert notes == []  # the photo and its preview: nothing to say
    pages = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    pages[0].save(tmp_path / "two.tif", save_all=True, append_images=pages[1:])
    second = Image.open(tmp_path / "two.tif")
    assert second.n_frames == 2  # which finds where each page starts
    data = (tmp_path / "two.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(data[: second._frame_pos[1] + 2])  # the second page's header cut off
    with pytest.warns(UserWarning, match="Corrupt EXIF"):  # PIL's, on the damaged page
        cut = load_images([str(tmp_path / "cut.tif")], 8)[0]
    assert float(cut[0].min()) > 0.9  # the first page, which is whole
    deep = np.full((8, 8), 40000, np.uint16)
    deep[:, :4] = 0
    Image.fromarray(deep).save(tmp_path / "keyed.png", transparency=0)  # a 16-bit grey PNG with a tRNS key
    assert Image.open(tmp_path / "keyed.png").mode.startswith("I;16")
    notes.clear()
    keyed = load_images([str(tmp_path / "keyed.png")], 8, "stretch", notes=notes)[0]
    assert float(keyed[:, :, :3].min()) == 1 and abs(float(keyed[:, :, 5:].mean()) - 40000 / 65535) < 1e-6
    assert notes == [f"{tmp_path / 'keyed.png'} has transparent pixels: they are explained as white"]
    for bad in (0, 1.5, -0.5, float("nan"), "half"):
        with pytest.raises(CLIError, match="crop_fraction must be a number in"):
            load_images([str(tmp_path / "keyed.png")], 8, crop_fraction=bad)


def test_explain_names_each_image_in_the_grid_and_keeps_the_notes_in_the_sidecar(capsys, tmp_path, monkeypatch):
    from naflow_fx import viz

    icon = np.zeros((24, 24, 4), np.uint8)
    icon[6:18, 6:18, 3] = 255
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for folder in ("a", "b"):
        Image.fromarray(icon, "RGBA").save(tmp_path / folder / "same.png")
    Image.fromarray(icon[..., :3]).save(tmp_path / "other.png")
    seen = {}
    real = viz.flow_grid
    monkeypatch.setattr(viz, "flow_grid", lambda *a, **k: seen.update(k) or real(*a, **k))
    paths = [str(tmp_path / "a" / "same.png"), str(tmp_path / "b" / "same.png"), str(tmp_path / "other.png")]
    code, _, err = run(
        capsys, "explain", *paths, "--model", "shapes", "--out", str(tmp_path / "out"), "--layers", "blocks"
    )
    assert code == 0, err
    assert seen["image_labels"] == [os.path.join("a", "same.png"), os.path.join("b", "same.png"), "other.png"]
    assert f"naflow: warning: {paths[0]} has transparent pixels: they are explained as white" in err
    meta = json.loads((tmp_path / "out" / "naflow.json").read_text())
    assert meta["input"]["notes"][:2] == [f"{p} has transparent pixels: they are explained as white" for p in paths[:2]]
    fig = viz.flow_grid(torch.rand(2, 3, 8, 8), _maps(2), image_labels=["cat.jpg", "/data/" + "x" * 80 + "/dog.jpg"])
    assert fig.axes[0].get_ylabel() == "cat.jpg\nnaflow"
    long = fig.axes[2].get_ylabel().split("\n")  # a long name keeps its end, and the method its own line
    assert long[0].startswith("…") and long[0].endswith("/dog.jpg") and long[1] == "naflow"
    with pytest.raises(naflow_fx_errors().InputError, match="image_labels has 1 label.* for 2 image"):
        viz.flow_grid(torch.rand(2, 3, 8, 8), _maps(2), image_labels=["cat.jpg"])


def naflow_fx_errors():
    import naflow_fx.errors

    return naflow_fx.errors


def _maps(batch: int):
    from naflow_fx import LayerMaps

    maps = {"a": torch.rand(batch, 4, 4)}
    return LayerMaps(["a"], maps, torch.zeros(batch, 3), torch.zeros(batch), None, (8, 8), "naflow")


def test_result_files_blocked_by_folders_and_files_named_like_options_are_explained(capsys, tmp_path, monkeypatch):
    (tmp_path / "out" / "flow.gif").mkdir(parents=True)
    code, _, err = run(capsys, "explain", sample_paths()[0], "--model", "shapes", "--out", str(tmp_path / "out"))
    assert_one_line_error(code, err, "flow.gif is a folder where a result file goes; remove it or pass another --out")
    assert not (tmp_path / "out" / "flow_grid.png").exists()  # refused before any work
    (tmp_path / "pdf" / "layercam.json").mkdir(parents=True)
    argv = ["--figure-format", "pdf", "--compare", "layercam", "--out", str(tmp_path / "pdf")]
    code, _, err = run(capsys, "explain", sample_paths()[0], "--model", "shapes", *argv)
    assert_one_line_error(code, err, "layercam.json is a folder where a result file goes")
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "-dash.png")
    for argv in (["-dash.png"], ["-dash.png", sample_paths()[0]]):
        with pytest.raises(SystemExit) as exited:  # argparse's error
            main(["explain", *argv, "--model", "shapes"])
        hint = "-dash.png is a file read as an option: write ./-dash.png, or put the images after --"
        assert_one_line_error(exited.value.code, capsys.readouterr().err, hint)
    with pytest.raises(SystemExit):  # after --, the file is an image: another error, and no such hint
        main(["explain", "--model", "shapes", "--size", "abc", "--", "-dash.png"])
    assert "is a file read as an option" not in capsys.readouterr().err
    assert build_parser().parse_args(iter(["inspect", "--model", "shapes"])).model == "shapes"  # any iterable


def test_sidecars_record_image_paths_as_given(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    star = sample_paths()[CLASSES.index("star")]
    (tmp_path / "imgdir").mkdir()
    Image.open(star).save(tmp_path / "star.png")
    Image.open(star).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(tmp_path / "imgdir" / "star.png")
    argv = ("explain", "star.png", "imgdir/star.png", "--model", "shapes", "--size", "32", "--layers", "blocks")
    code, out, err = run(capsys, *argv, "--out", "out")
    assert code == 0, err
    assert "  star.png: predicted" in out and "  imgdir/star.png: predicted" in out
    for method in ("naflow", "gradcam"):
        _, meta = load_maps(tmp_path / "out" / f"{method}.npz")
        assert [s["image"] for s in meta["samples"]] == ["star.png", "imgdir/star.png"]
        assert json.loads((tmp_path / "out" / f"{method}.json").read_text()) == meta
    # no output file is named after an image, so inputs with the same name cannot overwrite each other's
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["flow.gif", "flow_grid.png", "gradcam.json", "gradcam.npz", "naflow.json", "naflow.npz"]
    maps, _ = load_maps(tmp_path / "out" / "naflow.npz")
    assert all(m.shape[0] == 2 for m in maps.values()) and not np.allclose(*next(iter(maps.values())))


def test_a_file_name_that_is_not_utf8_is_written_as_text(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    name = os.fsdecode(b"bad\xff.png")  # how Python holds a non-UTF-8 name: the byte as a lone surrogate
    try:
        Image.open(sample_paths()[0]).save(name)
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system takes only UTF-8 names")
    code, _, err = run(capsys, "explain", name, "--model", "shapes", "--size", "32", "--layers", "blocks")
    assert code == 0, err
    text = (tmp_path / "naflow-out" / "naflow.json").read_text("utf-8")
    assert "\\udcff" not in text  # strict JSON readers refuse lone surrogates
    assert json.loads(text)["samples"][0]["image"] == "bad\\xff.png"


_CHATTY = """
import warnings

from torch import nn

from naflow_fx import NumericalWarning


def build():
    warnings.warn("the default init will change", FutureWarning)
    warnings.warn("some library chatter")
    warnings.warn(NumericalWarning("naflow_fx: a numerical problem"))
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
"""


def test_quiet_silences_other_libraries_warnings_but_not_numerical_ones(capsys, tmp_path, monkeypatch):
    import warnings

    from naflow_fx import NumericalWarning

    monkeypatch.chdir(tmp_path)
    (tmp_path / "chatty.py").write_text(_CHATTY)
    argv = ("explain", sample_paths()[0], "--model", "chatty:build", "--size", "16", "--compare", "none")
    for quiet in (False, True):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            code, out, err = run(capsys, *argv, "--out", f"out{quiet}", *(["-q"] if quiet else []))
            assert warnings.filters[0][:3] == ("always", None, Warning)  # the caller's filters, restored
        assert code == 0, err
        kinds = sorted(w.category.__name__ for w in caught)
        if quiet:
            assert out == "" and kinds == ["NumericalWarning"], kinds
        else:
            assert "note: build gets" in out
            assert kinds == ["FutureWarning", "NumericalWarning", "UserWarning"], kinds
    # non-finite maps of the flow itself: the one error line says what to do, no warning repeats it
    monkeypatch.syspath_prepend(os.path.dirname(__file__))  # tests/models.py
    nan = ("explain", sample_paths()[0], "--model", "models:silu_chain", "--size", "16", "--damping", "0", "-q")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, _, err = run(capsys, *nan, "--out", "nan")
    assert_one_line_error(code, err, "contain NaN or Inf", "--damping")
    assert not [w for w in caught if issubclass(w.category, NumericalWarning)]
    # as a user sees it, on stderr (pytest records warnings instead of printing them)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    proc = subprocess.run(
        [sys.executable, "-m", "naflow_fx.cli", *argv, "--out", "sub", "-q"], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0 and proc.stdout == "", proc.stderr
    assert "NumericalWarning: naflow_fx: a numerical problem" in proc.stderr
    assert "FutureWarning" not in proc.stderr and "chatter" not in proc.stderr, proc.stderr


# ---------------------------------------------------------------------------------------- audit fixes

_TOYS = """
import torch
from torch import nn


class _Batch1(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.c(x)).mean((2, 3)).view(1, -1))  # works at batch 1 only


class _FFT(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.fft.fft2(self.c(x)).real.mean((2, 3)))


def _classifier():
    torch.manual_seed(0)
    head = (nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), *head)


def batch1():
    torch.manual_seed(0)
    return _Batch1()


def double():
    return _classifier().double()


def half():
    return _classifier().half()


def dead():
    m = _classifier()
    with torch.no_grad():
        m[0].weight.zero_()
        m[0].bias.fill_(-1.0)
    return m


def one_class():
    return nn.Sequential(*_classifier()[:4], nn.Linear(4, 1))


def seg():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1))


def shrinking():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(8), nn.MaxPool2d(8), nn.Flatten(), nn.Linear(4, 3))


def flat():
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 3))


def collapsing():  # a 16×16 kernel: at 16 px its map is 1×1
    return nn.Sequential(nn.Conv2d(3, 4, 16), nn.ReLU(), nn.Flatten(), nn.Linear(4, 3))


def fft():
    return _FFT()


def returns_int():
    return 3


def hooked():
    m = _classifier()
    m[0].register_forward_hook(lambda mod, i, o: o + 1)
    return m
"""


@pytest.fixture
def toys(tmp_path, monkeypatch):
    """``toys:NAME`` models (see _TOYS), run from ``tmp_path``."""
    (tmp_path / "toys.py").write_text(_TOYS)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_model_that_runs_at_batch_one_only_explains_every_image(capsys, toys):
    argv = ("explain", *sample_paths()[:2], "--model", "toys:batch1", "--size", "16", "--out", "o", "-q")
    code, _, err = run(capsys, *argv)
    assert code == 0, err
    maps, _ = load_maps(toys / "o" / "naflow.npz")
    assert all(m.shape[0] == 2 for m in maps.values())


def test_a_float64_model_gets_float64_images(capsys, toys):
    code, _, err = run(capsys, "explain", sample_paths()[0], "--model", "toys:double", "--size", "16", "-q")
    assert code == 0, err
    assert load_maps(toys / "naflow-out" / "naflow.npz")[1]["samples"][0]["target"] in (0, 1, 2)
    code, _, err = run(capsys, "explain", sample_paths()[0], "--model", "toys:half", "--size", "16", "-q")
    assert_one_line_error(code, err, "torch.float16", "float32")  # still refused, cleanly


def test_library_advice_names_the_command_line_options(capsys, toys):
    img = sample_paths()[0]
    code, _, err = run(capsys, "inspect", "--model", "models:TwoUnsupportedOps", "--size", "16")
    assert code == 2 and "or pass --fallback linearize to invert" in err and "fallback='linearize'" not in err, err
    code, _, err = run(capsys, "explain", img, "--model", "toys:fft", "--size", "16", "-q")
    assert_one_line_error(code, err, "leaf_modules=[ThatModule]", "from Python", "--fallback linearize")
    code, _, err = run(capsys, "inspect", "--model", "shapes", "--last-layer", "bogus")
    assert_one_line_error(code, err, "--last-layer 'bogus' is not a 4-D layer", "Choose one of")
    code, _, err = run(capsys, "inspect", "--model", "toys:flat", "--size", "16")
    assert_one_line_error(code, err, "pass --last-layer NAME")
    assert "last_layer=" not in err
    code, _, err = run(capsys, "inspect", "--model", "toys:collapsing", "--size", "16")  # every map is 1×1
    assert_one_line_error(code, err, "the example is 16×16", "Pass a larger --size, the size the model is used at")
    code, _, err = run(capsys, "inspect", "--model", "toys:shrinking", "--size", "16")
    assert_one_line_error(code, err, "Output size is too small", "Pass a --size the model accepts")
    code, _, err = run(capsys, "explain", img, "--model", "toys:seg", "--size", "16", "-q")
    assert_one_line_error(code, err, "--target auto", "explains classifiers only", "Python API", "callable target")
    assert "target=None" not in err and "e.g. target=" not in err
    # --last-layer chooses the layer explained from; the sidecar records it
    argv = ("explain", img, "--model", "shapes", "--size", "32", "--layers", "blocks", "--compare", "none", "-q")
    code, _, err = run(capsys, *argv, "--last-layer", "layer3.0.relu#2", "--out", "last")
    assert code == 0, err
    _, meta = load_maps(toys / "last" / "naflow.npz")
    assert meta["layers"][-1]["name"] == "layer3.0.relu#2" and meta["options"]["last_layer"] == "layer3.0.relu#2"
    code, out, err = run(capsys, "inspect", "--model", "shapes", "--last-layer", "layer2.0.relu#2", "--no-code")
    assert code == 0 and "last layer 'layer2.0.relu#2'" in out, err


def test_version(capsys):
    import naflow_fx

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out == f"naflow {naflow_fx.__version__}\n"


def test_the_cli_in_process_keeps_the_callers_random_stream_and_stream_settings(monkeypatch):
    """``load_model`` seeded torch's global generator to make its random weights (the caller's next
    draws changed), and ``main`` left stdout and stderr replacing what they cannot encode."""
    import io

    from naflow_fx.cli import load_model

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = load_model("resnet18").model.conv1.weight.clone()
    assert torch.equal(torch.rand(3), expected)
    torch.manual_seed(7)
    assert torch.equal(load_model("resnet18").model.conv1.weight, first)  # still the same weights every run
    out = io.TextIOWrapper(io.BytesIO(), encoding="ascii", errors="strict")
    monkeypatch.setattr(sys, "stdout", out)
    with pytest.raises(SystemExit):
        main(["--version"])
    assert out.errors == "strict"


def test_unknown_options_point_at_their_commands_help(capsys):
    for argv, command in (
        (["explain", sample_paths()[0], "--model", "shapes", "--bogus"], "explain"),
        (["inspect", "--model", "shapes", "-q"], "inspect"),
        (["demo", "--bogus"], "demo"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.count("\n") == 1, err
        assert f"unrecognized arguments: {argv[-1]} (see 'naflow {command} --help')" in err, err


def test_empty_out_is_refused_before_the_flow_and_write_errors_advise_by_cause(capsys, tmp_path, monkeypatch):

    img = sample_paths()[0]
    for out in ("", "  "):
        code, out_text, err = run(capsys, "explain", img, "--model", "shapes", "--out", out)
        assert_one_line_error(code, err, "--out is empty", "pass a folder")
        assert "compiled" not in out_text
    for number, advice, other in (
        (errno.EACCES, "not writable; pass another folder", "free some space"),
        (errno.EROFS, "not writable; pass another folder", "free some space"),
        (errno.ENOSPC, "free some space or pass another folder", "not writable"),
    ):
        _failing_maps_files(monkeypatch, OSError(number, os.strerror(number)))
        argv = ("explain", img, "--model", "shapes", "--size", "32", "--layers", "blocks", "--compare", "none")
        code, _, err = run(capsys, *argv, "--out", str(tmp_path / str(number)), "-q")
        assert_one_line_error(code, err, "writing the results failed", os.strerror(number), advice)
        assert other not in err


def test_unreadable_images_say_why(capsys, tmp_path):
    data = open(sample_paths()[0], "rb").read()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    code, _, err = run(capsys, "explain", str(tmp_path / "trunc.png"), "--model", "shapes")
    assert_one_line_error(code, err, "cannot read image", "trunc.png", "image file is truncated")
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    (tmp_path / "imgs" / "sub.png").mkdir()
    code, _, err = run(capsys, "explain", str(tmp_path / "imgs"), "--model", "shapes")
    assert_one_line_error(code, err, "the folder", "imgs holds no image files", "pass a folder of images")
    with pytest.raises(CLIError, match=r"imgs is a folder, not an image; pass the images in it \(e\.g\. .*\*\.png\)"):
        load_images([str(tmp_path / "imgs")], 32)  # the Python function takes files only
    if hasattr(os, "mkfifo"):
        # a FIFO would block reading until something writes to it
        os.mkfifo(tmp_path / "pipe.png")
        import threading

        def unblock() -> None:  # had the CLI opened the FIFO, it would wait for a writer: end that wait
            try:
                os.close(os.open(tmp_path / "pipe.png", os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass  # no reader: the CLI did not open it

        timer = threading.Timer(10, unblock)
        timer.start()
        code, _, err = run(capsys, "explain", str(tmp_path / "pipe.png"), "--model", "shapes")
        timer.cancel()
        assert_one_line_error(code, err, "pipe.png is not a regular file", "save the image to a file")


def test_a_whole_model_passed_as_weights_is_steered_to_model(capsys, tmp_path):
    from naflow_fx.zoo.shapes import shapes_resnet

    torch.save(shapes_resnet(pretrained=False), tmp_path / "whole.pt")
    code, _, err = run(
        capsys, "explain", sample_paths()[0], "--model", "shapes", "--weights", str(tmp_path / "whole.pt")
    )
    assert_one_line_error(code, err, "hold pickled Python objects", "torch.save(model)", "--model FILE")


def test_layers_and_solver_option_errors_name_the_options(capsys):
    img = sample_paths()[0]
    base = ("explain", img, "--model", "shapes", "--size", "32", "--compare", "none", "-q")
    for text, expected in ((" all ", "all"), ("ALL", "all"), (" Blocks", "blocks"), (" conv1 , maxpool ", None)):
        args = build_parser().parse_args([*base, "--layers", text])
        assert args.layers == (expected or ["conv1", "maxpool"]), text
    # in a list, blocks is a name, as timm's EfficientNet calls a module
    assert build_parser().parse_args([*base, "--layers", "stem,blocks"]).layers == ["stem", "blocks"]
    code, _, err = run(capsys, *base, "--layers", "")
    assert_one_line_error(code, err, "--layers is empty")
    code, _, err = run(capsys, *base, "--layers", "bogus")
    assert_one_line_error(code, err, "--layers: layer 'bogus' is not an explainable layer")
    for flag, value, expected in (
        ("--max-iter", "0", "--max-iter must be a whole number ≥ 1, got 0"),
        ("--tol", "0", "--tol must be a finite number > 0"),
        ("--damping", "-1", "--damping must be a finite number ≥ 0"),
    ):
        code, _, err = run(capsys, *base, flag, value)
        assert_one_line_error(code, err, expected)
        assert "max_iter" not in err


def test_max_columns_caps_the_demo_grid(capsys, tmp_path):
    argv = ("demo", "--images", "1", "--layers", "blocks", "--out", str(tmp_path))
    code, out, err = run(capsys, *argv, "--max-columns", "2")
    assert code == 0, err
    assert "the grid shows 2 of the 5 layers" in out


def test_a_folder_stands_for_the_images_in_it_by_name(capsys, tmp_path):
    import shutil

    folder = tmp_path / "imgs"
    folder.mkdir()
    for name, src in (("b.png", sample_paths()[1]), ("a.PNG", sample_paths()[0]), (".hidden.png", sample_paths()[2])):
        shutil.copy(src, folder / name)
    (folder / "readme.txt").write_text("not an image")
    (folder / "weights.h5").write_bytes(b"\x89HDF\r\n\x1a\n")  # a format Pillow registers, not an image
    (folder / "deeper").mkdir()
    shutil.copy(sample_paths()[3], folder / "deeper" / "c.png")  # sub-folders are not searched
    argv = ("explain", str(folder), sample_paths()[3], str(folder / "b.png"), "--model", "shapes", "--size", "32")
    code, out, err = run(capsys, *argv, "--layers", "blocks", "--compare", "none", "--out", str(tmp_path / "out"))
    assert code == 0, err
    explained = [line.split(":")[0].strip() for line in out.splitlines() if ": predicted" in line]
    assert explained == [str(folder / "a.PNG"), str(folder / "b.png"), sample_paths()[3]]  # b.png once


def test_colorbar_adds_the_colormaps_scale_beside_the_grid(capsys, tmp_path):
    from PIL import Image

    img = sample_paths()[0]
    argv = ("explain", img, "--model", "shapes", "--size", "32", "--layers", "blocks", "--compare", "none")
    widths = []
    for extra in ((), ("--colorbar",)):
        out = str(tmp_path / f"run{len(extra)}")
        code, _, err = run(capsys, *argv, "--out", out, *extra)
        assert code == 0, err
        widths.append(Image.open(os.path.join(out, "flow_grid.png")).size[0])
    assert widths[1] > widths[0]


def test_unconverged_solves_and_all_zero_maps_are_one_warning_line_each(capsys, toys):
    img = sample_paths()[0]
    argv = ("explain", img, "--model", "shapes", "--size", "32", "--layers", "blocks", "--compare", "none")
    code, _, err = run(capsys, *argv, "--solver", "iterative", "--max-iter", "1", "--out", "it")
    assert code == 0, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("naflow: warning: "), err
    assert "least-squares solves did not converge within --max-iter 1" in err and "naflow.json" in err, err
    assert "larger --max-iter" in err
    code, _, err = run(capsys, *argv, "--solver", "iterative", "--max-iter", "1", "--out", "itq", "-q")
    assert code == 0 and err == "", err
    paths = sample_paths()[:2]
    code, _, err = run(capsys, "explain", *paths, "--model", "toys:dead", "--size", "16", "--out", "dead")
    assert code == 0, err
    lines = err.strip().splitlines()
    assert len(lines) == 2, err
    for line, path in zip(lines, paths):
        assert line.startswith(f"naflow: warning: every NAFlow map of {path} is zero"), line
    code, _, err = run(capsys, "explain", *paths, "--model", "toys:dead", "--size", "16", "--out", "deadq", "-q")
    assert code == 0 and err == "", err


def test_large_images_load_quietly_and_the_limit_quoted_is_pils_error_threshold(tmp_path, monkeypatch):
    import warnings

    from naflow_fx.cli import load_images

    side = Image.open(sample_paths()[0]).size
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", side[0] * side[1] - 1)  # warned about, not refused
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert load_images(sample_paths()[:1], 16).shape == (1, 3, 16, 16)
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(CLIError, match=r"more pixels than PIL's safety limit \(2,000\)"):
        load_images(sample_paths()[:1], 16)


def test_special_words_are_case_insensitive_and_counts_agree(capsys, toys):
    img = sample_paths()[0]
    for word in ("AUTO", " Auto "):
        assert build_parser().parse_args(["explain", img, "--model", "shapes", "--target", word]).target is None
    args = build_parser().parse_args(["explain", img, "--model", "shapes", "--compare", "GradCAM,None"])
    assert args.compare == ["gradcam"]
    code, _, err = run(capsys, "explain", img, "--model", "toys:returns_int")
    assert_one_line_error(code, err, "gives an int, not a torch.nn.Module")
    code, _, err = run(capsys, "explain", img, "--model", "toys:one_class", "--size", "16", "--target", "3")
    assert_one_line_error(code, err, "has 1 class (0–0)")
    code, out, err = run(capsys, "explain", img, "--model", "shapes", "--size", "32", "--layers", "maxpool")
    assert code == 0, err
    assert "1 layer, last" in out and "flow over 1 layer for 1 image(s)" in out


def test_figures_that_cannot_be_drawn_stop_the_run_before_the_flows(capsys, tmp_path, monkeypatch):
    import naflow_fx.viz

    images = sample_paths()[:2]
    argv = ("explain", *images, "--model", "shapes", "--size", "32", "--layers", "blocks", "--compare", "none")
    monkeypatch.setattr(naflow_fx.viz, "_AGG_MAX_SIDE", 300)  # a grid wider than matplotlib could draw
    code, out_text, err = run(capsys, *argv, "--out", str(tmp_path / "wide"), "-q")
    assert_one_line_error(code, err, "the grid: a figure of 2×", "nothing was computed", "fewer images per run")
    assert not (tmp_path / "wide").exists()
    monkeypatch.undo()
    # a GIF frame holds every image side by side: with many images, each gets fewer pixels instead of an error
    monkeypatch.setattr(naflow_fx.viz, "_GIF_MAX_SIDE", 300)
    code, _, err = run(capsys, *argv, "--out", str(tmp_path / "gif"), "-q")
    assert code == 0, err
    with Image.open(tmp_path / "gif" / "flow.gif") as gif:
        assert gif.size[0] == 2 * 150


def test_files_of_an_earlier_run_in_the_same_out_folder_are_named(capsys, tmp_path):
    img = sample_paths()[0]
    argv = ("explain", img, "--model", "shapes", "--size", "32", "--layers", "blocks", "--out", str(tmp_path))
    code, _, err = run(capsys, *argv)
    assert code == 0 and "earlier run" not in err
    code, _, err = run(capsys, *argv, "--compare", "none", "--figure-format", "svg")
    assert code == 0
    warning = [line for line in err.splitlines() if "earlier run" in line]
    assert len(warning) == 1 and "flow_grid.png, gradcam.npz, gradcam.json" in warning[0], err
    assert "naflow.npz" not in warning[0]  # replaced by this run


def test_library_warnings_are_warning_lines(capsys, toys):
    """A library UserWarning at compile time (forward hooks the graph does not run) is a naflow: warning: line."""
    code, _, err = run(capsys, "explain", sample_paths()[0], "--model", "toys:hooked", "--size", "16", "--out", "h")
    assert code == 0, err
    lines = [line for line in err.splitlines() if "forward hooks" in line]
    assert len(lines) == 1 and lines[0].startswith("naflow: warning: the model has forward hooks on '0'"), err
    assert "UserWarning" not in err and "warnings.warn" not in err
    code, _, err = run(capsys, "explain", sample_paths()[0], "--model", "toys:hooked", "--size", "16", "-q")
    assert code == 0 and err == "", err


def test_untraceable_model_advice_says_what_is_python_only(capsys, monkeypatch):
    monkeypatch.syspath_prepend(os.path.dirname(__file__))  # tests/models.py
    code, _, err = run(capsys, "inspect", "--model", "models:DataDependentBranch", "--size", "16")
    assert code == 2, err
    advice = " ".join(err.split())
    assert "leaf_modules=[...]) from Python" in advice and "--fallback linearize" in advice
    assert "concrete_args={'flag': value} from Python" in advice


def test_help_and_errors_on_an_ascii_terminal():
    """The help and messages use σ, × and ≥; a terminal that cannot show them gets '?' instead of a crash."""
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    cli = [sys.executable, "-m", "naflow_fx.cli"]
    done = subprocess.run([*cli, "explain", "--help"], capture_output=True, text=True, env=env, errors="replace")
    assert done.returncode == 0 and "Traceback" not in done.stderr and "--max-columns" in done.stdout, done.stderr


@pytest.mark.parametrize(
    ("missing", "argv", "needle"),
    [
        ("PIL.Image", ["explain", "IMG", "--model", "shapes"], "reading images needs pillow, which is not installed"),
        ("tqdm.auto", ["explain", "IMG", "--model", "shapes"], "the progress bar needs tqdm"),
        ("torchvision", ["inspect", "--model", "resnet18"], "--model resnet18 needs torchvision"),
    ],
    ids=["pillow", "tqdm", "torchvision"],
)
def test_a_missing_optional_package_is_one_error_line_naming_the_extra(
    capsys, monkeypatch, tmp_path, missing, argv, needle
):
    """The vision extra's packages are imported when needed; without one, the CLI says how to install it."""
    monkeypatch.setitem(sys.modules, missing, None)  # an import of it now raises ImportError
    argv = [sample_paths()[0] if a == "IMG" else a for a in argv]
    code, _, err = run(capsys, *argv, *(["--out", str(tmp_path)] if argv[0] == "explain" else []))
    assert_one_line_error(code, err, needle, "pip install 'naflow-fx[vision]'")


def test_library_functions_name_the_missing_package(monkeypatch, tmp_path):
    import naflow_fx.viz as viz
    from naflow_fx import MissingDependencyError

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingDependencyError, match=r"naflow_fx.viz needs matplotlib, which is not installed: pip"):
        viz.overlay(torch.zeros(3, 8, 8), torch.zeros(8, 8))
    assert issubclass(MissingDependencyError, ImportError)

"""The ``naflow`` command line: ``naflow demo``, ``naflow explain`` and ``naflow inspect``.

Every error the user can fix (a missing image, an unknown model, weights that do not match, a
target out of range, ...) is a message on stderr that says what to do, with exit code 2: one
line, plus indented detail lines for the errors that list things (unsupported ops, say).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import math
import os
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from .errors import ConfigError, InputError, NAFlowError, NumericalWarning, ZeroMapsWarning, did_you_mean, optional
from .solvers import SolverConfig
from .tracing import random_state_kept

__all__ = ["main", "build_parser", "load_model", "load_images", "with_input", "ModelSpec", "CLIError"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_EPILOG_DEMO = """examples:
  naflow demo                      # the embedded shapes ResNet on 4 bundled images -> naflow-demo/
  naflow demo --images 10 --layers blocks --out /tmp/demo
"""

_EPILOG_EXPLAIN = """examples:
  naflow explain star.png --model shapes                       # the embedded shapes ResNet
  naflow explain cat.jpg dog.jpg --model resnet50 --weights DEFAULT --layers blocks
  naflow explain photos/ --model resnet50 --weights DEFAULT --max-columns 12   # every image in a folder
  naflow explain img.png --model resnet18 --weights my_resnet18.pt --target 281 --compare gradcam,layercam
  naflow explain img.png --model mypkg.models:build_net --size 128 --out explained/
  naflow explain img.png --model whole_model.pt --device cuda
  naflow explain star.png --model shapes --damping 3e-2 --tol 1e-3     # solver options: help(naflow_fx.compile_naflow)

--model is a torchvision model name (random weights unless --weights), "shapes" (the embedded
model), module:callable (a function returning an nn.Module, or a module instance) or a file
saved with torch.save(model). --weights is a torchvision weights enum (DEFAULT, IMAGENET1K_V1,
...; downloaded by torchvision) or a state-dict file.
"""

_EPILOG_INSPECT = """examples:
  naflow inspect --model shapes
  naflow inspect --model resnet18 --size 64 --no-code
  naflow inspect --model mypkg.models:build_net --size 128
"""


class CLIError(Exception):
    """A user-fixable problem: printed as one line, exit code 2."""


@dataclass
class ModelSpec:
    """A model ready to explain, with how to feed it.

    Attributes:
        model: the ``nn.Module`` in eval mode.
        name: how to name it in outputs.
        size: the default input side in pixels.
        mean, std: per-channel input normalisation (after scaling pixels to [0, 1]).
        class_names: class index → name, when known.
        resize: ``"crop"`` (shorter side to size, centre crop; ImageNet style) or ``"stretch"``.
        crop_fraction: with ``"crop"``, the side of the central square as a fraction of the shorter
            side: torchvision's ``crop_size / resize_size`` for its models (224 / 256 unless the
            weights say otherwise), 1.0 (the whole central square) for others.
        random_weights: a torchvision architecture built without weights.
        known_input: whether ``mean``/``std`` are the model's own (False for a user's model, which
            gets ImageNet's unless ``--mean``/``--std`` say otherwise).
    """

    model: nn.Module
    name: str
    size: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    class_names: Sequence[str] | None = None
    resize: str = "crop"
    crop_fraction: float = 1.0
    random_weights: bool = False
    known_input: bool = True

    @property
    def channels(self) -> int:
        """Input channels: those of the model's first convolution (3 when it has none)."""
        conv = next((m for m in self.model.modules() if isinstance(m, nn.Conv2d)), None)
        return 3 if conv is None else int(conv.in_channels)


# ---------------------------------------------------------------------------------------- models
def _load_state_dict(model: nn.Module, path: str, name: str, torchvision: bool = False) -> None:
    from ._io import load_state_dict_file

    load_state_dict_file(
        model,
        path,
        name,
        missing_hint="pass an existing state-dict file" + (" or a torchvision weights name" if torchvision else ""),
        mismatch_hint="pass weights saved from this architecture",
        pickled_hint="pass a whole-model file as --model FILE, or save model.state_dict() for --weights",
    )


def _as_module(obj: object, source: str) -> nn.Module:
    if isinstance(obj, nn.Module):
        return obj
    if callable(obj):
        try:
            obj = obj()
        except Exception as exc:  # the user's factory failed
            raise CLIError(
                f"{source}() failed: {type(exc).__name__}: {exc}; it must build the model with no arguments"
            ) from None
        if isinstance(obj, nn.Module):
            return obj
    kind = type(obj).__name__
    article = "an" if kind[:1].lower() in "aeiou" else "a"
    raise CLIError(f"{source} gives {article} {kind}, not a torch.nn.Module; point --model at a model or factory")


# DEFAULT and the names of a torchvision weights enum (IMAGENET1K_V1, IMAGENET1K_SWAG_E2E_V1, ...), also written
# as ResNet50_Weights.IMAGENET1K_V1: what --weights takes, besides a state-dict file, for torchvision models only
_ENUM_NAME = re.compile(r"(?:\w+_Weights\.)?(?:[A-Z][A-Z0-9_]*|default)")


def _check_file_weights(spec: str, weights: str | None) -> None:
    """Refuse a torchvision weights name (``--weights DEFAULT``) for a model that is not torchvision's."""
    if weights is None or os.path.exists(weights) or not _ENUM_NAME.fullmatch(weights):
        return
    if spec == "shapes":
        raise CLIError(
            f"--weights {weights}: the shapes model already ships trained weights (leave out --weights to use them); "
            "for shapes --weights takes a state-dict file, while DEFAULT and names like IMAGENET1K_V1 are "
            "torchvision weights, for torchvision models such as --model resnet18"
        )
    raise CLIError(
        f"--weights {weights}: DEFAULT and names like IMAGENET1K_V1 are torchvision weights, for torchvision models "
        f"such as --model resnet18; for --model {spec} pass a state-dict file (torch.save(model.state_dict(), path))"
    )


def _shapes_spec(weights: str | None) -> ModelSpec:
    from .data.shapes import CLASSES, MEAN, SIZE, STD
    from .zoo.shapes import shapes_resnet

    if weights is None:
        model = shapes_resnet()
    else:
        model = shapes_resnet(pretrained=False)
        _load_state_dict(model, weights, "shapes")
    return ModelSpec(model.eval(), "shapes", SIZE, MEAN, STD, CLASSES, resize="stretch")


def _callable_spec(spec: str, weights: str | None) -> ModelSpec:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise CLIError(f"--model {spec}: write module:callable, e.g. mypkg.models:build_net")
    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # import errors of the user's code
        raise CLIError(
            f"--model {spec}: cannot import {module_name!r} ({type(exc).__name__}: {exc}); run from the folder that "
            "holds it or install its package"
        ) from None
    finally:
        sys.path.pop(0)
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CLIError(f"--model {spec}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    model = _as_module(obj, f"--model {spec}")
    if weights is not None:
        _load_state_dict(model, weights, spec)
    return ModelSpec(model.eval(), attr, known_input=False)


def _file_spec(path: str, weights: str | None) -> ModelSpec:
    try:
        # a whole pickled model needs full unpickling: only load files you trust
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # anything an unreadable or foreign file raises
        raise CLIError(
            f"cannot read model file {path} ({type(exc).__name__}); save it with torch.save(model, path)"
        ) from None
    if isinstance(obj, dict):
        raise CLIError(
            f"{path} holds a state dict, not a model: pass the architecture with --model NAME and this file with "
            "--weights FILE"
        )
    model = _as_module(obj, path)
    if weights is not None:
        _load_state_dict(model, weights, path)
    name = os.path.splitext(os.path.basename(path))[0]
    return ModelSpec(model.eval(), name, known_input=False)


def _torchvision_spec(name: str, weights: str | None) -> ModelSpec:
    torchvision = optional("torchvision", f"--model {name}")
    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        close = [m for m in available if m.startswith(name[:3])][:8]
        raise CLIError(
            f"unknown model {name!r}{did_you_mean(name, available)}: use a torchvision classification model "
            f"({', '.join(close or available[:8])}, "
            "...), 'shapes', module:callable or a saved model file"
        )
    if weights is None or os.path.isfile(weights) or weights.endswith((".pt", ".pth")):
        with random_state_kept(torch.device("cpu")):  # the same random weights every run; the caller's stream kept
            torch.manual_seed(0)
            model = torchvision.models.get_model(name, weights=None)
        if weights is not None:
            _load_state_dict(model, weights, name, torchvision=True)
        return ModelSpec(model.eval(), name, crop_fraction=_IMAGENET_CROP, random_weights=weights is None)
    enum = torchvision.models.get_model_weights(name)
    try:
        chosen = enum[weights] if weights != "DEFAULT" else enum.DEFAULT
    except KeyError:
        names = ", ".join(["DEFAULT", *(w.name for w in enum)])
        raise CLIError(f"--weights {weights} is neither a file nor weights of {name}; choose one of: {names}") from None
    try:
        model = torchvision.models.get_model(name, weights=chosen)
    except Exception as exc:  # network and cache errors
        raise CLIError(
            f"could not load {name} weights {chosen.name} ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            "download them where there is internet, or pass a state-dict file with --weights"
        ) from None
    # the weights' own evaluation transform: shorter side to resize_size, centre crop of crop_size
    transform = chosen.transforms()
    crop, resize = (getattr(transform, k, None) for k in ("crop_size", "resize_size"))
    size = int(crop[0] if isinstance(crop, (list, tuple)) else crop)
    resize = int(resize[0] if isinstance(resize, (list, tuple)) else resize) if resize else size
    categories = chosen.meta.get("categories")
    return ModelSpec(model.eval(), name, size, class_names=categories, crop_fraction=min(1.0, size / resize))


_IMAGENET_CROP = 224 / 256  # torchvision's ImageNet evaluation: shorter side to 256, centre crop of 224


def load_model(spec: str, weights: str | None = None) -> ModelSpec:
    """Resolve ``--model`` / ``--weights`` into a :class:`ModelSpec` (raises :class:`CLIError`).

    Example:
        >>> load_model("shapes").class_names[:3]
        ('circle', 'square', 'triangle')
    """
    is_file = os.path.isfile(spec) or spec.endswith((".pt", ".pth"))
    if spec == "shapes" or is_file or ":" in spec:
        _check_file_weights(spec, weights)
    if spec == "shapes":
        return _shapes_spec(weights)
    if is_file:
        if not os.path.isfile(spec):
            raise CLIError(f"model file not found: {spec}; pass an existing file saved with torch.save(model, path)")
        return _file_spec(spec, weights)
    if ":" in spec:
        return _callable_spec(spec, weights)
    return _torchvision_spec(spec, weights)


# ---------------------------------------------------------------------------------------- images
def load_images(
    paths: Sequence[str | os.PathLike[str]],
    size: int,
    resize: str = "crop",
    crop_fraction: float = 1.0,
    notes: list[str] | None = None,
) -> torch.Tensor:
    """Read image files as ``float Tensor[N, 3, size, size]`` in [0, 1] (raises :class:`CLIError`).

    ``resize="crop"``: a central square, ``crop_fraction`` of the shorter side, to ``size``
    (ImageNet style: torchvision's models take 224 / 256 of it, as their resize to 256 and centre
    crop of 224 do); ``"stretch"``: the whole image to ``size × size``. An image with an EXIF
    orientation (a photo stored sideways) is turned upright first, as viewers show it. Only that
    square is resampled, so a very long, thin image costs no more than a square one. Transparent
    pixels are shown on white, and an animated or multi-page file gives its first frame; each is
    said in ``notes`` (when a list is given). 16-bit and 32-bit greyscale images are scaled from
    their full range (65535, or 255 when no value exceeds it; float images from [0, 1] when they
    fit in it), not clipped at 255; negative, non-finite or over-16-bit values are an error.

    Example:
        >>> from naflow_fx.data.shapes import sample_paths
        >>> load_images(sample_paths()[:2], 64).shape
        torch.Size([2, 3, 64, 64])
    """
    import numpy as np

    Image = optional("PIL.Image", "reading images")
    UnidentifiedImageError = Image.UnidentifiedImageError

    if isinstance(crop_fraction, bool) or not isinstance(crop_fraction, (int, float)) or not 0 < crop_fraction <= 1:
        raise CLIError(
            f"crop_fraction must be a number in (0, 1], the central part of the shorter side; got {crop_fraction!r}"
        )
    out = []
    notes = [] if notes is None else notes
    for path in paths:
        if not os.path.exists(path):
            raise CLIError(f"image not found: {path}; check the path")
        if os.path.isdir(path):
            raise CLIError(
                f"{path} is a folder, not an image; pass the images in it (e.g. {os.path.join(path, '*.png')})"
            )
        if not os.path.isfile(path):
            # a FIFO would block open() until something writes to it; a device or socket is no image either
            raise CLIError(f"{path} is not a regular file (a pipe, device or socket); save the image to a file")
        try:
            with _open_image(path) as im:
                frames = _frames(im)
                im.load()
                # a camera's MPO JPEG is the photo and its previews; a PSD's "frames" are its layers, and PIL
                # gives the merged image
                if frames > 1 and im.format not in ("MPO", "PSD"):
                    notes.append(f"{path} has {frames} frames or pages; the first one is explained")
                im = _upright(im)
                w, h = im.size
                box = (0, 0, w, h)
                if resize == "crop":
                    side = min(w, h) * crop_fraction
                    left, top = (w - side) / 2, (h - side) / 2
                    box = (left, top, left + side, top + side)
                if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
                    array = _deep_grey(im, path, size, box, notes)
                else:
                    if im.mode in ("RGBA", "LA", "PA", "RGBa") or "transparency" in im.info:
                        # what a viewer shows on a white page, not the colours hidden under transparent pixels
                        rgba = im.convert("RGBA")
                        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
                        if rgba.getextrema()[3][0] < 255:
                            notes.append(_transparent(path))
                    rgb = im.convert("RGB").resize((size, size), Image.BILINEAR, box=box)
                    array = np.asarray(rgb, np.float32) / 255.0
        except Image.DecompressionBombError:
            # PIL warns above MAX_IMAGE_PIXELS (ignored above: the CLI resamples only the square it explains) and
            # refuses images of more than twice as many pixels
            raise CLIError(
                f"cannot read image {path}: it has more pixels than PIL's safety limit "
                f"({2 * (Image.MAX_IMAGE_PIXELS or 0):,}); downscale it first"
            ) from None
        except UnidentifiedImageError:
            raise CLIError(
                f"cannot read image {path}: not an image format PIL knows; pass a PNG, JPEG or other image file"
            ) from None
        except (OSError, ValueError) as exc:
            cause = " ".join(str(exc).split()) or type(exc).__name__
            raise CLIError(
                f"cannot read image {path} ({type(exc).__name__}: {cause}); pass a complete PNG, JPEG or other "
                "image file"
            ) from None
        out.append(torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1))
    return torch.stack(out)


def _transparent(path: str | os.PathLike[str]) -> str:
    return f"{path} has transparent pixels: they are explained as white"


def _frames(im) -> int:
    """How many frames or pages ``im`` has (1 when that cannot be told: a damaged later page), at frame 0."""
    try:
        frames = int(getattr(im, "n_frames", 1))
    except Exception:  # PIL raises anything from a damaged page; the first one may be fine
        frames = 1
    try:
        im.seek(0)  # where a failed count may have left another page
    except Exception:  # as above; loading the first page then says what is wrong
        pass
    return frames


def _deep_grey(im, path: str | os.PathLike[str], size: int, box: tuple, notes: list[str]):
    """A 16-bit, 32-bit or float greyscale image as ``float32 [size, size, 3]`` in [0, 1]."""
    import numpy as np

    Image = optional("PIL.Image", "reading images")

    values = np.asarray(im.convert("F"), np.float32)
    if not np.isfinite(values).all():
        raise CLIError(f"cannot read image {path}: it has NaN or infinite pixel values; replace them first")
    key = im.info.get("transparency")  # a 16-bit PNG's tRNS: the grey value shown as transparent
    clear = values == key if isinstance(key, (int, float)) and not isinstance(key, bool) else None
    if clear is not None and not clear.any():
        clear = None
    seen = values[~clear] if clear is not None else values
    low, peak = (float(seen.min()), float(seen.max())) if seen.size else (0.0, 0.0)
    if low < 0:
        raise CLIError(
            f"cannot read image {path}: its values go down to {low:g}, and the CLI reads pixels as intensities "
            "from 0; save it scaled to [0, 1] (or as an 8- or 16-bit image), or explain it from Python"
        )
    if im.mode.startswith("I;16"):
        scale = 65535.0
    elif im.mode == "F" and peak <= 1:
        scale = 1.0
    elif peak <= 65535:
        scale = 255.0 if peak <= 255 else 65535.0
    else:
        raise CLIError(
            f"cannot read image {path}: its values reach {peak:g}, beyond 16 bits (65535); save it scaled to 16 "
            "bits or to [0, 1], or explain it from Python"
        )
    if 0 < peak < scale / 20:
        notes.append(f"{path} uses values up to {peak:g} of the 0–{scale:g} range it is read from, so it looks dark")
    if clear is not None:  # as for colour images: what a viewer shows on a white page
        values = np.where(clear, scale, values)
        notes.append(_transparent(path))
    grey = Image.fromarray(values, "F").resize((size, size), Image.BILINEAR, box=box)
    return np.repeat((np.asarray(grey, np.float32) / scale).clip(0, 1)[:, :, None], 3, axis=2)


def _open_image(path: str | os.PathLike[str]):
    """``PIL.Image.open(path)`` without PIL's DecompressionBombWarning: the CLI resamples only the square it
    explains, so a large image costs little; one over PIL's error threshold still raises DecompressionBombError."""
    Image = optional("PIL.Image", "reading images")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(path)


def _upright(im):
    """``im`` turned as its EXIF Orientation tag says (``PIL.ImageOps.exif_transpose``); ``im`` itself without one."""
    ImageOps = optional("PIL.ImageOps", "reading images")

    try:
        if im.getexif().get(0x0112, 1) in (1, None):
            return im
        return ImageOps.exif_transpose(im)
    except Exception:  # a malformed EXIF block: the pixels as stored
        return im


# ---------------------------------------------------------------------------------------- running
def _progress(total: int, quiet: bool, desc: str):
    """A tqdm bar on stderr, shown only for runs longer than a second, on a terminal, without --quiet."""
    tqdm = optional("tqdm.auto", "the progress bar").tqdm

    return tqdm(total=total, desc=desc, unit="layer", delay=1.0, disable=quiet or not sys.stderr.isatty(), leave=False)


def _count(n: int, word: str, plural: str | None = None) -> str:
    """``1 layer``, ``2 layers``."""
    return f"{n} {word if n == 1 else plural or word + 's'}"


def _class_name(spec: ModelSpec, c: int) -> str:
    if spec.class_names is not None and 0 <= c < len(spec.class_names):
        return f"{spec.class_names[c]!r} ({c})"
    return f"class {c}"


def check_out_dir(out: str) -> None:
    """Fail before any work is done when ``out`` cannot become a folder to write into.

    ``out`` may not exist yet; then its nearest existing ancestor must be a writable folder.
    Nothing is created: a temporary file is made in that folder and removed at once.

    Example:
        >>> check_out_dir(tempfile.gettempdir())
        >>> check_out_dir(__file__)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        naflow_fx.cli.CLIError: --out ...cli.py is a file, not a folder; pass a folder to write the results into
    """
    if not out.strip():
        raise CLIError("--out is empty; pass a folder to write the results into (e.g. --out naflow-out)")
    probe = os.path.abspath(out)
    while not os.path.lexists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        what = f"--out {out} is" if probe == os.path.abspath(out) else f"--out {out}: {probe} is"
        raise CLIError(f"{what} a file, not a folder; pass a folder to write the results into")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise CLIError(f"--out {out}: cannot write in {probe} ({exc.strerror}); pass a writable folder") from None


def run_explain(
    spec: ModelSpec,
    images: torch.Tensor,
    labels: Sequence[str],
    out: str,
    *,
    target: int | None = None,
    layers: object = "all",
    compare: Sequence[str] = ("gradcam",),
    device: str = "cpu",
    quiet: bool = False,
    max_columns: int = 24,
    solver_options: dict | None = None,
    grid_layers: Callable[[list[str]], list[str]] | None = None,
    dpi: int = 150,
    gif_size: int = 192,
    figure_format: str = "png",
    say: Callable[[str], None] = print,
    image_notes: Sequence[str] = (),
    colorbar: bool = False,
) -> dict:
    """Explain every image, write the grid, the GIF and the ``.npz``/JSON files; returns what was written.

    ``grid_layers`` picks the grid's columns from the explained layers (default: all), at most
    ``max_columns`` of them, evenly spaced; the GIF and the ``.npz`` files hold every layer.
    ``dpi`` is the grid's resolution (of its images, for ``pdf`` and ``svg``), ``gif_size`` the
    side of each image in the GIF, ``figure_format`` the grid's file type (``png``, ``pdf``, ``svg``),
    ``colorbar`` whether the grid shows the colormap's scale.
    ``solver_options`` (``solver``, ``damping``, ``tol``, ``max_iter``, and ``fallback`` and
    ``last_layer`` if set) go to ``compile_naflow`` and into the NAFlow sidecar as ``"options"``.
    ``image_notes`` (from :func:`load_images`) are printed with the warnings and kept in the sidecars.
    """
    from . import compile_naflow
    from ._io import atomic_write_all
    from .export import maps_files, user_file_error
    from .result import concat, non_finite_layers
    from .viz import _GIF_MAX_SIDE, _check_gif_room, _check_grid_room, flow_gif, flow_grid, spread_layers

    files = [f"flow_grid.{figure_format}", "flow.gif"] + [
        f"{m}.{e}" for m in ("naflow", *compare) for e in ("npz", "json")
    ]
    taken = [os.path.join(out, f) for f in files if os.path.isdir(os.path.join(out, f))]
    if taken:  # before any work: the results could not be written there
        raise CLIError(f"--out {out}: {taken[0]} is a folder where a result file goes; remove it or pass another --out")
    dev = torch.device(device)
    model = spec.model.to(dev)
    mean = torch.tensor(spec.mean, device=dev).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, device=dev).view(1, -1, 1, 1)
    x = images.to(dev)
    if spec.channels == 1:  # a greyscale model: the luma of the RGB images (ITU-R BT.601)
        x = (x * torch.tensor(_LUMA, device=dev).view(1, 3, 1, 1)).sum(1, keepdim=True)
    x = (x - mean) / std
    param = next(iter(model.parameters()), None)
    if param is not None and param.is_floating_point():
        x = x.to(param.dtype)  # a float64 model gets float64 images (float16 is refused by compile_naflow)
    start = time.perf_counter()
    options = dict(solver_options or {})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        nf = compile_naflow(model, x[:1], layers=layers, **options)
    notes = list(image_notes) + [
        " ".join(str(w.message).split()) for w in caught if issubclass(w.category, UserWarning)
    ]
    for w in caught:
        if not issubclass(w.category, UserWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)  # others as they were
    layer_count = _count(len(nf.layers), "layer")
    say(f"{spec.name}: compiled in {time.perf_counter() - start:.1f}s, {layer_count}, last {nf.last_layer}")
    with torch.no_grad():
        logits = model(x[:1])  # the output's shape; images go one at a time, as the flow takes them
    if target is not None:
        if logits.dim() != 2:
            raise CLIError(f"--target needs a classifier; {spec.name} outputs shape {tuple(logits.shape)}")
        if not 0 <= target < logits.shape[1]:
            n = logits.shape[1]
            raise CLIError(
                f"--target {target} is out of range: {spec.name} has {_count(n, 'class', 'classes')} (0–{n - 1})"
            )
    columns = spread_layers(grid_layers(list(nf.layers)) if grid_layers is not None else list(nf.layers), max_columns)
    rows = ["NAFlow"] + [{"gradcam": "Grad-CAM", "layercam": "LayerCAM"}[m] for m in compare]
    # The figures must fit before the flows run: a GIF frame holds every image side by side, so many images
    # get smaller ones; a grid too large for matplotlib stops the run now rather than after all the work.
    if gif_size * len(labels) > _GIF_MAX_SIDE:
        gif_size = max(1, _GIF_MAX_SIDE // len(labels))
        notes.append(f"the GIF shows each of the {len(labels)} images at {gif_size} pixels, so that a frame fits a GIF")
    try:
        hw = tuple(images.shape[-2:])
        _check_grid_room(len(labels) * len(rows), len(columns) + 1, 1.15, dpi, figure_format, hw, "the grid", colorbar)
        _check_gif_room(len(labels), len(nf.layers), gif_size, "the GIF")
    except InputError as exc:
        raise CLIError(
            f"{str(exc).rsplit(': ', 1)[0]}; nothing was computed. Explain fewer images per run, show fewer layers "
            "(--max-columns, --layers) or drop --compare"
        ) from None
    flows, cams = [], {m: [] for m in compare}
    start = time.perf_counter()
    with _progress(len(labels) * nf.num_steps, quiet, "NAFlow") as bar, warnings.catch_warnings():
        warnings.simplefilter("ignore", NumericalWarning)  # non-finite maps are an error below, with what to do
        warnings.simplefilter("ignore", ZeroMapsWarning)  # a warning line per image below
        for i in range(len(labels)):
            bar.set_postfix_str(os.path.basename(labels[i]))
            flows.append(nf(x[i : i + 1], target, progress=lambda _rec: bar.update()))
            for m in compare:
                cams[m].append(getattr(nf, m)(x[i : i + 1], target))
    flow = concat(flows)
    bad = non_finite_layers(flow.maps, flow.layers)
    if bad:
        raise CLIError(
            f"the maps of {len(bad)} of {layer_count} contain NaN or Inf, from {bad[-1]!r} down: the "
            f"back-propagated feature maps grew beyond the range of {x.dtype}. Nothing was written. Try a larger "
            "--damping (e.g. 3e-2), or explain the model in float64 from Python (model.double(), x.double())"
        )
    say(f"flow over {layer_count} for {len(labels)} image(s): {time.perf_counter() - start:.1f}s")
    for i, label in enumerate(labels):
        pred = int(flow.output[i].argmax()) if flow.output.dim() == 2 else None
        prob = float(torch.softmax(flow.output[i], 0)[pred]) if pred is not None else None
        explained = int(flow.classes[i]) if flow.classes is not None else None
        line = f"  {label}: "
        if pred is not None:
            line += f"predicted {_class_name(spec, pred)} p={prob:.2f}; "
        if explained is not None:
            line += f"explained {_class_name(spec, explained)}, score {float(flow.scores[i]):.3g}"
        say(line)
    results = [flow] + [concat(cams[m]) for m in compare]
    written = {"grid": os.path.join(out, f"flow_grid.{figure_format}"), "gif": os.path.join(out, "flow.gif")}
    grid_args = dict(layers=columns, row_labels=rows, class_names=spec.class_names, dpi=dpi, colorbar=colorbar)
    grid_args["image_labels"] = _short_names(labels)
    outputs = [
        (written["grid"], lambda tmp: flow_grid(images, results, tmp, **grid_args)),
        (written["gif"], lambda tmp: flow_gif(images, flow, tmp, size=gif_size)),
    ]
    # as given (star.png and imgdir/star.png stay apart), as text: a name that is not UTF-8 (Python
    # holds its bytes as lone surrogates, which strict JSON readers refuse) shows those bytes as \xNN
    names = [_text(str(p)) for p in labels]
    recorded = asdict(nf.config) | {k: options[k] for k in ("fallback", "last_layer") if options.get(k)}
    preprocessing = {
        "channels": spec.channels,
        "size": list(images.shape[-2:]),
        "resize": spec.resize,
        "mean": list(spec.mean),
        "std": list(spec.std),
    }
    if spec.resize == "crop":
        preprocessing["crop_fraction"] = spec.crop_fraction  # of the shorter side, before resizing to size
    if image_notes:
        preprocessing["notes"] = list(image_notes)
    for res in results:
        extra = {"input": preprocessing} | ({"options": recorded} if res.method == "naflow" else {})
        npz, _, maps = maps_files(
            res,
            os.path.join(out, f"{res.method}.npz"),
            model=spec.name,
            class_names=spec.class_names,
            images=names,
            extra=extra,
        )
        written[res.method] = npz
        outputs += maps
    # All the files of a run are replaced together, or none is (a failure or Ctrl-C while writing
    # leaves the folder as it was): a grid beside the maps of an earlier run would mislead.
    try:
        os.makedirs(out, exist_ok=True)
        atomic_write_all(outputs)
    except OSError as exc:
        exc = user_file_error(exc, *(path for path, _ in outputs))
        raise CLIError(
            f"--out {out}: writing the results failed ({exc.strerror or exc}; nothing was written); "
            f"{_write_advice(exc)}"
        ) from None
    if len(columns) < len(nf.layers):
        say(f"the grid shows {len(columns)} of the {layer_count}; the .npz files and the GIF hold all")
    for key, path in written.items():
        say(f"wrote {path}" + (" (+ .json)" if key not in ("grid", "gif") else ""))
    if not quiet:
        lines = _result_warnings(flow, labels, options, written.get("naflow", "naflow.npz"))
        for line in notes + lines + _earlier_outputs(out, written):
            print(f"naflow: warning: {line}", file=sys.stderr)
    return {"written": written, "flow": flow, "baselines": results[1:], "naflow": nf}


def _text(name: str) -> str:
    """``name`` with the undecodable bytes of a file name (lone surrogates) written as ``\\xNN``."""
    try:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that is no escaped byte
        return name.encode("utf-8", "backslashreplace").decode("utf-8")


def _short_names(paths: Sequence[str]) -> list[str]:
    """The images' names for the grid's rows: each file's name, with as many of its folders as tell
    it apart from the others' (``a/same.png``, ``b/same.png``)."""
    parts = [os.path.normpath(_text(str(p))).split(os.sep) for p in paths]
    names = []
    for i, own in enumerate(parts):
        depth = 1
        while depth < len(own) and any(j != i and q[-depth:] == own[-depth:] for j, q in enumerate(parts)):
            depth += 1
        names.append(os.sep.join(own[-depth:]))
    return names


def _earlier_outputs(out: str, written: dict) -> list[str]:
    """A line naming the files an earlier run left in ``out`` that this run did not replace."""
    outputs = [f"flow_grid.{ext}" for ext in FIGURE_FORMATS] + ["flow.gif"]
    outputs += [f"{method}.{ext}" for method in ("naflow", "gradcam", "layercam") for ext in ("npz", "json")]
    now = {os.path.basename(p) for p in written.values()}
    now |= {os.path.splitext(n)[0] + ".json" for n in now if n.endswith(".npz")}
    stale = [n for n in outputs if n not in now and os.path.exists(os.path.join(out, n))]
    if not stale:
        return []
    return [
        f"{out} still holds {', '.join(stale)} from an earlier run, which this one did not write (another "
        "--figure-format or --compare); remove them, or pass a new --out, to keep runs apart"
    ]


def _write_advice(exc: OSError) -> str:
    """What to do about a failed write, by its cause: a full disk, a folder one may not write in, or other."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free some space or pass another folder"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "the folder is not writable; pass another folder"
    return "pass another folder"


def _result_warnings(flow, labels: Sequence[str], options: dict, npz: str) -> list[str]:
    """One line per problem with a result that was written: solves that did not converge, all-zero maps."""
    lines = []
    solves = [r for r in flow.diagnostics.values() if r.method != "closed form"]
    failed = [r for r in solves if not r.converged]
    if failed:
        cap = options.get("max_iter", SolverConfig().max_iter)
        sidecar = os.path.splitext(npz)[0] + ".json"
        lines.append(
            f"{len(failed)} of {_count(len(solves), 'least-squares solve')} did not converge within --max-iter {cap}, "
            f'so their maps are approximate (see "diagnostics" in {sidecar}: residual and iterations per layer); '
            "pass a larger --max-iter"
        )
    for i, label in enumerate(labels):
        if flow.maps and all(not bool(m[i].any()) for m in flow.maps.values()):
            lines.append(
                f"every NAFlow map of {label} is zero: no feature of the last layer contributes positively to the "
                "explained score (its activations are zero, or the score does not depend on them)"
            )
    return lines


# ---------------------------------------------------------------------------------------- commands
def _parse_target(text: str) -> int | str | None:
    """``auto`` → None, a class index → int, anything else → a class name, resolved once the model is loaded."""
    if text.strip().lower() == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        return text


def _class_index(spec: ModelSpec, target: int | str | None) -> int | None:
    """``--target`` as a class index: a class name is looked up in the weights' categories."""
    if not isinstance(target, str):
        return target
    names = list(spec.class_names or [])
    if not names:
        weights = " (its weights are random: --weights DEFAULT brings trained ones with their names)"
        raise CLIError(
            f"--target {target!r} is a class name, but {spec.name} carries no class names"
            f"{weights if spec.random_weights else ''}: pass a class index"
        )
    folded = [n.casefold() for n in names]
    if target.casefold() in folded:
        return folded.index(target.casefold())
    hint = did_you_mean(target, names)
    raise CLIError(
        f"--target {target!r} is not a class of {spec.name}{hint}; pass a class name, 'auto' or a class index"
    )


_LAYER_SETS = ("all", "conv", "blocks")


def _parse_layers(text: str) -> object:
    """``all``, ``conv`` or ``blocks`` alone (any case, spaces around ignored), else the list of layer names.

    In a list, ``blocks`` or ``conv`` is a layer or module name (timm's EfficientNet has a module ``blocks``).
    """
    items = [t.strip() for t in text.split(",") if t.strip()]
    if len(items) == 1 and items[0].lower() in _LAYER_SETS:
        return items[0].lower()
    return items


def _parse_columns(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 2:
        raise argparse.ArgumentTypeError(f"need a whole number ≥ 2 (the first and the last layer), got {text!r}")
    return value


def _parse_compare(text: str) -> list[str]:
    items = [t.strip().lower() for t in text.split(",") if t.strip() and t.strip().lower() != "none"]
    items = list(dict.fromkeys(items))  # each baseline once
    bad = [t for t in items if t not in ("gradcam", "layercam")]
    if bad:
        raise argparse.ArgumentTypeError(f"--compare takes gradcam, layercam or none, got {', '.join(bad)}")
    return items


def _check_device(device: str) -> str:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise CLIError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "meta":
        raise CLIError("--device meta holds no data, so nothing can be explained on it; use cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    available = getattr(getattr(torch, dev.type, None), "is_available", None)
    if dev.type not in ("cpu", "cuda") and not (callable(available) and available()):
        raise CLIError(f"--device {device}: {dev.type} is not available on this machine; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise CLIError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


MAX_SIZE = 2048
FIGURE_FORMATS = ("png", "pdf", "svg")  # the grid's file types (--figure-format)


_LUMA = (0.299, 0.587, 0.114)


def _parse_floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(t) for t in text.split(","))
    except ValueError:
        values = ()
    if not values or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"need finite numbers separated by commas, e.g. 0.5,0.5,0.5; got {text!r}")
    return values


def with_input(spec: ModelSpec, mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> ModelSpec:
    """``spec`` with its input normalisation checked against the model's channels (raises :class:`CLIError`).

    ``mean``/``std`` (``--mean``/``--std``) replace the spec's, one value for every channel or one
    per channel. The CLI reads RGB images: a model whose first convolution takes 1 channel gets their
    luma, and the spec's 3-channel statistics averaged unless given; other channel counts are refused.

    Example:
        >>> spec = with_input(load_model("shapes"), std=(0.25,))
        >>> spec.channels, spec.std
        (3, (0.25, 0.25, 0.25))
    """
    channels = spec.channels
    if channels not in (1, 3):
        raise CLIError(
            f"{spec.name} takes {channels}-channel input (its first convolution), but the command line reads RGB or "
            "greyscale images; explain it from Python with compile_naflow"
        )
    values = {}
    for name, given, own in (("mean", mean, spec.mean), ("std", std, spec.std)):
        stats = tuple(given) if given is not None else tuple(own)
        if given is None and channels == 1 and len(stats) == 3:
            stats = (sum(stats) / 3,)
        if len(stats) == 1:
            stats = stats * channels
        if len(stats) != channels:
            raise CLIError(
                f"--{name} has {len(stats)} values but {spec.name} takes {channels} channel(s): give one value, or one "
                "per channel"
            )
        values[name] = stats
    if not all(v > 0 for v in values["std"]):
        raise CLIError(f"--std must be positive (it divides the input), got {','.join(map(str, values['std']))}")
    known = spec.known_input or (mean is not None and std is not None)
    return replace(spec, mean=values["mean"], std=values["std"], known_input=known)


def _check_size(size: int) -> int:
    if size < 16:
        raise CLIError(f"--size {size} is too small: pass the input side in pixels, at least 16 (e.g. 224)")
    if size > MAX_SIZE:
        raise CLIError(
            f"--size {size} is too large: at most {MAX_SIZE} (memory grows with the square of the side; "
            "ImageNet models use 224)"
        )
    return size


# formats Pillow registers but only identifies (data formats, video) or reads through Ghostscript
_NOT_IMAGES = frozenset(
    {".h5", ".hdf", ".grib", ".bufr", ".fit", ".fits", ".mpg", ".mpeg", ".eps", ".ps", ".wmf", ".emf"}
)


def image_files(paths: Sequence[str]) -> list[str]:
    """The command's IMAGE arguments, each folder replaced by the image files directly in it, by name.

    In a folder, a file counts as an image by its extension: any format Pillow opens, except those
    it only identifies (HDF5, GRIB, BUFR, FITS, MPEG, WMF/EMF) and PostScript, which needs
    Ghostscript. Hidden files are skipped, and sub-folders are not searched. A folder without
    images is a :class:`CLIError`. A path named twice (also through its folder) is explained once.
    """
    Image = optional("PIL.Image", "reading images")
    known = {e for e, fmt in Image.registered_extensions().items() if fmt in Image.OPEN and e not in _NOT_IMAGES}
    found: dict[str, str] = {}  # the absolute path → the path as named
    for path in paths:
        if not os.path.isdir(path):
            found.setdefault(os.path.abspath(path), path)  # load_images says what is wrong with it, if anything
            continue
        try:
            names = sorted(os.listdir(path), key=lambda n: (n.casefold(), n))
        except OSError as exc:
            why = exc.strerror or exc
            raise CLIError(f"cannot list the folder {path}: {why}; pass the images themselves") from None
        files = [
            os.path.join(path, name)
            for name in names
            if not name.startswith(".")
            and os.path.splitext(name)[1].lower() in known
            and os.path.isfile(os.path.join(path, name))
        ]
        if not files:
            raise CLIError(
                f"the folder {path} holds no image files (.png, .jpg, ... directly in it); pass a folder of images, "
                "or the images themselves"
            )
        for file in files:
            found.setdefault(os.path.abspath(file), file)
    return list(found.values())


def _cmd_explain(args: argparse.Namespace) -> int:
    device = _check_device(args.device)
    options = _solver_options(args) | {k: getattr(args, k) for k in ("fallback", "last_layer") if getattr(args, k)}
    check_out_dir(args.out)
    paths = image_files(args.images)  # before the model, which may take long to load
    spec = with_input(load_model(args.model, args.weights), args.mean, args.std)
    size = _check_size(args.size if args.size is not None else spec.size)
    image_notes: list[str] = []
    images = load_images(paths, size, spec.resize, spec.crop_fraction, image_notes)
    say = (lambda s: None) if args.quiet else print
    if spec.random_weights:
        say(f"note: {spec.name} has random weights; pass --weights DEFAULT (or a file) for trained ones")
    if not spec.known_input:
        stats = f"mean {','.join(f'{v:g}' for v in spec.mean)}, std {','.join(f'{v:g}' for v in spec.std)}"
        grey = "the images' luma, " if spec.channels == 1 else ""
        say(f"note: {spec.name} gets {grey}{stats}; pass --mean and --std if it was trained with other statistics")
    run_explain(
        spec,
        images,
        paths,
        args.out,
        target=_class_index(spec, args.target),
        layers=args.layers,
        compare=args.compare,
        device=device,
        quiet=args.quiet,
        max_columns=args.max_columns,
        solver_options=options,
        figure_format=args.figure_format,
        say=say,
        image_notes=image_notes,
        colorbar=args.colorbar,
    )
    return 0


def _activation_layers(layers: list[str]) -> list[str]:
    """The demo grid's columns: every ReLU output and pooling layer (the layers a reader tracks)."""
    keep = [n for n in layers if n.split(".")[-1].split("#")[0] in ("relu", "maxpool", "avgpool")]
    return keep or layers


def _cmd_demo(args: argparse.Namespace) -> int:
    from .data.shapes import CLASSES, sample_paths, samples
    from .zoo.shapes import weights_info

    device = _check_device(args.device)
    options = _solver_options(args)
    check_out_dir(args.out)
    spec = load_model("shapes")
    paths = sample_paths()[: args.images]
    images = load_images(paths, spec.size, spec.resize)
    names = [os.path.basename(p) for p in paths]  # the bundled files: their names, not where they are installed
    say = (lambda s: None) if args.quiet else print
    info = weights_info()
    say(f"embedded model: shapes ResNet, held-out accuracy {info['held_out_accuracy']:.1%} ({', '.join(CLASSES)})")
    result = run_explain(
        spec,
        images,
        names,
        args.out,
        layers=args.layers,
        compare=["gradcam"],
        device=device,
        quiet=args.quiet,
        max_columns=args.max_columns,
        solver_options=options,
        grid_layers=None if args.all_columns else _activation_layers,
        dpi=100,  # the README figure: about 1.3k × 1k pixels, under 2 MB
        gif_size=128,
        figure_format=args.figure_format,
        say=say,
        colorbar=args.colorbar,
    )
    from .metrics import mask_energy

    masks = samples().masks[: args.images].to(result["flow"].output.device)
    table = mask_energy([result["flow"], *result["baselines"]], masks)
    say("\nshare of each map's mass on the object (ground-truth mask), mean over the images:")
    say(table)
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from . import compile_naflow

    spec = with_input(load_model(args.model, args.weights))
    size = _check_size(args.size if args.size is not None else spec.size)
    shape = (1, spec.channels, size, size)
    nf = compile_naflow(spec.model, shape, fallback=args.fallback, last_layer=args.last_layer)
    plan = nf.plan
    nodes = {n.name: n for n in nf.graph_module.graph.nodes}
    lines = [f"{spec.name} at {size}x{size}: {len(plan.stages)} stages, last layer {nf.last_layer!r}\n"]
    if nf.fixed_shape is not None:
        why = f"the forward computes with the input's shape ({nf.fixed_shape[1]})"
        lines.insert(1, f"traced for {size}x{size} inputs only: {why}\n")
    rows = []
    for s in plan.stages:
        step = nodes[s.output].meta["naflow.inverse"]
        name = nodes[s.output].meta.get("naflow.name", s.output)
        src = nodes[s.input].meta.get("naflow.name", s.input)
        rows.append((s.index, "region" if s.is_region else "op", src, name, step.rule_name))
    width = max([24, *(len(r[2]) for r in rows), *(len(r[3]) for r in rows)])  # long names widen the columns
    lines.append(f"{'stage':>5} {'kind':<7} {'input':<{width}} {'output':<{width}} inverse")
    lines += [f"{i:>5} {kind:<7} {src:<{width}} {name:<{width}} {rule}" for i, kind, src, name, rule in rows]
    lines += ["", nf.layer_table()]
    if not args.no_code:
        lines += ["\n# generated inverse network (nf.inverse.code):", nf.inverse.code]
    _write_stdout("\n".join(lines) + "\n")
    return 0


def _write_stdout(text: str) -> None:
    """Print ``text``: a reader that stops early (``naflow inspect ... | head``) is not an error; a full disk is."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
    except OSError as exc:
        _silence_stdout()
        raise CLIError(
            f"cannot write to standard output ({exc.strerror or exc}); redirect it to a writable file"
        ) from None


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that Python's flush at exit does not fail again on the closed pipe."""
    try:
        fd = sys.stdout.fileno()
        devnull = os.open(os.devnull, os.O_WRONLY)
    except (AttributeError, OSError, ValueError):  # no real file descriptor (e.g. captured in tests)
        return
    os.dup2(devnull, fd)
    os.close(devnull)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        required=True,
        help="torchvision model name, 'shapes' (embedded), module:callable, or a file saved with torch.save(model)",
    )
    p.add_argument("--weights", help="torchvision weights enum (DEFAULT, IMAGENET1K_V1, ...) or a state-dict file")
    p.add_argument("--size", type=int, default=None, help="input side in pixels (default: the model's, 224 or 96)")
    p.add_argument(
        "--fallback",
        choices=("linearize",),
        default=None,
        help="invert ops without an inverse rule through their linearisation (slower; help(naflow_fx.compile_naflow))",
    )
    p.add_argument(
        "--last-layer",
        metavar="NAME",
        default=None,
        help="the last feature layer to explain from, a layer or module name (default: the deepest 4-D layer "
        "before global pooling; 'naflow inspect' lists them)",
    )


def _add_run_args(p: argparse.ArgumentParser, out: str) -> None:
    p.add_argument(
        "--layers",
        type=_parse_layers,
        default="all",
        help="all, conv, blocks or comma-separated layer or module names (a block such as layer4.2 gives its output)",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--out", default=out, help=f"output folder (default {out})")
    p.add_argument(
        "--max-columns", type=_parse_columns, default=24, help="layers shown in the grid at most, ≥ 2 (default 24)"
    )
    p.add_argument(
        "--figure-format",
        choices=FIGURE_FORMATS,
        default="png",
        help="the grid's file type: png, or pdf or svg (vector) for papers (default png)",
    )
    p.add_argument(
        "--colorbar", action="store_true", help="show the colormap's scale beside the grid (each map min-max scaled)"
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar and no messages")
    solve = p.add_argument_group("solver options (compile_naflow's: help(naflow_fx.compile_naflow))")
    defaults = SolverConfig()
    solve.add_argument(
        "--damping",
        type=float,
        default=defaults.damping,
        help=f"Tikhonov damping relative to σ_max(J), 0 = exact pseudo-inverse (default {defaults.damping:g}); "
        "it changes the shallow layers' maps",
    )
    solve.add_argument(
        "--solver",
        choices=("auto", "dense", "iterative"),
        default=defaults.solver,
        help=f"dense SVD, CGLS, or auto: dense for small Jacobians (default {defaults.solver})",
    )
    solve.add_argument("--tol", type=float, default=defaults.tol, help=f"CGLS tolerance (default {defaults.tol:g})")
    solve.add_argument(
        "--max-iter", type=int, default=defaults.max_iter, help=f"CGLS iteration cap (default {defaults.max_iter})"
    )


def _solver_options(args: argparse.Namespace) -> dict:
    """The solver options of ``args`` as ``compile_naflow`` keywords, checked before any work is done."""
    options = {"solver": args.solver, "damping": args.damping, "tol": args.tol, "max_iter": args.max_iter}
    try:
        SolverConfig(**options)
    except ConfigError as exc:
        message = str(exc)
        name = message.split()[0] if message else ""
        if name in options:  # "max_iter must be ..." → "--max-iter must be ..."
            message = f"--{name.replace('_', '-')}{message[len(name) :]}"
        raise CLIError(message) from None
    return options


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors, like the CLI's other errors (``naflow: error: ...``, exit 2)."""

    argv: list[str] = []  # the command line being parsed, for error()'s hint about files named like options

    def error(self, message: str):  # type: ignore[override]
        argv = _Parser.argv[: _Parser.argv.index("--")] if "--" in _Parser.argv else _Parser.argv
        dashed = [a for a in argv if len(a) > 1 and a.startswith("-") and os.path.isfile(a)]
        if dashed:
            message += f"; {dashed[0]} is a file read as an option: write ./{dashed[0]}, or put the images after --"
        self.exit(2, f"naflow: error: {message} (see '{self.prog} --help')\n")

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        """As argparse's, but an unknown option is reported by its command's parser, which names its help."""
        args = list(sys.argv[1:] if args is None else args)  # once: an iterator is read here, not twice
        _Parser.argv = [str(a) for a in args]
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            commands = getattr(self, "commands", {})  # set by build_parser: command name → its parser
            where = commands.get(getattr(parsed, "command", None), self)
            where.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="naflow",
        description="Layer-by-layer NAFlow explanations of CNNs.",
        epilog="run 'naflow COMMAND --help' for each command's options and examples",
    )
    parser.add_argument("--version", action="version", version=f"naflow {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = argparse.RawDescriptionHelpFormatter
    demo = sub.add_parser(
        "demo",
        help="explain the embedded shapes ResNet on bundled images (grid vs Grad-CAM, GIF, .npz)",
        description="Explain the embedded shapes ResNet on bundled sample images: writes flow_grid.png "
        "(NAFlow against Grad-CAM; .pdf or .svg with --figure-format), flow.gif and the maps as .npz with JSON "
        "sidecars.",
        epilog=_EPILOG_DEMO,
        formatter_class=fmt,
    )
    demo.add_argument("--images", type=int, default=4, choices=range(1, 11), metavar="N", help="images, 1-10 (4)")
    demo.add_argument(
        "--all-columns",
        action="store_true",
        help="grid columns spread over all layers (--max-columns) instead of the ReLU and pooling outputs",
    )
    _add_run_args(demo, "naflow-demo")
    demo.set_defaults(func=_cmd_demo)
    explain = sub.add_parser(
        "explain",
        help="explain image files with a model",
        description="Explain image files: writes flow_grid.png (.pdf or .svg with --figure-format), flow.gif and "
        "the maps as .npz with JSON sidecars.",
        epilog=_EPILOG_EXPLAIN,
        formatter_class=fmt,
    )
    explain.add_argument(
        "images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ...) or folders of them (in name order)"
    )
    _add_model_args(explain)
    explain.add_argument(
        "--target",
        type=_parse_target,
        default=None,
        help="auto (argmax, default), a class index, or a class name of the weights (e.g. 'tiger cat')",
    )
    explain.add_argument(
        "--mean",
        type=_parse_floats,
        default=None,
        help="input mean after scaling pixels to [0, 1]: one value or one per channel (default: the model's; "
        "ImageNet's for your own models)",
    )
    explain.add_argument("--std", type=_parse_floats, default=None, help="input standard deviation, like --mean")
    explain.add_argument(
        "--compare", type=_parse_compare, default=["gradcam"], help="baselines: gradcam, layercam, none (gradcam)"
    )
    _add_run_args(explain, "naflow-out")
    explain.set_defaults(func=_cmd_explain)
    insp = sub.add_parser(
        "inspect",
        help="print the stages, inverse rules and generated inverse network of a model",
        description="Print the stage and region table, the inverse rule of every node, the layer table and the "
        "generated inverse network's code.",
        epilog=_EPILOG_INSPECT,
        formatter_class=fmt,
    )
    _add_model_args(insp)
    insp.add_argument("--no-code", action="store_true", help="do not print the generated code")
    insp.set_defaults(func=_cmd_inspect)
    parser.commands = {"demo": demo, "explain": explain, "inspect": insp}
    return parser


def _version() -> str:
    """The package's version: ``naflow_fx.__version__``, else the installed distribution's."""
    known = getattr(sys.modules.get(__package__ or "naflow_fx"), "__version__", None)
    if known:
        return str(known)
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("naflow_fx")
    except PackageNotFoundError:
        return "unknown"


# The library's advice names compile_naflow's keywords; on the command line, its options (or, where it has none,
# the Python API). Applied in order to every error message the CLI prints.
_ADVICE = (
    (
        re.compile(r"compile_naflow\(\.\.\., leaf_modules=\[ThatModule\], fallback='linearize'\)"),
        'compile_naflow(..., leaf_modules=[ThatModule], fallback="linearize") from Python (the command line has '
        "--fallback linearize but cannot mark leaf modules)",
    ),
    (re.compile(r"compile_naflow\(\.\.\., fallback='linearize'\)"), "--fallback linearize"),
    (
        re.compile(r"compile_naflow\(\.\.\., leaf_modules=\[TheModuleClass or 'its\.qualified\.name'\]\)"),
        "compile_naflow(..., leaf_modules=[...]) from Python",
    ),
    (re.compile(r"concrete_args=\{'flag': value\}"), "concrete_args={'flag': value} from Python"),
    (re.compile(r"fallback='linearize'"), "--fallback linearize"),
    (re.compile(r"\(compile_naflow\(\.\.\., last_layer=(<[^>]*>)\)\)"), r"(--last-layer \1)"),
    (re.compile(r"pass last_layer='<layer name>'"), "pass --last-layer NAME"),
    (re.compile(r"last_layer=('[^']*'|\"[^\"]*\")"), r"--last-layer \1"),
    (
        re.compile(
            r"Pass an example input the model accepts \(its channels, and a size large enough for its "
            r"downsampling\)\."
        ),
        "Pass a --size the model accepts (large enough for its downsampling, e.g. 224).",
    ),
    (
        re.compile(r"Pass an example of the size the model is used at, e\.g\. \(1, 3, 224, 224\) \(.*?\)\."),
        "Pass a larger --size, the size the model is used at (e.g. 224).",
    ),
    (re.compile(r"target=None means the argmax class"), "--target auto (the default) means the argmax class"),
    (
        re.compile(r"Pass a callable target(, e\.g\. .*?\.| ?\(output\) -> Tensor\[B\] instead\.)(?= |$)"),
        "The command line explains classifiers only; for other outputs use the Python API: compile_naflow with a "
        "callable target(output) -> Tensor[B] (one score per image).",
    ),
    (re.compile(r"^layers is empty:"), "--layers is empty:"),
    (re.compile(r"^((?:layer|module) '[^']*'.*? is not an explainable layer)"), r"--layers: \1"),
)


def _cli_advice(message: str) -> str:
    """``message`` with its Python-API advice (``fallback='linearize'``, ``last_layer=``, ...) as CLI options."""
    for pattern, replacement in _ADVICE:
        message = pattern.sub(replacement, message)
    return message


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``naflow`` console script."""
    strict = [
        s for s in (sys.stdout, sys.stderr) if hasattr(s, "reconfigure") and getattr(s, "errors", None) == "strict"
    ]
    for stream in strict:  # help and messages use σ, ×, ≥: never crash on an ASCII terminal
        stream.reconfigure(errors="replace")
    try:
        return _main(argv)
    finally:  # main() called in a caller's process (tests, a notebook): its streams as they were
        for stream in strict:
            stream.reconfigure(errors="strict")


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    # a command draws files only: no GUI backend, unless matplotlib is already set up (a session's stays)
    backend = "matplotlib" not in sys.modules and "MPLBACKEND" not in os.environ
    if backend:
        os.environ["MPLBACKEND"] = "Agg"
    try:
        with warnings.catch_warnings():
            if getattr(args, "quiet", False):
                # no third-party chatter (torchvision's FutureWarnings, ...); naflow_fx's NumericalWarning, a
                # numerical problem with the result, stays visible
                warnings.simplefilter("ignore")
                warnings.simplefilter("default", NumericalWarning)
            return int(args.func(args) or 0)
    except (CLIError, NAFlowError) as exc:
        first, *rest = _cli_advice(str(exc)).splitlines() or [type(exc).__name__]
        print("\n".join([f"naflow: error: {first}", *(f"  {line}" for line in rest if line.strip())]), file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # results are written all at once at the end, or not at all
        print("naflow: interrupted; no result file was written or changed", file=sys.stderr)
        return 130
    finally:
        if backend:
            os.environ.pop("MPLBACKEND", None)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

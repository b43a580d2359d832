"""Save per-layer maps: an ``.npz`` keyed by layer name plus a JSON sidecar that says what they are.

``save_maps(result, "out/maps.npz", ...)`` writes ``out/maps.npz`` (one ``float32 [B, h, w]``
array per layer, at the layer's own resolution) and ``out/maps.json`` (model, method, target,
score and, for class targets, the predicted class per sample, layers with their shapes, and
for NAFlow the solver diagnostics of every inverse step). ``load_maps`` reads them back.

Everything is checked and the sidecar is serialised before anything is written; then both files
are written atomically, so a bad argument or a failed write leaves no file and no temporary
behind. The sidecar is strict JSON: a non-finite number (NaN, ±inf, e.g. the score of a sample
whose output was NaN) is written as ``null`` and read back as ``None``.

Example:
    >>> import tempfile, torch
    >>> from naflow_fx import compile_naflow
    >>> nn = torch.nn
    >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2))
    >>> nf = compile_naflow(model.eval(), (1, 3, 8, 8), last_layer="1")
    >>> flow = nf(torch.rand(2, 3, 8, 8))
    >>> folder = tempfile.mkdtemp()
    >>> npz, sidecar = save_maps(flow, f"{folder}/maps.npz", model="tiny", class_names=["no", "yes"])
    >>> maps, meta = load_maps(npz)
    >>> maps["0"].shape, meta["method"], meta["model"], len(meta["samples"])
    ((2, 6, 6), 'naflow', 'tiny', 2)
"""

from __future__ import annotations

import json
import math
import os
import zipfile
import zlib
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from numpy.lib import format as npy_format

from ._io import atomic_write_all, check_parent
from .errors import InputError, InputTypeError
from .result import FlowResult, LayerMaps, check_layer_maps

__all__ = ["save_maps", "load_maps", "sidecar_path", "summary"]

FORMAT = "naflow_fx maps v1"
_WRITTEN_BY = "was it written by naflow_fx.export.save_maps?"


def sidecar_path(npz_path: str | os.PathLike[str]) -> str:
    """``out/maps.npz`` → ``out/maps.json`` (any other name: its extension replaced by ``.json``)."""
    path = os.fspath(npz_path)
    root = path[: -len(".npz")] if path.endswith(".npz") else os.path.splitext(path)[0]
    return root + ".json"


def _finite_or_none(value):
    """``value`` with every non-finite float (NaN, ±inf) replaced by ``None``, in dicts and lists too."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def _json_text(value, what: str) -> str:
    """Strict JSON (no NaN) for ``value``, or an :class:`InputTypeError` naming ``what`` is not serialisable."""
    try:
        return json.dumps(_finite_or_none(value), indent=2, allow_nan=False) + "\n"
    except (TypeError, ValueError) as exc:
        raise InputTypeError(
            f"save_maps: {what} is not JSON-serialisable ({exc}); use plain str, int, float, bool, None, "
            "lists and dicts with str keys (e.g. float(x) or array.tolist() for numpy and torch values)"
        ) from None


def _check_images(images, batch: int, caller: str) -> list | None:
    if images is None:
        return None
    if isinstance(images, (str, bytes)) or not isinstance(images, Sequence):
        raise InputTypeError(
            f"{caller}: images must be a list with one label per sample (e.g. the image file names), "
            f"got {type(images).__name__}"
        )
    if len(images) != batch:
        raise InputError(
            f"{caller}: images has {len(images)} label(s) but the result has {batch} sample(s); "
            "pass one label per sample, in batch order"
        )
    return list(images)


def summary(
    result: LayerMaps,
    *,
    model: str = "",
    class_names: Sequence[str] | None = None,
    images: Sequence[str | os.PathLike[str]] | None = None,
    extra: Mapping[str, object] | None = None,
) -> dict:
    """The JSON-ready description of ``result`` that :func:`save_maps` writes as the sidecar.

    ``model``, ``class_names``, ``images`` and ``extra`` are those of :func:`save_maps`: the
    model's name, class index → name, one label per sample, and more fields.

    Raises :class:`~naflow_fx.errors.InputTypeError` if ``result`` is not a result, ``images`` is
    not a list or ``extra`` not a dict, and :class:`~naflow_fx.errors.InputError` if ``images``
    does not have one label per sample or ``extra`` reuses a field this function writes.
    """
    return _summary(result, model, class_names, images, extra, "summary")


def _summary(result, model, class_names, images, extra, caller: str) -> dict:
    check_layer_maps(result, caller)
    output = result.output.detach().float().cpu()
    images = _check_images(images, output.shape[0], caller)
    if extra is not None and not isinstance(extra, Mapping):
        raise InputTypeError(f"{caller}: extra must be a dict of more sidecar fields, got {type(extra).__name__}")
    samples = []
    for b in range(output.shape[0]):
        row: dict = {"index": b}
        if images is not None:  # a path (Path, os.DirEntry) by its path, anything else by its str
            row["image"] = os.fsdecode(images[b]) if isinstance(images[b], os.PathLike) else str(images[b])
        if result.classes is not None:
            t = int(result.classes[b])
            row["target"] = t
            if class_names is not None and 0 <= t < len(class_names):
                row["target_name"] = class_names[t]
        row["score"] = float(result.scores[b])
        if output.dim() == 2 and result.classes is not None:  # logits; an embedding's argmax is no class
            probs = torch.softmax(output[b], 0)
            p = int(output[b].argmax())
            row["predicted"] = p
            if class_names is not None and 0 <= p < len(class_names):
                row["predicted_name"] = class_names[p]
            row["predicted_logit"] = float(output[b, p])
            row["predicted_probability"] = float(probs[p])
        samples.append(row)
    meta = {
        "format": FORMAT,
        "model": model,
        "method": result.method,
        "input_size": list(result.input_size),
        "layers": [{"name": n, "shape": list(result.maps[n].shape[1:])} for n in result.layers],
        "samples": samples,
    }
    if isinstance(result, FlowResult):
        meta["diagnostics"] = [
            {
                "inverse_of": r.layer,
                "rule": r.rule,
                "method": r.method,
                "iterations": r.iterations,
                "residual": r.residual,
                "converged": r.converged,
                "damping": r.damping,
                "seconds": round(r.seconds, 4),
            }
            for r in result.diagnostics.values()
        ]
    from . import __version__

    meta["naflow_fx"] = __version__
    if extra:
        clash = sorted(str(k) for k in extra if k in meta)
        if clash:
            raise InputError(
                f"{caller}: extra field(s) {clash} would overwrite what the sidecar records itself "
                f"({', '.join(meta)}); rename them"
            )
        meta.update(extra)
    return meta


def _members(layers: Sequence[str]) -> dict[str, str]:
    """Layer name → its ``.npz`` member ``name + ".npy"``, or a library error for a name a zip cannot hold."""
    members = {}
    for name in layers:
        if not isinstance(name, str):
            raise InputTypeError(f"save_maps: layer names must be str, got {type(name).__name__} {name!r}")
        member = name + ".npy"
        try:
            size = len(member.encode("utf-8"))
        except UnicodeEncodeError:
            size = None
        if size is None:
            why = "is not valid Unicode text (it holds a lone surrogate)"
        elif size > 0xFFFF:
            why = "is longer than the 65535 bytes of a zip member name"
        elif "\0" in name:
            why = "holds a NUL character, where zip readers cut the name"
        elif "\\" in name:
            why = "holds a backslash, which zip readers on Windows turn into '/'"
        else:
            why = ""
        if why:
            raise InputError(
                f"save_maps: layer name {name[:60]!r} {why}, so the .npz cannot hold it; rename the layer "
                "(its entries in result.layers and result.maps) before saving"
            )
        members[name] = member
    return members


def _npz_path(path) -> str:
    """The ``.npz`` path ``save_maps`` writes for ``path``, after checking it can be a file."""
    if not isinstance(path, (str, os.PathLike)):
        raise InputTypeError(f"save_maps: path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fsdecode(path)
    if path.lower().endswith(".json"):
        raise InputError(
            f"save_maps: {path} names the sidecar; pass the .npz path ({path[: -len('.json')]}.npz), and the "
            "sidecar is written next to it under the same name with .json"
        )
    if not path.lower().endswith(".npz"):
        path += ".npz"
    if not os.path.basename(path[: -len(".npz")]):
        raise InputError(
            f"save_maps: path {path!r} has no file name, only the extension; pass a file path such as "
            f"{os.path.join(os.path.dirname(path) or '.', 'maps.npz')!r}"
        )
    if os.path.isdir(path):
        raise InputError(f"save_maps: {path} is a folder; pass a file path such as {os.path.join(path, 'maps.npz')}")
    if os.path.isdir(sidecar_path(path)):
        raise InputError(f"save_maps: the sidecar {sidecar_path(path)} of {path} is a folder; choose another name")
    check_parent(path, "save_maps")
    return path


def save_maps(
    result: LayerMaps,
    path: str | os.PathLike[str],
    *,
    model: str = "",
    class_names: Sequence[str] | None = None,
    images: Sequence[str | os.PathLike[str]] | None = None,
    extra: Mapping[str, object] | None = None,
) -> tuple[str, str]:
    """Write ``result``'s maps to ``path`` (``.npz``) and the sidecar next to it (``.json``).

    Args:
        result: a flow (:class:`~naflow_fx.FlowResult`) or a baseline (:class:`~naflow_fx.LayerMaps`).
        path: the ``.npz`` file (``.npz`` is appended if missing); the sidecar is the same path with
            ``.json``. Missing folders are created.
        model: the model's name, recorded in the sidecar.
        class_names: class index → name, to name the target and predicted classes.
        images: one label per sample (e.g. the image files), recorded in the sidecar.
        extra: more JSON-serialisable fields for the sidecar (not the names of the fields it
            records itself). Non-finite floats in it are written as ``null``, like the rest.

    Returns:
        ``(npz_path, json_path)``.

    Raises:
        InputTypeError: ``result`` is not a result, ``path`` not a path, ``images`` not a list,
            ``extra`` not a dict or not JSON-serialisable, a layer name not a str.
        InputError: ``images`` has the wrong length, ``extra`` reuses a recorded field, ``path``
            has no file name, is a folder or lies under a file, or either file is a device, a pipe
            or read-only (a symbolic link is written through), or a layer name cannot be a zip
            member name (a NUL or backslash, a lone surrogate, over 65535 bytes).
        OSError: the files could not be written (e.g. no permission, disk full); the error names
            the file, and neither file is left half-written.

    Each layer's map is the member ``NAME.npy`` of the ``.npz``, so ``np.load(path)[name]`` reads it too.

    All checks run and the sidecar is serialised before anything is written, so a bad argument
    leaves no file behind. Both files are fully written to temporaries before either replaces an
    old one; if the second cannot replace its old file, the first is put back, so the pair always
    belongs together; and no temporary file is ever left.

    Example:
        >>> import tempfile, torch
        >>> from naflow_fx import LayerMaps
        >>> cam = LayerMaps(["conv"], {"conv": torch.ones(1, 2, 2)}, torch.tensor([[0.0, float("nan")]]),
        ...                 torch.tensor([float("nan")]), None, (8, 8), "gradcam")
        >>> npz, sidecar = save_maps(cam, tempfile.mkdtemp() + "/cam")  # ".npz" is appended
        >>> npz.endswith("cam.npz"), sidecar.endswith("cam.json"), load_maps(npz)[1]["samples"][0]["score"]
        (True, True, None)
        >>> save_maps(cam, npz, extra={"when": object()})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        naflow_fx.errors.InputTypeError: save_maps: extra['when'] is not JSON-serialisable (...
    """
    path, side, files = maps_files(result, path, model=model, class_names=class_names, images=images, extra=extra)
    try:  # both files, or neither: a sidecar must never describe other maps
        atomic_write_all(files)
    except InputError as exc:  # a target that is a device, a pipe or read-only
        raise InputError(f"save_maps: {exc}") from None
    except OSError as exc:  # name the user's file, not the hidden temporary one
        error = user_file_error(exc, side, path)
        if error is exc:
            raise
        raise error from exc
    return path, side


def maps_files(
    result: LayerMaps,
    path: str | os.PathLike[str],
    *,
    model: str = "",
    class_names: Sequence[str] | None = None,
    images: Sequence[str | os.PathLike[str]] | None = None,
    extra: Mapping[str, object] | None = None,
) -> tuple[str, str, list[tuple[str, Callable[[str], None]]]]:
    """What :func:`save_maps` writes, checked and serialised but not yet written.

    Returns ``(npz_path, json_path, files)``, ``files`` as :func:`~naflow_fx._io.atomic_write_all`
    takes them: to write them together with other files (the CLI's outputs, all or none).
    """
    meta = _summary(result, model, class_names, images, extra, "save_maps")
    members = _members(result.layers)
    for key, value in (extra or {}).items():  # name the culprit before serialising the whole sidecar
        _json_text({key: value}, f"extra[{key!r}]")
    text = _json_text(meta, "the sidecar (model, class_names or images)")
    path = _npz_path(path)
    side = sidecar_path(path)
    arrays = {members[name]: result.maps[name].detach().float().cpu().numpy() for name in result.layers}

    def write_npz(tmp: str) -> None:
        # what np.savez_compressed writes, but with each member named exactly NAME.npy: savez takes
        # names as keyword arguments, so it fails on "file" and drops "allow_pickle"
        with open(tmp, "wb") as fh, zipfile.ZipFile(fh, "w", zipfile.ZIP_DEFLATED, allowZip64=True) as zf:
            for member, array in arrays.items():
                with zf.open(member, "w", force_zip64=True) as out:
                    npy_format.write_array(out, array, allow_pickle=False)

    def write_sidecar(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    return path, side, [(side, write_sidecar), (path, write_npz)]


def user_file_error(exc: OSError, *paths: str) -> OSError:
    """``exc`` of :func:`~naflow_fx._io.atomic_write_all` about ``paths``, naming the user's file
    rather than its hidden temporary (``exc`` itself when it carries no errno)."""
    if exc.errno is None:
        return exc
    return OSError(exc.errno, exc.strerror, _user_file(exc, *paths))


def _user_file(exc: OSError, *paths: str) -> str:
    """Which of ``paths`` an error of :func:`~naflow_fx._io.atomic_write_all` is about (its temporaries are hidden)."""
    for name in (exc.filename2, exc.filename):
        base = os.path.basename(os.fspath(name)) if name else ""
        for path in paths:
            if base == os.path.basename(path) or base.startswith(f".{os.path.basename(path)}."):
                return path
    return paths[-1]


def _bad_file(path: str, problem: str, todo: str = _WRITTEN_BY) -> InputError:
    return InputError(f"load_maps: {path} {problem}; {todo}")


def _read_npz(path: str) -> dict[str, np.ndarray]:
    if not os.path.exists(path):
        raise _bad_file(path, "does not exist", "check the path (save_maps writes NAME.npz and NAME.json)")
    if os.path.isdir(path):
        raise _bad_file(path, "is a folder", "pass the .npz file that save_maps wrote in it")
    try:
        with open(path, "rb") as fh:
            head = fh.read(6)
    except OSError as exc:
        raise _bad_file(path, f"cannot be read ({exc.strerror or exc})", "check its permissions") from None
    if head.startswith(b"\x93NUMPY"):
        raise _bad_file(path, "is a single .npy array, not the .npz archive of maps save_maps writes")
    if not head.startswith(b"PK"):
        raise _bad_file(path, "is empty, not an .npz archive" if not head else "is not an .npz archive")
    # each layer from its exact member NAME.npy: np.load's data["a.npy"] would read member a.npy (the
    # layer "a"), not a.npy.npy
    try:
        with zipfile.ZipFile(path) as zf:
            maps = {}
            for info in zf.infolist():
                if info.filename.endswith(".npy"):
                    with zf.open(info) as fh:
                        maps[info.filename[: -len(".npy")]] = npy_format.read_array(fh, allow_pickle=False)
            return maps
    except (
        zipfile.BadZipFile,
        ValueError,
        OSError,
        EOFError,
        KeyError,
        zlib.error,
        NotImplementedError,  # a compression method zipfile does not know
        RuntimeError,  # an encrypted member
    ) as exc:
        raise _bad_file(path, f"is a damaged or foreign .npz archive ({type(exc).__name__}: {exc})") from None


def _read_sidecar(path: str, side: str) -> dict:
    if not os.path.exists(side):
        raise InputError(
            f"load_maps: {path} has no sidecar {side}; save_maps writes both files side by side - "
            "keep or copy the .json together with the .npz"
        )
    try:
        with open(side, encoding="utf-8") as fh:
            meta = json.load(fh, parse_constant=lambda _name: None)  # NaN / Infinity of older files → None
    except json.JSONDecodeError as exc:
        raise _bad_file(side, f"is not valid JSON ({exc})") from None
    except UnicodeDecodeError:
        raise _bad_file(side, "is not a UTF-8 text file") from None
    except OSError as exc:
        raise _bad_file(side, f"cannot be read ({exc.strerror or exc})", "check the path and its permissions") from None
    found = meta.get("format") if isinstance(meta, dict) else None
    if found != FORMAT:
        if isinstance(found, str) and found.startswith("naflow_fx maps"):
            raise _bad_file(side, f"has format {found!r}, not {FORMAT!r}", "read it with the naflow_fx that wrote it")
        raise _bad_file(side, f'is not a naflow_fx maps sidecar (no "format": {FORMAT!r})')
    layers = meta.get("layers")
    if not isinstance(layers, list) or not all(
        isinstance(la, dict) and isinstance(la.get("name"), str) for la in layers
    ):
        raise _bad_file(side, 'has no valid "layers" list (one {"name": ..., "shape": ...} per layer)')
    return meta


def load_maps(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], dict]:
    """Read what :func:`save_maps` wrote: ``(maps by layer name, sidecar dict)``.

    The maps come in the sidecar's layer order; a number that was not finite when saved is ``None``
    in the sidecar dict (the same for sidecars of older versions, which wrote a bare ``NaN``).

    Raises:
        InputTypeError: ``path`` is not a str or os.PathLike.
        InputError: the ``.npz`` or its ``.json`` sidecar is missing, unreadable, not what
            save_maps writes, or the two do not match (a layer of the sidecar is missing from the
            ``.npz`` or has another shape); the message names the file and what to do.

    Example:
        >>> import tempfile
        >>> load_maps(tempfile.mkdtemp() + "/none.npz")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        naflow_fx.errors.InputError: load_maps: .../none.npz does not exist; check the path (...)
    """
    if not isinstance(path, (str, os.PathLike)):
        raise InputTypeError(f"load_maps: path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fsdecode(path)
    maps = _read_npz(path)
    side = sidecar_path(path)
    meta = _read_sidecar(path, side)
    order = [layer["name"] for layer in meta["layers"]]
    missing = [k for k in order if k not in maps]
    if missing:
        raise InputError(
            f"load_maps: {side} lists layer(s) {missing} that {path} does not hold (it has {sorted(maps)}); "
            "the two files do not belong together - use the .npz and .json of one save_maps call"
        )
    samples = meta.get("samples")
    for layer in meta["layers"]:
        shape, array = layer.get("shape"), maps[layer["name"]]
        if isinstance(samples, list) and array.ndim and array.shape[0] != len(samples):
            raise InputError(
                f"load_maps: layer {layer['name']!r} holds {array.shape[0]} sample(s) in {path} but {side} describes "
                f"{len(samples)}; the two files do not belong together - use the .npz and .json of one save_maps call"
            )
        if isinstance(shape, list) and list(array.shape[1:]) != shape:
            raise InputError(
                f"load_maps: layer {layer['name']!r} has shape {list(array.shape[1:])} in {path} but {shape} in "
                f"{side}; the two files do not belong together - use the .npz and .json of one save_maps call"
            )
    return {k: maps[k] for k in order}, meta

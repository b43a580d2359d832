"""Save per-layer maps: an ``.npz`` keyed by layer name plus a JSON sidecar that says what they are.

``save_maps(result, "out/maps.npz", ...)`` writes ``out/maps.npz`` (one ``float32 [B, h, w]``
array per layer, at the layer's own resolution) and ``out/maps.json`` (model, method, target,
predicted class and score per sample, layers with their shapes, and for NAFlow the solver
diagnostics of every inverse step). Both files are written atomically. ``load_maps`` reads them back.

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
import os
from collections.abc import Sequence

import numpy as np
import torch

from ._io import atomic_write, atomic_write_text
from .result import FlowResult, LayerMaps

__all__ = ["save_maps", "load_maps", "sidecar_path", "summary"]


def sidecar_path(npz_path: str | os.PathLike) -> str:
    """``out/maps.npz`` → ``out/maps.json``."""
    root, _ = os.path.splitext(os.fspath(npz_path))
    return root + ".json"


def summary(
    result: LayerMaps,
    *,
    model: str = "",
    class_names: Sequence[str] | None = None,
    images: Sequence[str] | None = None,
    extra: dict | None = None,
) -> dict:
    """The JSON-ready description of ``result`` that :func:`save_maps` writes as the sidecar."""
    output = result.output.detach().float().cpu()
    samples = []
    for b in range(output.shape[0]):
        row: dict = {"index": b}
        if images is not None:
            row["image"] = str(images[b])
        if result.classes is not None:
            t = int(result.classes[b])
            row["target"] = t
            if class_names is not None and 0 <= t < len(class_names):
                row["target_name"] = class_names[t]
        row["score"] = float(result.scores[b])
        if output.dim() == 2:
            probs = torch.softmax(output[b], 0)
            p = int(output[b].argmax())
            row["predicted"] = p
            if class_names is not None and 0 <= p < len(class_names):
                row["predicted_name"] = class_names[p]
            row["predicted_logit"] = float(output[b, p])
            row["predicted_probability"] = float(probs[p])
        samples.append(row)
    meta = {
        "format": "naflow_fx maps v1",
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
        meta.update(extra)
    return meta


def save_maps(
    result: LayerMaps,
    path: str | os.PathLike,
    *,
    model: str = "",
    class_names: Sequence[str] | None = None,
    images: Sequence[str] | None = None,
    extra: dict | None = None,
) -> tuple[str, str]:
    """Write ``result``'s maps to ``path`` (``.npz``) and the sidecar next to it (``.json``).

    Args:
        result: a flow (:class:`~naflow_fx.FlowResult`) or a baseline (:class:`~naflow_fx.LayerMaps`).
        path: the ``.npz`` file; the sidecar is the same path with ``.json``.
        model: the model's name, recorded in the sidecar.
        class_names: class index → name, to name the target and predicted classes.
        images: one label per sample (e.g. the image files), recorded in the sidecar.
        extra: more JSON-serialisable fields for the sidecar.

    Returns:
        ``(npz_path, json_path)``.
    """
    path = os.fspath(path)
    if not path.endswith(".npz"):
        path += ".npz"
    arrays = {name: result.maps[name].detach().float().cpu().numpy() for name in result.layers}
    meta = summary(result, model=model, class_names=class_names, images=images, extra=extra)
    atomic_write(path, lambda tmp: np.savez_compressed(tmp, **arrays))  # tmp ends in .npz: numpy keeps the name
    side = sidecar_path(path)
    atomic_write_text(side, json.dumps(meta, indent=2) + "\n")
    return path, side


def load_maps(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """Read what :func:`save_maps` wrote: ``(maps by layer name, sidecar dict)``."""
    path = os.fspath(path)
    with np.load(path) as data:
        maps = {k: data[k] for k in data.files}
    with open(sidecar_path(path)) as fh:
        meta = json.load(fh)
    order = [layer["name"] for layer in meta["layers"]]
    return {k: maps[k] for k in order}, meta

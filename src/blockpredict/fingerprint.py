"""A model's fingerprint: what decides the values a resumed run would write.

The ledger's hash covers it, so a resume continues only with the same weights,
activation, normalization, output dtype and model source. Paths are left out:
a checkpoint moved elsewhere with the same bytes still resumes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

# the model section's keys that name where a model comes from
SOURCES = ("unet", "torchscript", "exported", "factory")


def weights_hash(model: Any) -> str:
    """Short sha256 of the state dict: names, dtypes, shapes and bytes of every tensor.

    A duck-typed model object without ``state_dict`` is hashed by its type name only.
    """
    digest = hashlib.sha256()
    state_dict = getattr(model, "state_dict", None)
    if not callable(state_dict):
        return f"no-state-dict:{type(model).__name__}"
    for name, value in sorted(state_dict().items()):
        digest.update(name.encode())
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous()
            digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:  # extra state
            digest.update(repr(value).encode())
    return digest.hexdigest()[:16]


def file_hash(path: Path) -> str:
    """Short sha256 of a file's bytes (a TorchScript or torch.export file holds code too)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def model_fingerprint(
    model: torch.nn.Module, source: Any, normalization: tuple[float, float]
) -> dict[str, Any]:
    """Plain values, one per thing that can change: each is named when it does.

    ``source`` is the workflow's ``ModelConfig`` or, from Python, the model itself.
    """
    activation = getattr(model, "eval_activation", None)
    fingerprint: dict[str, Any] = {
        "model_weights": weights_hash(model),
        "activation": type(activation).__name__ if activation is not None else "none",
        "normalization": [float(v) for v in normalization],
    }
    fields = getattr(source, "model_fields_set", None)
    if fields is None:  # a model object from Python
        fingerprint["model_source"] = f"python {type(source).__module__}.{type(source).__name__}"
        return fingerprint
    values = {k: getattr(source, k) for k in type(source).model_fields}
    files = {k: v for k, v in values.items() if isinstance(v, Path)}
    kind = next((k for k in SOURCES if values.get(k)), "model")
    fingerprint["model_source"] = values["factory"] if kind == "factory" else kind
    exclude = {*files, "factory", "eval_activation", "python_path"}
    keys = source.model_dump(mode="json", exclude_none=True, exclude=exclude)
    fingerprint["model_keys"] = keys
    for key, path in sorted(files.items()):
        if key != "checkpoint" and path.is_file():  # the checkpoint counts by its weights
            fingerprint[f"model_file.{key}"] = file_hash(path)
    return fingerprint

"""Checkpoints: read a state dict as DaCapo, funlib or plain PyTorch saved it, load it strictly.

Accepted files:

- ``torch.save(model.state_dict())`` of a :class:`~blockpredict.model.Model`
  (``architecture.*``, ``prediction_head.*`` and the duplicate ``chain.*`` keys);
- DaCapo's ``runs/<run>/checkpoints/iterations/<N>``: a pickled
  ``dacapo.store.weights_store.Weights`` (or a dict) with the state dict under
  ``model`` and the optimizer's under ``optimizer``; it is read with
  ``weights_only=True`` through a stand-in class, without DaCapo installed;
- an architecture's own state dict: ``unet.*`` keys (DaCapo's
  ``architecture.state_dict()``, a module holding a funlib.learn.torch
  ``UNet`` as ``self.unet``) or a bare funlib ``UNet``'s ``l_conv.*``, ``r_up.*``
  ... keys; head weights may sit beside them under ``prediction_head.*``.

Every key must match, with its shape: a mismatch names the first missing,
unexpected and differently shaped keys. Nothing is renamed beyond the prefixes
above.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import ModelError

HEAD_WEIGHT = "prediction_head.weight"
_UNET_MODULES = ("l_conv.", "l_down.", "r_up.", "r_conv.", "attention.")
_FIX = "use the checkpoint of this architecture and head (model.unet, model.head)"


class _DaCapoWeights:
    """Stand-in for ``dacapo.store.weights_store.Weights`` (attributes model, optimizer)."""

    model: Any
    optimizer: Any


_DaCapoWeights.__module__ = "dacapo.store.weights_store"
_DaCapoWeights.__name__ = _DaCapoWeights.__qualname__ = "Weights"


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The model's state dict in the file, keys as the Model names them (``architecture.*``)."""
    where = str(path)
    if not Path(path).exists():
        raise ModelError("checkpoint not found", where, "check model.checkpoint")
    try:
        with torch.serialization.safe_globals([_DaCapoWeights]):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelError(
            f"cannot load checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:120]})",
            where,
            "give a state_dict saved with torch.save(model.state_dict(), path) or a DaCapo "
            "checkpoint",
        ) from None
    if isinstance(state, _DaCapoWeights):
        state = getattr(state, "model", None)
    elif isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise ModelError("checkpoint is not a state_dict", where, "save model.state_dict()")
    return model_keys(state)


def model_keys(state: Mapping[str, Any]) -> dict[str, Any]:
    """Keys as a Model's ``architecture``/``prediction_head`` name them.

    The duplicate ``chain.*`` copies are dropped where the other names exist.
    """
    out: dict[str, Any] = {}
    chained: dict[str, Any] = {}
    for key, value in state.items():
        if key.startswith("chain.0."):
            chained["architecture." + key.removeprefix("chain.0.")] = value
        elif key.startswith("chain.1."):
            chained["prediction_head." + key.removeprefix("chain.1.")] = value
        elif key.startswith("0."):  # a state dict of Model.chain
            chained["architecture." + key.removeprefix("0.")] = value
        elif key.startswith("1."):
            chained["prediction_head." + key.removeprefix("1.")] = value
        elif key.startswith(("architecture.", "prediction_head.")):
            out[key] = value
        elif key.startswith("unet."):
            out["architecture." + key] = value
        elif key.startswith(_UNET_MODULES):
            out["architecture.unet." + key] = value
        else:
            out[key] = value
    for key, value in chained.items():  # only a state dict of Model.chain has no other names
        out.setdefault(key, value)
    return out


def head_shape(state: Mapping[str, Any], where: str) -> tuple[int, tuple[int, ...]]:
    """Output channels and kernel size of the head in ``state`` (``prediction_head.weight``)."""
    weight = state.get(HEAD_WEIGHT)
    if weight is None:
        raise ModelError(
            f"the checkpoint holds no {HEAD_WEIGHT}",
            where,
            "give model.head.out_channels (and kernel_size)",
        )
    return int(weight.shape[0]), tuple(int(k) for k in weight.shape[2:])


def load_strict(model: torch.nn.Module, state: Mapping[str, Any], where: str) -> None:
    """Load every key of ``state`` into ``model``; name the first mismatches otherwise."""
    expected = {_unchained(k): v for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} is {_shape(state[k])} in the checkpoint, {_shape(v)} in the model"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        raise ModelError(
            "checkpoint does not match the model"
            + _listed(" missing", missing, expected)
            + _listed(" unexpected", unexpected, state)
            + (f"; shapes differ: {shapes[0]}" if shapes else "")
            + (f" and {len(shapes) - 1} more" if len(shapes) > 1 else ""),
            where,
            _FIX,
        )
    full = {k: state[_unchained(k)] for k in model.state_dict()}
    model.load_state_dict(full, strict=True)


def _unchained(key: str) -> str:
    if key.startswith("chain.0."):
        return "architecture." + key.removeprefix("chain.0.")
    if key.startswith("chain.1."):
        return "prediction_head." + key.removeprefix("chain.1.")
    return key


def _shape(tensor: Any) -> str:
    return str(tuple(getattr(tensor, "shape", ())))


def _listed(label: str, keys: list[str], shapes: Mapping[str, Any]) -> str:
    if not keys:
        return ""
    shown = ", ".join(f"{k} {_shape(shapes[k])}" for k in keys[:3])
    more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
    return f";{label} keys: {shown}{more}"

"""Build a :class:`Model` from the workflow's ``model`` section.

The same config builds the model on the client (for its shapes) and on each
worker (for prediction), so workers receive a small config, never a pickled
module graph.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .architectures import UNet, WrappedArchitecture, load_exported, load_torchscript
from .config import ModelConfig
from .errors import ModelError
from .model import Model

WEIGHT_SEED = 0

ACTIVATIONS = {
    "sigmoid": lambda: torch.nn.Sigmoid(),
    "softmax": lambda: torch.nn.Softmax(dim=1),
    "tanh": lambda: torch.nn.Tanh(),
}


def build_model(config: ModelConfig) -> Model:
    """The eval-mode model described by ``config`` (on the CPU), checkpoint loaded."""
    activation = ACTIVATIONS[config.eval_activation]() if config.eval_activation else None
    # a fixed seed: the client and every worker build identical initial weights
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(WEIGHT_SEED)
        try:
            if config.factory:
                model = _from_factory(config, activation)
            else:
                architecture = _architecture(config)
                head = _head(config, architecture)
                model = Model(architecture, head, eval_activation=activation)
        except ModelError:
            raise
        except Exception as e:  # the dummy forward of Model() on a zero input
            first = str(e).strip().splitlines()
            raise ModelError(
                f"the model fails on a zero input: {type(e).__name__}: {first[0] if first else ''}",
                "model.factory" if config.factory else "model",
                "check input_shape, num_in_channels and the model",
            ) from e
    if config.checkpoint is not None:
        load_checkpoint(model, config.checkpoint)
    return model.eval()


def _architecture(config: ModelConfig) -> torch.nn.Module:
    if config.unet is not None:
        return UNet(**config.unet.model_dump())  # the config's keys are UNet's parameters
    if config.torchscript is not None:
        module = load_torchscript(config.torchscript)
    else:
        assert config.exported is not None
        module = load_exported(config.exported)
    return _wrap(module, config)


def _wrap(module: torch.nn.Module, config: ModelConfig) -> WrappedArchitecture:
    assert config.input_shape is not None
    assert config.num_in_channels is not None and config.num_out_channels is not None
    return WrappedArchitecture(
        module,
        input_shape=config.input_shape,
        eval_shape_increase=config.eval_shape_increase,
        num_in_channels=config.num_in_channels,
        num_out_channels=config.num_out_channels,
        scale=config.scale,
    )


def _head(config: ModelConfig, architecture: torch.nn.Module) -> torch.nn.Module:
    if config.head is None:
        return torch.nn.Identity()
    conv = {2: torch.nn.Conv2d, 3: torch.nn.Conv3d}[architecture.dims]
    return conv(architecture.num_out_channels, config.head.out_channels, config.head.kernel_size)


def _from_factory(config: ModelConfig, activation: torch.nn.Module | None) -> Model:
    """``module:function`` returning a Model (used as is) or an nn.Module (wrapped)."""
    name = config.factory or ""
    module_name, _, function_name = name.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ModelError(
            f"cannot import factory {name!r}: {e}", "model.factory", "write module:function"
        ) from None
    try:
        built = function(**config.kwargs)
    except Exception as e:
        raise ModelError(
            f"factory {name!r} failed: {type(e).__name__}: {e}",
            "model.factory",
            "check model.kwargs",
        ) from None
    if hasattr(built, "compute_output_shape") and hasattr(built, "eval_input_shape"):
        if activation is not None:
            built.eval_activation = activation
        return built
    declared = (config.input_shape, config.num_in_channels, config.num_out_channels)
    if isinstance(built, torch.nn.Module) and None not in declared:
        return Model(_wrap(built, config), torch.nn.Identity(), eval_activation=activation)
    raise ModelError(
        f"factory {name!r} returned {type(built).__name__}",
        "model.factory",
        "return a Model, or an nn.Module and declare input_shape, num_in_channels, "
        "num_out_channels",
    )


def load_checkpoint(model: Model, path: Path) -> None:
    """Load a state_dict (or a DaCapo checkpoint holding one under ``model``)."""
    if not Path(path).exists():
        raise ModelError("checkpoint not found", str(path), "check model.checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelError(
            f"cannot load checkpoint ({type(e).__name__})",
            str(path),
            "give a state_dict saved with torch.save(model.state_dict(), path)",
        ) from None
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]
    if not isinstance(state, Mapping):
        raise ModelError("checkpoint is not a state_dict", str(path), "save model.state_dict()")
    state = _chain_keys(state)
    try:
        result = model.chain.load_state_dict(state, strict=False)
    except RuntimeError as e:
        detail = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise ModelError(
            f"checkpoint does not match the model: {detail}",
            str(path),
            "use the checkpoint of this architecture and head",
        ) from None
    if result.missing_keys or result.unexpected_keys:
        raise ModelError(
            "checkpoint does not match the model"
            + _keys(" missing", result.missing_keys)
            + _keys(" unexpected", result.unexpected_keys),
            str(path),
            "use the checkpoint of this architecture and head",
        )


def _chain_keys(state: Mapping[str, Any]) -> dict[str, Any]:
    """Map ``architecture.*``/``prediction_head.*``/``chain.*`` keys onto ``chain``."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        for prefix, new in (("architecture.", "0."), ("prediction_head.", "1."), ("chain.", "")):
            if key.startswith(prefix):
                out.setdefault(new + key.removeprefix(prefix), value)
                break
        else:
            out.setdefault(key, value)
    return out


def _keys(label: str, keys: list[str]) -> str:
    if not keys:
        return ""
    shown = ", ".join(_unchain(k) for k in keys[:3])
    more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
    return f";{label} keys: {shown}{more}"


def _unchain(key: str) -> str:
    if key.startswith("0."):
        return "architecture." + key[2:]
    if key.startswith("1."):
        return "prediction_head." + key[2:]
    return key

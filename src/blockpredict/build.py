"""Build a :class:`Model` from the workflow's ``model`` section.

The same config builds the model on the client (for its shapes) and on each
worker (for prediction), so workers receive a small config, never a pickled
module graph.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import torch

from .architectures import CNNectomeUNet, WrappedArchitecture, load_exported, load_torchscript
from .checkpoint import head_shape, load_strict, read_checkpoint
from .config import HeadConfig, ModelConfig
from .errors import ModelError
from .model import Model

WEIGHT_SEED = 0

ACTIVATIONS = {
    "sigmoid": lambda: torch.nn.Sigmoid(),
    "softmax": lambda: torch.nn.Softmax(dim=1),
    "tanh": lambda: torch.nn.Tanh(),
}


def build_model(config: ModelConfig, output_shape: tuple[int, Any] | None = None) -> Model:
    """The eval-mode model described by ``config`` (on the CPU), checkpoint loaded;
    ``output_shape`` as the client's build found it (:class:`Model`) skips the shape probe."""
    activation = ACTIVATIONS[config.eval_activation]() if config.eval_activation else None
    state = read_checkpoint(config.checkpoint) if config.checkpoint is not None else None
    # a fixed seed: the client and every worker build identical initial weights
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(WEIGHT_SEED)
        try:
            if config.factory:
                model = _from_factory(config, activation)
            else:
                architecture = _architecture(config)
                head = _head(config, architecture, state)
                eval_output_shape = None
                if output_shape is None and config.unet is not None:
                    output_shape, eval_output_shape = _unet_shapes(config, head)
                model = Model(
                    architecture,
                    head,
                    eval_activation=activation,
                    output_shape=output_shape,
                    eval_output_shape=eval_output_shape,
                )
        except ModelError:
            raise
        except Exception as e:  # the dummy forward of Model() on a zero input
            first = str(e).strip().splitlines()
            raise ModelError(
                f"the model fails on a zero input: {type(e).__name__}: {first[0] if first else ''}",
                "model.factory" if config.factory else "model",
                "check input_shape, num_in_channels and the model",
            ) from e
    if state is not None:
        load_strict(model, state, str(config.checkpoint))
    return model.eval()


def build_shapes(config: ModelConfig) -> Model:
    """The model's shapes without its weights: built on torch's meta device, no checkpoint read.

    What ``status`` needs to count blocks. A big model's weights, its checkpoint and the
    dummy forward that finds its output shape take seconds to minutes on a CPU; on the
    meta device tensors have shapes but no data, so they cost nothing. A U-Net without a
    head size gets one channel (the count does not change the blocks).
    """
    update: dict[str, Any] = {"checkpoint": None}
    if config.unet is not None and (config.head is None or config.head.out_channels is None):
        update["head"] = HeadConfig(out_channels=1)
    with torch.device("meta"):
        return build_model(config.model_copy(update=update))


def _unet_shapes(config: ModelConfig, head: Any) -> tuple[tuple[int, Any], Any]:
    """The U-Net's output channels and shape at its input shape, and its output shape at
    its eval input shape, from a slim twin.

    Shapes do not depend on feature maps, so the same U-Net with one feature map per
    level, and a one-channel head with the same kernel, finds them with the same code
    (``Model``'s dummy forward) at a fraction of the cost: the real U-Net's forward took
    1.5-2 s of the client's start for the bench's 108^3 U-Net, and far more for large
    ones, twice where ``eval_shape_increase`` is set. Built after the real modules, so
    their seeded initial weights do not change; ``head`` is the real head's convolution.
    """
    assert config.unet is not None
    slim = config.unet.model_copy(update={"num_fmaps": 1, "fmap_inc_factor": 1, "fmaps_out": 1})
    architecture = CNNectomeUNet(**slim.model_dump())
    conv = {2: torch.nn.Conv2d, 3: torch.nn.Conv3d}[architecture.dims]
    twin = Model(architecture, conv(1, 1, head.kernel_size))
    eval_shape = twin.output_shape
    if twin.eval_input_shape != twin.input_shape:
        eval_shape = twin.compute_output_shape(twin.eval_input_shape)[1]
    return (int(head.out_channels), twin.output_shape), eval_shape


def _architecture(config: ModelConfig) -> torch.nn.Module:
    if config.unet is not None:
        # the config's keys are CNNectomeUNet's parameters
        return CNNectomeUNet(**config.unet.model_dump())
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


def _head(
    config: ModelConfig, architecture: torch.nn.Module, state: dict[str, Any] | None
) -> torch.nn.Module:
    """The head's convolution; channels (and kernel) from the checkpoint when not given."""
    if config.head is None and config.unet is None:
        return torch.nn.Identity()
    out_channels = config.head.out_channels if config.head else None
    kernel: int | tuple[int, ...] = config.head.kernel_size if config.head else 1
    if out_channels is None:
        if state is None:
            raise ModelError(
                "head.out_channels is not set and there is no checkpoint",
                "model.head",
                "give head.out_channels, or a checkpoint holding prediction_head.weight",
            )
        out_channels, shape = head_shape(state, str(config.checkpoint))
        kernel = shape if config.head is None else kernel
    conv = {2: torch.nn.Conv2d, 3: torch.nn.Conv3d}[architecture.dims]
    return conv(architecture.num_out_channels, out_channels, kernel)


def _from_factory(config: ModelConfig, activation: torch.nn.Module | None) -> Model:
    """``module:function`` returning a Model (used as is) or an nn.Module (wrapped)."""
    name = config.factory or ""
    module_name, _, function_name = name.partition(":")
    for folder in reversed(config.python_path):  # the workflow's folder, on every worker too
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError, ValueError) as e:
        where = ", ".join(str(p) for p in config.python_path) or "sys.path"
        raise ModelError(
            f"cannot import factory {name!r}: {e}",
            f"model.factory, searched {where} and sys.path",
            "write module:function with module.py beside the workflow (or in a folder listed "
            "in model.python_path); batch workers must see that folder too",
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


# The seed's Model API: what the engine reads from any model object (a DaCapo Model too).
MODEL_API = (
    "input_shape",
    "eval_input_shape",
    "num_in_channels",
    "num_out_channels",
    "compute_output_shape",
    "scale",
    "forward",
)


def check_model_api(model: object) -> None:
    """Refuse an object without the seed's attributes and methods, naming what it lacks."""
    missing = [name for name in MODEL_API if not hasattr(model, name)]
    if missing and isinstance(model, torch.nn.Module):
        raise ModelError(
            f"a plain {type(model).__name__} is not a Model (it lacks {', '.join(missing)})",
            "predict(model)",
            "wrap it: Model(WrappedArchitecture(module, input_shape=..., num_in_channels=..., "
            "num_out_channels=...), torch.nn.Identity())",
        )
    if missing:
        raise ModelError(
            f"{type(model).__name__} lacks {', '.join(missing)}",
            "predict(model)",
            "give a blockpredict or DaCapo Model, or an object with the same attributes "
            f"and methods ({', '.join(MODEL_API)})",
        )


def place(model: Any, device: torch.device | str) -> Any:
    """The model on ``device`` in eval mode; an object without ``to``/``eval`` is used as is."""
    to = getattr(model, "to", None)
    if callable(to):
        model = to(device) or model
    evaluate = getattr(model, "eval", None)
    if callable(evaluate):
        evaluate()
    return model if callable(model) else _Callable(model)


class _Callable:
    """Calls ``forward`` of a model object that is not itself callable."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def __getattr__(self, name: str) -> Any:
        if name == "model":  # not set yet (while unpickling)
            raise AttributeError(name)
        return getattr(self.model, name)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward(x)  # type: ignore[no-any-return]

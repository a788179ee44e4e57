"""What planning learns and checks about a model: its output shape at the eval input
shape, its downsampling phase, its channels, and what blockwise prediction cannot promise.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from funlib.geometry import Coordinate

from .errors import ModelError
from .words import plural

logger = logging.getLogger(__name__)


def warn_unbounded(model: Any, dtype: str) -> None:
    """uint8 stores [0, 1] as 0..255: values of an unbounded activation are clipped."""
    activation = getattr(model, "eval_activation", None)
    name = type(activation).__name__ if activation is not None else "none"
    if dtype == "uint8" and name not in ("Sigmoid", "Softmax"):
        logger.warning(
            "output.dtype is uint8, which stores [0, 1] as 0..255, but the model's "
            "activation (%s) is not bounded to [0, 1]: values outside are clipped; "
            "set model.eval_activation: sigmoid or output.dtype: float32",
            name,
        )


def check_channels(model_source: Any, channels: int) -> None:
    """A declared ``num_out_channels`` must be what the model's shape probe returned."""
    declared = getattr(model_source, "num_out_channels", None)
    if isinstance(declared, int) and declared != channels:
        raise ModelError(
            f"the model returns {plural(channels, 'channel')}, the workflow declares {declared}",
            "model.num_out_channels",
            f"set num_out_channels: {channels} or fix the model",
        )


def probe_output_shape(model: Any, eval_input_shape: Coordinate) -> tuple[int, Coordinate]:
    """Channels and spatial output shape at the eval input shape.

    The Model computed its ``output_shape`` at ``input_shape`` when it was built
    (a dummy forward); reuse it where the eval shape is the same, and its
    ``eval_output_shape`` where it knows one.
    """
    known = getattr(model, "output_shape", None)
    if known is not None and Coordinate(model.input_shape) == eval_input_shape:
        return int(model.num_out_channels), Coordinate(known)
    known_eval = getattr(model, "eval_output_shape", None)  # a built U-Net's (build.py)
    if known_eval is not None and Coordinate(model.eval_input_shape) == eval_input_shape:
        return int(model.num_out_channels), Coordinate(known_eval)
    channels, shape = model.compute_output_shape(eval_input_shape)
    return int(channels), Coordinate(shape)


def model_warnings(model: Any) -> tuple[str, ...]:
    """What blockwise prediction cannot promise for this model."""
    architecture = getattr(model, "architecture", model)
    if getattr(architecture, "use_attention", False):
        return (
            "the U-Net uses attention (use_attention: true), which is not translation-"
            "equivariant: each block equals the model applied to that block's read ROI, "
            "not a whole-volume forward pass (block seams may show)",
        )
    return ()


def downsampling_phase(model: Any) -> Coordinate | None:
    """The architecture's total downsampling factor, where it declares one."""
    architecture = getattr(model, "architecture", model)
    product = getattr(architecture, "downsample_factor_product", None)
    if product is not None:
        return Coordinate(product)
    factors = getattr(architecture, "downsample_factors", None)
    if factors:
        return Coordinate(math.prod(f[i] for f in factors) for i in range(len(factors[0])))
    return None

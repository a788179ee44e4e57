"""blockpredict: distributed blockwise prediction of PyTorch models over zarr volumes.

The names below are imported on first use, so that a module of the package
(the command line, a worker's task module) does not import torch unless it
needs it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .model import Architecture, Model
    from .workflow import predict

__all__ = ["Architecture", "Model", "predict"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in ("Architecture", "Model"):
        from . import model

        return getattr(model, name)
    if name == "predict":
        from .workflow import predict

        return predict
    raise AttributeError(f"module 'blockpredict' has no attribute {name!r}")

"""blockpredict: distributed blockwise prediction of PyTorch models over zarr volumes."""

from .model import Architecture, Model
from .workflow import predict

__all__ = ["Architecture", "Model", "predict"]
__version__ = "0.1.0"

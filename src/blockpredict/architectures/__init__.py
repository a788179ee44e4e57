"""Ready-made architectures: a U-Net and a wrapper for any ``torch.nn.Module``."""

from blockpredict.architectures.unet import UNet
from blockpredict.architectures.wrapped import (
    WrappedArchitecture,
    load_exported,
    load_torchscript,
)

__all__ = ["UNet", "WrappedArchitecture", "load_exported", "load_torchscript"]

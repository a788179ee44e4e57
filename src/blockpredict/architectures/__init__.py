"""Ready-made architectures: DaCapo's CNNectomeUNet, our earlier U-Net, and a wrapper."""

from blockpredict.architectures.cnnectome_unet import CNNectomeUNet
from blockpredict.architectures.unet import UNet
from blockpredict.architectures.wrapped import (
    WrappedArchitecture,
    load_exported,
    load_torchscript,
)

__all__ = ["CNNectomeUNet", "UNet", "WrappedArchitecture", "load_exported", "load_torchscript"]

"""A U-Net with the parameters of CNNectome/DaCapo's ``CNNectomeUNet``.

Downsampling is max pooling with kernel = stride = factor; upsampling is a
transposed convolution with kernel = stride = factor followed by the
activation. With ``padding="valid"`` the skip connection is cropped centrally
to the upsampled size. The crops only depend on the architecture, not on the
input size, so the network is translation-equivariant for shifts that are
multiples of :attr:`UNet.downsample_factor_product`: tiles at such offsets
give exactly the values of one big forward pass, which blockwise
prediction relies on.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import cast

import torch
from funlib.geometry import Coordinate
from torch import nn

from blockpredict.errors import ModelError
from blockpredict.model import Architecture

Shape = Sequence[int]

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_POOL = {2: nn.MaxPool2d, 3: nn.MaxPool3d}
_NORM = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def _activation(name: str) -> nn.Module:
    """Instantiate ``torch.nn.<name>`` (e.g. ``"ReLU"``)."""
    cls = getattr(nn, name, None)
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise ModelError(
            f"unknown activation {name!r}", "UNet", "use the name of a torch.nn module, e.g. 'ReLU'"
        )
    return cls()


class ConvPass(nn.Sequential):
    """Convolutions (each optionally batch-normalised) with an activation after each."""

    def __init__(
        self,
        dims: int,
        in_channels: int,
        out_channels: int,
        kernel_sizes: Sequence[Shape | int],
        padding: str,
        batch_norm: bool,
        activation: str,
    ) -> None:
        layers: list[nn.Module] = []
        for kernel in kernel_sizes:
            size = kernel if isinstance(kernel, int) else tuple(kernel)
            layers.append(_CONV[dims](in_channels, out_channels, size, padding=padding))
            if batch_norm:
                layers.append(_NORM[dims](out_channels))
            layers.append(_activation(activation))
            in_channels = out_channels
        super().__init__(*layers)


class Downsample(nn.Module):
    """Max pooling that refuses feature maps not divisible by its factor.

    Silent flooring would break translation equivariance and the skip crops.
    """

    def __init__(self, dims: int, factor: Shape) -> None:
        super().__init__()
        self.factor = tuple(factor)
        self.pool = _POOL[dims](self.factor, stride=self.factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = tuple(x.shape[2:])
        if any(s % f for s, f in zip(shape, self.factor, strict=True)):
            raise ModelError(
                f"U-Net cannot downsample a feature map of shape {shape} by {self.factor}",
                "UNet input shape",
                "choose an input shape (and eval_shape_increase) for which every level's "
                "feature map is divisible by its downsample factor",
            )
        return self.pool(x)


def _upsample(
    dims: int, in_channels: int, out_channels: int, factor: Shape, activation: str
) -> nn.Module:
    """Transposed convolution with kernel = stride = ``factor``, then the activation."""
    factor = tuple(factor)
    return nn.Sequential(
        _CONV_T[dims](in_channels, out_channels, factor, stride=factor), _activation(activation)
    )


def _center_crop(x: torch.Tensor, shape: Shape) -> torch.Tensor:
    """Crop the spatial axes of ``x`` centrally to ``shape``."""
    offsets = [(s - t) // 2 for s, t in zip(x.shape[2:], shape, strict=True)]
    slices = tuple(slice(o, o + t) for o, t in zip(offsets, shape, strict=True))
    return x[(slice(None), slice(None)) + slices]


class UNet(Architecture):
    """U-Net for 2D or 3D inputs of shape ``(batch, fmaps_in, *input_shape)``.

    ``kernel_size_down`` has one list of kernel shapes per level
    (``len(downsample_factors) + 1``), ``kernel_size_up`` one per upsampling
    level; both default to two 3^d convolutions. Each of ``upsample_factors``
    appends a transposed conv (kernel = stride = factor) and a conv pass
    (the top level's ``kernel_size_up``, else two 3^d convolutions), so the
    output is finer than the input (see :meth:`scale`).
    """

    def __init__(
        self,
        input_shape: Shape,
        fmaps_in: int,
        num_fmaps: int,
        fmap_inc_factor: int,
        downsample_factors: Sequence[Shape],
        fmaps_out: int | None = None,
        eval_shape_increase: Shape | None = None,
        kernel_size_down: Sequence[Sequence[Shape | int]] | None = None,
        kernel_size_up: Sequence[Sequence[Shape | int]] | None = None,
        upsample_factors: Sequence[Shape] | None = None,
        padding: str = "valid",
        batch_norm: bool = False,
        activation: str = "ReLU",
    ) -> None:
        super().__init__()
        dims = len(input_shape)
        if dims not in (2, 3):
            raise ModelError(
                f"U-Net input_shape {tuple(input_shape)} is neither 2D nor 3D",
                "UNet",
                "give 2 or 3 spatial sizes",
            )
        if padding not in ("valid", "same"):
            raise ModelError(f"unknown padding {padding!r}", "UNet", "use 'valid' or 'same'")
        self._input_shape = Coordinate(input_shape)
        self._eval_shape_increase = Coordinate(eval_shape_increase or (0,) * dims)
        self.fmaps_in = fmaps_in
        self.fmaps_out = fmaps_out if fmaps_out is not None else num_fmaps
        self.padding = padding
        self.downsample_factors = [Coordinate(f) for f in downsample_factors]
        self.upsample_factors = [Coordinate(f) for f in upsample_factors or []]
        for factor in self.downsample_factors + self.upsample_factors:
            if factor.dims != dims:
                raise ModelError(
                    f"factor {tuple(factor)} does not have {dims} axes",
                    "UNet",
                    "give one factor per spatial axis",
                )

        levels = len(self.downsample_factors) + 1
        default = [(3,) * dims, (3,) * dims]
        down_kernels = kernel_size_down or [default] * levels
        up_kernels = kernel_size_up or [default] * (levels - 1)
        self.kernel_size_down = [list(k) for k in down_kernels]
        self.kernel_size_up = [list(k) for k in up_kernels]
        if len(self.kernel_size_down) != levels or len(self.kernel_size_up) != levels - 1:
            raise ModelError(
                "kernel_size_down/kernel_size_up have the wrong number of levels",
                "UNet",
                f"give {levels} lists for kernel_size_down and {levels - 1} for kernel_size_up",
            )

        def fmaps(level: int) -> int:
            return num_fmaps * fmap_inc_factor**level

        conv_pass = partial(
            ConvPass, dims, padding=padding, batch_norm=batch_norm, activation=activation
        )
        self.down = nn.ModuleList(
            conv_pass(
                fmaps_in if lvl == 0 else fmaps(lvl - 1), fmaps(lvl), self.kernel_size_down[lvl]
            )
            for lvl in range(levels)
        )
        self.pool = nn.ModuleList(Downsample(dims, f) for f in self.downsample_factors)
        self.upsample = nn.ModuleList(
            _upsample(dims, fmaps(lvl + 1), fmaps(lvl), f, activation)
            for lvl, f in enumerate(self.downsample_factors)
        )
        self.up = nn.ModuleList(
            conv_pass(
                2 * fmaps(lvl),
                self.fmaps_out if lvl == 0 else fmaps(lvl),
                self.kernel_size_up[lvl],
            )
            for lvl in range(levels - 1)
        )
        if levels == 1 and self.fmaps_out != num_fmaps:  # no decoder: project to fmaps_out
            self.up.append(conv_pass(num_fmaps, self.fmaps_out, [(1,) * dims]))
        final_kernels = self.kernel_size_up[0] if self.kernel_size_up else default
        self.final_upsample = nn.Sequential(
            *(
                nn.Sequential(
                    _upsample(dims, self.fmaps_out, self.fmaps_out, f, activation),
                    conv_pass(self.fmaps_out, self.fmaps_out, final_kernels),
                )
                for f in self.upsample_factors
            )
        )

    @property
    def input_shape(self) -> Coordinate:
        return self._input_shape

    @property
    def eval_shape_increase(self) -> Coordinate:
        return self._eval_shape_increase

    @property
    def num_in_channels(self) -> int:
        return self.fmaps_in

    @property
    def num_out_channels(self) -> int:
        return self.fmaps_out

    @property
    def downsample_factor_product(self) -> Coordinate:
        """Product of all downsample factors per axis: the shift period of the output."""
        product = Coordinate((1,) * self.dims)
        for factor in self.downsample_factors:
            product = product * factor
        return product

    def scale(self, input_voxel_size: Coordinate) -> Coordinate:
        """Output voxel size: the input voxel size divided by each upsample factor."""
        voxel_size = Coordinate(input_voxel_size)
        for factor in self.upsample_factors:
            if any(v % f for v, f in zip(voxel_size, factor, strict=True)):
                raise ModelError(
                    f"voxel size {tuple(voxel_size)} is not divisible by "
                    f"upsample factor {tuple(factor)}",
                    "UNet upsample_factors",
                    "use upsample factors that divide the input voxel size exactly",
                )
            voxel_size = voxel_size / factor
        return voxel_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder, bottleneck, decoder with cropped skips, then extra upsampling."""
        skips: list[torch.Tensor] = []
        for level, pool in enumerate(self.pool):
            x = self.down[level](x)
            skips.append(x)
            x = pool(x)
        x = self.down[len(self.pool)](x)
        for level in reversed(range(len(self.pool))):
            x = self.upsample[level](x)
            skip = _center_crop(skips[level], x.shape[2:])
            x = self.up[level](torch.cat([skip, x], dim=1))
        if not self.pool and len(self.up):
            x = self.up[0](x)
        return cast(torch.Tensor, self.final_upsample(x))

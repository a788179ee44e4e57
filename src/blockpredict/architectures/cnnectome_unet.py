"""DaCapo's ``CNNectomeUNet``, module for module (DaCapo 0.3.5, BSD-3-Clause).

The module tree and parameter names are DaCapo's (``unet.l_conv.{level}.conv_pass.{i}``,
``unet.r_up.0.{level}.up.{i}``, ``unet.r_conv.0.{level}.conv_pass.{i}``,
``unet.attention.0.{level}.*``; with ``upsample_factors`` the U-Net is ``unet.0``
followed by ``unet.{1,2,...}``), and so is the arithmetic (nearest-neighbour
upsampling and a 1x1 convolution when ``constant_upsample`` is true, DaCapo's
default; crops that keep translation equivariance). A DaCapo checkpoint or a
funlib.learn.torch ``UNet`` state dict therefore loads with strict key
matching and computes what it computed there.

The attention gates (``use_attention``) depend on the size of the tensor they
see, so that network is not translation-equivariant: blockwise output equals
DaCapo's output block by block, never a whole-volume forward.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from funlib.geometry import Coordinate
from torch import nn

from blockpredict.errors import ModelError
from blockpredict.model import Architecture

Shape = Sequence[int]

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_NORM = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


class ConvPass(nn.Module):
    """Convolutions (each optionally batch-normalised), an activation after each."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_sizes: Sequence[Shape],
        activation: str | None,
        padding: str = "valid",
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for kernel_size in kernel_sizes:
            self.dims = len(kernel_size)
            pad: Any = tuple(k // 2 for k in kernel_size) if padding == "same" else 0
            layers.append(
                _CONV[self.dims](in_channels, out_channels, tuple(kernel_size), padding=pad)
            )
            if batch_norm:
                layers.append(_NORM[self.dims](out_channels))
            in_channels = out_channels
            if activation is not None:
                layers.append(getattr(nn, activation)())
        self.conv_pass = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_pass(x)  # type: ignore[no-any-return]


class Downsample(nn.Module):
    """Max pooling with kernel = stride = factor; refuses indivisible feature maps."""

    def __init__(self, downsample_factor: Shape) -> None:
        super().__init__()
        self.dims = len(downsample_factor)
        self.downsample_factor = tuple(downsample_factor)
        pool = {2: nn.MaxPool2d, 3: nn.MaxPool3d}[self.dims]
        self.down = pool(self.downsample_factor, stride=self.downsample_factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for d in range(1, self.dims + 1):
            if x.size()[-d] % self.downsample_factor[-d] != 0:
                raise RuntimeError(
                    f"Can not downsample shape {tuple(x.size())} with factor "
                    f"{self.downsample_factor}, mismatch in spatial dimension {self.dims - d}"
                )
        return self.down(x)  # type: ignore[no-any-return]


class Upsample(nn.Module):
    """Transposed convolution, or nearest-neighbour upsampling and a 1x1 convolution.

    With ``crop_factor`` the upsampled map is cropped so that the following
    convolutions leave a size that is a multiple of the factor (translation
    equivariance); with a skip input it is cropped centrally and concatenated.
    """

    def __init__(
        self,
        scale_factor: Shape,
        mode: str = "transposed_conv",
        in_channels: int | None = None,
        out_channels: int | None = None,
        crop_factor: Shape | None = None,
        next_conv_kernel_sizes: Sequence[Shape] | None = None,
        activation: str | None = None,
    ) -> None:
        super().__init__()
        assert (crop_factor is None) == (next_conv_kernel_sizes is None)
        self.crop_factor = crop_factor
        self.next_conv_kernel_sizes = next_conv_kernel_sizes
        self.dims = len(scale_factor)
        factor = tuple(scale_factor)
        layers: list[nn.Module] = []
        if mode == "transposed_conv":
            up = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[self.dims]
            layers.append(up(in_channels, out_channels, kernel_size=factor, stride=factor))
        else:
            layers.append(nn.Upsample(scale_factor=factor, mode=mode))
            layers.append(
                _CONV[self.dims](
                    in_channels, out_channels, kernel_size=(1,) * self.dims, stride=(1,) * self.dims
                )
            )
        if activation is not None:
            layers.append(getattr(nn, activation)())
        self.up = nn.Sequential(*layers) if len(layers) > 1 else layers[0]

    def crop_to_factor(
        self, x: torch.Tensor, factor: Shape, kernel_sizes: Sequence[Shape]
    ) -> torch.Tensor:
        """Largest ``n * factor + conv_crop`` not above the spatial shape."""
        spatial_shape = tuple(x.size()[-self.dims :])
        conv_crop = tuple(sum(ks[d] - 1 for ks in kernel_sizes) for d in range(self.dims))
        ns = (
            math.floor((s - c) / f)
            for s, c, f in zip(spatial_shape, conv_crop, factor, strict=True)
        )
        target = tuple(n * f + c for n, c, f in zip(ns, conv_crop, factor, strict=True))
        if target != spatial_shape:
            if not all(t > c for t, c in zip(target, conv_crop, strict=True)):
                raise RuntimeError(
                    f"Feature map with shape {tuple(x.size())} is too small to ensure "
                    f"translation equivariance with factor {tuple(factor)} and following "
                    f"convolutions {kernel_sizes}"
                )
            return self.crop(x, target)
        return x

    def crop(self, x: torch.Tensor, shape: Shape) -> torch.Tensor:
        target = tuple(x.size()[: -self.dims]) + tuple(shape)
        offset = tuple((a - b) // 2 for a, b in zip(x.size(), target, strict=True))
        return x[tuple(slice(o, o + s) for o, s in zip(offset, target, strict=True))]

    def forward(self, g_out: torch.Tensor, f_left: torch.Tensor | None = None) -> torch.Tensor:
        g_up = self.up(g_out)
        if self.next_conv_kernel_sizes is not None:
            assert self.crop_factor is not None
            g_cropped = self.crop_to_factor(g_up, self.crop_factor, self.next_conv_kernel_sizes)
        else:
            g_cropped = g_up
        if f_left is None:
            return g_cropped  # type: ignore[no-any-return]
        f_cropped = self.crop(f_left, tuple(g_cropped.size()[-self.dims :]))
        return torch.cat([f_cropped, g_cropped], dim=1)


class AttentionBlockModule(nn.Module):
    """DaCapo's attention gate: weights the skip features by a sigmoid map."""

    def __init__(
        self,
        F_g: int,  # noqa: N803 (DaCapo's names)
        F_l: int,  # noqa: N803
        F_int: int,  # noqa: N803
        dims: int,
        upsample_factor: Shape,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        self.dims = dims
        kernels = [(1,) * dims, (1,) * dims]
        self.upsample_factor = tuple(upsample_factor)
        self.W_g = ConvPass(F_g, F_int, kernels, None, "same", batch_norm)
        self.W_x = nn.Sequential(
            ConvPass(F_l, F_int, kernels, None, "same", batch_norm), Downsample(upsample_factor)
        )
        self.psi = ConvPass(F_int, 1, kernels, "Sigmoid", "same", batch_norm)
        mode = {2: "bilinear", 3: "trilinear"}[dims]
        self.up = nn.Upsample(scale_factor=self.upsample_factor, mode=mode, align_corners=True)
        self.relu = nn.ReLU(inplace=True)

    def pad_to(self, smaller: torch.Tensor, larger: torch.Tensor) -> torch.Tensor:
        padding: list[int] = []
        for i in range(2, 2 + self.dims):
            diff = larger.size(i) - smaller.size(i)
            padding.extend([diff // 2, diff - diff // 2])
        # DaCapo reverses this list (so the halves of odd differences swap sides): kept as is
        return nn.functional.pad(smaller, padding[::-1], mode="constant", value=0)

    def forward(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        g1 = self.W_g(g)
        x1 = self.W_x(x)
        g1 = self.pad_to(g1, x1)
        psi = self.psi(self.relu(g1 + x1))
        return x * self.up(psi)  # type: ignore[no-any-return]


class CNNectomeUNetModule(nn.Module):
    """funlib.learn.torch's ``UNet`` as DaCapo copies it (one head)."""

    def __init__(
        self,
        in_channels: int,
        num_fmaps: int,
        fmap_inc_factor: int,
        downsample_factors: Sequence[Shape],
        kernel_size_down: Sequence[Sequence[Shape]],
        kernel_size_up: Sequence[Sequence[Shape]],
        activation: str = "ReLU",
        num_fmaps_out: int | None = None,
        constant_upsample: bool = False,
        padding: str = "valid",
        upsample_channel_contraction: bool | Sequence[bool] = False,
        activation_on_upsample: bool = False,
        use_attention: bool = False,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        levels = self.num_levels = len(downsample_factors) + 1
        self.num_heads = 1
        self.in_channels = in_channels
        self.out_channels = num_fmaps_out if num_fmaps_out else num_fmaps
        contraction = (
            [upsample_channel_contraction] * levels
            if isinstance(upsample_channel_contraction, bool)
            else list(upsample_channel_contraction)
        )
        self.use_attention = use_attention
        self.batch_norm = batch_norm
        self.kernel_size_down = kernel_size_down
        self.kernel_size_up = kernel_size_up
        factors = [tuple(f) for f in downsample_factors]
        crop_factors: list[list[int]] = []
        product: list[int] | None = None
        for factor in factors[::-1]:
            product = (
                list(factor)
                if product is None
                else [f * p for f, p in zip(factor, product, strict=True)]
            )
            crop_factors.append(product)
        crop_factors = crop_factors[::-1]

        def fmaps(level: int) -> int:
            return int(num_fmaps * fmap_inc_factor**level)

        def up_fmaps(level: int) -> int:  # channels after upsampling from below ``level``
            return fmaps(level + (1 - contraction[level]))

        def out_fmaps(level: int) -> int:
            return fmaps(level) if num_fmaps_out is None or level != 0 else num_fmaps_out

        self.l_conv = nn.ModuleList(
            ConvPass(
                in_channels if level == 0 else fmaps(level - 1),
                fmaps(level),
                kernel_size_down[level],
                activation=activation,
                padding=padding,
                batch_norm=batch_norm,
            )
            for level in range(levels)
        )
        self.dims = self.l_conv[0].dims
        self.l_down = nn.ModuleList(Downsample(factors[level]) for level in range(levels - 1))
        self.r_up = nn.ModuleList(
            [
                nn.ModuleList(
                    Upsample(
                        factors[level],
                        mode="nearest" if constant_upsample else "transposed_conv",
                        in_channels=fmaps(level + 1),
                        out_channels=up_fmaps(level),
                        crop_factor=crop_factors[level],
                        next_conv_kernel_sizes=kernel_size_up[level],
                        activation=activation if activation_on_upsample else None,
                    )
                    for level in range(levels - 1)
                )
            ]
        )
        if use_attention:
            self.attention = nn.ModuleList(
                [
                    nn.ModuleList(
                        AttentionBlockModule(
                            F_g=fmaps(level + 1),
                            F_l=fmaps(level),
                            F_int=up_fmaps(level)
                            if num_fmaps_out is None or level != 0
                            else num_fmaps_out,
                            dims=self.dims,
                            upsample_factor=factors[level],
                            batch_norm=batch_norm,
                        )
                        for level in range(levels - 1)
                    )
                ]
            )
        self.r_conv = nn.ModuleList(
            [
                nn.ModuleList(
                    ConvPass(
                        fmaps(level) + up_fmaps(level),
                        out_fmaps(level),
                        kernel_size_up[level],
                        activation=activation,
                        padding=padding,
                        batch_norm=batch_norm,
                    )
                    for level in range(levels - 1)
                )
            ]
        )

    def rec_forward(self, level: int, f_in: torch.Tensor) -> torch.Tensor:
        i = self.num_levels - level - 1
        f_left = self.l_conv[i](f_in)
        if level == 0:
            return f_left  # type: ignore[no-any-return]
        g_out = self.rec_forward(level - 1, self.l_down[i](f_left))
        if self.use_attention:
            f_left = self.attention[0][i](g_out, f_left)
        return self.r_conv[0][i](self.r_up[0][i](g_out, f_left))  # type: ignore[no-any-return]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rec_forward(self.num_levels - 1, x)


class CNNectomeUNet(Architecture):
    """DaCapo's ``CNNectomeUNet`` from the keys of its ``CNNectomeUNetConfig``.

    ``activation_on_upsample`` and ``upsample_channel_contraction`` are not
    DaCapo config keys: their defaults are what DaCapo passes (a ReLU after
    each upsampling; channel contraction on every level but the top), and
    funlib.learn.torch's ``UNet`` defaults are ``False`` for both.
    """

    def __init__(
        self,
        input_shape: Shape,
        fmaps_out: int | None,
        fmaps_in: int,
        num_fmaps: int,
        fmap_inc_factor: int,
        downsample_factors: Sequence[Shape],
        kernel_size_down: Sequence[Sequence[Shape]] | None = None,
        kernel_size_up: Sequence[Sequence[Shape]] | None = None,
        eval_shape_increase: Shape | None = None,
        upsample_factors: Sequence[Shape] | None = None,
        constant_upsample: bool = True,
        padding: str = "valid",
        use_attention: bool = False,
        batch_norm: bool = False,
        activation_on_upsample: bool = True,
        upsample_channel_contraction: bool | Sequence[bool] | None = None,
    ) -> None:
        super().__init__()
        fmaps_out = num_fmaps if fmaps_out is None else fmaps_out
        self._input_shape = Coordinate(input_shape)
        self._eval_shape_increase = (
            None if eval_shape_increase is None else Coordinate(eval_shape_increase)
        )
        self.fmaps_out = fmaps_out
        self.fmaps_in = fmaps_in
        self.num_fmaps = num_fmaps
        self.fmap_inc_factor = fmap_inc_factor
        self.downsample_factors = [tuple(f) for f in downsample_factors]
        self.upsample_factors = [tuple(f) for f in upsample_factors or []]
        self.constant_upsample = constant_upsample
        self.padding = padding
        self.use_attention = use_attention
        self.batch_norm = batch_norm
        levels = len(self.downsample_factors) + 1
        default = [(3,) * self.dims, (3,) * self.dims]
        self.kernel_size_down = kernel_size_down or [default] * levels
        self.kernel_size_up = kernel_size_up or [default] * (levels - 1)
        if upsample_channel_contraction is None:
            upsample_channel_contraction = [False] + [True] * (len(self.downsample_factors) - 1)
        module: nn.Module = CNNectomeUNetModule(
            in_channels=fmaps_in,
            num_fmaps=num_fmaps,
            num_fmaps_out=fmaps_out,
            fmap_inc_factor=fmap_inc_factor,
            kernel_size_down=self.kernel_size_down,
            kernel_size_up=self.kernel_size_up,
            downsample_factors=self.downsample_factors,
            constant_upsample=constant_upsample,
            padding=padding,
            activation_on_upsample=activation_on_upsample,
            upsample_channel_contraction=upsample_channel_contraction,
            use_attention=use_attention,
            batch_norm=batch_norm,
        )
        if self.upsample_factors:
            layers = [module]
            for factor in self.upsample_factors:
                layers.append(Upsample(factor, "nearest", fmaps_out, fmaps_out, activation="ReLU"))
                layers.append(
                    ConvPass(
                        fmaps_out, fmaps_out, self.kernel_size_up[-1], "ReLU", batch_norm=batch_norm
                    )
                )
            module = nn.Sequential(*layers)
        self.unet = module

    @property
    def input_shape(self) -> Coordinate:
        return self._input_shape

    @property
    def eval_shape_increase(self) -> Coordinate:
        if self._eval_shape_increase is None:
            return super().eval_shape_increase
        return self._eval_shape_increase

    @property
    def num_in_channels(self) -> int:
        return self.fmaps_in

    @property
    def num_out_channels(self) -> int:
        return self.fmaps_out

    @property
    def downsample_factor_product(self) -> Coordinate:
        """Product of the downsample factors per axis: the shift period of the output."""
        product = Coordinate((1,) * self.dims)
        for factor in self.downsample_factors:
            product = product * Coordinate(factor)
        return product

    def scale(self, input_voxel_size: Coordinate) -> Coordinate:
        """The input voxel size divided by each upsample factor."""
        voxel_size = Coordinate(input_voxel_size)
        for factor in self.upsample_factors:
            if any(v % f for v, f in zip(voxel_size, factor, strict=True)):
                raise ModelError(
                    f"voxel size {tuple(voxel_size)} is not divisible by "
                    f"upsample factor {tuple(factor)}",
                    "model.unet.upsample_factors",
                    "use upsample factors that divide the input voxel size exactly",
                )
            voxel_size = voxel_size / Coordinate(factor)
        return voxel_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.unet(x)  # type: ignore[no-any-return]

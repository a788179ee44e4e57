"""Wrap any ``torch.nn.Module`` (plain, TorchScript or ``torch.export``) as an Architecture.

A module knows nothing about the shapes it was trained on, so the user
declares them here. Loaders turn missing or unreadable files into
:class:`~blockpredict.errors.ModelError` naming the path.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import torch
from funlib.geometry import Coordinate

from blockpredict.errors import ModelError
from blockpredict.model import Architecture


class WrappedArchitecture(Architecture):
    """An ``nn.Module`` plus declared input shape, channel counts and scale.

    ``scale`` (an int or one int per axis) says how much finer the output is:
    output voxel size = input voxel size / scale.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        input_shape: Sequence[int],
        num_in_channels: int,
        num_out_channels: int,
        eval_shape_increase: Sequence[int] | None = None,
        scale: int | Sequence[int] = 1,
    ) -> None:
        super().__init__()
        self.module = module
        self._input_shape = Coordinate(input_shape)
        dims = self._input_shape.dims
        self._eval_shape_increase = Coordinate(eval_shape_increase or (0,) * dims)
        self._num_in_channels = int(num_in_channels)
        self._num_out_channels = int(num_out_channels)
        self._scale = Coordinate((scale,) * dims if isinstance(scale, int) else scale)
        if self._eval_shape_increase.dims != dims or self._scale.dims != dims:
            raise ModelError(
                f"eval_shape_increase {tuple(self._eval_shape_increase)} or scale "
                f"{tuple(self._scale)} does not have {dims} axes like input_shape",
                "wrapped model",
                "give one value per spatial axis",
            )
        if any(s < 1 for s in self._scale):
            raise ModelError(
                f"scale {tuple(self._scale)} is not positive", "wrapped model", "use factors >= 1"
            )

    @property
    def input_shape(self) -> Coordinate:
        return self._input_shape

    @property
    def eval_shape_increase(self) -> Coordinate:
        return self._eval_shape_increase

    @property
    def num_in_channels(self) -> int:
        return self._num_in_channels

    @property
    def num_out_channels(self) -> int:
        return self._num_out_channels

    def scale(self, input_voxel_size: Coordinate) -> Coordinate:
        """Output voxel size; raises ModelError if the division is inexact."""
        voxel_size = Coordinate(input_voxel_size)
        if any(v % s for v, s in zip(voxel_size, self._scale, strict=True)):
            raise ModelError(
                f"voxel size {tuple(voxel_size)} is not divisible by scale {tuple(self._scale)}",
                "wrapped model scale",
                "declare a scale that divides the input voxel size exactly",
            )
        return voxel_size / self._scale

    def train(self, mode: bool = True) -> WrappedArchitecture:
        """Set the mode, tolerating modules that refuse it.

        Modules from ``ExportedProgram.module()`` raise NotImplementedError on
        ``train()``/``eval()``; their mode was fixed at export time.
        """
        self.training = mode
        try:
            self.module.train(mode)
        except NotImplementedError:
            pass
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)  # type: ignore[no-any-return]


def _check_file(path: str | os.PathLike[str], kind: str) -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelError(f"{kind} model file not found", path, "check the model path")
    return path


def load_torchscript(path: str | os.PathLike[str]) -> torch.nn.Module:
    """Load a TorchScript model (``torch.jit.save``) onto the CPU.

    Recent torch (2.13 here) deprecates TorchScript; the warning is silenced because the
    user chose the format and cannot act on it here.
    """
    path = _check_file(path, "TorchScript")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            return torch.jit.load(path, map_location="cpu")
    except Exception as exc:  # torch raises RuntimeError/ValueError for bad archives
        raise ModelError(
            f"cannot load TorchScript model: {str(exc).splitlines()[0]}",
            path,
            "save the model with torch.jit.save(torch.jit.script(model), path)",
        ) from exc


def load_exported(path: str | os.PathLike[str]) -> torch.nn.Module:
    """Load a ``torch.export`` program (``torch.export.save``) as a callable module."""
    path = _check_file(path, "exported")
    try:
        return torch.export.load(path).module()
    except Exception as exc:  # deserialisation errors vary between torch versions
        raise ModelError(
            f"cannot load exported program: {str(exc).splitlines()[0]}",
            path,
            "save the model with torch.export.save(torch.export.export(model, args), path)",
        ) from exc

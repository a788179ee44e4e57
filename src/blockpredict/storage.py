"""Storage: open the input, prepare the output, read and write blocks.

The client uses funlib.persistence for metadata (voxel size, offset, axes).
Workers read and write the underlying zarr arrays directly: funlib arrays are
dask arrays, and touching them inside a Dask worker would route the I/O
through the distributed scheduler as nested tasks.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from funlib.geometry import Coordinate, Roi
from funlib.persistence import open_ds, prepare_ds

from .config import Scaling
from .errors import InputError, OutputExistsError
from .metadata import spatial_metadata

logger = logging.getLogger(__name__)

INPUT_DTYPES = (
    "uint8",
    "uint16",
    "int8",
    "int16",
    "uint32",
    "int32",
    "float16",
    "float32",
    "float64",
)
AUTO_SCALE = {"uint8": 1 / 255, "uint16": 1 / 65535}


@dataclass(frozen=True)
class InputInfo:
    """What the client learns about the input without reading voxels."""

    path: str
    roi: Roi
    voxel_size: Coordinate
    dtype: str
    num_channels: int
    has_channel_axis: bool
    axis_names: tuple[str, ...]
    units: tuple[str, ...]
    voxel_size_source: str = "metadata"
    offset_source: str = "metadata"
    warnings: tuple[str, ...] = ()


def open_input(
    container: Path,
    dataset: str,
    voxel_size: Sequence[int] | None = None,
    offset: Sequence[int] | None = None,
) -> InputInfo:
    """Read the input's metadata, or raise :class:`InputError`.

    Voxel size and offset come from ``voxel_size``/``resolution`` and ``offset``
    attributes, or from ``voxel_size``/``offset`` given here (see metadata.py).
    """
    if not os.path.exists(container):
        raise InputError("input container not found", str(container), "check input.container")
    path = os.path.join(str(container), dataset)
    try:
        array = open_ds(path)
    except Exception as e:  # zarr raises several types for a missing array
        raise InputError(
            f"input dataset {dataset!r} not found or unreadable ({type(e).__name__})",
            path,
            "check input.dataset",
        ) from None
    dtype = str(array.dtype)
    if dtype not in INPUT_DTYPES:
        raise InputError(
            f"unsupported input dtype {dtype}", path, f"convert to one of {', '.join(INPUT_DTYPES)}"
        )
    channel_dims = array.channel_dims
    if channel_dims > 1:
        raise InputError(
            f"input has {channel_dims} channel axes", path, "give at most one (the first axis)"
        )
    spatial = list(array.axis_names)[channel_dims:]
    attrs = dict(zarr.open_array(path, mode="r").attrs)
    meta = spatial_metadata(attrs, len(spatial), path, voxel_size, offset)
    for warning in meta.warnings:
        logger.warning(warning)
    if (meta.voxel_size, meta.offset) != (array.voxel_size, array.roi.offset):
        array = open_ds(path, voxel_size=meta.voxel_size, offset=meta.offset)
    return InputInfo(
        path=path,
        roi=array.roi,
        voxel_size=array.voxel_size,
        dtype=dtype,
        num_channels=array.shape[0] if channel_dims else 1,
        has_channel_axis=bool(channel_dims),
        axis_names=tuple(spatial),
        units=tuple(array.units),
        voxel_size_source=meta.voxel_size_source,
        offset_source=meta.offset_source,
        warnings=meta.warnings,
    )


def normalization(dtype: str, normalize: str | Scaling) -> tuple[float, float]:
    """(scale, shift) so that ``value * scale + shift`` is what the model sees."""
    if isinstance(normalize, Scaling):
        return normalize.scale, normalize.shift
    if normalize == "none" or dtype.startswith("float"):
        return 1.0, 0.0
    if dtype in AUTO_SCALE:
        return AUTO_SCALE[dtype], 0.0
    raise InputError(
        f"normalize: auto does not know how to scale {dtype}",
        "input.normalize",
        "give normalize: {scale: ..., shift: ...} or normalize: none",
    )


class BlockReader:
    """Reads a normalized, zero-padded float32 block ``(channels, *read_shape)``."""

    def __init__(self, info: InputInfo, normalize: str | Scaling) -> None:
        self.info = info
        self.scale, self.shift = normalization(info.dtype, normalize)
        self._array: zarr.Array | None = None

    @property
    def array(self) -> zarr.Array:
        if self._array is None:
            self._array = zarr.open_array(self.info.path, mode="r")
        return self._array

    def read(self, roi: Roi) -> np.ndarray:
        info = self.info
        inside = roi.intersect(info.roi)
        if inside.empty:
            return np.zeros((info.num_channels, *(roi.shape / info.voxel_size)), np.float32)
        src = _slices(inside, info.roi.offset, info.voxel_size)
        data = self.array[src if info.has_channel_axis else src[1:]]
        # zarr returns a fresh array: convert once, normalize in place
        data = np.asarray(data, dtype=np.float32)
        if not info.has_channel_axis:
            data = data[None]
        if self.scale != 1.0:
            data *= np.float32(self.scale)
        if self.shift != 0.0:
            data += np.float32(self.shift)
        if inside == roi:  # most blocks lie inside the data: no padding
            return data
        out = np.zeros((info.num_channels, *(roi.shape / info.voxel_size)), np.float32)
        out[_slices(inside, roi.offset, info.voxel_size)] = data
        return out


def _slices(roi: Roi, origin: Coordinate, voxel_size: Coordinate) -> tuple[slice, ...]:
    begin = (roi.offset - origin) / voxel_size
    end = (roi.end - origin) / voxel_size
    return (slice(None), *(slice(b, e) for b, e in zip(begin, end, strict=True)))


@dataclass(frozen=True)
class OutputInfo:
    """Where and how blocks are written."""

    path: str
    roi: Roi
    voxel_size: Coordinate
    dtype: str
    num_channels: int


def output_path(container: Path, dataset: str) -> str:
    return os.path.join(str(container), dataset)


def check_output(container: Path, dataset: str, overwrite: bool) -> None:
    """Refuse to clobber an existing output unless asked."""
    path = output_path(container, dataset)
    if os.path.exists(path) and not overwrite:
        raise OutputExistsError(
            "output dataset exists", path, "set output.overwrite: true or choose another dataset"
        )


def prepare_output(
    container: Path,
    dataset: str,
    roi: Roi,
    voxel_size: Coordinate,
    write_shape: Coordinate,
    num_channels: int,
    dtype: str,
    axis_names: tuple[str, ...],
    units: tuple[str, ...],
    overwrite: bool,
) -> OutputInfo:
    """Create the output array: channels first, one chunk per block write."""
    check_output(container, dataset, overwrite)
    path = output_path(container, dataset)
    if overwrite and os.path.isdir(path):
        shutil.rmtree(path)
    shape = (num_channels, *(roi.shape / voxel_size))
    prepare_ds(
        path,
        shape=shape,
        offset=roi.offset,
        voxel_size=voxel_size,
        axis_names=["c^", *axis_names],
        types=["channel", *(["space"] * voxel_size.dims)],
        units=list(units),
        chunk_shape=(num_channels, *write_shape),
        dtype=np.dtype(dtype),
        mode="w",
    )
    return OutputInfo(path, roi.copy(), voxel_size, dtype, num_channels)


def convert(prediction: np.ndarray, dtype: str) -> np.ndarray:
    """float32 prediction to the output dtype (uint8 maps [0, 1] to [0, 255])."""
    if dtype == "uint8":
        return np.clip(np.rint(prediction * 255.0), 0, 255).astype(np.uint8)
    return prediction.astype(dtype, copy=False)


class BlockWriter:
    """Writes ``(channels, *shape)`` predictions into the output at a world ROI."""

    def __init__(self, info: OutputInfo) -> None:
        self.info = info
        self._array: zarr.Array | None = None

    @property
    def array(self) -> zarr.Array:
        if self._array is None:
            self._array = zarr.open_array(self.info.path, mode="r+")
        return self._array

    def write(self, roi: Roi, prediction: np.ndarray) -> None:
        self.array[_slices(roi, self.info.roi.offset, self.info.voxel_size)] = convert(
            prediction, self.info.dtype
        )

"""Storage: open the input, prepare the output, read and write blocks.

The client reads the input's metadata (voxel size, offset, axes) as
funlib.persistence does, without its dask arrays (array_metadata.py). Workers
read and write the underlying zarr arrays directly: funlib arrays are dask
arrays, and touching them inside a Dask worker would route the I/O through the
distributed scheduler as nested tasks.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from funlib.geometry import Coordinate, Roi
from zarr.core.sync import sync

from . import ome
from .array_metadata import ArrayMetadata, open_metadata
from .boxes import joined, tiles
from .config import Scaling
from .errors import InputError, OutputExistsError
from .layout import Image, OutputInfo
from .metadata import spatial_metadata
from .pyramid import downsample
from .stores import check_container, open_array, remove, zarr_store
from .stores import exists as store_exists
from .urls import is_url, join

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
    channel_axis: int | None  # where the array's channel axis ('c^') stands, if it has one
    axis_names: tuple[str, ...]  # the spatial axes' names
    units: tuple[str, ...]
    storage_options: dict = field(default_factory=dict)  # fsspec options of a URL container
    cache_bytes: int = 0  # per-worker cache of recently read chunks (URL containers)
    zarr_format: int = 3
    ome_level: ome.OmeLevel | None = None  # where the input is a level of an OME-NGFF image

    voxel_size_source: str = "metadata"
    offset_source: str = "metadata"
    warnings: tuple[str, ...] = ()

    @property
    def has_channel_axis(self) -> bool:
        return self.channel_axis is not None


def open_input(
    container: Path | str,
    dataset: str,
    voxel_size: Sequence[int] | None = None,
    offset: Sequence[int] | None = None,
    storage_options: dict | None = None,
) -> InputInfo:
    """Read the input's metadata, or raise :class:`InputError`.

    Voxel size and offset come from an OME-NGFF level's transforms, from
    ``voxel_size``/``resolution`` and ``offset`` attributes, or from
    ``voxel_size``/``offset`` given here (see metadata.py).
    """
    options = dict(storage_options or {})
    if is_url(container):
        check_container(str(container), options, "input")
    elif not os.path.exists(container):
        raise InputError("input container not found", str(container), "check input.container")
    path = join(container, dataset)
    level = None if is_url(container) else ome.find_level(str(container), dataset)
    try:
        store = zarr_store(path, options, read_only=True)
        array = open_metadata(store) if level is None else _open_ome_level(store, level)
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
    channel_axis = _channel_axis(array, path)
    spatial = [n for i, n in enumerate(array.axis_names) if i != channel_axis]
    if level is None:
        attrs = dict(zarr.open_array(store, mode="r").attrs)
    else:  # the level's transforms stand for the array's own attributes
        attrs = {"voxel_size": list(level.voxel_size), "offset": list(level.offset)}
    meta = spatial_metadata(attrs, len(spatial), path, voxel_size, offset)
    for warning in meta.warnings:
        logger.warning(warning)
    if (meta.voxel_size, meta.offset) != (array.voxel_size, array.roi.offset):
        if level is None:
            array = open_metadata(store, voxel_size=meta.voxel_size, offset=meta.offset)
        else:
            # a given offset says where the data is: the level's sub-voxel shift goes
            level = replace(level, voxel_size=meta.voxel_size, offset=meta.offset, shift=())
            array = _open_ome_level(store, level)
    return InputInfo(
        path=path,
        roi=array.roi,
        voxel_size=array.voxel_size,
        dtype=dtype,
        num_channels=1 if channel_axis is None else array.shape[channel_axis],
        channel_axis=channel_axis,
        axis_names=tuple(spatial),
        units=tuple(array.units),
        storage_options=options,
        zarr_format=_zarr_format(path, options),
        ome_level=level,
        voxel_size_source=meta.voxel_size_source,
        offset_source=meta.offset_source,
        warnings=meta.warnings,
    )


def _channel_axis(array: ArrayMetadata, path: str) -> int | None:
    """The position of the one channel axis (funlib: type 'channel', a name ending in '^')."""
    axes = [i for i, kind in enumerate(array.types) if kind == "channel"]
    if len(axes) > 1:
        names = ", ".join(repr(array.axis_names[i]) for i in axes)
        raise InputError(
            f"input has {len(axes)} channel axes ({names})",
            path,
            "give at most one, named 'c^' (it may stand anywhere)",
        )
    return axes[0] if axes else None


def _zarr_format(path: str, options: dict) -> int:
    return int(
        zarr.open_array(zarr_store(path, options, read_only=True), mode="r").metadata.zarr_format
    )


def _open_ome_level(path: Any, level: ome.OmeLevel) -> ArrayMetadata:
    """A level of an OME-NGFF image, with the voxel size and offset of its group's metadata."""
    return open_metadata(
        path,
        voxel_size=level.voxel_size,
        offset=level.offset,
        axis_names=level.axis_names,
        units=level.units,
        types=level.types,
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
            info = self.info
            self._array = open_array(info.path, info.storage_options, "r", info.cache_bytes)
        return self._array

    def read(self, roi: Roi) -> np.ndarray:
        info = self.info
        inside = roi.intersect(info.roi)
        if inside.empty:
            return np.zeros((info.num_channels, *(roi.shape / info.voxel_size)), np.float32)
        index = list(_slices(inside, info.roi.offset, info.voxel_size)[1:])
        axis = info.channel_axis
        if axis is not None:
            index.insert(axis, slice(None))
        data = self.array[tuple(index)]
        # zarr returns a fresh array: convert (channels first) once, normalize in place
        data = data[None] if axis is None else np.moveaxis(data, axis, 0)
        data = np.ascontiguousarray(data, dtype=np.float32)
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


def output_path(container: Path | str, dataset: str) -> str:
    return join(container, dataset)


def check_output(
    container: Path | str, dataset: str, overwrite: bool, storage_options: dict | None = None
) -> None:
    """Refuse to clobber an existing output unless asked."""
    path = output_path(container, dataset)
    if store_exists(path, storage_options) and not overwrite:
        raise OutputExistsError(
            "output dataset exists", path, "set output.overwrite: true or choose another dataset"
        )


def prepare_output(info: OutputInfo, overwrite: bool) -> OutputInfo:
    """Create every image of the output: its level arrays, then its OME-NGFF metadata.

    Each image is a group ``container/name`` holding ``s0`` (full resolution)
    and ``s1``.. (pyramid levels); every level array also carries funlib's
    attributes, so ``open_ds(container/name/s0)`` reads its voxel size.
    """
    options = info.storage_options
    container = os.path.dirname(info.images[0].path) if info.images else info.path
    for image in info.images:
        if store_exists(image.path, options) and not overwrite:
            raise OutputExistsError(
                "output dataset exists",
                image.path,
                "set output.overwrite: true or choose another dataset",
            )
    root_file = "zarr.json" if info.zarr_format == 3 else ".zgroup"
    if not store_exists(join(container, root_file), options):  # a root group for browsers
        zarr.open_group(zarr_store(container, options), mode="a", zarr_format=info.zarr_format)  # type: ignore[arg-type]
    for image in info.images:
        if overwrite:
            remove(image.path, options)
        _create_image(info, image)
    return info


def _create_image(info: OutputInfo, image: Image) -> None:
    fmt = info.zarr_format
    store = zarr_store(image.path, info.storage_options)
    group = zarr.open_group(store, mode="w", zarr_format=fmt)  # type: ignore[arg-type]
    names = list(info.axis_names)
    for level in image.levels:
        group.create_array(
            name=level.name,
            shape=level.shape,
            chunks=level.chunks,
            shards=level.shards,
            dtype=np.dtype(image.dtype),
            fill_value=0,
            compressors=_compressors(info.compressor, info.zarr_format),
            dimension_names=["c", *names] if info.zarr_format == 3 else None,
            attributes={
                "voxel_size": list(level.voxel_size),
                "offset": list(info.roi.offset),
                "axis_names": ["c^", *names],
                "units": list(info.units),
                "types": ["channel", *(["space"] * len(names))],
            },
        )
    method = "mean" if image.dtype.startswith("float") else "rounded mean"
    levels = [(level.name, level.voxel_size, info.roi.offset) for level in image.levels]
    name = os.path.basename(image.path)
    group.attrs.update(
        ome.multiscales(name, names, info.units, levels, info.zarr_format, method, info.shift)
    )


def _compressors(name: str, zarr_format: int) -> Any:
    if name == "none":
        return None
    if zarr_format == 2:
        import numcodecs

        if name == "gzip":
            return numcodecs.GZip(level=5)
        return numcodecs.Blosc(cname=name, clevel=5, shuffle=numcodecs.Blosc.SHUFFLE)
    from zarr.codecs import BloscCodec, GzipCodec

    if name == "gzip":
        return GzipCodec(level=5)
    return BloscCodec(cname=name, clevel=5, shuffle="shuffle")


def convert(
    prediction: np.ndarray, dtype: str, value_range: tuple[float, float] = (0.0, 1.0)
) -> np.ndarray:
    """float32 prediction to the output dtype (uint8 maps ``value_range`` to [0, 255])."""
    if dtype == "uint8":
        lo, hi = value_range
        scaled = (prediction - np.float32(lo)) * np.float32(255.0 / (hi - lo))
        return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return prediction.astype(dtype, copy=False)


class BlockWriter:
    """Writes a block's ``(channels, *shape)`` prediction at a world ROI.

    One call per block writes every image (channel group) and every pyramid
    level of it; a level is downsampled from the block's own converted output.
    """

    def __init__(self, info: OutputInfo) -> None:
        self.info = info
        self._arrays: dict[str, zarr.Array] = {}
        # plain ints for the per-block arithmetic (funlib's costs ~10 us per operation)
        self._origin = tuple(int(v) for v in info.roi.offset)
        self._level_sizes = {
            (image.path, level.name): tuple(int(v) for v in level.voxel_size)
            for image in info.images
            for level in image.levels
        }

    def array(self, path: str) -> zarr.Array:
        if path not in self._arrays:
            self._arrays[path] = open_array(path, self.info.storage_options, "r+")
        return self._arrays[path]

    def write(self, roi: Roi, prediction: np.ndarray) -> None:
        for array, where, data in self._pieces(roi, prediction):
            array[where] = data

    def write_many(self, blocks: list[tuple[Roi, np.ndarray]]) -> None:
        """Several blocks' predictions in one call: the blocks that fill a box are joined
        and written with one zarr call per box (and per image and level), and zarr
        writes every box concurrently, with one hand-off to its I/O loop.
        On an error some blocks may be written and others not (writing again is safe)."""
        pieces = []
        for members in tiles([roi for roi, _ in blocks]):
            each = [self._pieces(*blocks[i]) for i in members]
            if len(each) == 1:
                pieces += each[0]
                continue
            for k, (array, _, _) in enumerate(each[0]):  # every image and level
                box = joined([p[k][1] for p in each], [p[k][2] for p in each])
                pieces += [(array, *box)] if box is not None else [p[k] for p in each]

        async def write_all() -> None:
            await asyncio.gather(*(a.async_array.setitem(w, d) for a, w, d in pieces))

        sync(write_all())

    def _pieces(
        self, roi: Roi, prediction: np.ndarray
    ) -> list[tuple[zarr.Array, tuple[slice, ...], np.ndarray]]:
        """(array, selection, data) of every image and level a block writes."""
        info, pieces = self.info, []
        offset = [int(o) - g for o, g in zip(roi.offset, self._origin, strict=True)]
        for image in info.images:
            lo, hi = image.channels
            data = convert(prediction[lo:hi], image.dtype, info.range)
            for level in image.levels:
                down = downsample(data, level.factor)
                size = self._level_sizes[image.path, level.name]
                begin = [o // v for o, v in zip(offset, size, strict=True)]
                where = tuple(slice(b, b + s) for b, s in zip(begin, down.shape[1:], strict=True))
                array = self.array(join(image.path, level.name))
                pieces.append((array, (slice(None), *where), down))
        return pieces

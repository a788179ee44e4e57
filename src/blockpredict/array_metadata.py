"""An input array's funlib metadata (axes, voxel size, offset, units), read without dask.

funlib.persistence's ``open_ds`` wraps the zarr array in a dask array, and importing
funlib.persistence imports dask.array, which imports xarray, pandas and scipy.sparse:
1.5 s of the client's start-up on the development machine, spent before any worker
can start, for a run that only needs the array's metadata (workers read zarr
directly). This module reads the same metadata with funlib's own parser
(``funlib/persistence/arrays/metadata.py``, which imports neither), then derives
what funlib's ``Array`` would: its axes, types, units and ROI.

Where funlib.persistence is already imported (a Python caller, say, who may have
set its default metadata format), its own module is used; if the parser cannot
be loaded on its own (another funlib layout), ``open_ds`` itself is.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass, fields
from types import ModuleType
from typing import Any

import zarr
from funlib.geometry import Coordinate, Roi

FUNLIB_METADATA = "funlib.persistence.arrays.metadata"
_PRIVATE = "blockpredict._funlib_metadata"  # our own load of funlib's parser


@dataclass(frozen=True)
class ArrayMetadata:
    """What a funlib ``Array`` of a zarr array says about its axes and geometry."""

    dtype: Any
    shape: tuple[int, ...]
    axis_names: list[str]
    types: list[str]
    units: list[str]
    voxel_size: Coordinate
    roi: Roi


def open_metadata(store: Any, **overrides: Any) -> ArrayMetadata:
    """The metadata ``open_ds(store, **overrides)`` would give (offset, voxel_size,
    axis_names, units, types), with the same errors for arrays it cannot open."""
    parser = _parser()
    if parser is None:
        from funlib.persistence import open_ds

        return _of_array(open_ds(store, **overrides))
    data = zarr.open(store, mode="r")
    if not isinstance(data, zarr.Array):
        raise TypeError(f"Expected a zarr Array at {store}, got {type(data).__name__}")
    parsed = parser.get_default_metadata_format().parse(data.shape, data.attrs, **overrides)
    # as funlib's Array: its metadata again from the parsed values, and validated
    meta = parser.MetaData(
        shape=data.shape,
        offset=parsed.offset,
        voxel_size=parsed.voxel_size,
        axis_names=parsed.axis_names,
        units=parsed.units,
        types=parsed.types,
    )
    if len(meta.axis_names) != len(data.shape):  # as funlib's Array.validate
        raise AssertionError(f"axis names {meta.axis_names} do not match the shape {data.shape}")
    physical = [n for n, kind in zip(data.shape, meta.types, strict=True) if kind in PHYSICAL]
    return ArrayMetadata(
        dtype=data.dtype,
        shape=tuple(data.shape),
        axis_names=list(meta.axis_names),
        types=list(meta.types),
        units=list(meta.units),
        voxel_size=Coordinate(meta.voxel_size),
        roi=Roi(meta.offset, Coordinate(meta.voxel_size) * Coordinate(physical)),
    )


PHYSICAL = ("space", "time")


def _of_array(array: Any) -> ArrayMetadata:
    """The same, from a funlib ``Array`` (where the parser could not be loaded alone)."""
    return ArrayMetadata(*(getattr(array, f.name) for f in fields(ArrayMetadata)))


def _parser() -> ModuleType | None:
    """funlib's metadata module: funlib's own where it is imported, else loaded alone."""
    if FUNLIB_METADATA in sys.modules:
        return sys.modules[FUNLIB_METADATA]
    if _PRIVATE in sys.modules:
        return sys.modules[_PRIVATE]
    try:
        package = importlib.util.find_spec("funlib.persistence")
        folder = package.submodule_search_locations[0]  # type: ignore[union-attr,index]
        spec = importlib.util.spec_from_file_location(_PRIVATE, f"{folder}/arrays/metadata.py")
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules[_PRIVATE] = module
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        module.MetaData, module.get_default_metadata_format  # noqa: B018 (the API we use)
    except Exception:  # another layout: funlib.persistence itself
        sys.modules.pop(_PRIVATE, None)
        return None
    return module

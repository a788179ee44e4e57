"""An input's voxel size and offset: from its metadata conventions, or the workflow.

EM data carries its voxel size as funlib's ``voxel_size`` or as the older
gunpowder/daisy ``resolution`` (both with an ``offset`` in world units).
``input.voxel_size`` / ``input.offset`` override them, with a warning where they
disagree; without any voxel size (1, ...) is assumed, with a warning. Every
value says where it came from, so that ``plan`` can print it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from funlib.geometry import Coordinate

from .errors import InputError
from .words import plural

VOXEL_SIZE_KEYS = ("voxel_size", "resolution")


@dataclass(frozen=True)
class SpatialMetadata:
    """Voxel size and offset (world units), where each came from, and warnings."""

    voxel_size: Coordinate
    offset: Coordinate
    voxel_size_source: str
    offset_source: str
    warnings: tuple[str, ...] = ()


def spatial_metadata(
    attrs: Mapping[str, Any],
    dims: int,
    where: str,
    voxel_size: Sequence[int] | None = None,
    offset: Sequence[int] | None = None,
) -> SpatialMetadata:
    """Resolve voxel size and offset from ``attrs`` and the workflow's overrides."""
    warnings: list[str] = []
    found = [(key, _coordinate(attrs, key, dims, where)) for key in VOXEL_SIZE_KEYS]
    found = [(key, value) for key, value in found if value is not None]
    if len(found) == 2 and found[0][1] != found[1][1]:
        warnings.append(
            f"{where}: metadata voxel_size {tuple(found[0][1])} and resolution "
            f"{tuple(found[1][1])} disagree; using voxel_size"
        )
    meta_vs = found[0] if found else None
    meta_offset = _coordinate(attrs, "offset", dims, where)
    if voxel_size is not None:
        vs, vs_source = _given(voxel_size, dims, "input.voxel_size"), "input.voxel_size"
        if meta_vs is not None and meta_vs[1] != vs:
            warnings.append(
                f"input.voxel_size {tuple(vs)} overrides the metadata's {meta_vs[0]} "
                f"{tuple(meta_vs[1])} ({where})"
            )
    elif meta_vs is not None:
        vs, vs_source = meta_vs[1], f"metadata '{meta_vs[0]}'"
    else:
        vs, vs_source = Coordinate((1,) * dims), "assumed (no voxel size in the metadata)"
        warnings.append(
            f"{where} has no voxel size (neither voxel_size nor resolution): assuming "
            f"{tuple(vs)}; set input.voxel_size if that is wrong"
        )
    if offset is not None:
        off, off_source = _given(offset, dims, "input.offset"), "input.offset"
        if meta_offset is not None and meta_offset != off:
            warnings.append(
                f"input.offset {tuple(off)} overrides the metadata's offset "
                f"{tuple(meta_offset)} ({where})"
            )
    elif meta_offset is not None:
        off, off_source = meta_offset, "metadata 'offset'"
    else:
        off, off_source = Coordinate((0,) * dims), "default (no offset in the metadata)"
    if any(o % v for o, v in zip(off, vs, strict=True)):
        raise InputError(
            f"offset {tuple(off)} ({off_source}) is not a multiple of the voxel size "
            f"{tuple(vs)} ({vs_source})",
            where,
            "set input.offset / input.voxel_size to values that fit",
        )
    return SpatialMetadata(vs, off, vs_source, off_source, tuple(warnings))


def _coordinate(attrs: Mapping[str, Any], key: str, dims: int, where: str) -> Coordinate | None:
    value = attrs.get(key)
    if value is None:
        return None
    if (
        not isinstance(value, (list, tuple))
        or len(value) != dims
        or not all(isinstance(v, (int, float)) and float(v).is_integer() for v in value)
    ):
        raise InputError(
            f"metadata {key!r} is {value!r}, not {plural(dims, 'integer')}",
            where,
            "fix the array's attributes or set input."
            + ("offset" if key == "offset" else "voxel_size"),
        )
    return Coordinate(int(v) for v in value)


def _given(value: Sequence[int], dims: int, key: str) -> Coordinate:
    if len(value) != dims:
        raise InputError(
            f"{key} has {plural(len(value), 'value')}, the input has "
            f"{plural(dims, 'spatial axis', 'spatial axes')}",
            key,
            "give one value per spatial axis (z, y, x order, world units)",
        )
    return Coordinate(value)

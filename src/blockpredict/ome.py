"""OME-NGFF metadata: write it for outputs, read it for inputs.

Outputs are OME-NGFF multiscale images: a group whose ``multiscales``
attribute lists the levels ``s0``, ``s1``, ... with their scale (the voxel
size) and translation (the ROI's offset, world units, funlib's corner
convention). Version 0.4 for zarr v2 (``.zattrs``) and 0.5 for zarr v3
(``zarr.json``, under ``attributes.ome``).

An input level's translation need not fall on its voxel grid: ome-zarr (0.18 and
later) writes each downsampled level shifted by half a voxel of the level below
(pixel centres: ``s1`` of a 2 nm image has voxel size 4 and translation 1). The
level is then read on its grid (the offset rounded down to a multiple of its voxel
size, as funlib's ROIs need) and the remainder, a sub-voxel ``shift`` of the whole
grid, is added back to the output's translation, so predictions stay where their
voxels are.

funlib.persistence 0.7's ``prepare_ome_ds`` writes through iohub's "fov"
layout: one image per store, that must not exist yet, without shards or
pyramid levels. We write the few keys ourselves, and keep funlib's own
attributes on every level array so that ``open_ds`` still reads them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import zarr
from funlib.geometry import Coordinate

from .errors import InputError

# funlib/common unit spellings -> the UCUM names OME-NGFF lists
UNITS = {
    "nm": "nanometer",
    "um": "micrometer",
    "µm": "micrometer",
    "mm": "millimeter",
    "m": "meter",
    "pm": "picometer",
    "A": "angstrom",
    "s": "second",
    "ms": "millisecond",
}
OME_UNITS = set(UNITS.values())


def axes(axis_names: Sequence[str], units: Sequence[str]) -> list[dict[str, str]]:
    """The channel axis, then the spatial axes with their units (where known)."""
    result = [{"name": "c", "type": "channel"}]
    for name, unit in zip(axis_names, units, strict=True):
        axis = {"name": name, "type": "space"}
        ome_unit = unit if unit in OME_UNITS else UNITS.get(unit)
        if ome_unit:
            axis["unit"] = ome_unit
        result.append(axis)
    return result


def multiscales(
    name: str,
    axis_names: Sequence[str],
    units: Sequence[str],
    levels: Sequence[tuple[str, Coordinate, Coordinate]],
    zarr_format: int,
    method: str,
    shift: Sequence[float] = (),
) -> dict[str, Any]:
    """Group attributes for one multiscale image; ``levels`` is (path, voxel size, offset),
    and ``shift`` (world units) is added to every level's translation."""
    shift = tuple(shift) or (0.0,) * len(axis_names)
    datasets = [
        {
            "path": path,
            "coordinateTransformations": [
                {"type": "scale", "scale": [1.0, *(float(v) for v in voxel_size)]},
                {
                    "type": "translation",
                    "translation": [0.0, *(o + d for o, d in zip(offset, shift, strict=True))],
                },
            ],
        }
        for path, voxel_size, offset in levels
    ]
    image: dict[str, Any] = {
        "name": name,
        "axes": axes(axis_names, units),
        "datasets": datasets,
        "type": method,
        "metadata": {"method": method, "written_by": "blockpredict"},
    }
    if zarr_format == 2:
        return {"multiscales": [{"version": "0.4", **image}]}
    return {"ome": {"version": "0.5", "multiscales": [image]}}


@dataclass(frozen=True)
class OmeLevel:
    """One level of an OME-NGFF multiscale input, in funlib's terms."""

    group: str
    level: str
    voxel_size: Coordinate
    offset: Coordinate
    axis_names: tuple[str, ...]  # funlib names: channel axes end in "^"
    types: tuple[str, ...]
    units: tuple[str, ...]  # spatial axes only
    # the translation beyond ``offset`` (world units, each under one voxel): the
    # output's translation keeps it; empty where the translation is on the grid
    shift: tuple[float, ...] = ()


def find_level(container: str, dataset: str) -> OmeLevel | None:
    """The OME-NGFF level ``dataset`` names (``group/level``), or None if not in one.

    Raises :class:`InputError` when the group is a multiscale image but the
    level does not exist, naming the levels that do.
    """
    whole = _multiscale(os.path.join(container, dataset))
    if whole is not None:
        levels = ", ".join(f"{dataset.rstrip('/')}/{d['path']}" for d in whole["datasets"])
        raise InputError(
            f"input dataset {dataset!r} is an OME-NGFF multiscale image, not an array",
            os.path.join(container, dataset),
            f"name one of its levels: {levels}",
        )
    group_name, _, level = dataset.rstrip("/").rpartition("/")
    image = _multiscale(os.path.join(container, group_name)) if level else None
    if image is None:
        return None
    where = os.path.join(container, dataset)
    paths = [d["path"] for d in image["datasets"]]
    if level not in paths:
        raise InputError(
            f"OME-NGFF level {level!r} does not exist in {group_name!r}",
            where,
            f"name one of its levels: {', '.join(group_name + '/' + p for p in paths)}",
        )
    datasets = image["datasets"]
    scale, translation = _transforms(datasets[paths.index(level)], image, where)
    axes_meta = image.get("axes") or []
    types = [a.get("type", "space") if isinstance(a, dict) else "space" for a in axes_meta]
    names = [a["name"] if isinstance(a, dict) else str(a) for a in axes_meta]
    spatial = [i for i, t in enumerate(types) if t in ("space", "time")]
    if not axes_meta or len(scale) != len(axes_meta):
        raise InputError(
            "OME-NGFF axes and coordinateTransformations disagree", where, "fix the metadata"
        )
    voxel_size = _whole([scale[i] for i in spatial], where)
    on_grid = [float(translation[i]) for i in spatial]
    offset = Coordinate(math.floor(t / v) * v for t, v in zip(on_grid, voxel_size, strict=True))
    shift = tuple(t - o for t, o in zip(on_grid, offset, strict=True))
    return OmeLevel(
        group=group_name,
        level=level,
        voxel_size=voxel_size,
        offset=offset,
        shift=shift if any(shift) else (),
        axis_names=tuple(n if i in spatial else n + "^" for i, n in enumerate(names)),
        types=tuple("space" if i in spatial else "channel" for i in range(len(names))),
        units=tuple(_unit(axes_meta[i]) for i in spatial),
    )


def _multiscale(path: str) -> dict[str, Any] | None:
    try:
        attrs = zarr.open_group(path, mode="r").attrs.asdict()
    except Exception:  # not a group (or nothing there)
        return None
    found = attrs.get("ome", attrs).get("multiscales")
    return found[0] if found else None


def _transforms(
    dataset: dict[str, Any], image: dict[str, Any], where: str
) -> tuple[list[float], list[float]]:
    """Scale and translation of one level, composed with the image-wide transforms."""
    n = len(image.get("axes") or [])
    scale, translation = [1.0] * n, [0.0] * n
    for transforms in (
        dataset.get("coordinateTransformations", []),
        image.get("coordinateTransformations", []),
    ):
        for t in transforms:
            if t.get("type") == "scale":
                translation = [o * s for o, s in zip(translation, t["scale"], strict=True)]
                scale = [a * b for a, b in zip(scale, t["scale"], strict=True)]
            elif t.get("type") == "translation":
                translation = [o + d for o, d in zip(translation, t["translation"], strict=True)]
            elif t.get("type") != "identity":
                raise InputError(
                    f"unsupported coordinateTransformation {t.get('type')!r}",
                    where,
                    "use scale and translation transforms only",
                )
    return scale, translation


def _whole(values: Sequence[float], where: str) -> Coordinate:
    if any(float(v) != int(v) for v in values):
        raise InputError(
            f"OME-NGFF scale {list(values)} is not in whole numbers",
            where,
            "express them in a unit where they are integers (e.g. nanometer)",
        )
    return Coordinate(int(v) for v in values)


def _unit(axis: Any) -> str:
    unit = axis.get("unit", "") if isinstance(axis, dict) else ""
    short = {v: k for k, v in UNITS.items() if k != "µm"}
    return short.get(unit, unit or "")

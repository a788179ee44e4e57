"""The output layout: one value that says which arrays a run writes, and how.

:func:`describe_output` turns the plan and the workflow's ``output`` section
into an :class:`OutputInfo`: its images (one per channel group), their pyramid
levels with shapes, voxel sizes, chunks and shards, the zarr format and the
compressor. Pure: it checks and computes, it writes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import pairwise

from funlib.geometry import Coordinate, Roi

from .config import OutputConfig
from .errors import ConfigError
from .output_grid import output_grid
from .plan import BlockPlan
from .urls import join


@dataclass(frozen=True)
class Level:
    """One array of an image: level ``s{k}`` at ``factor`` times the output voxel size."""

    name: str
    factor: Coordinate
    voxel_size: Coordinate
    shape: tuple[int, ...]  # (channels, *spatial)
    chunks: tuple[int, ...]
    shards: tuple[int, ...] | None


@dataclass(frozen=True)
class Image:
    """One OME-NGFF multiscale image: channels ``[lo, hi)`` of the model's output."""

    path: str
    channels: tuple[int, int]
    dtype: str
    levels: tuple[Level, ...]

    @property
    def num_channels(self) -> int:
        return self.channels[1] - self.channels[0]


@dataclass(frozen=True)
class OutputInfo:
    """Where and how blocks are written.

    ``path`` is the output's main name (``container/dataset``); the ledger is
    named after it. ``images`` are the arrays written, each an OME-NGFF image.
    """

    path: str
    roi: Roi
    voxel_size: Coordinate
    dtype: str
    num_channels: int
    images: tuple[Image, ...] = ()
    zarr_format: int = 3
    compressor: str = "lz4"
    range: tuple[float, float] = (0.0, 1.0)
    axis_names: tuple[str, ...] = field(default=())
    units: tuple[str, ...] = field(default=())
    storage_options: dict = field(default_factory=dict)  # fsspec options of a URL container
    shift: tuple[float, ...] = ()  # the input's sub-voxel shift, kept in the OME translation


def describe_output(
    plan: BlockPlan,
    output: OutputConfig,
    num_channels: int,
    axis_names: tuple[str, ...],
    units: tuple[str, ...],
    input_zarr_format: int = 3,
    shift: tuple[float, ...] = (),
) -> OutputInfo:
    """The whole output layout, or a :class:`GeometryError`/:class:`ConfigError`."""
    zarr_format = output.zarr_format or input_zarr_format
    grid = output_grid(
        plan.write_shape,
        output.chunk_shape,
        output.shard_shape,
        sharded=zarr_format == 3,
        levels=output.multiscale,
        factor=output.multiscale_factors,
    )
    if output.datasets:
        groups = {n: (*g.channels, g.dtype) for n, g in output.datasets.items()}
    else:
        groups = {output.dataset: (0, num_channels, output.dtype)}
    _check_groups(groups, num_channels)
    shape = plan.output_shape
    images = []
    for name, (lo, hi, dtype) in groups.items():
        c = hi - lo
        levels = []
        for k, factor in enumerate(grid.factors):
            level_shape = tuple(-(-s // f) for s, f in zip(shape, factor, strict=True))
            if k == 0:
                chunks, shards = grid.chunks, grid.shards
            else:  # one chunk per block and level
                chunks, shards = plan.write_shape / factor, None
            levels.append(
                Level(
                    name=f"s{k}",
                    factor=factor,
                    voxel_size=plan.output_voxel_size * factor,
                    shape=(c, *level_shape),
                    chunks=(c, *chunks),
                    shards=None if shards is None else (c, *shards),
                )
            )
        path = join(output.container, name)
        images.append(Image(path, (lo, hi), dtype, tuple(levels)))
    return OutputInfo(
        path=join(output.container, output.dataset),
        roi=plan.output_roi.copy(),
        voxel_size=plan.output_voxel_size,
        dtype=output.dtype,
        num_channels=num_channels,
        images=tuple(images),
        zarr_format=zarr_format,
        compressor=output.compressor,
        range=(float(output.range[0]), float(output.range[1])),
        axis_names=tuple(axis_names),
        units=tuple(units),
        storage_options=dict(output.storage_options),
        shift=shift,
    )


def _check_groups(groups: dict[str, tuple[int, int, str]], num_channels: int) -> None:
    """Channel groups inside ``[0, num_channels)`` that do not overlap."""
    spans = []
    for name, (lo, hi, _) in groups.items():
        where = f"output.datasets.{name}"
        if not name or name.startswith("/") or ".." in name.split("/"):
            raise ConfigError(f"bad dataset name {name!r}", where, "use a relative name")
        if hi > num_channels:
            raise ConfigError(
                f"channels [{lo}, {hi}) exceed the model's {num_channels} output channels",
                where,
                f"give channels inside [0, {num_channels})",
            )
        spans.append((lo, hi, name))
    spans.sort()
    for (_, hi_a, a), (lo_b, _, b) in pairwise(spans):
        if lo_b < hi_a:
            raise ConfigError(
                f"channel groups {a!r} and {b!r} overlap",
                f"output.datasets.{b}",
                "give each channel to at most one group",
            )

"""The output's grid of chunks, shards and pyramid levels, checked against the blocks.

Pure geometry, like :mod:`.plan`: every block's write ROI must cover whole chunks
(or whole shards) and whole voxels of the coarsest pyramid level, so that no two
blocks write into one chunk or shard and each block downsamples its own output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from funlib.geometry import Coordinate

from .errors import GeometryError
from .words import plural


@dataclass(frozen=True)
class OutputGrid:
    """Chunks, shards and pyramid factors that keep every block's writes its own.

    Shapes are spatial, in output voxels. ``shards`` is None without sharding.
    ``factors[k]`` is the total downsampling of level ``s{k}`` (``factors[0]`` is 1).
    """

    chunks: Coordinate
    shards: Coordinate | None
    factors: tuple[Coordinate, ...]


def output_grid(
    write_shape: Coordinate,
    chunk_shape: Sequence[int] | None,
    shard_shape: Sequence[int] | None,
    sharded: bool,
    levels: int = 0,
    factor: Sequence[int] | None = None,
) -> OutputGrid:
    """Check that blocks write whole chunks, whole shards and whole pyramid voxels.

    Concurrent writes into one shard lose data (zarr-python #3682), so each
    block's write shape must be a whole number of shards (v3) or chunks (v2),
    and a multiple of the coarsest pyramid factor, so that no block needs a
    neighbour's voxels. Raises :class:`GeometryError` with the numbers.
    """
    dims = write_shape.dims
    shards = _shape_of(shard_shape, dims, "output.shard_shape") if sharded else None
    if shards is None and sharded:
        shards = write_shape
    outer = shards if shards is not None else write_shape
    chunks = _shape_of(chunk_shape, dims, "output.chunk_shape") or outer
    key = "output.shard_shape" if shards is not None else "output.chunk_shape"
    if shards is None:
        outer = chunks
    if any(w % s for w, s in zip(write_shape, outer, strict=True)):
        raise GeometryError(
            f"{key.split('.')[1].replace('_', ' ')} {tuple(outer)} does not tile the write shape "
            f"{tuple(write_shape)}: blocks would share {'shards' if shards else 'chunks'}",
            key,
            f"give a shape that divides {tuple(write_shape)} on every axis",
        )
    if shards is not None and any(s % c for s, c in zip(shards, chunks, strict=True)):
        raise GeometryError(
            f"chunk shape {tuple(chunks)} does not divide the shard shape {tuple(shards)}",
            "output.chunk_shape",
            f"give a chunk shape that divides {tuple(shards)} on every axis",
        )
    if shards is not None and chunks == shards:
        shards = None  # one chunk per shard: plain chunks, no sharding codec
    step = _shape_of(factor, dims, "output.multiscale_factors") or Coordinate((2,) * dims)
    factors = tuple(Coordinate(s**k for s in step) for k in range(levels + 1))
    if any(w % f for w, f in zip(write_shape, factors[-1], strict=True)):
        raise GeometryError(
            f"multiscale factor {tuple(factors[-1])} of level s{levels} does not divide the "
            f"write shape {tuple(write_shape)}: a block could not downsample its own output",
            "output.multiscale",
            "use fewer levels, other multiscale_factors, or an eval shape divisible by them",
        )
    return OutputGrid(chunks, shards, factors)


def _shape_of(shape: Sequence[int] | None, dims: int, key: str) -> Coordinate | None:
    if shape is None:
        return None
    if len(shape) != dims:
        raise GeometryError(
            f"{key} has {plural(len(shape), 'value')}, the output has "
            f"{plural(dims, 'spatial axis', 'spatial axes')}",
            key,
            "give one value per spatial axis",
        )
    return Coordinate(shape)

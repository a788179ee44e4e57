"""Block plan: the geometry of a blockwise prediction, pure and without I/O.

Given the input ROI and voxel size and the model's shapes, a :class:`BlockPlan`
fixes the output voxel size, the context, the read and write shapes, the output
ROI and the block grid. Blocks are computed from their id on demand, so a plan
of a terabyte volume costs a few coordinates, not a list of blocks.

World units are used for ROIs (like funlib); shapes are in voxels.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

from funlib.geometry import Coordinate, Roi

from .errors import GeometryError
from .words import plural

Border = Literal["valid", "pad"]


@dataclass(frozen=True)
class Block:
    """One unit of work: read ``read_roi`` of the input, write ``write_roi`` of the output.

    ``write_roi`` is cropped to the output ROI for trailing blocks; ``read_roi``
    always has the full eval input size (padded where outside the data).
    """

    id: int
    index: tuple[int, ...]
    read_roi: Roi
    write_roi: Roi


@dataclass(frozen=True)
class BlockPlan:
    """Voxel sizes, context, read/write shapes, output ROI and block grid.

    Shapes have the data's spatial dims; a model with fewer dims than the data
    gets read and write shapes of 1 voxel on the leading axes.
    """

    input_roi: Roi
    input_voxel_size: Coordinate
    output_voxel_size: Coordinate
    read_shape: Coordinate
    write_shape: Coordinate
    output_roi: Roi
    border: Border = "valid"
    warnings: tuple[str, ...] = field(default=(), compare=False)

    @property
    def dims(self) -> int:
        return self.input_voxel_size.dims

    @cached_property
    def read_size(self) -> Coordinate:
        """Read shape in world units."""
        return self.read_shape * self.input_voxel_size

    @cached_property
    def write_size(self) -> Coordinate:
        """Write shape in world units."""
        return self.write_shape * self.output_voxel_size

    @cached_property
    def context(self) -> Coordinate:
        """World units the read ROI extends beyond the write ROI on each side."""
        return (self.read_size - self.write_size) / 2

    @cached_property
    def output_shape(self) -> Coordinate:
        """Shape of the output ROI in output voxels."""
        return self.output_roi.shape / self.output_voxel_size

    @cached_property
    def grid_shape(self) -> Coordinate:
        """Number of blocks along each axis (trailing blocks may be partial)."""
        return Coordinate(
            math.ceil(s / w) for s, w in zip(self.output_roi.shape, self.write_size, strict=True)
        )

    @cached_property
    def num_blocks(self) -> int:
        return math.prod(self.grid_shape)

    def block_index(self, block_id: int) -> tuple[int, ...]:
        """Grid index of a block id (C order)."""
        if not 0 <= block_id < self.num_blocks:
            raise IndexError(f"block id {block_id} outside 0..{self.num_blocks - 1}")
        index = []
        for n in reversed(self.grid_shape):
            block_id, i = divmod(block_id, n)
            index.append(i)
        return tuple(reversed(index))

    @cached_property
    def _ints(self) -> tuple[tuple[int, ...], ...]:
        """The grid's vectors as plain ints: workers compute every block's ROIs, and
        funlib's Coordinate arithmetic costs about 10 us per operation."""
        return tuple(
            tuple(int(v) for v in c)
            for c in (
                self.output_roi.offset,
                self.output_roi.end,
                self.write_size,
                self.context,
                self.read_size,
            )
        )

    def block(self, block_id: int) -> Block:
        index = self.block_index(block_id)
        offset, shape, read_offset = self.block_box(block_id, index)
        write_roi = Roi(offset, shape)  # cropped to the output ROI for trailing blocks
        return Block(block_id, index, Roi(read_offset, self._ints[4]), write_roi)

    def block_box(
        self, block_id: int, index: tuple[int, ...] | None = None
    ) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """A block's write offset, write shape and read offset (world units) as plain ints:
        what :meth:`block` holds as ROIs, for a worker's per-block arithmetic."""
        index = index or self.block_index(block_id)
        begin, end, write, context, _ = self._ints
        offset = tuple(b + i * w for b, i, w in zip(begin, index, write, strict=True))
        shape = tuple(min(o + w, e) - o for o, w, e in zip(offset, write, end, strict=True))
        return offset, shape, tuple(o - c for o, c in zip(offset, context, strict=True))

    def blocks(self) -> Iterator[Block]:
        """All blocks, lazily, in id order."""
        for block_id in range(self.num_blocks):
            yield self.block(block_id)

    def to_dict(self) -> dict[str, object]:
        """Plain values that define the geometry (for reports and the hash)."""
        return {
            "input_roi": _roi_dict(self.input_roi),
            "input_voxel_size": list(self.input_voxel_size),
            "output_voxel_size": list(self.output_voxel_size),
            "read_shape": list(self.read_shape),
            "write_shape": list(self.write_shape),
            "context": list(self.context),
            "output_roi": _roi_dict(self.output_roi),
            "border": self.border,
            "grid_shape": list(self.grid_shape),
            "num_blocks": self.num_blocks,
        }


def _roi_dict(roi: Roi) -> dict[str, list[int]]:
    return {"offset": list(roi.offset), "shape": list(roi.shape)}


def lift(coordinate: Sequence[int], dims: int, fill: int) -> Coordinate:
    """Prepend ``fill`` so a model coordinate gets the data's number of dims."""
    coordinate = tuple(coordinate)
    if len(coordinate) > dims:
        raise GeometryError(
            f"model has {plural(len(coordinate), 'spatial dim')} but the input has {dims}",
            "input",
            "use a model with at most as many dims as the data",
        )
    return Coordinate((fill,) * (dims - len(coordinate)) + coordinate)


def make_plan(
    input_roi: Roi,
    input_voxel_size: Coordinate,
    output_voxel_size: Coordinate,
    eval_input_shape: Coordinate,
    eval_output_shape: Coordinate,
    requested_roi: Roi | None = None,
    border: Border = "valid",
    phase: Coordinate | None = None,
) -> BlockPlan:
    """Plan the blocks of a prediction, or raise :class:`GeometryError`.

    ``output_voxel_size`` is ``model.scale(input_voxel_size)``;
    ``eval_input_shape``/``eval_output_shape`` are the model's spatial shapes in
    voxels (model dims; lifted to the data's dims). ``phase`` is the total
    downsampling factor of the model: write shapes that are not a multiple of
    it give block seams that differ from a whole-volume prediction.
    """
    dims = input_voxel_size.dims
    vin = Coordinate(input_voxel_size)
    vout = lift(output_voxel_size, dims, 0)
    vout = Coordinate(o if o else i for o, i in zip(vout, vin, strict=True))
    read_shape = lift(eval_input_shape, dims, 1)
    write_shape = lift(eval_output_shape, dims, 1)
    _check_voxel_sizes(vin, vout)
    if any(s <= 0 for s in write_shape):
        raise GeometryError(
            f"model output shape {tuple(eval_output_shape)} is empty "
            f"for eval input shape {tuple(eval_input_shape)}",
            "model",
            "increase input_shape or eval_shape_increase",
        )
    read_size, write_size = read_shape * vin, write_shape * vout
    grid = Coordinate(math.lcm(a, b) for a, b in zip(vin, vout, strict=True))
    _check_context(read_size, write_size, vin, vout, grid)
    context = (read_size - write_size) / 2
    output_roi, warnings = _output_roi(input_roi, context, grid, requested_roi, border, vout)
    warnings += _phase_warnings(write_size, vin, dims, phase)
    return BlockPlan(
        input_roi=input_roi.copy(),
        input_voxel_size=vin,
        output_voxel_size=vout,
        read_shape=read_shape,
        write_shape=write_shape,
        output_roi=output_roi,
        border=border,
        warnings=tuple(warnings),
    )


def _check_voxel_sizes(vin: Coordinate, vout: Coordinate) -> None:
    for i, o in zip(vin, vout, strict=True):
        if o <= 0 or (i % o and o % i):
            raise GeometryError(
                f"output voxel size {tuple(vout)} is not an integer scaling "
                f"of the input voxel size {tuple(vin)}",
                "model.scale",
                "use an input voxel size divisible by the model's scale factors",
            )


def _check_context(
    read_size: Coordinate,
    write_size: Coordinate,
    vin: Coordinate,
    vout: Coordinate,
    grid: Coordinate,
) -> None:
    diff = read_size - write_size
    if any(d < 0 for d in diff):
        raise GeometryError(
            f"write size {tuple(write_size)} exceeds read size {tuple(read_size)}",
            "model",
            "the model must not grow the field of view (check scale and shapes)",
        )
    if any(d % (2 * i) or d % (2 * o) for d, i, o in zip(diff, vin, vout, strict=True)):
        raise GeometryError(
            f"context {tuple(c / 2 for c in diff)} is not a whole number of input voxels "
            f"{tuple(vin)} and output voxels {tuple(vout)}",
            "model",
            "choose an eval input shape whose output is centered on whole voxels",
        )
    if any(w % g for w, g in zip(write_size, grid, strict=True)):
        raise GeometryError(
            f"write size {tuple(write_size)} is not a multiple of the voxel grid {tuple(grid)}",
            "model",
            "choose an eval input shape whose output covers whole input voxels",
        )


def _output_roi(
    input_roi: Roi,
    context: Coordinate,
    grid: Coordinate,
    requested_roi: Roi | None,
    border: Border,
    vout: Coordinate,
) -> tuple[Roi, list[str]]:
    """The output ROI, and warnings saying how a requested ROI was clipped or snapped."""
    allowed = input_roi.grow(-context, -context) if border == "valid" else input_roi.copy()
    limit = allowed.copy()
    if requested_roi is not None:
        if not requested_roi.intersects(input_roi):
            raise GeometryError(
                f"requested ROI {requested_roi} is outside the input ROI {input_roi}",
                "output.roi",
                "give an offset and shape inside the input (world units)",
            )
        allowed = allowed.intersect(requested_roi) if not allowed.empty else allowed
    if allowed.empty or any(s <= 0 for s in allowed.shape):
        raise GeometryError(
            f"output ROI is empty after shrinking the input ROI {input_roi} by the context "
            f"{tuple(context)}",
            "output.roi",
            "use a larger input, a larger requested ROI, or border: pad",
        )
    roi = allowed.snap_to_grid(grid, mode="shrink")
    if roi.empty or any(s <= 0 for s in roi.shape):
        raise GeometryError(
            f"output ROI {allowed} holds no whole output voxel of the grid {tuple(grid)}",
            "output.roi",
            "use a larger requested ROI",
        )
    if requested_roi is None:
        return roi, []
    span = ", ".join(f"{b}:{e}" for b, e in zip(limit.begin, limit.end, strict=True))
    limit_text = "the input ROI less the context" if border == "valid" else "the input ROI"
    warnings = [  # allowed is now the requested ROI clipped to the limit
        _trim_warning(f"was clipped to {limit_text} [{span}]", requested_roi, allowed, vout),
        _trim_warning(f"was snapped to the voxel grid {tuple(grid)}", allowed, roi, vout),
    ]
    return roi, [w for w in warnings if w]


def _trim_warning(what: str, before: Roi, after: Roi, vout: Coordinate) -> str | None:
    """How far each side of ``before`` moved in to give ``after`` (world units, output voxels).

    Voxels are output voxels and may be fractional (a requested edge between voxels).
    """
    start, end = after.begin - before.begin, before.end - after.end
    if not any(start) and not any(end):
        return None

    def side(name: str, by: Coordinate) -> str:
        voxels = ", ".join(f"{b / v:g}" for b, v in zip(by, vout, strict=True))
        return f"at the {name} by {tuple(by)} world units = ({voxels}) voxels"

    return (
        f"output.roi {what}: trimmed {side('start', start)}, {side('end', end)}; "
        f"now offset {tuple(after.offset)} shape {tuple(after.shape)}"
    )


def _phase_warnings(
    write_size: Coordinate, vin: Coordinate, dims: int, phase: Coordinate | None
) -> list[str]:
    if phase is None:
        return []
    phase = lift(phase, dims, 1)
    step = phase * vin
    if all(w % s == 0 for w, s in zip(write_size, step, strict=True)):
        return []
    return [
        f"write size {tuple(write_size)} is not a multiple of the model's total "
        f"downsampling {tuple(phase)} x input voxel size {tuple(vin)}: block seams will "
        "differ from a whole-volume prediction; adjust eval_shape_increase"
    ]

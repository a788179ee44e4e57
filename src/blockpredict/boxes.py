"""Blocks that tile a box, written with one storage call.

A worker writes a group of a task's blocks at once. The blocks are Morton
neighbours, so most of them fill a few boxes of the block grid; one write per
box lets the store encode and write the box's chunks together instead of
paying its per-call cost once per block (about 1 ms per call with zarr). A
write may touch only the group's own blocks, so a box is used only where the
blocks fill it exactly. Pure geometry and array assembly: no I/O here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from funlib.geometry import Roi

Box = tuple[tuple[int, ...], tuple[int, ...]]  # begin, end


def tiles(rois: Sequence[Roi]) -> list[list[int]]:
    """Indices of ``rois`` in groups whose ROIs exactly fill their bounding box.

    The ROIs must not overlap and must lie on a grid, as blocks' write ROIs do.
    Groups that do not fill their box are halved along the axis with the most
    block positions (a k-d split) until they do; a single ROI always does.
    """
    boxes = [(tuple(map(int, r.begin)), tuple(map(int, r.end))) for r in rois]
    out: list[list[int]] = []
    if boxes:
        _split(list(range(len(boxes))), boxes, out)
    return out


def _split(members: list[int], boxes: list[Box], out: list[list[int]]) -> None:
    if len(members) == 1 or _filled(members, boxes) is not None:
        out.append(members)
        return
    dims = len(boxes[members[0]][0])
    begins = [sorted({boxes[i][0][d] for i in members}) for d in range(dims)]
    axis = max(range(dims), key=lambda d: len(begins[d]))
    cut = begins[axis][len(begins[axis]) // 2]
    _split([i for i in members if boxes[i][0][axis] < cut], boxes, out)
    _split([i for i in members if boxes[i][0][axis] >= cut], boxes, out)


def _filled(members: list[int], boxes: list[Box]) -> Box | None:
    """The bounding box of non-overlapping boxes, if they fill it (their volumes add up)."""
    dims = len(boxes[members[0]][0])
    lo = tuple(min(boxes[i][0][d] for i in members) for d in range(dims))
    hi = tuple(max(boxes[i][1][d] for i in members) for d in range(dims))
    volume = sum(math.prod(e - b for b, e in zip(*boxes[i], strict=True)) for i in members)
    return (lo, hi) if volume == math.prod(h - b for b, h in zip(lo, hi, strict=True)) else None


def joined(
    wheres: Sequence[tuple[slice, ...]], pieces: Sequence[np.ndarray]
) -> tuple[tuple[slice, ...], np.ndarray] | None:
    """One array for pieces that exactly tile their bounding box, and its selection.

    ``wheres`` are the pieces' selections in one array (``(slice(None), *spatial)``,
    channels first). None when the pieces do not fill the box (a caller then
    writes them one by one).
    """
    spatial = [where[1:] for where in wheres]
    boxes = [(tuple(s.start for s in w), tuple(s.stop for s in w)) for w in spatial]
    box = _filled(list(range(len(boxes))), boxes)
    if box is None:
        return None
    lo, hi = box
    first = pieces[0]
    data = np.empty((first.shape[0], *(h - b for b, h in zip(lo, hi, strict=True))), first.dtype)
    for (begin, end), piece in zip(boxes, pieces, strict=True):
        inner = tuple(slice(b - o, e - o) for b, e, o in zip(begin, end, lo, strict=True))
        data[(slice(None), *inner)] = piece
    where = tuple(slice(b, h) for b, h in zip(lo, hi, strict=True))
    return (slice(None), *where), data

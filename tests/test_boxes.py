"""Blocks joined into boxes for one write: every block once, every box filled exactly."""

from __future__ import annotations

import math

import numpy as np
from funlib.geometry import Roi
from hypothesis import given, settings
from hypothesis import strategies as st

from blockpredict.boxes import joined, tiles
from blockpredict.order import morton_order

GRID = (5, 6, 7)
SIZE = (4, 3, 2)  # a block's shape in world units


def block_roi(index: tuple[int, ...]) -> Roi:
    return Roi(tuple(i * s for i, s in zip(index, SIZE)), SIZE)


def morton_run(start: int, length: int) -> list[tuple[int, ...]]:
    """``length`` consecutive blocks of the grid's Morton order, as a task's group has."""
    order = list(morton_order(GRID))[start : start + length]
    return [tuple(int(i) for i in np.unravel_index(b, GRID)) for b in order]


def test_an_aligned_morton_run_is_one_box() -> None:
    rois = [block_roi(i) for i in morton_run(0, 8)]  # the first 2x2x2 cube
    assert tiles(rois) == [list(range(8))]


@settings(max_examples=200, deadline=None)
@given(
    start=st.integers(0, math.prod(GRID) - 1),
    length=st.integers(1, 64),
    drop=st.sets(st.integers(0, 63), max_size=10),
)
def test_tiles_cover_every_block_once_with_filled_boxes(
    start: int, length: int, drop: set[int]
) -> None:
    """Any group (a Morton run, with some blocks already done) splits into filled boxes."""
    run = [index for k, index in enumerate(morton_run(start, length)) if k not in drop]
    rois = [block_roi(i) for i in run]
    groups = tiles(rois)
    assert sorted(i for g in groups for i in g) == list(range(len(rois)))
    for group in groups:
        box = rois[group[0]]
        for i in group[1:]:
            box = box.union(rois[i])
        assert box.size == sum(rois[i].size for i in group)  # filled: nothing else written
    if len(rois) >= 8:
        assert len(groups) < len(rois)  # and some blocks share a write


def test_joined_places_each_piece_and_refuses_a_box_with_a_hole() -> None:
    rng = np.random.default_rng(0)
    wheres = [
        (slice(None), slice(0, 2), slice(4, 6)),
        (slice(None), slice(2, 4), slice(4, 6)),
        (slice(None), slice(0, 2), slice(6, 9)),
        (slice(None), slice(2, 4), slice(6, 9)),
    ]
    pieces = [rng.random((3, 2, w[2].stop - w[2].start), dtype=np.float32) for w in wheres]
    where, data = joined(wheres, pieces)
    assert where == (slice(None), slice(0, 4), slice(4, 9))
    whole = np.zeros((3, 4, 9), np.float32)
    for w, p in zip(wheres, pieces):
        whole[w] = p
    np.testing.assert_array_equal(data, whole[where])
    assert joined(wheres[:3], pieces[:3]) is None

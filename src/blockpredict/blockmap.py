"""The block map the dashboard draws: block states per map cell, kept up to date as results come.

A run can have billions of blocks (a 1 PB volume: 1.28e9 blocks of 92³), so the page
cannot decode the ledger at each refresh. :class:`BlockMap` keeps, per cell of a small
2D map, how many of the blocks it covers are in each state, and updates those counts
as blocks are submitted, finish or fail. Drawing the projection then costs O(cells),
whatever the number of blocks.

A cell covers ``step`` x ``step`` blocks in (y, x), with ``step`` chosen so that the map
has at most ``max_side`` cells per side, and all the block layers along z. It shows the
most telling state among its blocks, in this order: failed, in flight, pending, done,
skipped by resume. So a cell turns "done" only when all its blocks are done, and one
failed block anywhere under it stays visible at any zoom.

One z layer (the slider) is drawn from that layer's slice of the ledger: O(blocks of one
layer), never the whole ledger.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from .ledger import DONE, FAILED

PENDING, IN_FLIGHT, DONE_NOW, FAILED_NOW, SKIPPED = range(5)
STATE_NAMES = ("pending", "in flight", "done", "failed", "skipped by resume")
STATE_COLORS = ("#d9d9d9", "#f2b701", "#2ca02c", "#d62728", "#1f77b4")

MAX_SIDE = 512  # cells per side of the drawn map
SLAB = 1 << 22  # blocks of the ledger read at a time when the run starts

# the most telling state first: failed > in flight > pending > done > skipped by resume
_RANK = np.array([2, 3, 1, 4, 0], np.uint8)  # code -> rank
_CODE_OF_RANK = np.array([SKIPPED, DONE_NOW, PENDING, IN_FLIGHT, FAILED_NOW], np.uint8)


class BlockMap:
    """Per-cell state counts of a block grid (z, y, x), or (y, x) for a 2D output.

    Not thread safe: :class:`~blockpredict.live.LiveState` holds the lock.
    """

    def __init__(self, grid_shape: Iterable[int], max_side: int = MAX_SIDE) -> None:
        grid = tuple(int(n) for n in grid_shape)
        self.ny, self.nx = ((1, 1) + grid)[-2:]
        self.layers = math.prod(grid) // (self.ny * self.nx)
        self.step = max(1, math.ceil(max(self.ny, self.nx) / max_side))
        self.shape = (math.ceil(self.ny / self.step), math.ceil(self.nx / self.step))
        self.counts = np.zeros((5, *self.shape), np.int64)  # state code, cell y, cell x
        ys = np.minimum(self.step, self.ny - self.step * np.arange(self.shape[0]))
        xs = np.minimum(self.step, self.nx - self.step * np.arange(self.shape[1]))
        self.counts[PENDING] = np.outer(ys, xs) * self.layers  # blocks under each cell
        self.failed: set[int] = set()  # failed now, or in an earlier run and not yet retried

    def load(self, states: np.ndarray) -> None:
        """Count the blocks a ledger already holds as done (skipped) or failed, once.

        Whole rows of blocks at a time, summed per cell in x by element-wise adds and
        in y by ``reduceat``: a few passes over the ledger, no per-block index arrays.
        """
        nx, rows, step = self.nx, max(1, SLAB // self.nx), self.step
        for r0 in range(0, states.size // nx, rows):
            part = states[r0 * nx : (r0 + rows) * nx]
            n = part.size // nx
            cy = (r0 + np.arange(n)) % self.ny // step  # the cell row of each block row
            starts_y = np.flatnonzero(np.diff(cy, prepend=-1))
            for value, code in ((DONE, SKIPPED), (FAILED, FAILED_NOW)):
                hit = part == value
                if not hit.any():
                    continue
                padded = np.zeros((n, self.shape[1] * step), np.uint8)
                padded[:, :nx] = hit.reshape(n, nx)
                columns = padded.reshape(n, self.shape[1], step)
                per_x = columns[:, :, 0].astype(np.int64)  # step element-wise adds: fast
                for i in range(1, step):
                    per_x += columns[:, :, i]
                per_cell = np.add.reduceat(per_x, starts_y, axis=0)
                np.add.at(self.counts[code], cy[starts_y], per_cell)
                np.add.at(self.counts[PENDING], cy[starts_y], -per_cell)
                if code == FAILED_NOW:
                    self.failed.update((np.flatnonzero(hit) + r0 * nx).tolist())

    def move(self, block_id: int, old: int, new: int) -> None:
        """One block went from state ``old`` to ``new``."""
        yx = block_id % (self.ny * self.nx)  # plain ints: this runs once per result
        cy, cx = yx // self.nx // self.step, yx % self.nx // self.step
        self.counts[old, cy, cx] -= 1
        self.counts[new, cy, cx] += 1

    def submitted(self, block_id: int) -> None:
        old = FAILED_NOW if block_id in self.failed else PENDING
        self.failed.discard(block_id)
        self.move(block_id, old, IN_FLIGHT)

    def projection(self) -> np.ndarray:
        """The map's state codes: the most telling state over each cell's blocks, O(cells)."""
        codes = np.full(self.shape, SKIPPED, np.uint8)
        for code in (DONE_NOW, PENDING, IN_FLIGHT, FAILED_NOW):  # later wins
            codes[self.counts[code] > 0] = code
        return codes

    def layer(self, codes: np.ndarray) -> np.ndarray:
        """Per-block state codes of one layer (ny * nx) reduced to the map's cells."""
        s = self.step
        h, w = self.shape
        ranks = np.zeros((h * s, w * s), np.uint8)  # padding has rank 0: it never wins
        ranks[: self.ny, : self.nx] = _RANK[codes.reshape(self.ny, self.nx)]
        # the maximum over each cell as s + s element-wise passes: ~5x faster than max(axis=)
        along_x = ranks.reshape(h * s, w, s)
        top = along_x[:, :, 0].copy()
        for i in range(1, s):
            np.maximum(top, along_x[:, :, i], out=top)
        along_y = top.reshape(h, s, w)
        cell = along_y[:, 0].copy()
        for i in range(1, s):
            np.maximum(cell, along_y[:, i], out=cell)
        return _CODE_OF_RANK[cell]

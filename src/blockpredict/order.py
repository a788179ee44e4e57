"""The order in which blocks go out: Morton (Z-order), so neighbours run close in time.

Neighbouring blocks share input chunks (their read ROIs overlap by the context), so
a worker's next block is usually a neighbour of its last and the input chunk cache
(:mod:`.cache`) serves the overlap. Pure, like :mod:`.plan`: ids from a grid shape.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np


def morton_order(grid_shape: Sequence[int], batch: int = 1 << 16) -> Iterator[int]:
    """Block ids in Z-order (Morton order): neighbouring blocks run close in time.

    Lazy: codes are decoded in batches, so memory stays constant for any grid.
    """
    grid = np.asarray(grid_shape, dtype=np.int64)
    dims = len(grid)
    bits = max(1, int(grid.max() - 1).bit_length())
    strides = np.cumprod([1, *grid[::-1][:-1]])[::-1]
    for start in range(0, 1 << (bits * dims), batch):
        codes = np.arange(start, min(start + batch, 1 << (bits * dims)), dtype=np.int64)
        index = np.zeros((len(codes), dims), dtype=np.int64)
        for bit in range(bits):
            for d in range(dims):
                shift = bit * dims + (dims - 1 - d)
                index[:, d] |= ((codes >> shift) & 1) << bit
        inside = (index < grid).all(axis=1)
        yield from (index[inside] @ strides).tolist()

"""Pyramid levels: mean downsampling of one block's output, by itself.

A block's write shape is a multiple of every level's factor (the plan checks
it), so a block's level voxels depend on its own full-resolution voxels only.
Trailing blocks, cropped at the output ROI's end, average the voxels they
have: a level voxel is the mean of the full-resolution voxels it covers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def downsample(data: np.ndarray, factor: Sequence[int]) -> np.ndarray:
    """Mean over ``factor`` windows of the spatial axes of ``(C, *spatial)`` data.

    Integer data gets the mean rounded (half to even), float data the mean in
    its own dtype; the result has shape ``(C, *ceil(spatial / factor))``.
    """
    factor = tuple(int(f) for f in factor)
    if all(f == 1 for f in factor):
        return data
    spatial = data.shape[1:]
    target = tuple(math.ceil(s / f) for s, f in zip(spatial, factor, strict=True))
    padded = tuple(t * f for t, f in zip(target, factor, strict=True))
    windows = [data.shape[0]]
    for t, f in zip(target, factor, strict=True):
        windows += [t, f]
    sum_axes = tuple(range(2, 2 * len(factor) + 1, 2))
    values = np.zeros((data.shape[0], *padded), dtype=np.float64)
    values[(slice(None), *(slice(0, s) for s in spatial))] = data
    total = values.reshape(windows).sum(axis=sum_axes)
    if padded == spatial:
        mean = total / math.prod(factor)
    else:
        counts = np.zeros(padded, dtype=np.float64)
        counts[tuple(slice(0, s) for s in spatial)] = 1.0
        mean = total / counts.reshape(windows[1:]).sum(axis=tuple(a - 1 for a in sum_axes))
    if np.issubdtype(data.dtype, np.integer):
        info = np.iinfo(data.dtype)
        return np.clip(np.rint(mean), info.min, info.max).astype(data.dtype)
    return mean.astype(data.dtype)

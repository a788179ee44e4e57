"""``blockpredict preview``: a PNG of one section with the block grid drawn over it.

Side by side: the input, the output (each channel in gray, or one RGB panel for
three channels), each with the outline of every block of that section in its
state's colour (pending, done, failed; the dashboard's colours). Every panel
covers the output ROI at the same pixel size, so offsets, scale and seams can be
checked at a glance. The block grid comes from the ledger (and its event log),
so a preview needs neither the model nor a cluster.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from funlib.geometry import Coordinate, Roi
from funlib.persistence import open_ds

from .errors import InputError
from .events import events_path, replay
from .ledger import DONE, FAILED, Ledger, ledger_path
from .live import DONE_NOW, FAILED_NOW, PENDING, STATE_COLORS

GAP = 4  # white pixels between panels
MIN_SIDE = 256  # small sections are scaled up by an integer factor to at least this


@dataclass(frozen=True)
class Layout:
    """Where things are in the image: for users of :func:`render` (and its tests)."""

    z: int | None  # world z of the section (None for 2D data)
    pixel_size: Coordinate  # world (y, x) per pixel before scaling
    scale: int  # each pixel repeated scale x scale times
    panels: tuple[str, ...]  # "input", "output" (RGB) or "output c<i>"
    panel_width: int  # in image pixels, scale included
    lines_y: tuple[int, ...]  # block outlines: image rows (within a panel) of block tops
    lines_x: tuple[int, ...]  # image columns (within a panel) of block left edges


def write_preview(
    input_path: str, output: str, out_png: Path, z: float | None = None, shown: str | None = None
) -> Layout:
    """Render the section at world ``z`` (default: the middle of the output ROI) to a PNG.

    ``output`` names the ledger; ``shown`` the output image drawn (default: ``output``).
    """
    from PIL import Image

    image, layout = render(input_path, output, z, shown)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(out_png)
    return layout


def render(
    input_path: str, output: str, z: float | None = None, shown: str | None = None
) -> tuple[np.ndarray, Layout]:
    """The RGB image (H, W, 3) of the section, and where its panels and grid lines are."""
    path = ledger_path(output)
    if not Ledger.exists(path):
        raise InputError("no ledger: this output has not been predicted", path, "run predict")
    ledger = Ledger.open(path)
    replay(ledger, events_path(output))
    plan = ledger.geometry["plan"]
    roi = Roi(plan["output_roi"]["offset"], plan["output_roi"]["shape"])
    out_vs = Coordinate(plan["output_voxel_size"])
    write_size = Coordinate(plan["write_shape"]) * out_vs
    grid = tuple(plan["grid_shape"])
    source = open_ds(input_path)
    result = open_ds(_full_resolution(shown or output))
    section, z_world, layer = _section(roi, out_vs, write_size, z)
    in_vs = Coordinate(source.voxel_size)
    pixel = Coordinate(min(a, b) for a, b in zip(in_vs[-2:], out_vs[-2:], strict=True))
    panels = [("input", _gray(_sample(source, section, pixel)))]
    out = _sample(result, section, pixel)
    if out.shape[0] == 3:
        panels.append(("output", np.stack([_to_uint8(c) for c in out], axis=-1)))
    else:
        panels += [(f"output c{i}", _gray(c)) for i, c in enumerate(out)]
    h, w = panels[0][1].shape[:2]
    scale = max(1, math.ceil(MIN_SIDE / max(h, w)))
    states = _layer_states(ledger.states, grid, layer)
    tops = [(by * write_size[-2]) // pixel[0] * scale for by in range(states.shape[0])]
    lefts = [(bx * write_size[-1]) // pixel[1] * scale for bx in range(states.shape[1])]
    width = w * scale
    image = np.full((h * scale, len(panels) * (width + GAP) - GAP, 3), 255, np.uint8)
    for i, (_, panel) in enumerate(panels):
        big = panel.repeat(scale, 0).repeat(scale, 1)
        _outline(big, states, tops, lefts)
        image[:, i * (width + GAP) : i * (width + GAP) + width] = big
    layout = Layout(
        z=z_world,
        pixel_size=pixel,
        scale=scale,
        panels=tuple(n for n, _ in panels),
        panel_width=width,
        lines_y=tuple(tops),
        lines_x=tuple(lefts),
    )
    return image, layout


def _full_resolution(path: str) -> str:
    """An output image's ``s0`` level (outputs are OME-NGFF multiscale groups)."""
    level = os.path.join(path, "s0")
    return level if os.path.exists(level) else path


def _section(
    roi: Roi, voxel_size: Coordinate, write_size: Coordinate, z: float | None
) -> tuple[Roi, int | None, int]:
    """The one-voxel-thick output ROI slab at world ``z``, that z, and its block layer."""
    if roi.dims < 3:
        return roi, None, 0
    lo, hi = roi.begin[-3], roi.end[-3]
    if z is None:
        z = lo + (hi - lo) // 2
    if not lo <= z < hi:
        raise InputError(
            f"z = {z:g} is outside the output ROI [{lo}, {hi}) in world units",
            "--z",
            f"give a z in [{lo}, {hi})",
        )
    zs = int(lo + (int(z) - lo) // voxel_size[-3] * voxel_size[-3])
    begin = list(roi.begin)
    shape = list(roi.shape)
    begin[-3], shape[-3] = zs, voxel_size[-3]
    layer = (zs - lo) // write_size[-3]
    return Roi(begin, shape), zs, int(layer)


def _sample(array: Any, section: Roi, pixel: Coordinate) -> np.ndarray:
    """(C, H, W) values at each pixel's centre (nearest voxel), zero outside the array."""
    vs = Coordinate(array.voxel_size)
    region = section.snap_to_grid(vs, mode="grow")  # whole voxels around the section
    data = _read(array, region)
    channels = data.ndim - vs.dims
    data = data.reshape((-1, *data.shape[channels:])) if channels else data[None]
    data = data.reshape(data.shape[0], -1, *data.shape[-2:])[:, 0]
    ny, nx = section.shape[-2] // pixel[0], section.shape[-1] // pixel[1]
    centres_y = section.begin[-2] + np.arange(ny) * pixel[0] + pixel[0] // 2
    centres_x = section.begin[-1] + np.arange(nx) * pixel[1] + pixel[1] // 2
    iy = (centres_y - region.begin[-2]) // vs[-2]
    ix = (centres_x - region.begin[-1]) // vs[-1]
    return data[:, iy][:, :, ix]


def _read(array: Any, region: Roi) -> np.ndarray:
    """``region`` of ``array`` with its channel axes first (wherever the array keeps them),
    zero outside the array."""
    vs = Coordinate(array.voxel_size)
    axes = [i for i, kind in enumerate(array.types) if kind == "channel"]
    channels = tuple(array.shape[i] for i in axes)
    out = np.zeros((*channels, *(region.shape / vs)), dtype=array.dtype)
    inside = region.intersect(array.roi)
    if not inside.empty:
        data = np.moveaxis(np.asarray(array[inside]), axes, list(range(len(axes))))
        out[(..., *((inside - region.offset) / vs).to_slices())] = data
    return out


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """uint8 as it is; floats in [0, 1] times 255; anything else stretched to 0..255."""
    if values.dtype == np.uint8:
        return values
    v = values.astype(np.float64)
    if v.size and v.min() >= 0 and v.max() <= 1 and values.dtype.kind == "f":
        return np.round(v * 255).astype(np.uint8)
    lo, hi = (float(v.min()), float(v.max())) if v.size else (0.0, 1.0)
    return np.round((v - lo) / max(hi - lo, 1e-12) * 255).astype(np.uint8)


def _gray(values: np.ndarray) -> np.ndarray:
    g = _to_uint8(values[0] if values.ndim == 3 else values)
    return np.repeat(g[..., None], 3, axis=-1)


def _layer_states(states: np.ndarray, grid: tuple[int, ...], layer: int) -> np.ndarray:
    """Display codes (pending, done, failed) of one layer of the block grid."""
    ny, nx = ((1, 1) + grid)[-2:]
    raw = states[layer * ny * nx : (layer + 1) * ny * nx].reshape(ny, nx)
    codes = np.full(raw.shape, PENDING, np.uint8)
    codes[raw == DONE] = DONE_NOW
    codes[raw == FAILED] = FAILED_NOW
    return codes


def _outline(panel: np.ndarray, states: np.ndarray, tops: list[int], lefts: list[int]) -> None:
    """Each block's top row and left column in its state's colour; the last blocks also get
    their bottom row and right column."""
    colors = np.array([[int(c[i : i + 2], 16) for i in (1, 3, 5)] for c in STATE_COLORS], np.uint8)
    h, w = panel.shape[:2]
    bottoms, rights = [*tops[1:], h], [*lefts[1:], w]
    for by, (y0, y1) in enumerate(zip(tops, bottoms, strict=True)):
        for bx, (x0, x1) in enumerate(zip(lefts, rights, strict=True)):
            color = colors[states[by, bx]]
            panel[y0, x0:x1] = color
            panel[y0:y1, x0] = color
            if by == len(tops) - 1:
                panel[h - 1, x0:x1] = color
            if bx == len(lefts) - 1:
                panel[y0:y1, w - 1] = color

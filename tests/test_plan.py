"""Block plan geometry: disjoint, chunk-aligned write ROIs that cover the output ROI."""

from __future__ import annotations

import numpy as np
import pytest
from funlib.geometry import Coordinate, Roi
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockpredict.errors import GeometryError
from blockpredict.order import morton_order
from blockpredict.plan import make_plan


@st.composite
def plans(draw):
    dims = draw(st.integers(2, 3))
    vin = Coordinate(draw(st.lists(st.sampled_from([1, 2, 4, 8]), min_size=dims, max_size=dims)))
    # the model scales each axis by an integer factor up or down
    factors = draw(st.lists(st.sampled_from([1, 2]), min_size=dims, max_size=dims))
    up = draw(st.booleans())
    vout = Coordinate(v // f if up and v % f == 0 else v * f for v, f in zip(vin, factors))
    grid = Coordinate(np.lcm(vin, vout).tolist())
    write_shape = Coordinate(
        g // o * draw(st.integers(1, 4)) for g, o in zip(grid, vout, strict=True)
    )
    # context: a whole number of both voxel grids on each side
    context = Coordinate(g * draw(st.integers(0, 3)) for g in grid)
    read_size = write_shape * vout + context * 2
    read_shape = read_size / vin
    offset = Coordinate(v * draw(st.integers(-5, 5)) for v in vin)
    shape = Coordinate(v * draw(st.integers(1, 40)) for v in vin)
    border = draw(st.sampled_from(["valid", "pad"]))
    requested = None
    if draw(st.booleans()):
        r_off = Coordinate(draw(st.integers(o - 10, o + s)) for o, s in zip(offset, shape))
        r_shape = Coordinate(draw(st.integers(1, s + 10)) for s in shape)
        requested = Roi(r_off, r_shape)
    return dict(
        input_roi=Roi(offset, shape),
        input_voxel_size=vin,
        output_voxel_size=vout,
        eval_input_shape=read_shape,
        eval_output_shape=write_shape,
        requested_roi=requested,
        border=border,
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plans())
def test_write_rois_are_disjoint_chunk_aligned_and_cover_the_output(kwargs):
    try:
        plan = make_plan(**kwargs)
    except GeometryError:
        return  # an empty output ROI is a reported error, not a plan
    vout = plan.output_voxel_size
    out = plan.output_roi
    assert out.offset.is_multiple_of(vout) and out.shape.is_multiple_of(vout)
    assert out.offset.is_multiple_of(plan.input_voxel_size)
    assert kwargs["input_roi"].intersects(out)
    if plan.border == "valid":
        assert kwargs["input_roi"].contains(out.grow(plan.context, plan.context))
    else:
        assert kwargs["input_roi"].contains(out)
    if kwargs["requested_roi"] is not None:
        assert kwargs["requested_roi"].contains(out)

    covered = np.zeros(tuple(plan.output_shape), dtype=np.int32)
    chunk = plan.write_size
    for block in plan.blocks():
        w = block.write_roi
        # whole chunks of an output array that starts at the output ROI
        rel = w.offset - out.offset
        assert rel.is_multiple_of(chunk)
        assert w.shape == chunk or w.end == out.end or any(e == oe for e, oe in zip(w.end, out.end))
        assert out.contains(w)
        # full-size read, centred on the (uncropped) write ROI, on the input grid
        assert block.read_roi.shape == plan.read_size
        assert block.read_roi.offset == w.offset - plan.context
        assert block.read_roi.offset.is_multiple_of(plan.input_voxel_size)
        sl = tuple(slice(b // v, e // v) for b, e, v in zip(rel, rel + w.shape, vout, strict=True))
        covered[sl] += 1
    assert (covered == 1).all()


def test_anisotropic_plan_numbers():
    plan = make_plan(
        input_roi=Roi((0, 0, 0), (40 * 30, 8 * 100, 8 * 100)),
        input_voxel_size=Coordinate(40, 8, 8),
        output_voxel_size=Coordinate(40, 8, 8),
        eval_input_shape=Coordinate(14, 60, 60),
        eval_output_shape=Coordinate(10, 40, 40),
    )
    assert plan.context == Coordinate(80, 80, 80)
    assert plan.output_roi == Roi((80, 80, 80), (40 * 26, 8 * 80, 8 * 80))
    assert plan.grid_shape == Coordinate(3, 2, 2)
    last = plan.block(plan.num_blocks - 1)
    assert last.write_roi.shape == Coordinate(40 * 6, 320, 320)
    assert last.read_roi.shape == Coordinate(40 * 14, 480, 480)


def test_two_dimensional_model_on_a_volume_predicts_sections():
    plan = make_plan(
        input_roi=Roi((0, 0, 0), (10, 50, 50)),
        input_voxel_size=Coordinate(1, 1, 1),
        output_voxel_size=Coordinate(1, 1),
        eval_input_shape=Coordinate(30, 30),
        eval_output_shape=Coordinate(20, 20),
    )
    assert plan.read_shape == Coordinate(1, 30, 30)
    assert plan.write_shape == Coordinate(1, 20, 20)
    assert plan.output_roi == Roi((0, 5, 5), (10, 40, 40))
    assert plan.num_blocks == 10 * 2 * 2


def test_upsampling_model_halves_the_output_voxel_size():
    plan = make_plan(
        input_roi=Roi((0, 0), (8 * 60, 8 * 60)),
        input_voxel_size=Coordinate(8, 8),
        output_voxel_size=Coordinate(4, 4),
        eval_input_shape=Coordinate(44, 44),
        eval_output_shape=Coordinate(52, 52),
    )
    assert plan.context == Coordinate(72, 72)
    assert plan.write_size == Coordinate(208, 208)
    assert plan.output_roi == Roi((72, 72), (336, 336))
    assert plan.output_shape == Coordinate(84, 84)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(output_voxel_size=Coordinate(3, 3)), "not an integer scaling"),
        (dict(eval_output_shape=Coordinate(21, 21)), "not a whole number"),
        (dict(requested_roi=Roi((1000, 1000), (10, 10))), "outside the input"),
        (dict(input_roi=Roi((0, 0), (20, 20))), "empty after shrinking"),
        (dict(eval_output_shape=Coordinate(40, 40)), "exceeds read size"),
    ],
)
def test_bad_geometry_is_reported(kwargs, message):
    args = dict(
        input_roi=Roi((0, 0), (100, 100)),
        input_voxel_size=Coordinate(2, 2),
        output_voxel_size=Coordinate(2, 2),
        eval_input_shape=Coordinate(30, 30),
        eval_output_shape=Coordinate(20, 20),
    )
    args.update(kwargs)
    with pytest.raises(GeometryError, match=message):
        make_plan(**args)


def test_phase_warning_when_write_shape_breaks_the_downsampling_phase():
    args = dict(
        input_roi=Roi((0, 0), (100, 100)),
        input_voxel_size=Coordinate(1, 1),
        output_voxel_size=Coordinate(1, 1),
        eval_input_shape=Coordinate(30, 30),
        eval_output_shape=Coordinate(18, 18),
    )
    assert make_plan(**args, phase=Coordinate(2, 2)).warnings == ()
    assert "block seams" in make_plan(**args, phase=Coordinate(4, 4)).warnings[0]


def test_a_clipped_or_snapped_output_roi_is_reported_per_axis():
    args = dict(
        input_roi=Roi((0, 0), (100, 100)),
        input_voxel_size=Coordinate(1, 1),
        output_voxel_size=Coordinate(2, 2),
        eval_input_shape=Coordinate(20, 20),
        eval_output_shape=Coordinate(8, 8),  # context 2 world units on each side
    )
    inside = make_plan(**args, requested_roi=Roi((10, 10), (40, 40)))
    assert inside.warnings == ()  # inside and on the grid: nothing to say
    clipped = make_plan(**args, requested_roi=Roi((0, 10), (40, 96)))
    assert clipped.output_roi == Roi((2, 10), (38, 88))
    (warning,) = clipped.warnings
    assert "clipped to the input ROI less the context" in warning
    assert "at the start by (2, 0) world units = (1, 0) voxels" in warning
    assert "at the end by (0, 8) world units = (0, 4) voxels" in warning
    snapped = make_plan(**args, requested_roi=Roi((11, 10), (40, 41)))
    assert snapped.output_roi == Roi((12, 10), (38, 40))
    (warning,) = snapped.warnings
    assert "snapped to the voxel grid (2, 2)" in warning
    assert "at the start by (1, 0) world units = (0.5, 0) voxels" in warning
    assert "at the end by (1, 1) world units = (0.5, 0.5) voxels" in warning
    padded = make_plan(**args, requested_roi=Roi((-4, 0), (20, 20)), border="pad")
    assert "clipped to the input ROI [0:100, 0:100]" in padded.warnings[0]


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.integers(1, 9), min_size=1, max_size=3),
    st.sampled_from([1, 3, 1 << 16]),
)
def test_morton_order_visits_every_block_once_neighbours_first(grid, batch):
    ids = list(morton_order(grid, batch=batch))
    assert sorted(ids) == list(range(int(np.prod(grid))))
    if min(grid) >= 2:  # the first 2^dims blocks are the corner cube of the grid
        corner = {int(np.ravel_multi_index(i, grid)) for i in np.ndindex(*(2,) * len(grid))}
        assert set(ids[: 2 ** len(grid)]) == corner

"""The preview PNG: its pixels are the arrays' values, and the block grid's lines are
drawn in the blocks' states, where the plan puts them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import cli_in_process, make_input, on_workers, write_factory, write_workflow
from PIL import Image

from blockpredict.config import load_workflow
from blockpredict.live import DONE_NOW, FAILED_NOW, STATE_COLORS
from blockpredict.preview import GAP
from blockpredict.workflow import predict_workflow


def rgb(color: str) -> list[int]:
    return [int(color[i : i + 2], 16) for i in (1, 3, 5)]


@pytest.fixture(scope="module")
def predicted(tmp_path_factory, cluster_address):
    """26^3 uint8 input, 3x3x3 blocks of 8^3; block (1, 2, 2) (id 17) fails. One run for
    the module: the tests only read it."""
    tmp_path = tmp_path_factory.mktemp("predicted")
    write_factory(tmp_path, "meanf")
    cluster = on_workers(cluster_address, tmp_path)
    sys.path.insert(0, str(tmp_path))
    data = np.random.default_rng(0).integers(0, 250, size=(26, 26, 26)).astype(np.uint8)
    data[12, 20, 20] = 255  # read only by block (1, 2, 2)
    make_input(tmp_path / "in.zarr" / "raw", data, (1, 1, 1))
    path = write_workflow(
        tmp_path / "workflow.yaml",
        {
            "input": {"container": "in.zarr", "dataset": "raw"},
            "model": {"factory": "meanf:build", "kwargs": {"mark": 0.99}},  # 255 of uint8
            "output": {"container": "out.zarr", "dataset": "pred"},
            "cluster": cluster,
            "execution": {"max_retries": 0, "fail_fast": 0},
        },
    )
    report = predict_workflow(load_workflow(path), progress=False)
    assert (report.blocks_processed, report.blocks_failed) == (26, 1)
    yield tmp_path, path, data
    sys.path.remove(str(tmp_path))
    sys.modules.pop("meanf", None)


def preview(path: Path, *args: str) -> subprocess.CompletedProcess:
    return cli_in_process(["preview", str(path), *args], path.parent)


def test_preview_pixels_are_the_arrays_and_the_grid_is_in_block_states(predicted):
    tmp_path, path, data = predicted
    done = preview(path, "--z", "13.5", "--out", "p.png")
    assert done.returncode == 0, done.stderr
    png = tmp_path / "p.png"
    assert done.stdout.strip() == f"preview at z = 13: {png} (input, output c0)"
    image = np.asarray(Image.open(png).convert("RGB"))
    out = zarr.open_array(str(tmp_path / "out.zarr" / "pred" / "s0"), mode="r")[:]
    scale = 11  # 24 pixels per panel side, scaled up to at least 256
    width = 24 * scale
    assert image.shape == (24 * scale, 2 * width + GAP, 3)
    section_in = data[13, 1:25, 1:25]  # the output ROI [1, 25) at z = 13
    section_out = np.round(out[0, 12].astype(np.float64) * 255).astype(np.uint8)
    lines = {0, 8 * scale, 16 * scale, 24 * scale - 1}
    states = np.full((3, 3), DONE_NOW)
    states[2, 2] = FAILED_NOW  # block (1, 2, 2) of layer z = 1
    for panel, expected in enumerate([section_in, section_out]):
        x0 = panel * (width + GAP)
        # inside the grid's cells: each pixel is its voxel's value
        centre = image[scale // 2 :: scale, x0 + scale // 2 : x0 + width : scale]
        inner = np.ones((24, 24), bool)
        inner[[0, 8, 16, 23], :] = inner[:, [0, 8, 16, 23]] = False
        for c in range(3):
            np.testing.assert_array_equal(centre[..., c][inner], expected[inner])
        # the block grid: each block's top row and left column in its state's colour
        for by in range(3):
            for bx in range(3):
                color = rgb(STATE_COLORS[states[by, bx]])
                top, left = by * 8 * scale, x0 + bx * 8 * scale
                assert image[top, left + 3 * scale].tolist() == color
                assert image[top + 3 * scale, left].tolist() == color
        assert image[24 * scale - 1, x0 + 20 * scale].tolist() == rgb(STATE_COLORS[FAILED_NOW])
        assert image[5 * scale, x0 + width - 1].tolist() == rgb(STATE_COLORS[DONE_NOW])
        assert not any(r in lines for r in range(scale // 2, 24 * scale, scale))
    # the failed block wrote nothing: its output is the fill value, shown as such
    assert (section_out[16:, 16:] == 0).all() and (section_out[:16, :16] > 0).all()


def test_preview_refuses_a_z_outside_the_output(predicted):
    _, path, _ = predicted
    done = preview(path, "--z", "40")
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "error: z = 40 is outside the output ROI [1, 25) in world units (--z): give a z in [1, 25)"
    )

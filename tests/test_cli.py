"""The CLI as users run it: demo, plan, predict with --set/--report, failing blocks."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import zarr
from conftest import (
    SRC,
    UNET_3D,
    cli_in_process,
    enliven,
    make_input,
    marked_input,
    max_abs_diff,
    on_workers,
    print_imported,
    python_lines,
    read_output,
    reference,
    volume_of,
    write_workflow,
)
from funlib.geometry import Coordinate, Roi

import blockpredict
from blockpredict.architectures import UNet


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "blockpredict.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def basic_workflow(tmp_path: Path, cluster: dict | None = None, **output) -> Path:
    make_input(tmp_path / "in.zarr" / "raw", volume_of((48, 48, 48)), (4, 4, 4))
    return write_workflow(
        tmp_path / "workflow.yaml",
        {
            "input": {"container": "in.zarr", "dataset": "raw"},
            "model": {"unet": UNET_3D, "head": {"out_channels": 2}},
            "output": {"container": "out.zarr", "dataset": "pred", **output},
            "cluster": cluster or {"type": "local", "n_workers": 2},
        },
    )


def test_the_command_ends_without_teardown_but_after_its_exit_handlers(tmp_path):
    """``blockpredict predict`` skips the interpreter's teardown (1.2-1.4 s after torch)
    but still runs its exit handlers and flushes its output: it exits 0 with its summary,
    and the warm start's forkserver, killed by an exit handler, is gone."""
    import psutil

    result = cli("--debug", "predict", str(basic_workflow(tmp_path)), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"blocks: (\d+)/\1 done", result.stderr), result.stderr[-3000:]
    started = re.search(r"forkserver (\d+) started", result.stderr)
    assert started, result.stderr[-3000:]
    assert not psutil.pid_exists(int(started.group(1)))


def test_demo(tmp_path):
    result = cli("demo", "--dir", "demo", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "demo" / "prediction.zarr" / "affinities"
    assert f"output: {out}" in result.stdout
    prediction = zarr.open_array(str(out / "s0"), mode="r")
    assert prediction.shape == (3, 112, 176, 176)
    assert prediction.dtype == np.uint8
    assert "18/18 done (18 processed, 0 skipped), 0 failed" in result.stderr
    assert "output voxel size (8, 8, 8), ROI offset (64, 64, 64) shape (896, 1408, 1408)" in (
        result.stderr
    )
    # the trained model shows the membranes: low affinities where the input is dark
    raw = zarr.open_array(str(tmp_path / "demo" / "data.zarr" / "raw"), mode="r")
    raw = raw[8:120, 8:184, 8:184]  # the output ROI
    affinity = prediction[:].astype(np.float32).mean(axis=0)
    membrane, inside = affinity[raw < 50].mean(), affinity[raw > 150].mean()
    assert inside - membrane > 100, (inside, membrane)
    png = tmp_path / "demo" / "preview.png"
    assert f"preview (z = 512 nm): {png}" in result.stdout and png.stat().st_size > 10_000
    # a second demo run in the same folder starts over (the demo asks for overwrite)
    again = cli("demo", "--dir", "demo", cwd=tmp_path)
    assert again.returncode == 0 and "reusing the trained weights" in again.stderr


def test_plan_prints_the_geometry_and_writes_nothing(tmp_path):
    path = basic_workflow(tmp_path)
    result = cli_in_process(["plan", str(path)], tmp_path)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "input voxel size   (4, 4, 4)" in text
    assert "context            (32, 32, 32) world, (8, 8, 8) input voxels" in text
    assert "read shape         (28, 28, 28) voxels = (112, 112, 112) world" in text
    assert "write shape        (12, 12, 12) voxels = (48, 48, 48) world" in text
    assert "block grid         (3, 3, 3) = 27 blocks" in text
    assert "shape (2, 32, 32, 32) chunks (2, 12, 12, 12) float32" in text
    assert f"output size        {2 * 32**3 * 4} bytes" in text
    assert not (tmp_path / "out.zarr").exists()


def test_predict_with_set_and_report(tmp_path, cluster_address):
    path = basic_workflow(tmp_path, {"type": "address", "address": cluster_address})
    report_path = tmp_path / "report.json"
    result = cli(
        "predict",
        str(path),
        "--set",
        "output.dataset=other",
        "--set",
        "output.dtype=float16",
        "--report",
        str(report_path),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(report_path.read_text())
    assert report["blocks_total"] == report["blocks_processed"] == 27
    assert report["blocks_failed"] == 0
    assert report["output_voxel_size"] == [4, 4, 4]
    assert report["output_roi"] == {"offset": [32, 32, 32], "shape": [128, 128, 128]}
    assert report["output_voxels_per_second"] > 0 and report["wall_seconds"] > 0
    assert report["workers"] == 2
    assert zarr.open_array(str(tmp_path / "out.zarr" / "other" / "s0")).dtype == np.float16
    assert not (tmp_path / "out.zarr" / "pred").exists()
    assert "dashboard: http://127.0.0.1:" in result.stderr


def test_failing_blocks_are_retried_named_and_exit_1(tmp_path, cluster_address):
    marked_input(tmp_path)
    path = write_workflow(
        tmp_path / "workflow.yaml",
        {
            "input": {"container": "in.zarr", "dataset": "raw"},
            "model": {"factory": "marked:build"},
            "output": {"container": "out.zarr", "dataset": "pred"},
            "cluster": on_workers(cluster_address, tmp_path),
            "execution": {"max_retries": 1},
        },
    )
    result = cli(
        "predict",
        str(path),
        "--report",
        "report.json",
        cwd=tmp_path,
        env={"PYTHONPATH": os.pathsep.join([str(tmp_path), SRC])},
    )
    assert result.returncode == 1, result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["blocks_total"] == 27
    assert report["blocks_failed"] == 1
    assert report["retries"] == 1
    failed = report["failed_blocks"][0]
    assert failed["index"] == [2, 2, 2]
    assert "marked voxel" in failed["error"]
    assert "failed block 26 [2, 2, 2]: ValueError: marked voxel in this block" in result.stderr
    out = read_output(tmp_path / "out.zarr" / "pred")
    assert (out[:, 16:, 16:, 16:] == 0).all()  # the failed block wrote nothing
    written = np.ones(out.shape, dtype=bool)
    written[:, 16:, 16:, 16:] = False
    assert (out[written] == 1).all()  # every other block was written


def test_python_api(tmp_path, cluster_address):
    make_input(tmp_path / "in.zarr" / "raw", volume_of((40, 40, 40)), (2, 2, 2))
    torch.manual_seed(3)
    architecture = UNet(
        input_shape=Coordinate(28, 28, 28),
        fmaps_in=1,
        num_fmaps=3,
        fmap_inc_factor=2,
        downsample_factors=[(2, 2, 2)],
    )
    model = enliven(blockpredict.Model(architecture, torch.nn.Conv3d(3, 2, 1), torch.nn.Sigmoid()))
    report = blockpredict.predict(
        model,
        input={"container": str(tmp_path / "in.zarr"), "dataset": "raw"},
        output={"container": str(tmp_path / "out.zarr"), "dataset": "pred"},
        cluster={"type": "address", "address": cluster_address},
        progress=False,
    )
    assert report.exit_code == 0
    got = read_output(tmp_path / "out.zarr" / "pred")
    volume = volume_of((40, 40, 40)).astype(np.float32)[None] / 255
    from blockpredict.plan import make_plan

    plan = make_plan(
        Roi((0, 0, 0), (80, 80, 80)),
        Coordinate(2, 2, 2),
        Coordinate(2, 2, 2),
        Coordinate(28, 28, 28),
        Coordinate(12, 12, 12),
    )
    expected = reference(model, volume, Roi((0, 0, 0), (80, 80, 80)), Coordinate(2, 2, 2), plan)
    assert max_abs_diff(got, expected) <= 1e-4


def test_a_worker_imports_no_dask_array_or_pandas(tmp_path):
    """What a worker imports before its first block (the forkserver's, or a spawned GPU
    worker's, imports) leaves out funlib.persistence and what it brings: only the
    client reads metadata with it."""
    code = "import blockpredict.worker\n" + print_imported(
        ("funlib.persistence", "dask.array", "xarray", "pandas")
    )
    assert python_lines(code, tmp_path) == ["[]"]


HEAVY = ("torch", "distributed", "dask", "zarr", "funlib.persistence")


def test_the_command_line_imports_no_torch_dask_or_zarr_until_used(tmp_path):
    """`blockpredict --version`, `--help` and a bad path answer without the heavy imports."""
    code = (
        "import blockpredict.cli\n"
        + print_imported(HEAVY)
        + "from blockpredict import predict, Model\n"  # the package's names still import
        + "print(predict.__name__, Model.__name__)\n"
    )
    assert python_lines(code, tmp_path) == ["[]", "predict Model"]
    missing = cli("predict", "nope.yaml", cwd=tmp_path)
    assert missing.returncode == 2
    lines = missing.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: workflow file not found"), lines
    # the workflow file is read and checked before them too (its URLs: urls.py, no zarr)
    workflow = {
        "input": {"container": "s3://bucket/in.zarr", "dataset": "raw"},
        "model": {"unet": UNET_3D, "head": {"out_channels": 1}},
        "output": {"container": "out.zarr", "dataset": "pred"},
    }
    write_workflow(tmp_path / "workflow.yaml", workflow)
    code = "from blockpredict.config import load_workflow\nload_workflow('workflow.yaml')\n"
    assert python_lines(code + print_imported(HEAVY), tmp_path) == ["[]"]

"""Runs that survive faults: resume from the ledger, killed workers and clients, fail-fast."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import (
    cli_process as cli,
)
from conftest import (
    make_input,
    marked_input,
    on_workers,
    read_output,
    worker_processes,
    write_factory,
    write_workflow,
)

from blockpredict.config import load_workflow
from blockpredict.errors import BlockpredictError
from blockpredict.loading import WorkerSetupError
from blockpredict.workflow import predict_workflow

SHAPE = (34, 34, 34)  # output ROI 32^3: 4 x 4 x 4 = 64 blocks of 8^3


@pytest.fixture
def setup(tmp_path):
    write_factory(tmp_path)
    sys.path.insert(0, str(tmp_path))
    data = np.random.default_rng(0).random(SHAPE, dtype=np.float32)
    make_input(tmp_path / "in.zarr" / "raw", data, (1, 1, 1))
    yield tmp_path, data
    sys.path.remove(str(tmp_path))
    sys.modules.pop("slow", None)


def workflow(tmp_path: Path, cluster: dict, delay: float = 0.0, fail: bool = False, **execution):
    return write_workflow(
        tmp_path / "workflow.yaml",
        {
            "input": {"container": "in.zarr", "dataset": "raw"},
            "model": {"factory": "slow:build", "kwargs": {"delay": delay, "fail": fail}},
            "output": {"container": "out.zarr", "dataset": "pred"},
            "cluster": cluster,
            "execution": {"max_retries": 1, **execution},
        },
    )


def expected(data: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(data)[None, None]
    return torch.nn.functional.avg_pool3d(x, 3, stride=1)[0, 0].numpy()


def ledger_done(tmp_path: Path) -> int:
    path = tmp_path / "out.zarr" / "pred-ledger"
    try:
        return int((zarr.open_array(str(path), mode="r")[:] == 1).sum())
    except Exception:
        return 0


def wait_for_ledger(tmp_path: Path, done: int, timeout: float = 120) -> None:
    """Until the ledger on disk marks ``done`` blocks (or ``timeout`` passes)."""
    deadline = time.time() + timeout
    while ledger_done(tmp_path) < done and time.time() < deadline:
        time.sleep(0.1)


def test_rerun_resumes_and_skips_done_blocks(setup, cluster_address):
    tmp_path, data = setup
    path = workflow(tmp_path, on_workers(cluster_address, tmp_path))
    first = predict_workflow(load_workflow(path), progress=False)
    assert (first.blocks_processed, first.exit_code) == (64, 0)
    again = predict_workflow(load_workflow(path), progress=False)
    assert (again.blocks_skipped, again.blocks_processed, again.exit_code) == (64, 0, 0)
    np.testing.assert_allclose(
        read_output(tmp_path / "out.zarr" / "pred")[0], expected(data), atol=1e-6
    )


def test_changed_geometry_is_refused_unless_overwrite(setup, cluster_address):
    tmp_path, _ = setup
    path = workflow(tmp_path, on_workers(cluster_address, tmp_path))
    predict_workflow(load_workflow(path), progress=False)
    changed = ["output.roi={offset: [1, 1, 1], shape: [16, 16, 16]}"]
    with pytest.raises(
        BlockpredictError, match=r"geometry changed since the ledger was written: plan \("
    ):
        predict_workflow(load_workflow(path, changed), progress=False)
    report = predict_workflow(
        load_workflow(path, [*changed, "output.overwrite=true"]), progress=False
    )
    assert (report.blocks_total, report.blocks_processed, report.blocks_skipped) == (8, 8, 0)
    no_resume = ["execution.resume=false"]
    with pytest.raises(BlockpredictError, match="output dataset exists"):
        predict_workflow(load_workflow(path, no_resume), progress=False)


UNLOADABLE = """
import multiprocessing
from slow import build as build_here

def build(**kwargs):
    if multiprocessing.parent_process() is not None:  # a worker process, not the client
        raise FileNotFoundError("weights.pt is not on this node")
    return build_here(**kwargs)
"""


def test_a_model_that_fails_to_load_on_the_workers_stops_before_any_block(setup, cluster_address):
    tmp_path, _ = setup
    (tmp_path / "unloadable.py").write_text(UNLOADABLE)  # a name of its own: workers cache it
    path = workflow(tmp_path, on_workers(cluster_address, tmp_path))
    path.write_text(path.read_text().replace("slow:build", "unloadable:build"))
    try:
        with pytest.raises(WorkerSetupError) as error:
            predict_workflow(load_workflow(path), progress=False)
    finally:
        sys.modules.pop("unloadable", None)
    message = str(error.value)  # one line, exit code 2, and what the worker said
    assert message.startswith("the model could not be loaded on a worker: "), message
    assert "FileNotFoundError: weights.pt is not on this node" in message
    assert message.endswith("(model): check that the workers can import and load the model")
    assert ledger_done(tmp_path) == 0


def test_fail_fast_stops_a_run_whose_blocks_all_fail(setup, cluster_address):
    tmp_path, _ = setup
    path = workflow(
        tmp_path, on_workers(cluster_address, tmp_path), fail=True, fail_fast=4, max_retries=0
    )
    report = predict_workflow(load_workflow(path), progress=False)
    assert report.exit_code == 1
    assert report.fail_fast_error == "RuntimeError: CUDA out of memory (simulated)"
    assert report.blocks_failed < 64 and report.blocks_processed == 0
    assert "stopped early" in report.summary()
    status = subprocess.run(
        [sys.executable, "-m", "blockpredict.cli", "status", str(path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=True,
    ).stdout
    assert f"failed: {report.blocks_failed}" in status and "done: 0/64 (0.0%)" in status
    assert (
        "failed blocks: "
        + " ".join(str(b.id) for b in sorted(report.failed_blocks, key=lambda b: b.id))[:40]
        in status
    )


def test_a_killed_worker_loses_nothing(setup):
    tmp_path, data = setup
    path = workflow(tmp_path, {"type": "local", "n_workers": 2}, delay=0.15)
    proc = cli("predict", str(path), "--report", "report.json", "--no-progress", cwd=tmp_path)
    wait_for_ledger(tmp_path, 4)
    workers = worker_processes(proc.pid)
    assert len(workers) == 2
    workers[0].send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["blocks_processed"] == 64 and report["blocks_failed"] == 0
    np.testing.assert_allclose(
        read_output(tmp_path / "out.zarr" / "pred")[0], expected(data), atol=1e-6
    )


def test_a_killed_client_resumes_to_the_same_output(setup):
    tmp_path, data = setup
    path = workflow(tmp_path, {"type": "local", "n_workers": 2}, delay=0.15)
    proc = cli("predict", str(path), "--no-progress", cwd=tmp_path, start_new_session=True)
    wait_for_ledger(tmp_path, 8)
    os.killpg(proc.pid, signal.SIGKILL)  # the client, its cluster and workers: all gone
    proc.communicate(timeout=60)
    assert 8 <= ledger_done(tmp_path) < 64
    rerun = cli("predict", str(path), "--report", "report.json", "--no-progress", cwd=tmp_path)
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["blocks_skipped"] >= 8
    assert report["blocks_processed"] < 64
    assert report["blocks_skipped"] + report["blocks_processed"] == 64
    np.testing.assert_allclose(
        read_output(tmp_path / "out.zarr" / "pred")[0], expected(data), atol=1e-6
    )


def test_sigterm_flushes_the_ledger_and_exits_143(setup):
    tmp_path, _ = setup
    path = workflow(tmp_path, {"type": "local", "n_workers": 1}, delay=0.15)
    proc = cli("predict", str(path), "--report", "report.json", "--no-progress", cwd=tmp_path)
    wait_for_ledger(tmp_path, 2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["interrupted"] == "SIGTERM"
    assert 2 <= report["blocks_processed"] < 64
    assert ledger_done(tmp_path) == report["blocks_processed"]  # flushed on the way out


def test_a_hanging_block_times_out_and_the_run_ends(tmp_path):
    marked_input(tmp_path)
    path = write_workflow(
        tmp_path / "workflow.yaml",
        {
            "input": {"container": "in.zarr", "dataset": "raw"},
            "model": {"factory": "marked:build", "kwargs": {"action": "hang"}},
            "output": {"container": "out.zarr", "dataset": "pred"},
            "cluster": {"type": "local", "n_workers": 2},
            "execution": {"max_retries": 1, "block_timeout": 3},
        },
    )
    proc = cli("predict", str(path), "--report", "report.json", "--no-progress", cwd=tmp_path)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 1, err
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["blocks_processed"] == 26 and report["blocks_failed"] == 1
    assert report["retries"] == 1  # timed out twice: once retried, then failed
    failed = report["failed_blocks"][0]
    assert failed["index"] == [2, 2, 2] and "block_timeout" in failed["error"]

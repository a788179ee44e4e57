"""The event log: its content, the ledger's changed-chunk flush, kill -9 and resume, torn lines."""

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
from conftest import (
    make_input,
    marked_input,
    on_workers,
    read_output,
    write_factory,
    write_workflow,
)

import blockpredict
from blockpredict.config import load_workflow
from blockpredict.events import EventLog, read_events, replay
from blockpredict.job import BlockResult
from blockpredict.ledger import CHUNK, DONE, FAILED, Ledger
from blockpredict.plan import BlockPlan
from blockpredict.workflow import predict_workflow

SRC = str(Path(blockpredict.__file__).resolve().parents[1])


def env_with(folder: Path) -> dict[str, str]:
    """The factory modules in ``folder`` and this checkout's blockpredict, for subprocesses."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), SRC])}


@pytest.fixture
def on_path(tmp_path):
    sys.path.insert(0, str(tmp_path))
    yield tmp_path
    sys.path.remove(str(tmp_path))
    for name in ("marked", "slow"):
        sys.modules.pop(name, None)


def test_the_log_of_a_run_with_one_failing_block(on_path, cluster_address):
    tmp_path = on_path
    marked_input(tmp_path)
    path = write_workflow(
        tmp_path / "workflow.yaml",
        {
            "input": {"container": "in.zarr", "dataset": "raw"},
            "model": {"factory": "marked:build"},
            "output": {"container": "out.zarr", "dataset": "pred"},
            "cluster": on_workers(cluster_address, tmp_path),
            "execution": {"max_retries": 1, "fail_fast": 0},
        },
    )
    report = predict_workflow(load_workflow(path), progress=False)
    assert (report.blocks_processed, report.blocks_failed) == (26, 1)
    log = tmp_path / "out.zarr" / "pred-events.jsonl"
    events = list(read_events(log))
    kinds = [e["event"] for e in events]
    assert kinds[0] == "run_started" and kinds[-1] == "run_ended"
    started = events[0]
    ledger = Ledger.open(str(tmp_path / "out.zarr" / "pred-ledger"))
    assert started["workflow_hash"] == ledger.hash
    assert started["plan"]["num_blocks"] == 27 and started["plan"]["grid_shape"] == [3, 3, 3]
    assert started["versions"] == {
        "blockpredict": blockpredict.__version__,
        "torch": torch.__version__,
        "dask": __import__("dask").__version__,
        "distributed": __import__("distributed").__version__,
    }
    finished = [e for e in events if e["event"] == "block_finished"]
    assert sorted(e["block"] for e in finished) == [i for i in range(27) if i != 26]
    for e in finished:
        assert e["worker"] and e["compute"] > 0 and e["read"] >= 0 and e["write"] >= 0
        # when the worker's write returned, by its clock: before the client heard of it
        assert started["time"] - 1 < e["written"] <= e["time"] + 1
        assert e["index"] == list(np.unravel_index(e["block"], (3, 3, 3)))
    failed = [e for e in events if e["event"] == "block_failed"]
    assert [(e["block"], e["final"]) for e in failed] == [(26, False), (26, True)]
    assert failed[-1]["index"] == [2, 2, 2] and failed[-1]["worker"]
    assert failed[-1]["error"] == "ValueError: marked voxel in this block"
    summary = events[-1]["summary"]
    assert (summary["blocks_processed"], summary["blocks_failed"], summary["exit_code"]) == (
        26,
        1,
        1,
    )
    assert all(line.endswith("\n") for line in log.read_text().splitlines(keepends=True))


def chunk_mtimes(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in (path / "c").rglob("*")}


def test_a_flush_writes_only_the_changed_ledger_chunks(tmp_path):
    path = tmp_path / "ledger"
    ledger = Ledger.create(str(path), {"plan": "test"}, 4 * CHUNK)
    for c in range(4):
        ledger.mark(c * CHUNK + 7, DONE)
    ledger.flush()
    before = chunk_mtimes(path)
    assert len(before) == 4
    time.sleep(0.05)
    ledger.mark(2 * CHUNK + 9, FAILED)
    ledger.mark(2 * CHUNK + 10, DONE)
    ledger.flush()
    after = chunk_mtimes(path)
    assert [k for k in after if after[k] != before[k]] == [os.path.join("c", "2")]
    ledger.flush()  # nothing changed: nothing written
    assert chunk_mtimes(path) == after
    again = Ledger.open(str(path), {"plan": "test"})
    assert again.states[2 * CHUNK + 9] == FAILED and again.counts()["done"] == 5


def test_kill_9_of_the_client_redoes_no_block_the_log_recorded(tmp_path):
    write_factory(tmp_path)
    data = np.random.default_rng(0).random((34, 34, 34), dtype=np.float32)
    make_input(tmp_path / "in.zarr" / "raw", data, (1, 1, 1))
    path = write_workflow(
        tmp_path / "workflow.yaml",
        {
            "input": {"container": "in.zarr", "dataset": "raw"},
            "model": {"factory": "slow:build", "kwargs": {"delay": 0.1}},
            "output": {"container": "out.zarr", "dataset": "pred"},
            "cluster": {"type": "local", "n_workers": 2, "dashboard_address": "127.0.0.1:0"},
        },
    )
    log = tmp_path / "out.zarr" / "pred-events.jsonl"

    def logged() -> set[int]:
        return {e["block"] for e in read_events(log) if e["event"] == "block_finished"}

    command = [sys.executable, "-m", "blockpredict.cli", "predict", str(path), "--no-progress"]
    proc = subprocess.Popen(
        command,
        cwd=tmp_path,
        env=env_with(tmp_path),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while len(logged()) < 10 and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # client, scheduler, workers: all gone at once
    proc.wait(timeout=60)
    recorded = logged()
    assert 10 <= len(recorded) < 64
    status = subprocess.run(
        [sys.executable, "-m", "blockpredict.cli", "status", str(path)],
        cwd=tmp_path,
        env=env_with(tmp_path),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    done = int(status.split("done: ")[1].split("/")[0])
    assert done >= len(recorded), status
    rerun = subprocess.run(
        [*command, "--report", "report.json"],
        cwd=tmp_path,
        env=env_with(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rerun.returncode == 0, rerun.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["blocks_skipped"] >= len(recorded)
    assert report["blocks_skipped"] + report["blocks_processed"] == 64
    expected = torch.nn.functional.avg_pool3d(torch.from_numpy(data)[None, None], 3, stride=1)
    np.testing.assert_allclose(
        read_output(tmp_path / "out.zarr" / "pred")[0], expected[0, 0].numpy(), atol=1e-6
    )
    starts = [e for e in read_events(log) if e["event"] == "run_started"]
    assert len(starts) == 2 and starts[1]["blocks_done"] == report["blocks_skipped"]


def test_a_torn_last_line_is_skipped_and_cut_before_appending(tmp_path):
    plan = _plan()
    ledger = Ledger.create(str(tmp_path / "ledger"), {"plan": "torn"}, plan.num_blocks)
    log = tmp_path / "events.jsonl"
    writer = EventLog(log)
    writer.run_started(plan, ledger, workers=1)
    for block in (3, 5):
        writer.block_finished(BlockResult(block, 0.01, 0.02, 0.01, "w"))
    writer.flush()
    with open(log, "a") as f:
        f.write('{"time":1,"event":"block_finished","block":6,"wor')  # a kill mid-write
    fresh = Ledger.open(str(tmp_path / "ledger"), {"plan": "torn"})  # the snapshot: no blocks
    assert replay(fresh, log) == 2
    assert np.flatnonzero(fresh.states == DONE).tolist() == [3, 5]
    assert replay(fresh, log) == 0  # idempotent
    other = Ledger.create(str(tmp_path / "other"), {"plan": "another"}, plan.num_blocks)
    assert replay(other, log) == 0  # a log of another geometry vouches for nothing
    EventLog(log).run_started(plan, fresh, workers=1)  # a resumed run appends
    lines = log.read_text().splitlines(keepends=True)
    assert all(line.endswith("\n") for line in lines)
    assert [json.loads(line)["event"] for line in lines] == ["run_started"] + [
        "block_finished"
    ] * 2 + ["run_started"]


def _plan() -> BlockPlan:
    from funlib.geometry import Coordinate, Roi

    from blockpredict.plan import make_plan

    return make_plan(
        input_roi=Roi((0, 0, 0), (34, 34, 34)),
        input_voxel_size=Coordinate(1, 1, 1),
        output_voxel_size=Coordinate(1, 1, 1),
        eval_input_shape=Coordinate(10, 10, 10),
        eval_output_shape=Coordinate(8, 8, 8),
        requested_roi=None,
        border="valid",
        phase=None,
    )

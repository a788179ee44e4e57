"""Speed features that users rely on for correctness: worker environment, pipeline, batching.

Speed itself is measured by ``blockpredict bench``, never here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    alive_checkpoint,
    cli_in_process,
    enliven,
    make_input,
    max_abs_diff,
    read_output,
    volume_of,
    workflow_on,
    write_workflow,
)
from distributed import Client, LocalCluster

from blockpredict.build import build_model
from blockpredict.cluster import connect
from blockpredict.config import ClusterConfig, ModelConfig, load_workflow
from blockpredict.environment import ALLOCATOR_ENV, MIMALLOC_ENV, mimalloc_library
from blockpredict.forward import Forward
from blockpredict.gpu_preload import own_gpu
from blockpredict.job import BlockResult
from blockpredict.jobqueue import job_script
from blockpredict.pipeline import Pending, Pipeline, groups_in_memory
from blockpredict.precision import TOLERANCE
from blockpredict.sizing import TaskSizer
from blockpredict.submit import driver_script
from blockpredict.workflow import predict_workflow

VARS = (*ALLOCATOR_ENV, *MIMALLOC_ENV, "OMP_NUM_THREADS", "MKL_NUM_THREADS", "BLOCKPREDICT_EXTRA")


def _read_env() -> dict[str, str | None]:
    import dask

    seen: dict[str, str | None] = {name: os.environ.get(name) for name in VARS}
    seen["mimalloc"] = str("libmimalloc" in Path("/proc/self/maps").read_text())
    seen["profiler"] = str(dask.config.get("distributed.worker.profile.enabled"))
    seen["tick"] = str(dask.config.get("distributed.admin.tick.interval"))
    return seen


def test_local_workers_see_allocator_thread_and_user_variables():
    config = ClusterConfig.model_validate(
        {
            "n_workers": 2,
            "dashboard_address": ":0",
            "worker_env": {"BLOCKPREDICT_EXTRA": "yes", "MALLOC_ARENA_MAX": "2"},
        }
    )
    with connect(config) as client:
        seen = client.run(_read_env)
    assert len(seen) == 2
    for env in seen.values():
        assert env["MALLOC_MMAP_THRESHOLD_"] == "4294967296"
        assert env["MALLOC_TRIM_THRESHOLD_"] == "17179869184"  # not the nanny's 65536
        assert env["MALLOC_ARENA_MAX"] == "2"  # worker_env overrides a default
        assert env["BLOCKPREDICT_EXTRA"] == "yes"  # and adds
        assert env["mimalloc"] == "True" and env["MIMALLOC_PURGE_DELAY"] == "-1"  # preloaded
        assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "1"  # 2 cores, 2 workers
        assert env["profiler"] == "False"  # seceding tasks would race Dask's sampler
        assert env["tick"] == "500ms"  # not 50 wake-ups a second taken from the forward


WARM = """
import json, os, sys
from pathlib import Path
from blockpredict.cluster import connect
from blockpredict.config import ClusterConfig

def seen():
    raw = Path("/proc/self/environ").read_bytes().split(b"\\0")  # as the process started
    start = dict(item.decode().split("=", 1) for item in raw if b"=" in item)
    names = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "EXTRA",
             "LD_PRELOAD", "MIMALLOC_PURGE_DELAY", "MIMALLOC_ALLOW_THP")
    return {"parent": os.getppid(), "torch": "torch" in sys.modules,
            "start": {name: start.get(name) for name in names},
            "mimalloc": "libmimalloc" in Path("/proc/self/maps").read_text()}

runs = {}
other = {"MALLOC_ARENA_MAX": "2", "EXTRA": "y", "LD_PRELOAD": ""}  # glibc, the user's choice
for name, env in (("first", {}), ("other", other), ("again", {})):
    config = {"n_workers": 2, "dashboard_address": ":0", "device": "cpu", "worker_env": env}
    with connect(ClusterConfig.model_validate(config)) as client:
        runs[name] = list(client.run(seen).values())
print(json.dumps({"client": os.getpid(), "pandas": "pandas" in sys.modules, **runs}))
"""


def test_local_cpu_workers_start_warm_unless_their_start_environment_differs():
    """Local CPU workers fork from a process that imported torch and started with their
    allocator variables; a cluster whose workers need other start-time variables in the
    same Python process spawns them, with those variables, as before. The workflow's
    variables win over the ones this process has (Dask's nanny prefers those). The client
    never imports pandas, which distributed imports to set a forkserver's preload."""
    env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": "65536"}  # as an earlier nanny leaves it
    out = subprocess.run(
        [sys.executable, "-c", WARM], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    client, first, other, again = seen["client"], seen["first"], seen["other"], seen["again"]
    kept = {**ALLOCATOR_ENV, "EXTRA": None, "LD_PRELOAD": mimalloc_library(), **MIMALLOC_ENV}
    forkserver = {worker["parent"] for worker in first}
    assert len(forkserver) == 1 and client not in forkserver  # forked, not spawned
    assert not seen["pandas"]  # 0.3-0.5 s on the event loop as the first worker starts
    for worker in first + again:
        assert worker["torch"]  # imported before the worker started
        assert worker["start"] == kept  # what the allocators read as the process started
        assert worker["mimalloc"]  # preloaded in the forkserver, so in its forks
    assert {worker["parent"] for worker in again} == forkserver
    for worker in other:
        assert worker["parent"] == client and not worker["torch"]  # spawned
        assert worker["start"] == {**kept, "MALLOC_ARENA_MAX": "2", "EXTRA": "y", "LD_PRELOAD": ""}
        assert not worker["mimalloc"]  # the user's empty LD_PRELOAD: glibc


def test_batch_worker_and_driver_jobs_export_the_variables(tmp_path: Path):
    section = {
        "type": "slurm",
        "jobqueue": {"memory": "8GB", "job_script_prologue": ["export MALLOC_ARENA_MAX=4"]},
        "threads_per_worker": 3,
        "worker_env": {"BLOCKPREDICT_EXTRA": "a b"},
    }
    lines = job_script(ClusterConfig.model_validate(section)).splitlines()
    assert "export MALLOC_TRIM_THRESHOLD_=17179869184" in lines
    assert "export OMP_NUM_THREADS=3" in lines
    library = mimalloc_library()  # preloaded only on a node that has the client's copy
    assert f"if [ -e {library} ]; then export LD_PRELOAD={library}; fi" in lines
    assert "export MIMALLOC_PURGE_DELAY=-1" in lines
    assert "export DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL=500ms" in lines
    assert "export BLOCKPREDICT_EXTRA='a b'" in lines
    # the user's own prologue comes after ours, so it wins
    assert lines.index("export MALLOC_ARENA_MAX=4") > lines.index("export MALLOC_ARENA_MAX=1")

    workflow = workflow_on(section)
    script, _ = driver_script(tmp_path / "w.yaml", workflow, [], tmp_path / "r.json")
    assert "export MALLOC_MMAP_THRESHOLD_=4294967296" in script.splitlines()
    assert "export OMP_NUM_THREADS=1" in script.splitlines()


def test_one_worker_per_gpu_each_sees_only_its_own():
    """The GPU layout, started on the CPU: each worker reads back its CUDA_VISIBLE_DEVICES."""
    from blockpredict.cluster import gpu_cluster

    config = ClusterConfig.model_validate({"dashboard_address": ":0"})
    with gpu_cluster(config, ["0", "1"], {"BLOCKPREDICT_EXTRA": "gpu"}) as cluster:
        with Client(cluster) as client:
            seen = client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
    assert sorted(seen.values()) == ["0", "1"]


# --- the pipelined worker ---------------------------------------------------------------

UNET = {"input_shape": [28, 28, 28], "num_fmaps": 3, "downsample_factors": [[2, 2, 2]]}


def _unet_run(root: Path, address: str, name: str, **execution: object) -> np.ndarray:
    write_workflow(
        root / f"{name}.yaml",
        {
            "input": {"container": "in.zarr", "dataset": "raw"},
            "model": alive_checkpoint(root, {"unet": UNET, "head": {"out_channels": 2}}),
            "output": {"container": "out.zarr", "dataset": name},
            "cluster": {"type": "address", "address": address},
            "execution": execution,
        },
    )
    report = predict_workflow(load_workflow(root / f"{name}.yaml"), progress=False)
    assert report.blocks_failed == 0 and report.blocks_processed == report.blocks_total
    return read_output(root / "out.zarr" / name)


def test_pipelined_auto_sized_and_batched_runs_equal_one_block_at_a_time(tmp_path, cluster_address):
    make_input(tmp_path / "in.zarr" / "raw", volume_of((60, 60, 60)), (1, 1, 1))
    one = _unet_run(tmp_path, cluster_address, "one", blocks_per_task=1, batch_size=1)
    auto = _unet_run(tmp_path, cluster_address, "auto")  # the default: auto, pipelined
    many = _unet_run(tmp_path, cluster_address, "many", blocks_per_task=7)
    io = _unet_run(tmp_path, cluster_address, "io", blocks_per_task=7, io_threads=3)
    assert np.array_equal(one, auto) and np.array_equal(one, many)  # bit for bit
    assert np.array_equal(one, io)
    batched = _unet_run(tmp_path, cluster_address, "batched", batch_size=4, blocks_per_task=7)
    # torch's CPU convolution picks other kernels for a batch of 4: fp32 rounding (2.6e-6
    # measured, on outputs of order 0.1)
    assert max_abs_diff(one, batched) <= 1e-5
    bf16 = _unet_run(tmp_path, cluster_address, "bf16", precision="bf16")
    assert 0 < max_abs_diff(one, bf16) <= TOLERANCE["bf16"]


def _model(out_channels: int = 2) -> torch.nn.Module:
    config = {"unet": UNET, "head": {"out_channels": out_channels}}
    return enliven(build_model(ModelConfig.model_validate(config)))


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_reduced_precision_stays_within_its_tolerance(precision):
    """fp16 runs only on CUDA in a real run; its numerics are checked here through CPU autocast."""
    model = _model().eval()
    blocks = [np.random.default_rng(i).random((1, 28, 28, 28), dtype=np.float32) for i in range(2)]
    exact = Forward(model, torch.device("cpu"), (12, 12, 12), 3)(blocks)
    reduced = Forward(model, torch.device("cpu"), (12, 12, 12), 3, precision)(blocks)
    for a, b in zip(exact, reduced, strict=True):
        assert b.dtype == np.float32
        assert 0 < max_abs_diff(a, b) <= TOLERANCE[precision]


def test_the_cuda_staging_path_on_the_cpu():
    """Pinned-buffer staging (forced on the CPU): same values, and no output is overwritten by
    later forwards while the writer may still hold it: a group of 8 blocks, one forward
    each, is written only after its 8th forward (with a ring of two output buffers, 6 of
    every 8 blocks were written with another block's prediction)."""
    model = _model().eval()
    rng = np.random.default_rng(0)
    blocks = {i: rng.random((1, 28, 28, 28), dtype=np.float32) for i in range(16)}
    plain = Forward(model, torch.device("cpu"), (12, 12, 12), 3)
    staged = Forward(model, torch.device("cpu"), (12, 12, 12), 3, staging=True)
    written: dict[int, np.ndarray] = {}
    read = lambda i: staged.stage([blocks[i]])[0]  # noqa: E731 (a worker's read stages)
    pipeline = Pipeline(read, staged, written.__setitem__, group=8)
    try:
        pipeline.run(list(blocks))
    finally:
        pipeline.close()
    wrong = [i for i, b in blocks.items() if not np.array_equal(written[i], plain([b])[0])]
    assert not wrong
    box = np.random.default_rng(0).random((1, 40, 40, 40), dtype=np.float32)  # a read box
    views = [box[:, z : z + 28, 12:, :28] for z in (0, 12)]  # its blocks: strided views
    copies = [np.ascontiguousarray(v) for v in views]
    for got, want in zip(staged(views), plain(copies), strict=True):
        assert np.array_equal(got, want)
    for got, want in zip(staged(staged.stage(views)), plain(copies), strict=True):
        assert np.array_equal(got, want)


def test_compile_runs_compiled_or_falls_back_with_one_warning():
    """``execution.compile: true``: torch.compile's output (inductor needs a C++ compiler on
    the CPU; ~10-40 s here) equals the eager forward, or the forward falls back to eager with
    exactly one warning and still returns the eager values."""
    model = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.ReLU()).eval()
    blocks = [np.random.default_rng(i).random((1, 8, 8, 8), dtype=np.float32) for i in range(2)]
    eager = Forward(model, torch.device("cpu"), (6, 6, 6), 3)([blocks[0]])[0]
    compiled = Forward(model, torch.device("cpu"), (6, 6, 6), 3, compile=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outputs = [compiled([blocks[0]])[0] for _ in range(3)]  # later calls: no new warning
    about_compile = [w for w in caught if "execution.compile" in str(w.message)]
    assert len(about_compile) == (0 if compiled.compiled is not None else 1)
    for y in outputs:
        assert np.allclose(y, eager, atol=1e-5)


@pytest.mark.parametrize("group, io_threads", [(1, 1), (3, 1), (1, 3)])
def test_a_failing_block_fails_alone_in_the_pipeline_and_in_a_batch(group: int, io_threads: int):
    written: dict[int, float] = {}
    grouped_reads: list[list[int]] = []

    def read(block_id: int) -> np.ndarray:
        if block_id == 3:
            raise OSError("unreadable chunk")
        return np.full((1, 2), float(block_id), np.float32)

    def read_many(ids: list[int]) -> list[np.ndarray]:  # one storage call for a group
        grouped_reads.append(ids)
        return [read(i) for i in ids]  # a group holding block 3 falls back to one read each

    def forward(batch: list[np.ndarray]) -> list[np.ndarray]:
        if any(b[0, 0] == 5 for b in batch):
            raise RuntimeError("CUDA out of memory (simulated)")
        return [b * 2 for b in batch]

    def write(block_id: int, prediction: np.ndarray) -> None:
        if block_id == 7:
            raise PermissionError("read-only store")
        written[block_id] = float(prediction[0, 0])

    running: set[int] = set()
    starts: list[int] = []

    def started(block_id: int) -> None:
        running.add(block_id)
        starts.append(block_id)

    pipeline = Pipeline(
        read,
        forward,
        write,
        batch_size=4,
        started=started,
        finished=running.discard,
        group=group,
        read_many=read_many,
        io_threads=io_threads,
    )
    try:
        results = pipeline.run(list(range(10)))
        again = pipeline.run([11, 12])  # the stages stay usable for the next task
    finally:
        pipeline.close()
    assert [r.block_id for r in results] == list(range(10))
    errors = {r.block_id: r.error for r in results if r.error}
    assert set(errors) == {3, 5, 7}
    assert errors[3].startswith("OSError") and errors[5].startswith("RuntimeError")
    assert errors[7].startswith("PermissionError")
    assert written == {i: 2.0 * i for i in (0, 1, 2, 4, 6, 8, 9, 11, 12)}
    assert all(r.error is None for r in again)
    assert not running  # every block was let go, failed or not
    # block_timeout's clock runs per stage (read, forward, write): waiting is not charged
    assert starts.count(0) == 3 and starts.count(3) == 1  # 3 never reached its forward
    # groups of 3 batches of 4: one read call for 0..9 (fails: 3), then one for 11, 12
    assert sorted(grouped_reads) == (  # several readers take groups in turn, in any order
        [[*range(10)], [11, 12]] if group > 1 else [[*range(4)], [*range(4, 8)], [8, 9], [11, 12]]
    )


def test_outputs_still_coming_from_the_device_are_written_once_they_landed():
    """A GPU's forward returns before its outputs are copied back (``Pending``; the device
    here: a thread that fills them 10 ms after the call returned). The writer waits for
    them (without waiting it would write zeros), a batch whose device work fails fails
    alone, each block's compute time is its batch's device time as the wait reports it,
    and a block is charged to block_timeout while its writer waits on the device."""
    device = ThreadPoolExecutor(1)
    charged: list[int] = []

    def forward(batch: list[np.ndarray]) -> Pending:
        outputs = [np.zeros_like(b) for b in batch]

        def run() -> None:
            time.sleep(0.01)
            if any(b[0, 0] == 5 for b in batch):
                raise RuntimeError("CUDA error: an illegal memory access (simulated)")
            for out, b in zip(outputs, batch):
                out[...] = 2 * b

        done = device.submit(run)

        def wait() -> float:
            done.result()
            return 0.25

        return Pending(outputs, wait)

    written: dict[int, float] = {}
    pipeline = Pipeline(
        lambda i: np.full((1, 2), float(i), np.float32),
        forward,
        lambda i, y: written.__setitem__(i, float(y[0, 0])),
        batch_size=2,
        group=2,
        started=charged.append,
    )
    try:
        results = pipeline.run(list(range(8)))
    finally:
        pipeline.close()
        device.shutdown()
    errors = {r.block_id: r.error for r in results if r.error}
    assert set(errors) == {4, 5} and errors[4].startswith("RuntimeError: CUDA error")
    assert written == {i: 2.0 * i for i in (0, 1, 2, 3, 6, 7)}
    assert all(r.compute == 0.125 for r in results if r.error is None)
    assert all(charged.count(i) == 4 for i in (0, 1, 2, 3, 6, 7))  # read, forward, wait, write


def test_only_the_hanging_block_is_charged_while_its_group_waits():
    """block_timeout blames the block that hangs: its group's other blocks, read and
    forwarded but waiting for the group's write, are not running meanwhile."""
    hang, hanging = threading.Event(), threading.Event()
    running: dict[int, int] = {}

    def forward(batch: list[np.ndarray]) -> list[np.ndarray]:
        if batch[0][0, 0] == 1:
            hanging.set()
            hang.wait(timeout=30)
        return batch

    def started(block_id: int) -> None:
        running[block_id] = running.get(block_id, 0) + 1

    pipeline = Pipeline(
        lambda i: np.full((1, 2), float(i), np.float32),
        forward,
        lambda i, y: None,
        group=4,  # one group of four blocks, one forward each
        started=started,
        finished=lambda i: running.pop(i, None),
    )
    worker = threading.Thread(target=pipeline.run, args=([0, 1, 2, 3],))
    try:
        worker.start()
        assert hanging.wait(timeout=30)
        assert set(running) == {1}  # 0 is done with its forward, 2 and 3 wait for theirs
    finally:
        hang.set()
        worker.join(timeout=30)
        pipeline.close()
    assert not running


def test_the_next_task_enters_the_pipeline_before_the_last_one_drains():
    """A worker's stages never drain between tasks: while task 1's last blocks run their
    forward and write, task 2's blocks are read; at most three groups hold data at once."""
    events: list[tuple[str, int]] = []
    holding: set[int] = set()
    most = 0

    def read(block_id: int) -> np.ndarray:
        nonlocal most
        events.append(("read", block_id))
        holding.add(block_id)
        most = max(most, len(holding))
        return np.full((1, 2), float(block_id), np.float32)

    def forward(batch: list[np.ndarray]) -> list[np.ndarray]:
        time.sleep(0.02)  # a device that takes its time
        return batch

    def write(block_id: int, prediction: np.ndarray) -> None:
        time.sleep(0.02)
        events.append(("write", block_id))
        holding.discard(block_id)

    pipeline = Pipeline(read, forward, write)
    second: list[BlockResult] = []
    entered = threading.Event()

    def next_task() -> None:  # what Dask does once a task secedes: start the next one
        second.extend(pipeline.run([10, 11, 12]))

    runner = threading.Thread(target=next_task)
    try:
        first = pipeline.run(
            [0, 1, 2, 3],
            entered=lambda: (entered.set(), runner.start()),  # type: ignore[func-returns-value]
        )
        runner.join(timeout=30)
    finally:
        pipeline.close()
    assert entered.is_set()
    assert [r.block_id for r in first] == [0, 1, 2, 3] and all(r.error is None for r in first)
    assert [r.block_id for r in second] == [10, 11, 12] and all(r.error is None for r in second)
    assert events.index(("read", 10)) < events.index(("write", 3))  # no drain in between
    assert most <= 3  # one group read ahead, one in the forward, one being written


def test_several_io_threads_read_and_write_at_once_within_their_bound():
    """``io_threads: 3`` (a GPU's default): three reads and three writes run at once around
    one forward at a time, and at most 2 x 3 + 1 groups hold data."""
    lock = threading.Lock()
    now = {"read": 0, "forward": 0, "write": 0, "holding": 0}
    most = dict.fromkeys(now, 0)

    def enter(stage: str) -> None:
        with lock:
            now[stage] += 1
            most[stage] = max(most[stage], now[stage])

    def leave(stage: str) -> None:
        with lock:
            now[stage] -= 1

    def read(block_id: int) -> np.ndarray:
        enter("read"), enter("holding")
        time.sleep(0.03)  # I/O slower than the device
        leave("read")
        return np.full((1, 2), float(block_id), np.float32)

    def forward(batch: list[np.ndarray]) -> list[np.ndarray]:
        enter("forward")
        time.sleep(0.005)
        leave("forward")
        return [b * 2 for b in batch]

    written: dict[int, float] = {}

    def write(block_id: int, prediction: np.ndarray) -> None:
        enter("write")
        time.sleep(0.03)
        written[block_id] = float(prediction[0, 0])
        leave("write"), leave("holding")

    pipeline = Pipeline(read, forward, write, io_threads=3)
    try:
        results = pipeline.run(list(range(30)))
    finally:
        pipeline.close()
    assert [r.block_id for r in results] == list(range(30)) and not any(r.error for r in results)
    assert written == {i: 2.0 * i for i in range(30)}
    assert most["read"] == 3 and most["write"] == 3 and most["forward"] == 1
    assert most["holding"] <= groups_in_memory(3) == 7


def test_task_sizes_auto_and_forced():
    forced = TaskSizer(5)
    assert forced.size(remaining=1000) == 5
    # each worker's first block warms its device up: it is not measured
    warmup = BlockResult(0, read=0.05, compute=0.26, write=0.01, worker="w")
    sizer = TaskSizer("auto", batch_size=2, workers=2)
    assert sizer.size(remaining=1000) == 2  # nothing measured yet: one batch
    sizer.observe(warmup)
    assert sizer.size(remaining=1000) == 2  # nor after the warm-up alone
    tiny = BlockResult(1, read=0.0003, compute=0.0001, write=0.001, worker="w")
    sizer.observe(tiny)
    assert sizer.size(remaining=100_000) >= 200  # tiny blocks: the per-task cost dominates
    assert sizer.size(remaining=8) >= 8  # the end: a few ms of work is not worth a round trip
    slow = TaskSizer("auto", workers=2)
    for result in (warmup, BlockResult(1, read=0.015, compute=0.6, write=0.04, worker="w")):
        slow.observe(result)
    assert slow.size(remaining=1000) == 1  # the pipeline does not drain between tasks
    gpu = BlockResult(1, read=0.015, compute=0.05, write=0.02, worker="w")
    small, big = TaskSizer("auto", workers=2), TaskSizer("auto", workers=512)
    for sizer in (small, big):
        sizer.observe(warmup)
        sizer.observe(gpu)
    # the scheduler handles every worker's tasks: tasks get longer on a bigger cluster
    assert small.size(remaining=10**6) == 5 and big.size(remaining=10**6) == 410
    # near the end tasks shrink to a share for every worker, but never below 0.25 s of work:
    # a worker waiting a round trip for each tiny task idles more than it balances
    assert big.size(remaining=10_000) == 10 and big.size(remaining=100) == 5
    # an H100's first forward of the bench U-Net took 0.26 s, the next 3 ms: counted in,
    # the warm-up kept tasks at 7 blocks (0.25 s over a mean of 36 ms) instead of 50
    fast = TaskSizer("auto", workers=1)
    fast.observe(warmup)
    for i in range(7):
        fast.observe(BlockResult(i, read=0.005, compute=0.003, write=0.0025, worker="w"))
    assert fast.size(remaining=500) == 50


@pytest.mark.parametrize(
    "override, phrases",
    [
        ("execution.batch_size=0", ["execution.batch_size", "greater than or equal to 1"]),
        ("execution.io_threads=0", ["execution.io_threads"]),
        ("execution.precision=fp8", ["execution.precision", "'fp32', 'fp16' or 'bf16'"]),
        ("execution.blocks_per_task=0", ["execution.blocks_per_task"]),
        ("execution.cuda_graphs=sometimes", ["execution.cuda_graphs", "boolean"]),
        ("cluster.worker_env={OMP_NUM_THREADS: 4}", ["cluster.worker_env.OMP_NUM_THREADS"]),
        ("cluster.worker_env=[A]", ["cluster.worker_env", "a mapping"]),
        (
            "execution.precision=fp16",
            ["precision fp16 cannot run on cpu", "fp16 needs a CUDA device", "use fp32 or bf16"],
        ),
    ],
)
def test_bad_speed_settings_are_one_line_and_exit_2(tmp_path, override, phrases):
    make_input(tmp_path / "in.zarr" / "raw", volume_of((40, 40, 40)), (1, 1, 1))
    path = write_workflow(
        tmp_path / "workflow.yaml",
        {
            "input": {"container": "in.zarr", "dataset": "raw"},
            "model": {"unet": UNET, "head": {"out_channels": 2}},
            "output": {"container": "out.zarr", "dataset": "pred"},
            "cluster": {"device": "cpu"},
        },
    )
    result = cli_in_process(["predict", str(path), "--set", override], tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert all(p in lines[0] for p in phrases), lines[0]
    assert not (tmp_path / "out.zarr").exists()


def test_batch_jobs_with_several_gpus_give_each_worker_process_its_own():
    section = {"type": "slurm", "jobqueue": {"memory": "8GB"}, "gpus_per_job": 2}
    script = job_script(ClusterConfig.model_validate(section)).splitlines()
    # GPU workers keep their pages but not one arena: their I/O threads allocate at once
    assert "export MALLOC_MMAP_THRESHOLD_=4294967296" in script
    assert not any("MALLOC_ARENA_MAX" in line for line in script)
    command = script[-1].split()
    assert "--nworkers" in command and command[command.index("--nworkers") + 1] == "2"
    assert command[command.index("--preload") + 1] == "blockpredict.gpu_preload"
    assert own_gpu("3,5", "SLURMCluster-4-1") == "5" and own_gpu("3", "x-1") is None
    # that worker command, run here as the job would run it on a node with GPUs 3 and 5
    with (
        LocalCluster(n_workers=0, host="127.0.0.1", dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "3,5"}
        worker = [sys.executable, "-m", "distributed.cli.dask_worker", cluster.scheduler_address]
        options = ["--name", "job-7", "--nthreads", "1", "--nworkers", "2", "--no-dashboard"]
        process = subprocess.Popen(
            [*worker, *options, "--preload", "blockpredict.gpu_preload"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            client.wait_for_workers(2, timeout=120)
            seen = client.run(os.getenv, "CUDA_VISIBLE_DEVICES")
        finally:
            process.terminate()
            process.wait(60)
    assert sorted(seen.values()) == ["3", "5"]  # one GPU each, not both

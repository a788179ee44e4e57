"""``blockpredict bench``: start-up at scale, dispatch rate and U-Net throughput.

Figures, not pass/fail: each measurement runs in fresh processes, repeats,
and reports medians, so runs on a noisy shared machine stay comparable.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from funlib.geometry import Coordinate

from .architectures import WrappedArchitecture
from .bench_report import format_results  # noqa: F401 (the CLI's import path)
from .model import Model

# the U-Net of DESIGN.md: 12 feature maps, x3 per level, one 2x level; 108^3 -> 92^3
UNET = {
    "input_shape": [108, 108, 108],
    "fmaps_in": 1,
    "num_fmaps": 12,
    "fmap_inc_factor": 3,
    "downsample_factors": [[2, 2, 2]],
}


def trivial_model(size: int = 8) -> Model:
    """Identity-like model for dispatch figures: the work per block is negligible."""
    arch = WrappedArchitecture(
        torch.nn.Identity(),
        input_shape=Coordinate(size, size, size),
        num_in_channels=1,
        num_out_channels=1,
    )
    return Model(arch, torch.nn.Identity())


def _cube(path: Path, size: int, data: np.ndarray | int | None = None) -> None:
    """A uint8 zarr cube at voxel size 1; without ``data`` only its metadata is written.

    A cube already at ``path`` is removed first: ``mode="w"`` would replace it anyway,
    and funlib.persistence would log the mismatch ("Shapes differ ...") on the way.
    """
    from funlib.persistence import prepare_ds

    if path.exists():
        shutil.rmtree(path)
    array = prepare_ds(
        str(path),
        shape=(size, size, size),
        voxel_size=Coordinate(1, 1, 1),
        axis_names=["z", "y", "x"],
        dtype=np.uint8,
        mode="w",
    )
    if data is not None:
        array[:] = data


def _workflow(
    folder: Path, model: dict[str, Any], name: str = "workflow.yaml", **sections: Any
) -> Path:
    workflow = {
        "input": {"container": "in.zarr", "dataset": "raw"},
        "model": model,
        "output": {"container": "out.zarr", "dataset": "pred", "overwrite": True},
        **sections,
    }
    path = folder / name
    path.write_text(yaml.safe_dump(workflow))
    return path


STARTUP_PROBE = """
import json, resource, sys, time
t0 = time.perf_counter()
from blockpredict.config import load_workflow
from blockpredict.ledger import Ledger, ledger_path
from blockpredict.order import morton_order
from blockpredict.storage import prepare_output
from blockpredict.workflow import prepare_workflow
w = load_workflow(sys.argv[1])
p = prepare_workflow(w)
t_plan = time.perf_counter() - t0
o = w.output
prepare_output(p.output_info(), True)
ledger = Ledger.create(ledger_path(p.output_path), p.geometry(), p.plan.num_blocks)
first = next(ledger.pending(morton_order(p.plan.grid_shape)))
t_start = time.perf_counter() - t0
print(json.dumps({"blocks": p.plan.num_blocks, "plan_s": t_plan, "start_s": t_start,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def bench_startup(folder: Path, sizes: list[int], repeats: int) -> list[dict[str, Any]]:
    """Plan and predict start-up (to the first block id) for empty inputs of each size."""
    rows = []
    for size in sizes:
        sub = folder / f"startup-{size}"
        sub.mkdir(parents=True, exist_ok=True)
        _cube(sub / "in.zarr" / "raw", size)
        path = _workflow(sub, {"unet": UNET, "head": {"out_channels": 3}})
        runs = []
        for _ in range(repeats):
            out = subprocess.run(
                [sys.executable, "-c", STARTUP_PROBE, str(path)],
                capture_output=True,
                text=True,
                check=True,
            )
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        rows.append(
            {
                "input": f"{size}^3 uint8",
                "blocks": runs[0]["blocks"],
                "plan_s": statistics.median(r["plan_s"] for r in runs),
                "start_s": statistics.median(r["start_s"] for r in runs),
                "peak_mb": statistics.median(r["peak_mb"] for r in runs),
            }
        )
    return rows


def bench_dispatch(
    folder: Path, size: int, per_task: list[int | str], repeats: int
) -> list[dict[str, Any]]:
    """Blocks/s, identity model (16^3 blocks), 2-worker LocalCluster, by blocks_per_task."""
    from distributed import LocalCluster

    from .config import load_workflow
    from .workflow import predict_workflow

    sub = folder / "dispatch"
    sub.mkdir(parents=True, exist_ok=True)
    _cube(sub / "in.zarr" / "raw", size, 1)
    rows = []
    with LocalCluster(
        n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=":0"
    ) as cluster:
        for n in per_task:
            path = _workflow(
                sub,
                {"factory": "blockpredict.bench:trivial_model", "kwargs": {"size": 16}},
                cluster={"type": "address", "address": cluster.scheduler_address},
                execution={"blocks_per_task": n},
            )
            rates, steady = [], []
            for _ in range(repeats):
                report = predict_workflow(load_workflow(path), progress=False)
                rates.append(report.blocks_processed / report.wall_seconds)
                loop = report.wall_seconds - report.setup_seconds  # once every worker is ready
                steady.append(report.blocks_processed / max(loop, 1e-9))
            rows.append(
                {
                    "blocks_per_task": n,
                    "blocks": report.blocks_total,
                    "blocks_per_s": statistics.median(rates),
                    "steady_blocks_per_s": statistics.median(steady),
                }
            )
    return rows


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def bench_device(folder: Path, device_ms: float, quick: bool, repeats: int) -> dict[str, Any]:
    """The engine with a simulated device (forward sleeps, no CPU): the fraction of time busy."""
    from .config import load_workflow
    from .workflow import predict_workflow

    size_in, size_out, k = (28, 12, 2) if quick else (108, 92, 4)
    size = k * size_out + (size_in - size_out)
    sub = folder / "device"
    sub.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    _cube(sub / "in.zarr" / "raw", size, rng.integers(0, 255, (size,) * 3, dtype=np.uint8))
    factory = {
        "factory": "blockpredict.benchmodes:sleep_model",
        "kwargs": {"ms": device_ms, "size": size_in, "context": size_in - size_out},
    }
    path = _workflow(sub, factory)
    runs = []
    for _ in range(repeats):
        report = predict_workflow(load_workflow(path), progress=False)
        busy = report.blocks_processed * device_ms / 1000
        steady = report.wall_seconds - report.setup_seconds  # the model loaded
        runs.append(
            {
                "busy": busy / (report.workers * report.wall_seconds),
                "busy_steady": busy / (report.workers * steady),
                "wall_s": report.wall_seconds,
                "workers": report.workers,
            }
        )
    return {
        "device_ms": device_ms,
        "blocks": k**3,
        "block": f"{size_in}^3 -> {size_out}^3 float32",
        "busy": _median(runs, "busy"),
        "busy_steady": _median(runs, "busy_steady"),
        "wall_s": _median(runs, "wall_s"),
        "workers": runs[0]["workers"],
    }


def bench_simulated_cluster(
    folder: Path, workers: int, device_ms: float, repeats: int, seconds: float = 8.0
) -> list[dict[str, Any]]:
    """Dispatch rate of N simulated worker processes, against N / device time.

    The real runner, scheduler and worker pipeline, each worker a process of its own;
    only the device and the storage are simulated (see
    :class:`~blockpredict.simulate.SimulatedDevice`). Workers are added in steps
    (N/4, N/2, N) to one scheduler.
    """
    from distributed import Client, LocalCluster

    from .config import ExecutionConfig, load_workflow
    from .job import Job
    from .ledger import Ledger
    from .runner import run
    from .simulate import SimulatedDevice, SimulatedWorkers, forward_ends
    from .storage import OutputInfo
    from .workflow import prepare_workflow

    sub = folder / "simulate"
    sub.mkdir(parents=True, exist_ok=True)
    rows = []
    with (
        LocalCluster(
            n_workers=0,
            processes=False,
            protocol="tcp://",
            host="127.0.0.1",
            dashboard_address=":0",
        ) as cluster,
        Client(cluster) as client,
    ):
        pool = SimulatedWorkers(cluster.scheduler_address)
        try:
            for n in sorted({max(1, workers // 4), max(1, workers // 2), workers}):
                pool.grow(n)
                ideal = n * 1000 / device_ms
                side = max(4, round((ideal * seconds) ** (1 / 3)))  # seconds at the ideal rate
                _cube(sub / "in.zarr" / "raw", 16 * side)  # metadata only: nothing is read
                model = {"factory": "blockpredict.bench:trivial_model", "kwargs": {"size": 16}}
                prepared = prepare_workflow(load_workflow(_workflow(sub, model)))
                plan = prepared.plan
                where = str(sub / "out.zarr" / "sim")  # its event log and ledger; no image
                output = OutputInfo(where, plan.output_roi, plan.output_voxel_size, "float32", 1)
                job = Job(plan, prepared.input, "none", output, model=None)
                rates, steady, cpu = [], [], []
                for i in range(repeats):
                    ledger = Ledger.create(
                        str(sub / f"ledger-{n}-{i}"), {"bench": i}, plan.num_blocks
                    )
                    cpu0 = time.process_time()  # this process: the scheduler and the client
                    report = run(
                        client,
                        job,
                        ledger,
                        ExecutionConfig(),
                        progress=False,
                        plugin=SimulatedDevice(device_ms),
                    )
                    cpu.append((time.process_time() - cpu0) / max(1, report.blocks_processed))
                    rates.append(report.blocks_processed / report.wall_seconds)
                    ends = client.run(forward_ends)  # every process's simulated forwards
                    steady.append(_middle_rate([t for e in ends.values() for t in e]))
                rate = statistics.median(rates)
                rows.append(
                    {
                        "workers": n,
                        "blocks": plan.num_blocks,
                        "blocks_per_s": rate,
                        # the middle 80% of the blocks, timed where the devices finished them:
                        # without the first results' round trips and the last tasks' tail,
                        # which do not grow with the run
                        "steady_blocks_per_s": statistics.median(steady),
                        "ideal": ideal,
                        "of_ideal": rate / ideal,
                        # CPU of the scheduler and the client per block: the rate at which
                        # they would take a whole core, whatever the workers' machines
                        "scheduler_cpu_ms_per_block": 1000 * statistics.median(cpu),
                        "scheduler_limit_blocks_per_s": 1 / max(statistics.median(cpu), 1e-9),
                    }
                )
        finally:
            pool.close()
    return rows


def _middle_rate(ends: list[float]) -> float:
    """Blocks/s between the times the devices had finished 10% and 90% of the blocks."""
    ends = sorted(ends)
    lo, hi = len(ends) // 10, len(ends) * 9 // 10
    return (hi - lo) / (ends[hi] - ends[lo]) if hi > lo and ends[hi] > ends[lo] else 0.0


def run_bench(
    folder: Path | None,
    quick: bool,
    repeats: int | None = None,
    device_ms: float | None = None,
    simulate_workers: int | None = None,
    simulate_ms: float = 50.0,
    parts: tuple[str, ...] = ("compare", "startup", "dispatch", "device", "cluster"),
    compare_device: str = "auto",
) -> dict[str, Any]:
    """The figures of ``parts``; ``quick`` shrinks sizes and repeats (for a smoke test).

    ``device`` runs only with ``device_ms``, ``cluster`` only with ``simulate_workers``.
    ``compare_device`` (auto, cpu, cuda: ``--device``) is where the side-by-side part runs.
    """
    import os

    from .bench_compare import bench_compare, bench_device_of

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    with tempfile.TemporaryDirectory() as tmp:
        root = folder or Path(tmp)
        repeats = repeats or (1 if quick else 3)
        t0 = time.perf_counter()
        results: dict[str, Any] = {
            "command": " ".join(["blockpredict", *sys.argv[1:]]),
            "repeats": repeats,
        }
        if "compare" in parts:
            device = bench_device_of(compare_device)
            results["compare"] = bench_compare(root, quick, repeats, cores or 1, device)
        if "startup" in parts:
            results["startup"] = bench_startup(root, [1000] if quick else [200, 10_000], repeats)
        if "dispatch" in parts:
            results["dispatch"] = bench_dispatch(
                root, 64 if quick else 256, ["auto", 8] if quick else ["auto", 1, 8, 32], repeats
            )
        if device_ms is not None and "device" in parts:
            results["device"] = bench_device(root, device_ms, quick, repeats)
        if simulate_workers and "cluster" in parts:
            results["simulated_cluster"] = bench_simulated_cluster(
                root, simulate_workers, simulate_ms, repeats, 2.0 if quick else 8.0
            )
        results["bench_seconds"] = time.perf_counter() - t0
        return results

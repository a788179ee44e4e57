"""The side-by-side part of ``blockpredict bench``: the limit, the engine, a naive loop
and dask.array on the same model, block shape, volume and device.

On the CPU the volume is 4^3 blocks and the limit is the best of the core layouts and
allocator settings. On a GPU it is 8^3 blocks (a 108^3 forward takes milliseconds
there, so 64 blocks would measure start-up), and the limit is the best of batch sizes
1 and 4 on preloaded device tensors, each eager and as a CUDA graph; the engine also
runs with CUDA graphs, with one reader and one writer (``io_threads: 1``) and at
``batch_size: 4``.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .bench import UNET, _cube, _median, _workflow
from .events import events_path

# the quick variant: same layers, tiny blocks (28^3 -> 12^3), 2^3 blocks of it
QUICK_UNET = {"input_shape": [28, 28, 28], "num_fmaps": 3, "downsample_factors": [[2, 2, 2]]}


def steady_seconds(report: dict[str, Any], blocks: int) -> float:
    """The engine's time for ``blocks`` at its steady rate: blocks written from the moment
    every worker had written its first one (the limit too leaves each process's first
    forward, its warm-up, untimed) to the last, by the workers' clocks in the event log.
    A run too short for that: its time once the model was loaded."""
    first: dict[str, float] = {}
    written: list[float] = []
    for line in Path(events_path(report["output_path"])).read_text().splitlines():
        event = json.loads(line)
        if event.get("event") == "block_finished" and event.get("written"):
            worker, t = event["worker"], event["written"]
            first[worker] = min(first.get(worker, t), t)
            written.append(t)
    start = max(first.values(), default=0.0)
    after = sum(t > start for t in written)
    if after == 0:
        return float(report["wall_seconds"] - report["setup_seconds"])
    return blocks * (max(written) - start) / after


def bench_device_of(setting: str) -> str:
    """``cuda`` where ``setting`` (auto, cpu, cuda) picks a visible GPU, else ``cpu``."""
    if setting == "cpu" or not torch.cuda.is_available():
        return "cpu"
    return "cuda"


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(0) if device == "cuda" else "cpu"


def bench_compare(
    folder: Path,
    quick: bool,
    repeats: int,
    cores: int,
    device: str = "cpu",
    k: int | None = None,
) -> dict[str, Any]:
    """The limit, the engine, a naive loop and dask.array side by side (voxels/s, medians).

    ``k`` blocks per axis (default 4 on the CPU, 8 on a GPU; quick 2).
    """
    from .benchmodes import GPU_BATCH, dask_array, engine, limit, naive

    unet = QUICK_UNET if quick else UNET
    default_k = 2 if quick else (8 if device == "cuda" else 4)
    size_in, size_out, k = (28, 12, k or default_k) if quick else (108, 92, k or default_k)
    size = k * size_out + (size_in - size_out)  # k^3 whole blocks
    sub = folder / "compare"
    sub.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    _cube(sub / "in.zarr" / "raw", size, rng.integers(0, 255, (size,) * 3, dtype=np.uint8))
    model = {"unet": unet, "head": {"out_channels": 1}}
    cluster = {"device": device}  # the engine runs where the limit does
    path = _workflow(sub, model, cluster=cluster)  # execution: the defaults
    engines = {"engine": path}
    if device == "cuda":  # what the defaults choose on a GPU, against the alternatives
        for name, execution in (
            ("CUDA graphs", {"cuda_graphs": True}),
            ("io_threads 1", {"io_threads": 1}),
            (f"batch {GPU_BATCH}", {"batch_size": GPU_BATCH}),
        ):
            engines[f"engine, {name}"] = _workflow(
                sub, model, f"workflow-{len(engines)}.yaml", cluster=cluster, execution=execution
            )
    blocks, voxels = k**3, (k * size_out) ** 3
    limits: list[dict[str, Any]] = []
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in engines}
    runs["naive loop"], runs["dask.array"] = [], []
    for _ in range(repeats):
        limits.append(limit(model, blocks, size_out**3, cores, device))
        for name, workflow in engines.items():
            run = engine(workflow)
            runs[name].append(
                {
                    "wall_s": run["wall_s"],
                    "steady_s": steady_seconds(run["report"], blocks),
                    "phases": run["report"]["phase_seconds"],
                }
            )
        runs["naive loop"].append(naive(path, device))
        runs["dask.array"].append(dask_array(path, cores, device))
    best = max(limits, key=lambda r: r["voxels_per_s"])  # its layouts are printed
    limit_rate = statistics.median(r["voxels_per_s"] for r in limits)
    modes = {"limit": {"wall_s": voxels / limit_rate, "steady_s": voxels / limit_rate}}
    for name, mode_runs in runs.items():
        modes[name] = {
            "wall_s": _median(mode_runs, "wall_s"),
            "steady_s": _median(mode_runs, "steady_s"),
        }
    for m in modes.values():
        m["voxels_per_s"] = voxels / m["wall_s"]
        m["of_limit_wall"] = m["voxels_per_s"] / limit_rate
        m["of_limit_steady"] = (voxels / m["steady_s"]) / limit_rate
    return {
        "model": f"U-Net {size_in}^3 -> {size_out}^3",
        "input": f"{size}^3 uint8",
        "blocks": blocks,
        "cores": cores,
        "device": device_name(device),
        "modes": modes,
        "limit_layouts": best["layouts"],
        "engine_phases": runs["engine"][-1]["phases"],
    }

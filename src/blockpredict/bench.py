"""``blockpredict bench``: start-up at scale, dispatch rate and U-Net throughput.

Figures, not pass/fail: each measurement runs in fresh processes, repeats,
and reports medians, so runs on a noisy shared machine stay comparable.
"""

from __future__ import annotations

import json
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
    """A uint8 zarr cube at voxel size 1; without ``data`` only its metadata is written."""
    from funlib.persistence import prepare_ds

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


def _workflow(folder: Path, model: dict[str, Any], **sections: Any) -> Path:
    workflow = {
        "input": {"container": "in.zarr", "dataset": "raw"},
        "model": model,
        "output": {"container": "out.zarr", "dataset": "pred", "overwrite": True},
        **sections,
    }
    path = folder / "workflow.yaml"
    path.write_text(yaml.safe_dump(workflow))
    return path


STARTUP_PROBE = """
import json, resource, sys, time
t0 = time.perf_counter()
from blockpredict.config import load_workflow
from blockpredict.ledger import Ledger, ledger_path
from blockpredict.plan import morton_order
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
    folder: Path, size: int, per_task: list[int], repeats: int
) -> list[dict[str, Any]]:
    """Blocks/s with a trivial model on a 2-worker LocalCluster, by blocks_per_task."""
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
                {"factory": "blockpredict.bench:trivial_model"},
                cluster={"type": "address", "address": cluster.scheduler_address},
                execution={"blocks_per_task": n},
            )
            rates = []
            for _ in range(repeats):
                report = predict_workflow(load_workflow(path), progress=False)
                rates.append(report.blocks_processed / report.wall_seconds)
            rows.append(
                {
                    "blocks_per_task": n,
                    "blocks": report.blocks_total,
                    "blocks_per_s": statistics.median(rates),
                }
            )
    return rows


def bench_unet(folder: Path, size: int, repeats: int) -> dict[str, Any]:
    """Blockwise U-Net throughput against the bare forward rate of the same blocks."""
    from .config import load_workflow
    from .workflow import predict_workflow

    sub = folder / "unet"
    sub.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    _cube(sub / "in.zarr" / "raw", size, rng.integers(0, 255, (size,) * 3, dtype=np.uint8))
    path = _workflow(
        sub,
        {"unet": UNET, "head": {"out_channels": 3}},
        cluster={"type": "local", "n_workers": 2, "threads_per_worker": 1},
    )
    rates, walls = [], []
    for _ in range(repeats):
        report = predict_workflow(load_workflow(path), progress=False)
        rates.append(report.output_voxels_per_second)
        walls.append(report.wall_seconds)
    bare = _bare_forward_rate(repeats)
    blockwise = statistics.median(rates)
    return {
        "input": f"{size}^3",
        "blocks": report.blocks_total,
        "blockwise_mvox_s": blockwise / 1e6,
        "bare_mvox_s": bare / 1e6,
        "ratio": blockwise / bare,
        "wall_s": statistics.median(walls),
    }


def _bare_forward_rate(repeats: int) -> float:
    """Output voxels/s of back-to-back forwards: the faster of 1x2 threads and 2x1 processes."""
    code = (
        "import time, torch, sys\n"
        "from blockpredict.bench import UNET\n"
        "from blockpredict.build import build_model\n"
        "from blockpredict.config import ModelConfig\n"
        "torch.set_num_threads(int(sys.argv[1]))\n"
        "m = build_model(ModelConfig.model_validate({'unet': UNET, 'head': {'out_channels': 3}}))\n"
        "x = torch.zeros(1, 1, 108, 108, 108)\n"
        "with torch.no_grad():\n"
        "    m(x); t = time.perf_counter(); n = 3\n"
        "    for _ in range(n): m(x)\n"
        "print(n * 92**3 / (time.perf_counter() - t))\n"
    )

    def rate(threads: int, processes: int) -> float:
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", code, str(threads)], stdout=subprocess.PIPE, text=True
            )
            for _ in range(processes)
        ]
        return sum(float(p.communicate()[0].strip()) for p in procs)

    one = statistics.median(rate(2, 1) for _ in range(repeats))
    two = statistics.median(rate(1, 2) for _ in range(repeats))
    return max(one, two)


def run_bench(folder: Path | None, quick: bool) -> dict[str, Any]:
    """All figures; ``quick`` shrinks sizes and repeats (for a smoke test)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = folder or Path(tmp)
        repeats = 1 if quick else 3
        t0 = time.perf_counter()
        results = {
            "startup": bench_startup(root, [200, 1000] if quick else [200, 10_000], repeats),
            "dispatch": bench_dispatch(
                root, 24 if quick else 64, [1, 8] if quick else [1, 8, 32], repeats
            ),
        }
        if not quick:
            results["unet"] = bench_unet(root, 292, repeats)  # 3^3 whole blocks
        results["bench_seconds"] = time.perf_counter() - t0
        return results


def format_results(results: dict[str, Any]) -> str:
    lines = ["start-up (plan, and predict up to its first block id; medians):"]
    for r in results["startup"]:
        lines.append(
            f"  {r['input']:>16}  {r['blocks']:>9} blocks  plan {r['plan_s']:.2f} s  "
            f"start {r['start_s']:.2f} s  peak {r['peak_mb']:.0f} MB"
        )
    lines.append("dispatch, trivial model, 2 worker processes (medians):")
    for r in results["dispatch"]:
        lines.append(
            f"  blocks_per_task {r['blocks_per_task']:>3}  {r['blocks']} blocks  "
            f"{r['blocks_per_s']:.0f} blocks/s"
        )
    if "unet" in results:
        u = results["unet"]
        lines.append(f"U-Net 108^3 -> 92^3 on {u['input']} ({u['blocks']} blocks, medians):")
        lines.append(
            f"  blockwise {u['blockwise_mvox_s']:.2f} M voxels/s, bare forward "
            f"{u['bare_mvox_s']:.2f} M voxels/s, ratio {u['ratio']:.2f}, "
            f"wall {u['wall_s']:.1f} s"
        )
    lines.append(f"bench took {results['bench_seconds']:.0f} s")
    return "\n".join(lines)

"""Side-by-side modes of ``blockpredict bench``: the limit, the engine, a naive loop, dask.array.

Every mode runs the same model on the same input volume with the same cores,
each in fresh processes, and returns output voxels/s. The simulated device
(``sleep_model``) stands in for a fast GPU: its forward sleeps and uses no CPU.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from funlib.geometry import Coordinate

from .architectures import WrappedArchitecture
from .environment import ALLOCATOR_ENV, START_VARS, allocator_environment
from .model import Model


class Sleep(torch.nn.Module):
    """A simulated device: sleeps ``ms`` per forward (no CPU) and returns a centre crop."""

    def __init__(self, ms: float, context: int) -> None:
        super().__init__()
        self.ms, self.context = ms, context

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.ms / 1000.0 * x.shape[0])
        c = self.context // 2
        return x[:, :, c:-c, c:-c, c:-c] if c else x


def sleep_model(ms: float = 100.0, size: int = 108, context: int = 16) -> Model:
    """``size``^3 -> (``size`` - ``context``)^3 blocks whose forward sleeps ``ms``."""
    arch = WrappedArchitecture(
        Sleep(ms, context),
        input_shape=Coordinate(size, size, size),
        num_in_channels=1,
        num_out_channels=1,
    )
    return Model(arch, torch.nn.Identity())


def allocators() -> dict[str, dict[str, str]]:
    """The allocator settings the CPU limit tries: glibc's defaults, glibc keeping its
    pages, and what CPU workers run where that differs (mimalloc preloaded)."""
    settings = {"default": {}, "pages kept": dict(ALLOCATOR_ENV)}
    workers = allocator_environment()
    if workers != ALLOCATOR_ENV:
        settings["mimalloc"] = workers
    return settings


def _env(allocator: dict[str, str]) -> dict[str, str]:
    """This process's environment with ``allocator``'s variables and no other allocator's."""
    env = {k: v for k, v in os.environ.items() if k not in START_VARS}
    return {**env, **allocator}


def _json_of(command: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> Any:
    out = subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd)
    if out.returncode != 0:
        raise RuntimeError(f"{command[:4]} failed: {out.stderr.strip()[-500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


BARE = """
import json, sys, time, torch
from blockpredict.build import build_model
from blockpredict.config import ModelConfig
config, (threads, n, batch), device = json.loads(sys.argv[1]), map(int, sys.argv[2:5]), sys.argv[5]
graphed = sys.argv[6] == "graph"
torch.set_num_threads(threads)
m = build_model(ModelConfig.model_validate(config)).eval().to(device)
x = torch.rand(batch, m.num_in_channels, *m.eval_input_shape, device=device)
sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
with torch.no_grad():
    run = lambda: m(x)
    if graphed:  # warmed up on a side stream, then captured: one launch per forward
        s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s): m(x)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g): m(x)
        run = g.replay
    run(); sync(); t = time.perf_counter()
    for _ in range(n): run()
    sync()
print(json.dumps({"seconds": time.perf_counter() - t}))
"""


GPU_BATCH = 4  # on a GPU: the limit's second layout, and the engine's second run


def limit(
    model: dict[str, Any], blocks: int, block_voxels: int, cores: int, device: str = "cpu"
) -> dict[str, Any]:
    """Bare forwards on a preloaded tensor, ``blocks`` in all: on the CPU the best of
    (core layout x allocator, see ``allocators``), on a GPU the best of batch sizes 1 and
    ``GPU_BATCH``, each run as it is and as a CUDA graph (one process)."""
    settings = allocators()
    if device == "cuda":
        layouts = [(1, cores, b, "default", g) for b in (1, GPU_BATCH) for g in ("eager", "graph")]
    else:
        cpu = ((1, cores), (cores, 1))
        layouts = [(p, t, 1, name, "eager") for name in settings for p, t in cpu]
    rows = []
    for processes, threads, batch, allocator, mode in layouts:
        per = math.ceil(blocks / processes / batch)  # forwards per process
        argv = [json.dumps(model), str(threads), str(per), str(batch), device, mode]
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", BARE, *argv],
                stdout=subprocess.PIPE,
                text=True,
                env=_env(settings[allocator]),
            )
            for _ in range(processes)
        ]
        seconds = max(json.loads(p.communicate()[0].splitlines()[-1])["seconds"] for p in procs)
        rows.append(
            {
                "layout": f"{processes} x {threads} thread(s)"
                if device == "cpu"
                else f"1 process, batch {batch}" + (", CUDA graph" if mode == "graph" else ""),
                "allocator": allocator,
                "voxels_per_s": per * batch * processes * block_voxels / seconds,
            }
        )
    best = max(rows, key=lambda r: r["voxels_per_s"])
    return {"voxels_per_s": best["voxels_per_s"], "best": best, "layouts": rows}


def engine(workflow: Path) -> dict[str, Any]:
    """The real CLI run, end to end: wall clock of the command, and its report."""
    report = workflow.parent / "engine-report.json"
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "blockpredict.cli", "predict", str(workflow), "--no-progress"]
        + ["--report", str(report)],
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"engine run failed: {out.stderr.strip()[-500:]}")
    data = json.loads(report.read_text())
    return {"wall_s": wall, "report": data}


NAIVE = """
import json, sys, time, torch, zarr
from blockpredict.config import load_workflow
from blockpredict.layout import describe_output
from blockpredict.storage import BlockReader, BlockWriter, prepare_output
from blockpredict.workflow import prepare_workflow
from blockpredict.build import build_model
t0 = time.perf_counter()
w = load_workflow(sys.argv[1]); p = prepare_workflow(w); plan = p.plan; o = w.output
naive = o.model_copy(update={"dataset": o.dataset + "-naive"})
info = prepare_output(describe_output(plan, naive, p.num_out_channels, p.input.axis_names,
                                      p.input.units, p.input.zarr_format), True)
reader, writer = BlockReader(p.input, w.input.normalize), BlockWriter(info)
device = sys.argv[2]
model = build_model(w.model).eval().to(device)
with torch.no_grad():
    for i in range(plan.num_blocks):
        b = plan.block(i)
        y = model(torch.from_numpy(reader.read(b.read_roi))[None].to(device)).cpu().numpy()[0]
        crop = tuple(slice(0, s) for s in b.write_roi.shape / plan.output_voxel_size)
        writer.write(b.write_roi, y[(slice(None), *crop)])
        if i == 0:  # its first block warmed it up (the limit leaves that forward untimed)
            t1 = time.perf_counter()
t2 = time.perf_counter()
steady = (t2 - t1) * plan.num_blocks / max(1, plan.num_blocks - 1)
print(json.dumps({"wall_s": t2 - t0, "steady_s": steady}))
"""

DASK_ARRAY = """
import json, sys, time
t0 = time.perf_counter()
import dask.array as da, numpy as np, torch, zarr
from distributed import Client, LocalCluster
from blockpredict.config import load_workflow
from blockpredict.build import build_model
w = load_workflow(sys.argv[1]); cores, device = int(sys.argv[2]), sys.argv[3]
_model = {}
def predict(block):
    if "m" not in _model:
        torch.set_num_threads(1); _model["m"] = build_model(w.model).eval().to(device)
    x = torch.from_numpy(block.astype(np.float32) / 255)[None, None].to(device)
    with torch.no_grad():
        y = _model["m"](x).cpu()
    c = (block.shape[0] - y.shape[2]) // 2
    out = np.zeros(block.shape, np.float32); s = slice(c, c + y.shape[2])
    out[s, s, s] = y[0, 0].numpy(); return out
if __name__ == "__main__":
    m = build_model(w.model)
    size, out_size = m.eval_input_shape[0], m.output_shape[0]
    c = (size - out_size) // 2
    # on the CPU a single-thread worker per core; on a GPU one worker, 4 threads sharing it
    workers, threads = (cores, 1) if device == "cpu" else (1, 4)
    with LocalCluster(n_workers=workers, threads_per_worker=threads, host="127.0.0.1",
                      dashboard_address=":0") as cluster, Client(cluster):
        x = da.from_zarr(str(w.input.container / w.input.dataset))
        k = (x.shape[0] - 2 * c) // out_size  # the volume is k whole blocks plus the context
        chunks = (c + out_size,) + (out_size,) * (k - 2) + (out_size + c,)
        x = x.rechunk((chunks,) * 3)
        y = x.map_overlap(predict, depth=c, boundary="none", dtype=np.float32)
        t1 = time.perf_counter()
        y.to_zarr(str(w.output.container / "dask-array"), overwrite=True)
        t2 = time.perf_counter()
    print(json.dumps({"wall_s": time.perf_counter() - t0, "steady_s": t2 - t1}))
"""


def naive(workflow: Path, device: str = "cpu") -> dict[str, Any]:
    """read -> forward -> write per block in one process (every core or the GPU)."""
    return _json_of([sys.executable, "-c", NAIVE, str(workflow), device], cwd=workflow.parent)


def dask_array(workflow: Path, cores: int, device: str = "cpu") -> dict[str, Any]:
    """``map_overlap`` over ``from_zarr``, the model once per worker process (first channel)."""
    return _json_of(
        [sys.executable, "-c", DASK_ARRAY, str(workflow), str(cores), device], cwd=workflow.parent
    )

"""Shared fixtures: a real LocalCluster of 2 worker processes, real zarr inputs."""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import math
import os
import subprocess
import sys
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from distributed import LocalCluster
from funlib.geometry import Coordinate, Roi
from funlib.persistence import prepare_ds

from blockpredict.plan import BlockPlan

# the tests' small 3D U-Net: 28^3 -> 12^3, one 2x level
UNET_3D = {
    "input_shape": [28, 28, 28],
    "fmaps_in": 1,
    "num_fmaps": 3,
    "fmap_inc_factor": 2,
    "downsample_factors": [[2, 2, 2]],
}


@pytest.fixture(scope="session")
def cluster_address():
    """One cluster for the session: 2 worker processes, 1 thread each."""
    with LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=":0",
    ) as cluster:
        yield cluster.scheduler_address


def make_input(
    path: Path,
    data: np.ndarray,
    voxel_size: tuple[int, ...],
    offset: tuple[int, ...] | None = None,
    channels: bool = False,
) -> None:
    """Write ``data`` as a funlib/zarr dataset with voxel size and offset metadata."""
    spatial = data.ndim - int(channels)
    names = ["z", "y", "x"][3 - spatial :]
    prepare_ds(
        str(path),
        shape=data.shape,
        offset=Coordinate(offset or (0,) * spatial),
        voxel_size=Coordinate(voxel_size),
        axis_names=(["c^"] if channels else []) + names,
        types=(["channel"] if channels else []) + ["space"] * spatial,
        dtype=data.dtype,
        mode="w",
    )[:] = data


def enliven(model: Any) -> Any:
    """Weights whose outputs vary with the input: Kaiming-normal convolutions, biases
    0.01 x N(0, 1), from the first seed whose output on a random input varies (a layer
    of 3 channels can die by chance). The builder's seed-0 weights leave the tests'
    small U-Nets all but constant (a standard deviation of 1e-7 over a volume: their
    random biases outweigh the input), so a block written in the wrong place, or
    another block's prediction, would still equal the reference. With these, outputs
    are of order 0.1-1 and differ from block to block by about 0.4."""
    sample = torch.rand(
        (1, model.num_in_channels, *model.eval_input_shape),
        generator=torch.Generator().manual_seed(0),
    )
    for seed in range(1, 50):
        _initialize(model, seed)
        with torch.no_grad():
            if model.eval()(sample).std() > 0.05:
                return model
    raise AssertionError("no seed gives this model an output that varies")


def _initialize(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, torch.nn.modules.conv._ConvNd):
                inputs = layer.weight[0].numel()  # per output value: channels x kernel
                if layer.transposed:  # (in, out, *kernel), spread over stride^d outputs
                    inputs = layer.weight.shape[0] * math.prod(layer.kernel_size)
                    inputs //= math.prod(layer.stride)
                std = (2.0 / inputs) ** 0.5
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * std)
                if layer.bias is not None:
                    layer.bias.copy_(torch.randn(layer.bias.shape, generator=generator) * 0.01)


def alive_checkpoint(folder: Path, model: dict[str, Any]) -> dict[str, Any]:
    """A workflow's ``model`` section with a checkpoint of :func:`enliven`'s weights (a
    section that names a checkpoint or builds no U-Net is returned as it is)."""
    from blockpredict.build import build_model
    from blockpredict.config import ModelConfig

    if "checkpoint" in model or "unet" not in model:
        return model
    built = enliven(build_model(ModelConfig.model_validate(model)))
    path = folder / "alive-weights.pt"
    torch.save(built.state_dict(), path)
    return {**model, "checkpoint": str(path)}


def workflow_on(cluster: dict[str, Any]) -> Any:
    """A minimal valid workflow on this cluster section (for job and driver scripts)."""
    from blockpredict.config import validate_workflow

    return validate_workflow(
        {
            "input": {"container": "in.zarr", "dataset": "raw"},
            "model": {"factory": "x:y"},
            "output": {"container": "out.zarr"},
            "cluster": cluster,
        }
    )


def write_workflow(path: Path, workflow: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(workflow, sort_keys=False))
    return path


def reference(
    model: torch.nn.Module,
    volume: np.ndarray,
    input_roi: Roi,
    voxel_size: Coordinate,
    plan: BlockPlan,
) -> np.ndarray:
    """The model applied in ONE forward pass to the region all blocks read.

    ``volume`` is the normalized float32 input ``(C, *spatial)`` covering
    ``input_roi``. The region grows to whole blocks (a valid input size for a
    U-Net whose write shape keeps the downsampling phase); outside the data it
    is zero. The result is cropped to the output ROI.
    """
    blocks = Coordinate(plan.grid_shape) * plan.write_size
    region = Roi(plan.output_roi.offset - plan.context, blocks + plan.context * 2)
    canvas = np.zeros((volume.shape[0], *(region.shape / voxel_size)), dtype=np.float32)
    inside = region.intersect(input_roi)
    src = tuple(
        slice(b, e)
        for b, e in zip(
            (inside.begin - input_roi.begin) / voxel_size,
            (inside.end - input_roi.begin) / voxel_size,
        )
    )
    dst = tuple(
        slice(b, e)
        for b, e in zip(
            (inside.begin - region.begin) / voxel_size, (inside.end - region.begin) / voxel_size
        )
    )
    canvas[(slice(None), *dst)] = volume[(slice(None), *src)]
    model_dims = len(model.eval_input_shape)
    lead = canvas.ndim - 1 - model_dims
    x = torch.from_numpy(canvas)
    if lead:  # sections of a volume: one batch of 2D images
        x = x.reshape(x.shape[0], -1, *x.shape[-model_dims:]).transpose(0, 1)
    else:
        x = x[None]
    with torch.no_grad():
        y = model.eval()(x).numpy()
    if lead:
        y = y.transpose(1, 0, *range(2, y.ndim)).reshape(
            y.shape[1], *canvas.shape[1 : 1 + lead], *y.shape[2:]
        )
    else:
        y = y[0]
    shape = plan.output_roi.shape / plan.output_voxel_size
    assert y.shape[1:] == tuple(blocks / plan.output_voxel_size), (y.shape, blocks)
    return y[(slice(None), *(slice(0, s) for s in shape))]


def read_output(path: Path) -> np.ndarray:
    """The full-resolution array of an output (an OME-NGFF image's ``s0``)."""
    import zarr

    node = zarr.open(str(path), mode="r")
    return (node["s0"] if isinstance(node, zarr.Group) else node)[:]


def python_lines(code: str, cwd: Path) -> list[str]:
    """The output lines of ``code`` run in a fresh interpreter, which must succeed."""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=cwd
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def print_imported(modules: tuple[str, ...]) -> str:
    """Code printing which of ``modules`` the interpreter has imported, sorted."""
    return f"import sys\nprint(sorted(m for m in {modules!r} if m in sys.modules))\n"


def volume_of(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """uint8 test volume with structure at several scales."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, size=shape).astype(np.float32)
    grid = np.meshgrid(*(np.arange(s) for s in shape), indexing="ij")
    waves = sum(np.sin(g / (3 + i)) for i, g in enumerate(grid))
    return np.clip(0.5 * noise + 40 * waves + 64, 0, 255).astype(np.uint8)


FACTORY = """
import os, time
import torch
from funlib.geometry import Coordinate
from blockpredict.architectures import WrappedArchitecture
from blockpredict.model import Model

class SlowMean(torch.nn.Module):
    '''3x3x3 mean filter (10^3 in, 8^3 out) for runs that fail, hang or take time.

    A block holding a marked voxel (above ``mark``) raises, or hangs if ``action`` is
    "hang". Every other block (never the all-zero shape probe) raises when ``fail``,
    waits for the file ``gate`` if given, and sleeps ``delay`` seconds.'''
    def __init__(self, delay, fail, gate, action, mark):
        super().__init__()
        self.delay, self.fail, self.gate, self.action, self.mark = delay, fail, gate, action, mark
    def forward(self, x):
        if x.max() > self.mark:
            if self.action == "hang":
                time.sleep(3600)
            raise ValueError("marked voxel in this block")
        if x.abs().sum() > 0:  # not in the shape probe
            if self.fail:
                raise RuntimeError("CUDA out of memory (simulated)")
            while self.gate and not os.path.exists(self.gate):
                time.sleep(0.05)
            time.sleep(self.delay)
        return torch.nn.functional.avg_pool3d(x, 3, stride=1)

def build(delay=0.0, fail=False, gate=None, action="raise", mark=100.0):
    arch = WrappedArchitecture(SlowMean(delay, fail, gate, action, mark),
                               input_shape=Coordinate(10, 10, 10),
                               num_in_channels=1, num_out_channels=1)
    return Model(arch, torch.nn.Identity())
"""


def mean_model() -> Any:
    """The factory's model without its delay: a 3x3x3 mean filter, 10^3 in, 8^3 out."""
    from blockpredict.architectures import WrappedArchitecture
    from blockpredict.model import Model

    arch = WrappedArchitecture(
        torch.nn.AvgPool3d(3, stride=1),
        input_shape=Coordinate(10, 10, 10),
        num_in_channels=1,
        num_out_channels=1,
    )
    return Model(arch, torch.nn.Identity())


def write_factory(folder: Path, name: str = "slow") -> str:
    """The test factory ``FACTORY`` as module ``name`` in ``folder``; returns ``name``.

    The shared cluster's workers cache modules by name: a test on it gives its module
    a name no other test there uses.
    """
    (folder / f"{name}.py").write_text(FACTORY)
    return name


def on_workers(address: str, folder: Path) -> dict[str, str]:
    """The shared cluster's workers import factory modules from ``folder`` too.

    Returns the workflow's cluster section for that cluster.
    """
    from distributed import Client

    with Client(address) as client:
        client.run(exec, f"import sys; sys.path.insert(0, {str(folder)!r})")
    return {"type": "address", "address": address}


def marked_input(folder: Path) -> None:
    """The ``marked`` factory module and a 26^3 input of ones with voxel (20, 20, 20) marked.

    With 10^3 reads and 8^3 writes the output ROI [1, 25)^3 has 3^3 blocks; only
    block (2, 2, 2), id 26, reads the marked voxel.
    """
    write_factory(folder, "marked")
    data = np.ones((26, 26, 26), dtype=np.float32)
    data[20, 20, 20] = 1000.0
    make_input(folder / "in.zarr" / "raw", data, (1, 1, 1))


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (
        float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())
        if math.prod(a.shape)
        else 0.0
    )


def cli_in_process(
    args: list[str], cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``blockpredict ARGS`` run by ``cli.main`` in this process, as a subprocess would see it.

    For commands that end before any cluster starts (bad input, ``plan``): they cost
    milliseconds here instead of seconds of imports. ``cwd`` is the working folder and
    is on ``sys.path`` (factory modules); ``env`` is added to ``os.environ``. stdout and
    stderr are captured, with the CLI's own log handler writing to that stderr as it
    would in a fresh process; an exception that escapes ``main`` prints its traceback
    and exits 1, as the interpreter does. Modules imported from ``cwd`` are forgotten.
    What only a real process shows (signals, import time, the entry point) stays in
    subprocess tests.
    """
    from blockpredict.cli import main

    out, err = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    root.handlers = []  # main's logging.basicConfig installs its handler, as in a new process
    modules = set(sys.modules)
    sys.path.insert(0, str(cwd))
    importlib.invalidate_caches()  # factory modules written since the last import
    try:
        with (
            contextlib.chdir(cwd),
            _environ(env or {}),
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
            warnings.catch_warnings(),
        ):
            warnings.resetwarnings()  # Python's defaults, not pytest's filters
            warnings.simplefilter("default")
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning):
                warnings.simplefilter("ignore", category)
            try:
                code = main(args)
            except SystemExit as e:  # argparse
                code = e.code if isinstance(e.code, int) else 1
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers, root.level = saved
        sys.path.remove(str(cwd))
        for name in set(sys.modules) - modules:
            origin = getattr(sys.modules[name], "__file__", None) or ""
            if origin.startswith(os.path.join(cwd, "")):
                del sys.modules[name]
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


@contextlib.contextmanager
def _environ(extra: dict[str, str]) -> Iterator[None]:
    saved = dict(os.environ)
    os.environ.update(extra)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


SRC = str(Path(__file__).resolve().parents[1] / "src")


def cli_process(
    *args: str, cwd: Path, env: dict[str, str] | None = None, **kwargs: Any
) -> subprocess.Popen[str]:
    """``python -m blockpredict.cli ARGS`` started in ``cwd``, stdout and stderr piped.

    ``cwd`` (factory modules) and this checkout's ``src`` are on its PYTHONPATH, and
    ``env`` is added to this process's environment. For what only a real process shows:
    signals, killed workers or clients, the exit code of the real entry point.
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(cwd), SRC]), **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "blockpredict.cli", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def worker_processes(pid: int) -> list[Any]:
    """The Dask worker processes below process ``pid``, as psutil sees them: spawned
    (``spawn_main``) or forked by the forkserver of a warm start (its children)."""
    import psutil

    def forked(p: Any) -> bool:
        parent = p.parent()
        return parent is not None and "forkserver" in " ".join(parent.cmdline())

    children = psutil.Process(pid).children(recursive=True)
    return [p for p in children if "spawn_main" in " ".join(p.cmdline()) or forked(p)]

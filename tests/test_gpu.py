"""On a CUDA GPU: the engine's output, reduced precision, torch.compile, one GPU per worker.

Skipped where torch sees no GPU (CI has none). On a GPU machine:
``python -m pytest tests/test_gpu.py``. The CPU runs the same code with the CUDA
staging path forced on (tests/test_speed.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import (
    UNET_3D,
    alive_checkpoint,
    enliven,
    make_input,
    max_abs_diff,
    read_output,
    reference,
    volume_of,
    write_workflow,
)
from distributed import Client
from funlib.geometry import Coordinate, Roi

from blockpredict import warm_start
from blockpredict.build import build_model
from blockpredict.cluster import connect, local_gpus
from blockpredict.config import ClusterConfig, ModelConfig, load_workflow
from blockpredict.forward import Forward
from blockpredict.pipeline import Pending
from blockpredict.precision import TOLERANCE
from blockpredict.workflow import predict_workflow, prepare_workflow

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def landed(result: list[np.ndarray] | Pending) -> list[np.ndarray]:
    """A forward's outputs once they are on the host (waiting for them if they are not)."""
    if isinstance(result, Pending):
        result.wait()
        return result.outputs
    return result


def tf32_tolerance(expected: np.ndarray) -> float:
    """fp32 on a GPU against the CPU: cuDNN's convolutions on Ampere and newer run in TF32
    by default (torch.backends.cudnn.allow_tf32), a 10-bit mantissa, about 1e-3 relative
    per layer; 1% of the output's range allows that and still sees a misplaced block
    (whose outputs differ by about 0.4, see conftest.enliven)."""
    return 1e-2 * float(expected.max() - expected.min())


def _model() -> torch.nn.Module:
    return enliven(
        build_model(ModelConfig.model_validate({"unet": UNET_3D, "head": {"out_channels": 2}}))
    )


def _predict(tmp_path: Path, data: np.ndarray, execution: dict[str, Any], name: str) -> Any:
    workflow = {
        "input": {"container": "in.zarr", "dataset": "raw"},
        "model": alive_checkpoint(tmp_path, {"unet": UNET_3D, "head": {"out_channels": 2}}),
        "output": {"container": "out.zarr", "dataset": name},
        "cluster": {"device": "cuda", "dashboard_address": ":0"},
        "execution": {"max_retries": 0, **execution},
    }
    path = write_workflow(tmp_path / f"{name}.yaml", workflow)
    loaded = load_workflow(path)
    report = predict_workflow(loaded, progress=False)
    assert report.exit_code == 0, report.summary()
    return loaded, report


def test_a_run_on_the_gpu_equals_the_whole_volume_forward(tmp_path, monkeypatch):
    """A local cluster on the GPU (one worker per GPU): auto-sized tasks, tasks of 16 blocks
    (a pipeline group then holds 16 outputs until its write), batches of 4 and CUDA graphs.
    Each output equals one CPU forward over the whole volume to TF32's tolerance."""
    monkeypatch.chdir(tmp_path)
    data = volume_of((64, 64, 64))
    make_input(tmp_path / "in.zarr" / "raw", data, (1, 1, 1))
    runs = {
        "auto": {},
        "grouped": {"blocks_per_task": 16},
        "batched": {"batch_size": 4, "blocks_per_task": 16},
        "graphs": {"cuda_graphs": True, "blocks_per_task": 16},
    }
    outputs = {}
    for name, execution in runs.items():
        loaded, report = _predict(tmp_path, data, execution, name)
        assert report.workers == 1  # one GPU here: one worker process
        outputs[name] = read_output(tmp_path / "out.zarr" / name)
    plan = prepare_workflow(loaded).plan
    volume = data.astype(np.float32)[None] / 255.0
    expected = reference(
        build_model(loaded.model), volume, Roi((0, 0, 0), (64, 64, 64)), Coordinate(1, 1, 1), plan
    )
    for name, got in outputs.items():
        error = max_abs_diff(got, expected)
        print(f"{name}: max |gpu - cpu| = {error:.2e}")
        assert error <= tf32_tolerance(expected), name


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_reduced_precision_on_the_gpu_stays_within_its_tolerance(precision):
    model = _model().eval().cuda()
    blocks = [np.random.default_rng(i).random((1, 28, 28, 28), dtype=np.float32) for i in range(3)]
    device = torch.device("cuda")
    exact = landed(Forward(model, device, (12, 12, 12), 3)(blocks))
    reduced = landed(Forward(model, device, (12, 12, 12), 3, precision)(blocks))
    for a, b in zip(exact, reduced, strict=True):
        assert b.dtype == np.float32
        error = max_abs_diff(a, b)
        print(f"{precision}: max |{precision} - fp32| = {error:.2e}")
        assert 0 < error <= TOLERANCE[precision]


def test_the_staging_path_uses_pinned_buffers_and_keeps_the_last_output():
    model = _model().eval().cuda()
    box = np.random.default_rng(0).random((1, 40, 40, 40), dtype=np.float32)  # a read box
    blocks = [box[:, z : z + 28, 12:, :28] for z in (0, 12)]  # its blocks: strided views
    forward = Forward(model, torch.device("cuda"), (12, 12, 12), 3)
    assert forward.staging and forward.stream is not None
    staged = forward.stage(blocks)  # what the reader threads do
    assert all(torch.from_numpy(s).is_pinned() and s.flags.c_contiguous for s in staged)
    assert all(np.array_equal(s, b) for s, b in zip(staged, blocks, strict=True))
    first = landed(forward([staged[0]]))[0]
    kept = first.copy()
    second = landed(forward([staged[1]]))[0]
    assert np.array_equal(first, kept)  # each call's outputs have buffers of their own
    assert torch.from_numpy(second).is_pinned()
    assert np.array_equal(landed(forward([blocks[1]]))[0], second)  # unstaged: the same values
    with torch.no_grad():
        plain = model(torch.from_numpy(blocks[1])[None].cuda()).cpu().numpy()[0]
    assert np.array_equal(second, plain)


def test_a_captured_forward_replays_what_the_model_computes():
    """The second forward of a batch shape is captured and later ones replay it (two shapes at
    most): each output equals the model's own forward, and no replay overwrites an output
    that was already returned (the writer may still hold it)."""
    model = _model().eval().cuda()
    blocks = [np.random.default_rng(i).random((1, 28, 28, 28), dtype=np.float32) for i in range(5)]
    device = torch.device("cuda")
    graphed = Forward(model, device, (12, 12, 12), 3, cuda_graphs=True)
    singles = [landed(graphed([b]))[0] for b in blocks]  # eager, eager then captured, replays
    kept = [s.copy() for s in singles]
    pairs = [landed(graphed(blocks[i : i + 2])) for i in range(4)]  # a second shape, captured too
    assert sorted(graphed.graphs) == [(1, 1, 28, 28, 28), (2, 1, 28, 28, 28)]
    landed(graphed([blocks[0]] * 3))  # a third shape runs as it is
    assert len(graphed.graphs) == 2
    with torch.no_grad():
        expected = [model(torch.from_numpy(b)[None].cuda()).cpu().numpy()[0] for b in blocks]
    for got, old, want in zip(singles, kept, expected, strict=True):
        assert np.array_equal(got, old)
        error = max_abs_diff(got, want)
        print(f"replayed: max |graph - model| = {error:.2e}")
        assert error <= tf32_tolerance(want)  # the same kernels: 0 expected
    for i, pair in enumerate(pairs):
        for got, want in zip(pair, expected[i : i + 2], strict=True):
            assert max_abs_diff(got, want) <= tf32_tolerance(want)


def test_queued_forwards_each_equal_the_models_own():
    """The forward thread queues batches without waiting (copy in, forward and copy out on
    three streams, ordered by events): 24 batches queued before the first wait, each from
    a pinned input dropped as soon as it was queued (the next one's staging may reuse its
    buffer), each equal the model's own forward; graphed replays too (their input and
    output buffers are reused by every replay)."""
    model = _model().eval().cuda()
    device = torch.device("cuda")
    rng = np.random.default_rng(7)
    batches = [[rng.random((1, 60, 60, 60), dtype=np.float32) for _ in range(4)] for _ in range(24)]
    with torch.no_grad():
        expected = [
            model(torch.from_numpy(np.stack(batch)).cuda()).cpu().numpy() for batch in batches
        ]
    for graphs in (False, True):
        forward = Forward(model, device, (44, 44, 44), 3, cuda_graphs=graphs)
        queued = [forward(forward.stage(batch)) for batch in batches]  # nothing waited for
        assert all(isinstance(q, Pending) for q in queued)
        assert len(forward.graphs) == int(graphs)
        for q, want in zip(queued, expected, strict=True):
            assert q.wait() > 0  # the forward's seconds on the device
            for got, row in zip(q.outputs, want, strict=True):
                error = max_abs_diff(got, row)
                assert error <= tf32_tolerance(row), f"graphs {graphs}: {error:.2e}"
                if not graphs:  # the same kernels as the model's own forward
                    assert np.array_equal(got, row)


class _Syncing(torch.nn.Module):
    """A model that reads a value back to the host in its forward: it cannot be captured."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = 2.0 if float(x.mean()) >= 0 else 1.0  # synchronizes with the host
        return x[:, :, 8:-8, 8:-8, 8:-8] * scale


def test_a_model_that_cannot_be_captured_runs_as_it_is_with_one_warning():
    device = torch.device("cuda")
    forward = Forward(_Syncing().cuda(), device, (12, 12, 12), 3, cuda_graphs=True)
    blocks = [np.random.default_rng(i).random((1, 28, 28, 28), dtype=np.float32) for i in range(4)]
    with pytest.warns(RuntimeWarning, match="execution.cuda_graphs: capture failed") as seen:
        outputs = [landed(forward([b]))[0] for b in blocks]
    assert len(seen) == 1 and not forward.graphs and not forward.graphs_on
    for got, block in zip(outputs, blocks, strict=True):
        assert np.array_equal(got, 2 * block[:, 8:-8, 8:-8, 8:-8])


def test_compile_on_the_gpu_equals_eager():
    model = _model().eval().cuda()
    blocks = [np.random.default_rng(i).random((1, 28, 28, 28), dtype=np.float32) for i in range(2)]
    device = torch.device("cuda")
    eager = landed(Forward(model, device, (12, 12, 12), 3)(blocks))
    compiled = Forward(model, device, (12, 12, 12), 3, compile=True)
    got = landed(compiled(blocks))
    assert compiled.compiled is not None, "torch.compile fell back on a GPU"
    for a, b in zip(eager, got, strict=True):
        assert max_abs_diff(a, b) <= tf32_tolerance(a)


def _visible() -> dict[str, Any]:
    return {
        "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "devices": torch.cuda.device_count(),
        "arenas": os.environ.get("MALLOC_ARENA_MAX"),
        "mmap": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        "parent": os.getppid(),
    }


def test_each_local_gpu_worker_sees_only_its_own_gpu():
    """Each worker is forked from the warm start's forkserver (which imported torch without
    starting CUDA), yet sees only its own GPU: its nanny set CUDA_VISIBLE_DEVICES as it
    started, before its torch started CUDA."""
    config = ClusterConfig.model_validate({"device": "cuda", "dashboard_address": ":0"})
    with connect(config) as client:
        assert isinstance(client, Client)
        seen = client.run(_visible)
    gpus = local_gpus(config)  # CUDA_VISIBLE_DEVICES's entries, or 0..n-1
    assert gpus and sorted(v["CUDA_VISIBLE_DEVICES"] for v in seen.values()) == sorted(gpus)
    assert all(v["devices"] == 1 for v in seen.values())
    assert {v["parent"] for v in seen.values()} == {warm_start._pid()} != {os.getpid()}
    # pages kept, but not one arena: a GPU worker's I/O threads allocate at once
    assert all(v["mmap"] == "4294967296" and v["arenas"] is None for v in seen.values())

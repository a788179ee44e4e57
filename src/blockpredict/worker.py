"""Worker side: one eval-mode model per worker, and the per-block function.

The :class:`ModelPlugin` is registered once per run; it builds the model on
the worker's device when the worker starts (or joins) and holds it for every
block. Tasks carry only block ids: each worker reads its input and writes its
output itself.
"""

from __future__ import annotations

import logging
import math
import os
import re
from typing import Any

import numpy as np
import torch
from distributed import WorkerPlugin
from funlib.geometry import Roi

from .build import build_model, place
from .config import ModelConfig
from .forward import Forward
from .job import Job
from .pipeline import GPU_GROUP_BYTES, GROUP_BYTES, Pipeline, group_size
from .precision import unsupported
from .storage import BlockReader, BlockWriter
from .tasks import PLUGIN_NAME, mark_running, mark_stopped

logger = logging.getLogger(__name__)

GPU_IO_THREADS = 2  # readers and writers each, per GPU worker (execution.io_threads: auto)


def choose_device(setting: str, worker_name: object) -> torch.device:
    """The CPU, or a GPU: a worker that sees one GPU (``CUDA_VISIBLE_DEVICES``, set per worker
    process on local and batch clusters) uses it; one that sees several (a user's own
    workers) picks ``cuda:i`` by its name's trailing number."""
    if setting == "cpu" or (setting == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("cluster.device is cuda but this worker sees no GPU")
    match = re.search(r"(\d+)$", str(worker_name))
    index = int(match.group(1)) if match else 0
    return torch.device("cuda", index % torch.cuda.device_count())


def io_threads(setting: int | str, device: torch.device) -> int:
    """Reader and writer threads of a worker's pipeline: ``auto`` is one each on the CPU,
    where the forward needs the cores, and ``GPU_IO_THREADS`` each on a GPU, where a
    forward takes a few ms and one reader and one writer cannot keep up."""
    if setting != "auto":
        return int(setting)
    return GPU_IO_THREADS if device.type == "cuda" else 1


class ModelPlugin(WorkerPlugin):
    """Loads the model once per worker, in eval mode, on the worker's device."""

    name = PLUGIN_NAME

    def __init__(self, job: Job) -> None:
        self.job = job
        self.model: torch.nn.Module | None = None
        self.pipeline: Pipeline | None = None

    def setup(self, worker: Any) -> None:
        job = self.job
        self.worker_name = str(worker.name)
        self.device = choose_device(job.device, worker.name)
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, job.threads))
        reason = unsupported(job.precision, self.device)
        if reason:
            raise RuntimeError(f"execution.precision {job.precision}: {reason}")
        config = job.model
        model = build_model(config, job.model_shape) if isinstance(config, ModelConfig) else config
        self.model = place(model, self.device)
        # the geometry a worker computes with for every block, as plain ints
        self._read_shape = tuple(int(v) for v in job.plan.read_size)
        self._input_voxel_size = tuple(int(v) for v in job.input.voxel_size)
        self._output_voxel_size = tuple(int(v) for v in job.plan.output_voxel_size)
        self.reader = BlockReader(job.input, job.normalize)
        self.writer = BlockWriter(job.output)
        self.forward = Forward(
            self.model,
            self.device,
            tuple(job.plan.write_shape),
            len(model.eval_input_shape),
            job.precision,
            job.compile,
            cuda_graphs=job.cuda_graphs,
        )
        self.pipeline = Pipeline(
            self.read,
            self.forward,
            self.write,
            job.batch_size,
            self.worker_name,
            started=mark_running,
            finished=mark_stopped,
            group=group_size(
                4 * job.input.num_channels * math.prod(job.plan.read_shape),
                job.batch_size,
                GPU_GROUP_BYTES if self.device.type == "cuda" else GROUP_BYTES,
            ),
            read_many=self.read_many,
            write_many=self.write_many,
            io_threads=io_threads(job.io_threads, self.device),
        )
        logger.info("worker %s: model on %s (pid %d)", worker.name, self.device, os.getpid())

    def teardown(self, worker: Any) -> None:
        if self.pipeline is not None:
            self.pipeline.close()
            self.forward.graphs.clear()  # their memory pools go with them
        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def read(self, block_id: int) -> np.ndarray:
        """The normalized input of one block: ``(C, *read_shape)`` float32, staged for the
        device (``Forward.stage``)."""
        return self.forward.stage([self.reader.read(self.job.plan.block(block_id).read_roi)])[0]

    def read_many(self, block_ids: list[int]) -> list[np.ndarray]:
        """The inputs of adjacent blocks: one storage call per run of blocks that fills at
        least half of its bounding box in the block grid (a task's Morton-ordered blocks
        mostly do; where the order jumps, a new run starts), staged for the device."""
        out: list[np.ndarray] = []
        for run in _compact_runs(block_ids, tuple(self.job.plan.grid_shape)):
            out += self._read_box(run)
        return self.forward.stage(out)

    def _read_box(self, block_ids: list[int]) -> list[np.ndarray]:
        plan, read = self.job.plan, self._read_shape
        offsets = [plan.block_box(i)[2] for i in block_ids]  # plain ints: a worker's hot path
        if len(offsets) == 1:
            return [self.reader.read(Roi(offsets[0], read))]
        lo = tuple(map(min, zip(*offsets, strict=True)))
        hi = tuple(m + r for m, r in zip(map(max, zip(*offsets, strict=True)), read, strict=True))
        data = self.reader.read(Roi(lo, tuple(h - b for b, h in zip(lo, hi, strict=True))))
        size, views = self._input_voxel_size, []
        for offset in offsets:
            begin = [(o - b) // v for o, b, v in zip(offset, lo, size, strict=True)]
            ends = [b + r // v for b, r, v in zip(begin, read, size, strict=True)]
            views.append(data[(slice(None), *map(slice, begin, ends))])
        return views

    def write(self, block_id: int, prediction: np.ndarray) -> None:
        """Crop a ``(C_out, *write_shape)`` prediction to the block's write ROI and write it."""
        self.writer.write(*self._cropped(block_id, prediction))

    def write_many(self, block_ids: list[int], predictions: list[np.ndarray]) -> None:
        """Several blocks' predictions, cropped, in one storage call."""
        pairs = zip(block_ids, predictions, strict=True)
        self.writer.write_many([self._cropped(i, p) for i, p in pairs])

    def _cropped(self, block_id: int, prediction: np.ndarray) -> tuple[Roi, np.ndarray]:
        offset, shape, _ = self.job.plan.block_box(block_id)
        crop = tuple(slice(0, s // v) for s, v in zip(shape, self._output_voxel_size, strict=True))
        return Roi(offset, shape), prediction[(slice(None), *crop)]


def _compact_runs(block_ids: list[int], grid: tuple[int, ...]) -> list[list[int]]:
    """Consecutive runs of ``block_ids`` whose grid bounding box holds at most twice as many
    blocks as the run (so a run's one read costs at most about twice its blocks' voxels)."""
    index = np.stack(np.unravel_index(np.asarray(block_ids, np.int64), grid), axis=1)
    runs: list[list[int]] = []
    lo = hi = index[0]
    for k, block_id in enumerate(block_ids):
        new_lo, new_hi = np.minimum(lo, index[k]), np.maximum(hi, index[k])
        if runs and math.prod((new_hi - new_lo + 1).tolist()) <= 2 * (len(runs[-1]) + 1):
            runs[-1].append(block_id)
            lo, hi = new_lo, new_hi
        else:
            runs.append([block_id])
            lo = hi = index[k]
    return runs

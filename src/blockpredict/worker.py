"""Worker side: one eval-mode model per worker, and the per-block function.

The :class:`ModelPlugin` is registered once per run; it builds the model on
the worker's device when the worker starts (or joins) and holds it for every
block. Tasks carry only block ids: each worker reads its input and writes its
output itself.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from distributed import WorkerPlugin, get_worker

from .build import build_model, place
from .config import ModelConfig, Scaling
from .plan import BlockPlan
from .storage import BlockReader, BlockWriter, InputInfo, OutputInfo

logger = logging.getLogger(__name__)

PLUGIN_NAME = "blockpredict"

# block id -> time.time() when this worker process started it (for block_timeout)
_RUNNING: dict[int, float] = {}


@dataclass(frozen=True)
class Job:
    """All a worker needs to process any block of one run: small and picklable.

    ``model`` is either a :class:`ModelConfig` (rebuilt on the worker) or a
    model object passed from Python (serialized once, with the plugin).
    """

    plan: BlockPlan
    input: InputInfo
    normalize: str | Scaling
    output: OutputInfo
    model: ModelConfig | Any
    device: str = "auto"
    threads: int = 1


@dataclass(frozen=True)
class BlockResult:
    """Timings of one block in seconds, or the error that stopped it."""

    block_id: int
    read: float = 0.0
    compute: float = 0.0
    write: float = 0.0
    worker: str = ""
    error: str | None = None


def describe(exception: BaseException) -> str:
    """``Type: first line of the message``, for reports and logs."""
    text = str(exception).strip().splitlines()
    return f"{type(exception).__name__}: {text[0] if text else ''}".rstrip(": ")


def choose_device(setting: str, worker_name: object) -> torch.device:
    """``cuda:i`` spread over visible GPUs by worker index, else the CPU."""
    if setting == "cpu" or (setting == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("cluster.device is cuda but this worker sees no GPU")
    match = re.search(r"(\d+)$", str(worker_name))
    index = int(match.group(1)) if match else 0
    return torch.device("cuda", index % torch.cuda.device_count())


class ModelPlugin(WorkerPlugin):
    """Loads the model once per worker, in eval mode, on the worker's device."""

    name = PLUGIN_NAME

    def __init__(self, job: Job) -> None:
        self.job = job
        self.model: torch.nn.Module | None = None

    def setup(self, worker: Any) -> None:
        job = self.job
        self.worker_name = str(worker.name)
        self.device = choose_device(job.device, worker.name)
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, job.threads))
        model = build_model(job.model) if isinstance(job.model, ModelConfig) else job.model
        self.model = place(model, self.device)
        self.model_dims = len(model.eval_input_shape)
        self.reader = BlockReader(job.input, job.normalize)
        self.writer = BlockWriter(job.output)
        logger.info("worker %s: model on %s (pid %d)", worker.name, self.device, os.getpid())

    def teardown(self, worker: Any) -> None:
        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def process(self, block_id: int) -> BlockResult:
        """Read, normalize, predict, convert and write one block."""
        assert self.model is not None, "ModelPlugin.setup did not run"
        block = self.job.plan.block(block_id)
        t0 = time.perf_counter()
        data = self.reader.read(block.read_roi)
        t1 = time.perf_counter()
        prediction = self.forward(data)
        t2 = time.perf_counter()
        plan = self.job.plan
        crop = tuple(slice(0, s) for s in block.write_roi.shape / plan.output_voxel_size)
        self.writer.write(block.write_roi, prediction[(slice(None), *crop)])
        t3 = time.perf_counter()
        return BlockResult(block_id, t1 - t0, t2 - t1, t3 - t2, self.worker_name)

    def forward(self, data: np.ndarray) -> np.ndarray:
        """``(C, *read_shape)`` -> ``(C_out, *write_shape)``; extra leading axes are 1."""
        assert self.model is not None
        channels, *spatial = data.shape
        model_shape = spatial[len(spatial) - self.model_dims :]
        x = torch.from_numpy(data).reshape(1, channels, *model_shape).to(self.device)
        with torch.no_grad():
            y = self.model(x)
        y = y.float().cpu().numpy()
        write_shape = tuple(self.job.plan.write_shape)
        if y.shape[2:] != write_shape[len(write_shape) - self.model_dims :]:
            raise RuntimeError(
                f"model returned spatial shape {y.shape[2:]}, expected {write_shape}"
            )
        return y.reshape(y.shape[1], *write_shape)


def process_blocks(block_ids: list[int]) -> list[BlockResult]:
    """The Dask task: adjacent blocks, with the model held by this worker's plugin.

    A block that raises is reported in its result, so the others of the task
    still count and only that block is retried.
    """
    plugin = get_worker().plugins[PLUGIN_NAME]
    results = []
    for block_id in block_ids:
        _RUNNING[block_id] = time.time()
        try:
            results.append(plugin.process(block_id))
        except Exception as e:
            error = describe(e)
            logger.warning("block %d failed: %s", block_id, error)
            results.append(BlockResult(block_id, worker=plugin.worker_name, error=error))
        finally:
            _RUNNING.pop(block_id, None)
    return results


def kill_this_worker() -> None:
    """End this worker process at once (a hung block cannot be stopped otherwise).

    A nanny notices and starts a fresh worker, which loads the model again.
    """
    os.kill(os.getpid(), signal.SIGKILL)


def running_blocks() -> dict[int, float]:
    """Seconds each block in progress on this worker has run (asked by the runner)."""
    now = time.time()
    return {block_id: now - start for block_id, start in list(_RUNNING.items())}

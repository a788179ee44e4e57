"""The per-worker stages that overlap: read ahead, one forward at a time, write behind.

While group i runs its forwards (in the Dask task's thread), group i+1 is read
and normalized on a reader thread and group i-1 is converted and written on a
writer thread. A group is ``group`` whole batches: one batch for large blocks,
more for small ones, up to about ``GROUP_BYTES`` of input, so tiny blocks are
read with one storage call per group (``read_many``) instead of one per block.
Each stage holds at most one group, so a worker holds at most **three groups**
(``3 * batch_size`` blocks for large blocks; for small ones about
``3 * GROUP_BYTES`` of input and its outputs), whatever the volume. Only the task's thread runs
forwards, and a worker runs one task at a time per thread, so there is one
forward at a time per device.

A block that fails (read, forward or write) fails alone: its result carries the
error and the others go on; a batch whose forward raises is retried one block
at a time so only the culprit fails. A block counts as done only when its
write returned (the runner's ledger rule).

``started(block_id)`` is called when a block's read begins and again when its
forward begins, ``finished(block_id)`` after its write (or failure): the worker
times blocks from these for ``block_timeout``, so a block read ahead is not
charged for the forward it waits for.

The stages reach storage only through two callables, ``read(block_id)`` and
``write(block_id, prediction)``, so storage can change how it reads and writes.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from .job import BlockResult, describe
from .precision import autocast

logger = logging.getLogger(__name__)

BATCHES_IN_MEMORY = 3  # groups: one being read, one in the forward, one being written
GROUP_BYTES = 4 << 20  # input bytes a group of small blocks reads at once
MAX_GROUP = 64  # blocks per group at most (a task's blocks are Morton-adjacent)


def group_size(block_bytes: int, batch_size: int) -> int:
    """Batches per group: as many as fit in ``GROUP_BYTES`` (at least one, at most ``MAX_GROUP``
    blocks)."""
    blocks = min(MAX_GROUP, GROUP_BYTES // max(1, block_bytes))
    return max(1, blocks // max(1, batch_size))


ReadBlock = Callable[[int], np.ndarray]
WriteBlock = Callable[[int, np.ndarray], None]
ReadMany = Callable[[list[int]], list[np.ndarray]]


@dataclass
class _Block:
    """One block's way through the stages."""

    block_id: int
    data: np.ndarray | None = None
    read: float = 0.0
    compute: float = 0.0
    write: float = 0.0
    error: str | None = None
    done: bool = field(default=False)


class Forward:
    """Batched forward on one device: ``[(C, *read_shape)] -> [(C_out, *write_shape)]``.

    On CUDA, inputs go through pinned host buffers with non-blocking copies on
    a stream of the forward's own; outputs come back through a ring of two
    pinned buffers (one may still be being written while the next forward
    fills the other). ``staging`` forces that path on (to test it on the CPU).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        device: torch.device,
        write_shape: tuple[int, ...],
        model_dims: int,
        precision: str = "fp32",
        compile: bool = False,
        staging: bool | None = None,
    ) -> None:
        self.model = model
        self.device = device
        self.write_shape = tuple(write_shape)
        self.model_dims = model_dims
        self.precision = precision
        self.staging = device.type == "cuda" if staging is None else staging
        self.pin = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._buffers: dict[tuple[str, int], torch.Tensor] = {}
        self._turn = 0
        self.compiled: Callable[..., torch.Tensor] | None = None
        if compile:
            try:
                self.compiled = torch.compile(model)
            except Exception as e:
                self._compile_failed(e)

    def __call__(self, blocks: list[np.ndarray]) -> list[np.ndarray]:
        channels, *spatial = blocks[0].shape
        model_shape = spatial[len(spatial) - self.model_dims :]
        batch = np.stack(blocks).reshape(len(blocks), channels, *model_shape)
        with self._on_stream():
            x = self._to_device(batch)
            with torch.no_grad(), autocast(self.device, self.precision):
                y = self._run(x)
            y = self._to_host(y.float())
        expected = self.write_shape[len(self.write_shape) - self.model_dims :]
        if tuple(y.shape[2:]) != expected:
            raise RuntimeError(
                f"model returned spatial shape {tuple(y.shape[2:])}, expected {expected}"
            )
        return [y[i].reshape(y.shape[1], *self.write_shape) for i in range(len(blocks))]

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        if self.compiled is not None:
            try:
                return self.compiled(x)
            except Exception as e:
                y = self.model(x)  # the model itself runs: compiling was the problem
                self._compile_failed(e)
                return y
        return self.model(x)

    def _compile_failed(self, error: Exception) -> None:
        self.compiled = None
        warnings.warn(
            f"execution.compile: torch.compile failed ({describe(error)}); running uncompiled",
            RuntimeWarning,
            stacklevel=2,
        )
        logger.warning("torch.compile failed (%s); running uncompiled", describe(error))

    @contextlib.contextmanager
    def _on_stream(self) -> Iterator[None]:
        if self.stream is None:
            yield
            return
        with torch.cuda.stream(self.stream):
            yield
        self.stream.synchronize()

    def _buffer(self, name: str, shape: torch.Size, turn: int = 0) -> torch.Tensor:
        buffer = self._buffers.get((name, turn))
        if buffer is None or buffer.shape != shape:
            buffer = torch.empty(shape, dtype=torch.float32, pin_memory=self.pin)
            self._buffers[(name, turn)] = buffer
        return buffer

    def _to_device(self, batch: np.ndarray) -> torch.Tensor:
        host = torch.from_numpy(batch)
        if not self.staging:
            return host.to(self.device)
        staged = self._buffer("in", host.shape)
        staged.copy_(host)
        return staged.to(self.device, non_blocking=True)

    def _to_host(self, y: torch.Tensor) -> np.ndarray:
        if not self.staging:
            return y.cpu().numpy()
        self._turn = 1 - self._turn
        host = self._buffer("out", y.shape, self._turn)
        host.copy_(y, non_blocking=True)
        if self.stream is not None:
            self.stream.synchronize()
        return host.numpy()


class Pipeline:
    """Runs a task's blocks through read -> forward -> write, the three stages overlapping."""

    def __init__(
        self,
        read: ReadBlock,
        forward: Callable[[list[np.ndarray]], list[np.ndarray]],
        write: WriteBlock,
        batch_size: int = 1,
        worker: str = "",
        started: Callable[[int], None] = lambda block_id: None,
        finished: Callable[[int], None] = lambda block_id: None,
        group: int = 1,
        read_many: ReadMany | None = None,
    ) -> None:
        self.read = read
        self.read_many = read_many
        self.group = max(1, group)
        self.forward = forward
        self.write = write
        self.batch_size = batch_size
        self.worker = worker
        self.started = started
        self.finished = finished
        self.reader = ThreadPoolExecutor(1, thread_name_prefix="blockpredict-read")
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="blockpredict-write")

    def close(self) -> None:
        self.reader.shutdown(wait=False, cancel_futures=True)
        self.writer.shutdown(wait=False, cancel_futures=True)

    def run(self, block_ids: list[int]) -> list[BlockResult]:
        """Every block's result (timings or its error), in the order given."""
        size = self.batch_size * self.group  # blocks per stage: whole batches
        batches = [block_ids[i : i + size] for i in range(0, len(block_ids), size)]
        finished: list[_Block] = []
        reading: Future[list[_Block]] | None = None
        writing: Future[list[_Block]] | None = None
        try:
            if batches:
                reading = self.reader.submit(self._read, batches[0])
            for i in range(len(batches)):
                assert reading is not None
                blocks = reading.result()
                reading = None
                if i + 1 < len(batches):  # read ahead while this batch runs its forward
                    reading = self.reader.submit(self._read, batches[i + 1])
                self._forward(blocks)
                if writing is not None:  # back-pressure: one batch being written at a time
                    finished += writing.result()
                writing = self.writer.submit(self._write, blocks)
            if writing is not None:
                finished += writing.result()
                writing = None
        finally:  # an unexpected error: let the stages settle before the next task
            for pending in (reading, writing):
                if pending is not None:
                    pending.cancel() or pending.exception()
        by_id = {b.block_id: b for b in finished}
        return [self._result(by_id[i]) for i in block_ids]

    def _read(self, ids: list[int]) -> list[_Block]:
        for block_id in ids:
            self.started(block_id)
        if self.read_many is not None and len(ids) > 1:
            t0 = time.perf_counter()
            try:
                data = self.read_many(ids)
            except Exception:  # read them one by one: only the culprit fails
                pass
            else:
                share = (time.perf_counter() - t0) / len(ids)
                return [_Block(i, d, read=share) for i, d in zip(ids, data, strict=True)]
        blocks = []
        for block_id in ids:
            block = _Block(block_id)
            t0 = time.perf_counter()
            try:
                block.data = self.read(block_id)
            except Exception as e:
                block.error = describe(e)
            block.read = time.perf_counter() - t0
            blocks.append(block)
        return blocks

    def _forward(self, blocks: list[_Block]) -> None:
        for i in range(0, len(blocks), self.batch_size):  # a stage's group: batch by batch
            self._forward_batch(blocks[i : i + self.batch_size])

    def _forward_batch(self, blocks: list[_Block]) -> None:
        ready = [b for b in blocks if b.error is None]
        if not ready:
            return
        for b in ready:  # block_timeout counts from here: waiting for the forward is not running
            self.started(b.block_id)
        t0 = time.perf_counter()
        try:
            outputs = self.forward([b.data for b in ready])  # type: ignore[misc]
        except Exception as e:
            if len(ready) == 1:
                ready[0].error, ready[0].data = describe(e), None
                ready[0].compute = time.perf_counter() - t0
                return
            for b in ready:  # find the block that fails: one forward each
                self._forward_batch([b])
            return
        share = (time.perf_counter() - t0) / len(ready)
        for b, y in zip(ready, outputs, strict=True):
            b.data, b.compute = y, share

    def _write(self, blocks: list[_Block]) -> list[_Block]:
        for block in blocks:
            if block.error is None:
                t0 = time.perf_counter()
                try:
                    self.write(block.block_id, block.data)  # type: ignore[arg-type]
                    block.done = True
                except Exception as e:
                    block.error = describe(e)
                block.write = time.perf_counter() - t0
            block.data = None
            self.finished(block.block_id)
        return blocks

    def _result(self, b: _Block) -> BlockResult:
        if b.error is not None:
            logger.warning("block %d failed: %s", b.block_id, b.error)
        return BlockResult(b.block_id, b.read, b.compute, b.write, self.worker, b.error)

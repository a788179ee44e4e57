"""The per-worker stages that overlap: read ahead, one forward at a time, write behind.

A worker holds one :class:`Pipeline` for the whole run, with one forward thread
and ``io_threads`` reader and writer threads. While group i runs its forwards,
group i+1 is read and normalized and group i-1 is converted and written (with
several I/O threads, the next ``io_threads`` groups are read and the last
``io_threads`` written at once: a GPU's forward outruns one reader and one
writer). Tasks only feed it: a task's blocks join the queue behind the previous
task's, so the stages do not drain between tasks. ``entered`` (the worker passes
Dask's ``secede``) is called in the task's thread once the reader has taken the
task's last group: the worker then starts its next task, whose first read
overlaps this task's last forward and write.

A group is ``group`` whole batches: one batch for large blocks, more for
small ones, up to about ``GROUP_BYTES`` of input (``GPU_GROUP_BYTES`` on a GPU),
so neighbouring blocks are read with one storage call per group (``read_many``)
instead of one per block.
At most ``2 * io_threads + 1`` groups (with one I/O thread each, **three**: one
being read, one in the forward, one being written) hold data at any time,
whatever the volume and however many tasks wait: on the CPU ``3 * batch_size``
blocks for large blocks, about ``3 * GROUP_BYTES`` of input and its outputs for
small ones; on a GPU about ``(2 * io_threads + 1) * GPU_GROUP_BYTES`` of input
and its outputs.
One thread runs every forward, so there is one forward at a time per device. On a
GPU that thread only queues each forward (``Forward`` returns a :class:`Pending`) and
goes on with the next batch; the writer waits for a batch's outputs to reach the host
before it writes them.

A block that fails (read, forward or write) fails alone: its result carries the
error and the others go on; a batch whose forward raises is retried one block
at a time so only the culprit fails. A block counts as done only when its
write returned (the runner's ledger rule).

``started(block_id)`` is called when a stage begins work on a block (its read,
its forward, its write) and ``finished(block_id)`` when that stage is done with
it: the worker times blocks from these for ``block_timeout``, so only the stage
at work is charged, never a block that waits (read ahead, or written with its
group once the group's last forward returns, behind a block that hangs).

The stages reach storage only through callables, ``read(block_id)`` and
``write(block_id, prediction)`` and, for a group at once, ``read_many`` and
``write_many`` (a failed group call falls back to one call per block), so
storage can change how it reads and writes.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .job import BlockResult, describe

logger = logging.getLogger(__name__)


def groups_in_memory(io_threads: int) -> int:
    """Groups that hold data at most: one per reader, one in the forward, one per writer."""
    return 2 * io_threads + 1


GROUP_BYTES = 4 << 20  # input bytes a group of small blocks reads at once
# on a GPU, whose forward of a large block takes milliseconds: 2x2x2 blocks of 108^3 float32
# are read as one box, each input chunk decoded once for the box, in parallel by zarrs
GPU_GROUP_BYTES = 64 << 20
MAX_GROUP = 64  # blocks per group at most (a task's blocks are Morton-adjacent)


def group_size(block_bytes: int, batch_size: int, group_bytes: int = GROUP_BYTES) -> int:
    """Batches per group: as many as fit in ``group_bytes`` (at least one, at most
    ``MAX_GROUP`` blocks), a power of two of blocks where it can be, so that aligned
    Morton runs of a task fill boxes of the block grid (2x1x1, 2x2x1, 2x2x2, ...)."""
    blocks = min(MAX_GROUP, group_bytes // max(1, block_bytes))
    blocks = 1 << (blocks.bit_length() - 1) if blocks else 0
    return max(1, blocks // max(1, batch_size))


@dataclass
class Pending:
    """A forward's outputs still on their way from the device (a GPU's asynchronous copies).

    A forward may return this instead of the outputs themselves, so that its thread can
    queue the next forward while the device still runs this one: the writer calls
    ``wait()`` (which returns the forward's seconds on the device) before it reads them.
    """

    outputs: list[np.ndarray]
    wait: Callable[[], float]


ReadBlock = Callable[[int], np.ndarray]
WriteBlock = Callable[[int, np.ndarray], None]
ReadMany = Callable[[list[int]], list[np.ndarray]]
WriteMany = Callable[[list[int], list[np.ndarray]], None]


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
    written: float = 0.0  # time.time() when its write returned
    pending: Pending | None = None  # its batch's outputs, still coming from the device


class _Ticket:
    """One task's blocks on their way: set ``entered`` when the last group is being read,
    ``done`` when every block was written (or failed)."""

    def __init__(self, block_ids: list[int]) -> None:
        self.block_ids = block_ids
        self.finished: list[_Block] = []
        self.entered = threading.Event()
        self.done = threading.Event()
        self._lock = threading.Lock()

    def add(self, blocks: list[_Block]) -> None:
        with self._lock:
            self.finished += blocks
            if len(self.finished) >= len(self.block_ids):
                self.done.set()


@dataclass
class _Group:
    ticket: _Ticket
    ids: list[int]
    last: bool
    blocks: list[_Block] = field(default_factory=list)


class Pipeline:
    """Runs every task's blocks through read -> forward -> write, the three stages overlapping."""

    def __init__(
        self,
        read: ReadBlock,
        forward: Callable[[list[np.ndarray]], list[np.ndarray] | Pending],
        write: WriteBlock,
        batch_size: int = 1,
        worker: str = "",
        started: Callable[[int], None] = lambda block_id: None,
        finished: Callable[[int], None] = lambda block_id: None,
        group: int = 1,
        read_many: ReadMany | None = None,
        write_many: WriteMany | None = None,
        io_threads: int = 1,
    ) -> None:
        self.read = read
        self.read_many = read_many
        self.write_many = write_many
        self.group = max(1, group)
        self.forward = forward
        self.write = write
        self.batch_size = batch_size
        self.worker = worker
        self.started = started
        self.finished = finished
        self._to_read: queue.SimpleQueue[_Group | None] = queue.SimpleQueue()
        self._to_forward: queue.SimpleQueue[_Group | None] = queue.SimpleQueue()
        self._to_write: queue.SimpleQueue[_Group | None] = queue.SimpleQueue()
        self.io_threads = max(1, io_threads)
        self._slots = threading.Semaphore(groups_in_memory(self.io_threads))  # holding data
        self._readers_left = self.io_threads  # the last reader to end tells the forward
        self._threads: list[threading.Thread] = []
        self._start_lock = threading.Lock()

    def close(self) -> None:
        """Let the stage threads end (they finish the groups they hold)."""
        if self._threads:
            for _ in range(self.io_threads):
                self._to_read.put(None)

    def run(
        self, block_ids: list[int], entered: Callable[[], None] | None = None
    ) -> list[BlockResult]:
        """Every block's result (timings or its error), in the order given.

        ``entered`` is called in this thread once the reader has taken the last group.
        """
        if not block_ids:
            return []
        self._start()
        ticket = _Ticket(block_ids)
        size = self.batch_size * self.group  # blocks per group: whole batches
        for i in range(0, len(block_ids), size):
            ids = block_ids[i : i + size]
            self._to_read.put(_Group(ticket, ids, last=i + size >= len(block_ids)))
        if entered is not None:
            ticket.entered.wait()
            entered()
        ticket.done.wait()
        by_id = {b.block_id: b for b in ticket.finished}
        return [self._result(by_id[i]) for i in block_ids]

    def _start(self) -> None:
        with self._start_lock:
            if self._threads:
                return
            stages = [("read", self._reading)] * self.io_threads + [("forward", self._forwarding)]
            for name, loop in stages + [("write", self._writing)] * self.io_threads:
                thread = threading.Thread(target=loop, name=f"blockpredict-{name}", daemon=True)
                thread.start()
                self._threads.append(thread)

    def _reading(self) -> None:
        while (group := self._to_read.get()) is not None:
            self._slots.acquire()  # at most groups_in_memory(io_threads) groups hold data
            if group.last:
                group.ticket.entered.set()  # the next task may enter while this group is read
            group.blocks = self._guarded(group, self._read)
            for b in group.blocks:  # read: waiting for the forward is not running
                self.finished(b.block_id)
            self._to_forward.put(group)
        with self._start_lock:
            self._readers_left -= 1
            last = self._readers_left == 0
        if last:
            self._to_forward.put(None)

    def _forwarding(self) -> None:
        while (group := self._to_forward.get()) is not None:
            group.blocks = self._guarded(group, self._forward)
            self._to_write.put(group)
        for _ in range(self.io_threads):
            self._to_write.put(None)

    def _writing(self) -> None:
        while (group := self._to_write.get()) is not None:
            blocks = self._guarded(group, self._write)
            self._slots.release()
            group.ticket.add(blocks)

    def _guarded(self, group: _Group, stage: Callable[[_Group], list[_Block]]) -> list[_Block]:
        """A stage's work on a group; an unexpected error fails the group's blocks, so the
        task still gets an answer and the stage thread goes on."""
        try:
            return stage(group)
        except BaseException as e:  # noqa: BLE001 (reported per block, never lost)
            blocks = group.blocks or [_Block(i) for i in group.ids]
            for b in blocks:
                b.error, b.data = b.error or describe(e), None
            return blocks

    def _read(self, group: _Group) -> list[_Block]:
        ids = group.ids
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

    def _forward(self, group: _Group) -> list[_Block]:
        blocks = group.blocks
        for i in range(0, len(blocks), self.batch_size):  # a group: batch by batch
            self._forward_batch(blocks[i : i + self.batch_size])
        return blocks

    def _forward_batch(self, blocks: list[_Block]) -> None:
        ready = [b for b in blocks if b.error is None]
        if not ready:
            return
        for b in ready:
            self.started(b.block_id)
        t0 = time.perf_counter()
        try:
            result = self.forward([b.data for b in ready])  # type: ignore[misc]
        except Exception as e:
            if len(ready) == 1:
                ready[0].error, ready[0].data = describe(e), None
                ready[0].compute = time.perf_counter() - t0
            else:
                for b in ready:  # find the block that fails: one forward each
                    self._forward_batch([b])
        else:
            share = (time.perf_counter() - t0) / len(ready)
            pending = result if isinstance(result, Pending) else None
            outputs = result.outputs if isinstance(result, Pending) else result
            for b, y in zip(ready, outputs, strict=True):
                b.data, b.compute, b.pending = y, share, pending
        for b in ready:  # waiting for the rest of its group and the write is not running
            self.finished(b.block_id)

    def _land(self, blocks: list[_Block]) -> None:
        """Wait for outputs still coming from the device; their blocks' compute time is
        then their batch's time on the device. A batch whose wait raises fails alone."""
        batches: dict[int, tuple[Pending, list[_Block]]] = {}
        for b in blocks:
            if b.pending is not None and b.error is None:
                batches.setdefault(id(b.pending), (b.pending, []))[1].append(b)
            b.pending = None
        for pending, members in batches.values():
            for b in members:  # waiting on the device: charged to block_timeout
                self.started(b.block_id)
            try:
                seconds = pending.wait()
            except Exception as e:
                for b in members:
                    b.error, b.data = describe(e), None
            else:
                for b in members:
                    b.compute = seconds / len(members)

    def _write(self, group: _Group) -> list[_Block]:
        blocks = group.blocks
        self._land(blocks)
        ready = [b for b in blocks if b.error is None]
        if self.write_many is not None and len(ready) > 1:
            for b in ready:
                self.started(b.block_id)
            t0 = time.perf_counter()
            try:
                self.write_many([b.block_id for b in ready], [b.data for b in ready])  # type: ignore[misc]
            except Exception:  # write them one by one: only the culprit fails
                pass
            else:
                share, now = (time.perf_counter() - t0) / len(ready), time.time()
                for b in ready:
                    b.done, b.write, b.written = True, share, now
        for block in blocks:
            if block.error is None and not block.done:
                self.started(block.block_id)  # one at a time: each block's own clock
                t0 = time.perf_counter()
                try:
                    self.write(block.block_id, block.data)  # type: ignore[arg-type]
                    block.done, block.written = True, time.time()
                except Exception as e:
                    block.error = describe(e)
                block.write = time.perf_counter() - t0
            block.data = None
            self.finished(block.block_id)
        return blocks

    def _result(self, b: _Block) -> BlockResult:
        if b.error is not None:
            logger.warning("block %d failed: %s", b.block_id, b.error)
        return BlockResult(b.block_id, b.read, b.compute, b.write, self.worker, b.error, b.written)

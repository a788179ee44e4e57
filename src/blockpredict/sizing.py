"""Self-sizing tasks: how many blocks one Dask task carries.

Each task costs a scheduler round trip (2-3 ms here, DESIGN.md) and the
client's and worker's handling of it; the worker's pipeline does not drain
between tasks (the next task's blocks queue behind), so reads and writes are
not part of that cost. The scheduler's share grows with the workers: it
handles every worker's tasks, so tasks get longer on bigger clusters.
``blocks_per_task: auto`` measures the blocks as they finish and sizes tasks
so that these costs stay under ``OVERHEAD`` of the task's time (and the
scheduler under ``SCHEDULER_SHARE`` of its own). Each worker's first block is left
out of the measure: its forward warms the device up (on an H100 the bench U-Net's
first forward took 0.26 s, the next ones 3 ms), and counted in, it kept tasks at 7
blocks where 50 fit, for the first second of a run. Near the end of the run
tasks shrink so every worker still gets a share of what is left. An integer
``blocks_per_task`` forces the size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .job import BlockResult

OVERHEAD = 0.02  # the per-task cost, as a share of the task's time
TASK_COST_S = 0.005  # scheduler round trip and client handling per task
# what one task costs the scheduler and the client, for any worker's task (measured here:
# about 60 tasks/s with 32 simulated workers on 2 cores)
SCHEDULER_TASK_S = 0.01
SCHEDULER_SHARE = 0.25  # of the scheduler's time the run's tasks may take
MAX_BLOCKS_PER_TASK = 4096
SHARES_AT_THE_END = 2  # tasks per worker that what is left is split into


@dataclass
class TaskSizer:
    """Blocks per task: fixed, or from the mean read/forward/write times measured so far."""

    setting: str | int = "auto"
    batch_size: int = 1
    workers: int = 1
    _count: int = 0
    _read: float = 0.0
    _compute: float = 0.0
    _write: float = 0.0
    _warm: set[str] = field(default_factory=set)  # workers whose first block was seen

    def observe(self, result: BlockResult) -> None:
        """Count one finished block's timings (failed blocks say nothing about speed, and
        a worker's first block mostly about its warm-up)."""
        if result.error is not None:
            return
        if result.worker not in self._warm:
            self._warm.add(result.worker)
            return
        self._count += 1
        self._read += result.read
        self._compute += result.compute
        self._write += result.write

    def size(self, remaining: int) -> int:
        """Blocks for the next task, with ``remaining`` blocks not yet submitted."""
        if self.setting != "auto":
            return int(self.setting)
        if self._count == 0:
            return self.batch_size  # the first tasks measure
        n = self._count
        read, compute, write = self._read / n, self._compute / n, self._write / n
        steady = max(read, compute, write, 1e-6)  # per block, once the stages overlap
        seconds = max(  # a task's time, long enough for both costs
            TASK_COST_S / OVERHEAD, self.workers * SCHEDULER_TASK_S / SCHEDULER_SHARE
        )
        wanted = math.ceil(seconds / steady)
        share = math.ceil(remaining / (SHARES_AT_THE_END * max(1, self.workers)))
        # near the end tasks shrink, but never below what keeps the per-task cost small:
        # a worker waiting a round trip for each tiny task idles more than it balances
        floor = math.ceil(TASK_COST_S / OVERHEAD / steady)
        blocks = max(1, min(max(min(wanted, share), floor), MAX_BLOCKS_PER_TASK))
        return math.ceil(blocks / self.batch_size) * self.batch_size  # whole batches

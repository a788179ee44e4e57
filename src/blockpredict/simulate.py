"""The bench's simulated device: a worker plugin whose forward sleeps and uses no CPU.

It runs the worker's real pipeline and tasks (``tasks.process_blocks``) with
the device and the storage simulated: reads return an empty block, the
forward sleeps ``ms`` per block, writes do nothing. Without I/O, what a
simulated cluster measures is the dispatch: the client, the scheduler and
each worker's handling of its tasks. This module imports neither torch nor
zarr, so a simulated worker process costs only Dask's own start-up, and a
bench can run many of them as separate processes, as a real cluster does.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time
from typing import Any

import numpy as np
from distributed import WorkerPlugin

from .environment import DASK_CONFIG
from .pipeline import Pipeline
from .tasks import PLUGIN_NAME, mark_running, mark_stopped

# when each simulated forward of this process ended: the bench's steady rate, from the
# devices' side (the client sees a task's blocks only together, when its result arrives)
_ENDS: list[float] = []


def forward_ends() -> list[float]:
    """The end times of this process's simulated forwards since the last call (for
    ``client.run``: the first worker of a process asked takes them all)."""
    ends = _ENDS[:]
    del _ENDS[: len(ends)]
    return ends


class SimulatedDevice(WorkerPlugin):
    """The worker's pipeline with a forward that sleeps ``ms`` per block."""

    name = PLUGIN_NAME

    def __init__(self, ms: float, batch_size: int = 1) -> None:
        self.ms = ms
        self.batch_size = batch_size
        self.pipeline: Pipeline | None = None

    def setup(self, worker: Any) -> None:
        empty = np.zeros((1, 1), np.float32)
        ms = self.ms

        def forward(batch: list[np.ndarray]) -> list[np.ndarray]:
            time.sleep(ms / 1000 * len(batch))
            _ENDS.extend([time.time()] * len(batch))
            return batch

        self.pipeline = Pipeline(
            lambda block_id: empty,
            forward,
            lambda block_id, prediction: None,
            self.batch_size,
            str(worker.name),
            started=mark_running,
            finished=mark_stopped,
        )

    def teardown(self, worker: Any) -> None:
        if self.pipeline is not None:
            self.pipeline.close()


WORKERS_PER_PROCESS = 8  # 64 workers in 8 processes: 2 cores cannot run 64 interpreters


class SimulatedWorkers:
    """Worker processes for a simulated cluster, started in steps against one scheduler.

    Each process holds ``WORKERS_PER_PROCESS`` workers of one thread each: a real
    cluster gives every worker a process (and a machine) of its own, but this
    machine's cores cannot run one idle interpreter per worker, so a few workers
    share each process (and its interpreter lock), which makes the figure a
    lower bound of what the scheduler sustains.
    """

    def __init__(self, address: str) -> None:
        self.address = address
        self.processes: list[subprocess.Popen[bytes]] = []
        self.count = 0

    def grow(self, n: int, timeout: float = 300.0) -> None:
        """Start workers until there are ``n``; wait until the scheduler sees them all."""
        from distributed import Client

        while self.count < n:
            end = min(n, self.count + WORKERS_PER_PROCESS)
            names = [f"sim-{i}" for i in range(self.count, end)]
            command = [sys.executable, "-m", "blockpredict.simulate", self.address, *names]
            self.processes.append(subprocess.Popen(command, stdout=subprocess.DEVNULL))
            self.count += len(names)
        with Client(self.address, timeout="30s") as client:
            client.wait_for_workers(n, timeout=timeout)

    def close(self) -> None:
        for p in self.processes:
            p.terminate()
        for p in self.processes:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        self.processes.clear()
        self.count = 0


async def _serve(address: str, names: list[str]) -> None:
    import dask
    from distributed import Worker

    logging.getLogger("distributed").setLevel(logging.WARNING)
    dask.config.set(DASK_CONFIG)  # as the workers blockpredict starts

    workers = [
        Worker(address, nthreads=1, name=name, memory_limit=0, dashboard=False) for name in names
    ]
    await asyncio.gather(*workers)  # each starts and joins the scheduler
    await asyncio.gather(*(w.finished() for w in workers))


if __name__ == "__main__":  # python -m blockpredict.simulate ADDRESS NAME...
    asyncio.run(_serve(sys.argv[1], sys.argv[2:]))

"""The Dask tasks a run sends to its workers, and the clock ``block_timeout`` reads.

Tasks carry only block ids; each worker's plugin (``worker.ModelPlugin``, or
the bench's simulated device) holds the pipeline that processes them. This
module imports neither torch nor zarr, so that it costs a worker nothing
beyond its plugin.
"""

from __future__ import annotations

import os
import signal
import time

from distributed import get_worker, secede

from .job import BlockResult

PLUGIN_NAME = "blockpredict"

# block id -> time.time() when this worker process started it (for block_timeout)
_RUNNING: dict[int, float] = {}


def mark_running(block_id: int) -> None:
    """A block's read or forward begins: its ``block_timeout`` clock (re)starts."""
    _RUNNING[block_id] = time.time()


def mark_stopped(block_id: int) -> None:
    """A block was written or failed: it no longer runs."""
    _RUNNING.pop(block_id, None)


def process_blocks(block_ids: list[int]) -> list[BlockResult]:
    """The Dask task: adjacent blocks through this worker's pipeline.

    A block that raises is reported in its result, so the others of the task
    still count and only that block is retried. Once the pipeline's reader has
    taken the task's last group, the task secedes from the worker's thread
    pool: the worker starts its next task, whose blocks queue behind these, so
    the stages never drain between tasks.
    """
    plugin = get_worker().plugins[PLUGIN_NAME]
    assert plugin.pipeline is not None, "the plugin's setup did not run"
    try:
        return plugin.pipeline.run(block_ids, entered=secede)
    finally:  # whatever happened, none of them runs any more
        for block_id in block_ids:
            mark_stopped(block_id)


def kill_this_worker() -> None:
    """End this worker process at once (a hung block cannot be stopped otherwise).

    A nanny notices and starts a fresh worker, which loads the model again.
    """
    os.kill(os.getpid(), signal.SIGKILL)


def running_blocks() -> dict[int, float]:
    """Seconds each block in progress on this worker has run (asked by the runner)."""
    now = time.time()
    return {block_id: now - start for block_id, start in list(_RUNNING.items())}

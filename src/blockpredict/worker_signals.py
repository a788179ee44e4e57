"""Worker processes of the clusters blockpredict starts ignore SIGINT, first ones and restarts.

Ctrl-C in a terminal signals the whole process group; the driver alone decides how a
run stops (see :mod:`.signals`), so workers must not die of it. Workers started while the
driver ignores SIGINT inherit that (across exec), but the nanny restarts a worker
(after a ``block_timeout`` kill, or a crash) later, when the driver handles SIGINT
again. So every worker process also runs this module as a Dask preload, which ignores
SIGINT as the worker starts.
"""

from __future__ import annotations

import multiprocessing
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from . import worker_exit

PRELOAD = __name__  # the module's name: a Dask preload that every worker process imports


def worker_preloads() -> list[str]:
    """The workers' preloads: the user's Dask config, then this module and
    :mod:`~blockpredict.worker_exit` (a closed worker leaves without the teardown)."""
    import dask  # here, not at import: the warm start's forkserver starts before Dask loads

    configured = dask.config.get("distributed.worker.preload", []) or []
    return [*configured, PRELOAD, worker_exit.PRELOAD]


def dask_setup(worker: Any) -> None:
    """Ignore SIGINT in a worker process (never in the driver: in-process workers skip it)."""
    in_child = multiprocessing.parent_process() is not None
    if in_child and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextmanager
def workers_ignore_sigint() -> Iterator[None]:
    """Start worker processes with SIGINT ignored (they inherit it across exec)."""
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: workers are not in a terminal's group then
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)

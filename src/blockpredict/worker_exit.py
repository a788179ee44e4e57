"""A worker that its nanny closed leaves at once, without the interpreter's teardown.

After torch was imported, the interpreter's teardown (freeing every module) took
2-4 s on 2 busy cores, and the cluster's close waited for it: the nanny kills a
worker still alive after 4 s ("nanny still alive after 4 s, killing"). Every
worker process of the clusters blockpredict starts runs this module as a Dask
preload. When the worker was closed normally (its blocks written and reported,
its plugins torn down), the process runs what exit runs first (the finalizers
that remove the worker's directory), flushes its logs and ends with
``os._exit(0)``. A crash or any other exit goes the usual way, with its code.

A worker whose heartbeat finds the scheduler already gone (the run stopped at once
on a second Ctrl-C, and the scheduler closed first) logs a traceback to the
terminal; that heartbeat's failure is left out of the worker's log: a scheduler
lost during a run ends the run on the client, which says so.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
import threading
import weakref
from typing import Any, NoReturn

PRELOAD = __name__  # a Dask preload

_closed = threading.Event()  # this worker was closed by its nanny (the cluster is closing)


HEARTBEAT_LOST = "Failed to communicate with scheduler during heartbeat"


def _not_heartbeat_lost(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(HEARTBEAT_LOST)


def dask_setup(worker: Any) -> None:
    """Run :func:`_exit_at_once` at exit (the handlers registered later run before it)."""
    atexit.register(_exit_at_once)
    logging.getLogger("distributed.worker").addFilter(_not_heartbeat_lost)


def dask_teardown(worker: Any) -> None:
    """The worker closes normally: its process may skip the interpreter's teardown."""
    _closed.set()


def _exit_at_once() -> None:
    if not _closed.is_set():  # a crash or another exit: the usual way, with its exit code
        return
    with contextlib.suppress(Exception):  # what exit does first: e.g. remove the work dir
        weakref.finalize._exitfunc()  # type: ignore[attr-defined]
    leave(0)


def leave(code: int) -> NoReturn:
    """End this process now with ``code``, after flushing the logs, stdout and stderr:
    what the interpreter's teardown would still have done that matters."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)

"""How the driver stops a run on SIGINT/SIGTERM (the workers' side: :mod:`.worker_signals`).

The first signal stops submitting and lets the blocks in flight finish (the grace
period); a second one stops at once. After a stop, the cluster closes in peace:
further signals only say so. :func:`signals_restored` gives the handlers back when
the run and its cluster are over.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stoppable(Protocol):
    """What a signal sets: why the run stops, and whether to stop at once."""

    stop_reason: str | None
    stop_now: bool


@contextmanager
def stop_on_signals(run: Stoppable) -> Iterator[None]:
    """SIGINT/SIGTERM: stop submitting, let in-flight blocks finish (grace period)."""

    def handler(signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if run.stop_reason is None:
            logger.warning(
                "%s: finishing the running blocks, then stopping (again to stop at once)", name
            )
            run.stop_reason = name
        elif not run.stop_now:
            logger.warning("%s again: stopping at once", name)
            run.stop_now = True

    try:
        previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    except ValueError:  # not the main thread: leave signals alone
        previous = {}
    try:
        yield
    finally:
        stopped = run.stop_reason in ("SIGINT", "SIGTERM")
        for s, h in previous.items():  # after a stop, the cluster closes in peace
            signal.signal(s, _closing if stopped else h)


def _closing(signum: int, frame: object) -> None:
    logger.warning("%s: already stopping, closing the cluster", signal.Signals(signum).name)


@contextmanager
def signals_restored() -> Iterator[None]:
    """Give SIGINT/SIGTERM back their handlers when the run and its cluster are over."""
    try:
        previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    except ValueError:
        previous = {}
    try:
        yield
    finally:
        for s, h in previous.items():
            try:
                signal.signal(s, h)  # type: ignore[arg-type]
            except ValueError:  # not the main thread
                break

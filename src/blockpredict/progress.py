"""Progress of a run: a bar in a terminal, one summary line every N seconds in a job's log.

A bar written to a file grows without bound (carriage returns are not lines), so
without a TTY the run prints ``progress: ...`` lines at ``progress_interval``
instead: blocks, blocks/s, output voxels/s, ETA, failed blocks and workers.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from contextlib import ExitStack
from typing import IO, Any

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from .observe import RunObserver
from .words import plural

logger = logging.getLogger(__name__)


def format_seconds(seconds: float) -> str:
    """``42 s``, ``3 min 20 s``, ``2 h 05 min``; ``?`` when unknown."""
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _size(stream: IO[str]) -> tuple[int, int]:
    """The terminal's (columns, lines); (120, 24) where it reports none (a bare pty says 0,
    and tqdm then hides its bar)."""
    try:
        size = os.get_terminal_size(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return 120, 24
    return (size.columns if size.columns >= 40 else 120), (size.lines if size.lines >= 2 else 24)


def format_rate(voxels_per_second: float) -> str:
    """``12.3 M output voxels/s`` (``k`` below a million)."""
    if voxels_per_second >= 1e6:
        return f"{voxels_per_second / 1e6:.2f} M output voxels/s"
    return f"{voxels_per_second / 1e3:.1f} k output voxels/s"


class Progress(RunObserver):
    """Counts results and shows them: as a tqdm bar on a TTY, else as periodic lines."""

    def __init__(self, interval: float = 60.0, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval
        self.bar: tqdm | None = None
        self._above_bar = ExitStack()  # log lines go above the bar while it is up
        self.done = self.failed = self.processed = self.total = 0
        self.workers: set[str] = set()
        self.initial_workers = 0
        self.voxels_per_block = 0.0
        self.start = self.last_line = time.monotonic()

    def run_started(self, plan: Any, ledger: Any, workers: int) -> None:
        counts = ledger.counts()
        self.total, self.done = plan.num_blocks, counts["done"]
        self.initial_workers = workers
        self.voxels_per_block = math.prod(plan.output_shape) / max(1, plan.num_blocks)
        self.start = self.last_line = time.monotonic()

    def _show_bar(self) -> None:
        """The bar, from the first tick or result on. Lines logged while it is up (the
        dashboard's URLs, a failed block's warning) are written above it, not through it."""
        if self.tty and self.bar is None:
            self.bar = tqdm(
                total=self.total,
                initial=self.done + self.failed,
                unit="block",
                file=self.stream,
                smoothing=0.1,
                ncols=_size(self.stream)[0],
                nrows=_size(self.stream)[1],
            )
            self._above_bar.enter_context(logging_redirect_tqdm())

    def block_finished(self, result: Any) -> None:
        self.done += 1
        self.processed += 1
        self.workers.add(result.worker)
        if self.bar is not None:
            self.bar.update(1)
            self._postfix()

    def blocks_finished(self, results: Any) -> None:
        self.done += len(results)
        self.processed += len(results)
        self.workers.update(r.worker for r in results)
        if self.bar is not None and results:
            self.bar.update(len(results))
            self._postfix()

    def block_failed(self, result: Any, final: bool) -> None:
        if not final:
            return
        self.failed += 1
        if self.bar is not None:
            self.bar.update(1)
            self._postfix()

    def tick(self) -> None:
        if self.tty:
            self._show_bar()
            return
        now = time.monotonic()
        if now - self.last_line >= self.interval:
            self.last_line = now
            logger.info(self.line())

    def run_ended(self, report: Any) -> None:
        if self.bar is not None:
            self._postfix()
            self.bar.close()
            self._above_bar.close()
        elif time.monotonic() - self.start >= self.interval:
            logger.info(self.line())

    @property
    def n_workers(self) -> int:
        return max(self.initial_workers, len(self.workers))

    def rates(self) -> tuple[float, float, float]:
        """Blocks/s and output voxels/s of this run so far, and the ETA in seconds."""
        elapsed = max(time.monotonic() - self.start, 1e-9)
        blocks = self.processed / elapsed
        left = self.total - self.done - self.failed
        eta = left / blocks if blocks > 0 else (0.0 if left == 0 else math.inf)
        return blocks, blocks * self.voxels_per_block, eta

    def line(self) -> str:
        """One summary line, e.g. for a batch job's log."""
        blocks, voxels, eta = self.rates()
        pct = 100 * self.done / max(1, self.total)
        return (
            f"progress: {self.done}/{plural(self.total, 'block')} ({pct:.1f}%), "
            f"{blocks:.2f} blocks/s, "
            f"{format_rate(voxels)}, ETA {format_seconds(eta)}, "
            f"{self.failed} failed, {plural(self.n_workers, 'worker')}"
        )

    def _postfix(self) -> None:
        assert self.bar is not None
        _, voxels, _ = self.rates()
        self.bar.set_postfix_str(
            f"{format_rate(voxels).replace(' output voxels', ' vox')}, failed {self.failed}, "
            f"workers {self.n_workers}",
            refresh=False,
        )

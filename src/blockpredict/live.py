"""The run's live state: what the dashboard page shows, fed by the runner.

A :class:`LiveState` lives in the blockpredict process, next to the ledger it
reads. For local and batch clusters that process also runs the Dask scheduler,
so the scheduler's dashboard page reads it in memory (:func:`lookup` by the
scheduler's address); for ``type: address`` the page is served by the
blockpredict process itself. Memory: the ledger's one byte per block is shared,
plus one bit per block for "skipped by resume", the blocks in flight and the
block map's per-cell counts (:mod:`blockpredict.blockmap`), which the runner's
results update so that a refresh of the page never reads the whole ledger.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from typing import Any

import numpy as np

from .blockmap import (
    DONE_NOW,
    FAILED_NOW,
    IN_FLIGHT,
    MAX_SIDE,
    PENDING,
    SKIPPED,
    SLAB,
    STATE_COLORS,
    STATE_NAMES,
    BlockMap,
)
from .ledger import DONE, FAILED
from .observe import RunObserver

__all__ = ["DONE_NOW", "FAILED_NOW", "IN_FLIGHT", "PENDING", "SKIPPED", "STATE_COLORS"]
__all__ += ["STATE_NAMES", "LiveState", "lookup", "publish"]

RATE_WINDOW = 10.0  # seconds of history behind each rate sample

_REGISTRY: dict[str, LiveState] = {}


def publish(address: str, state: LiveState) -> None:
    """Make ``state`` the run shown for the scheduler at ``address``.

    Only the latest few runs stay registered, so a long-lived process that runs many
    workflows does not keep their block states.
    """
    _REGISTRY.pop(address, None)
    _REGISTRY[address] = state
    while len(_REGISTRY) > 4:
        _REGISTRY.pop(next(iter(_REGISTRY)))


def lookup(address: str | None = None) -> LiveState | None:
    """The run of the scheduler at ``address``; else the latest published run."""
    if address in _REGISTRY:
        return _REGISTRY[address]
    return next(reversed(_REGISTRY.values()), None) if _REGISTRY else None


class LiveState(RunObserver):
    """Block states, throughput over time, phase times and failures of one run."""

    def __init__(
        self, output_path: str = "", history: int = 3600, max_side: int = MAX_SIDE
    ) -> None:
        self.output_path = output_path
        self.max_side = max_side  # cells per side of the block map
        self.lock = threading.Lock()
        self.plan: Any = None
        self.states: np.ndarray | None = None  # the ledger's own array (not a copy)
        self.skipped_bits = np.zeros(0, np.uint8)
        self.map = BlockMap(())
        self.in_flight: set[int] = set()
        self.processed = self.failed = self.retries = self.skipped = 0
        self.workers: set[str] = set()
        self.phase_totals = {"read": 0.0, "compute": 0.0, "write": 0.0}
        self.failures: deque[dict[str, Any]] = deque(maxlen=200)
        self.throughput: deque[tuple[float, float, float]] = deque(maxlen=history)
        self.voxels_per_block = 0.0
        self.start = time.time()
        self._samples: deque[tuple[float, int]] = deque()  # (monotonic, processed), last 10 s
        self.ended = False
        self.summary = ""

    def run_started(self, plan: Any, ledger: Any, workers: int) -> None:
        with self.lock:
            self.plan, self.states = plan, ledger.states
            states = ledger.states  # a slab at a time: no temporary the size of the ledger
            slabs = [np.packbits(states[i : i + SLAB] == DONE) for i in range(0, states.size, SLAB)]
            self.skipped_bits = np.concatenate(slabs) if slabs else np.zeros(0, np.uint8)
            self.map = BlockMap(plan.grid_shape, self.max_side)
            self.map.load(states)
            self.skipped = int(self.map.counts[SKIPPED].sum())
            self.voxels_per_block = math.prod(plan.output_shape) / max(1, plan.num_blocks)
            self.start = time.time()
            self._samples.append((time.monotonic(), 0))

    def blocks_submitted(self, block_ids: Any) -> None:
        with self.lock:
            for block_id in block_ids:
                if block_id not in self.in_flight:  # not a block resent after a timeout
                    self.map.submitted(block_id)
                    self.in_flight.add(block_id)

    def _left_flight(self, block_id: int, new: int) -> None:
        old = IN_FLIGHT if block_id in self.in_flight else PENDING
        self.in_flight.discard(block_id)
        self.map.move(block_id, old, new)

    def block_finished(self, result: Any) -> None:
        self.blocks_finished([result])

    def blocks_finished(self, results: Any) -> None:
        with self.lock:
            for r in results:  # the block map's counts move with each block
                self._left_flight(r.block_id, DONE_NOW)
            self.processed += len(results)
            self.workers.update(r.worker for r in results)
            for phase in self.phase_totals:
                self.phase_totals[phase] += sum(getattr(r, phase) for r in results)

    def block_failed(self, result: Any, final: bool) -> None:
        with self.lock:
            self._left_flight(result.block_id, FAILED_NOW if final else PENDING)
            if not final:
                self.retries += 1
                return
            self.map.failed.add(result.block_id)
            self.failed += 1
            index = list(self.plan.block_index(result.block_id)) if self.plan else []
            self.failures.append(
                {
                    "block": result.block_id,
                    "index": index,
                    "worker": result.worker,
                    "error": result.error or "",
                }
            )

    def tick(self) -> None:
        """Once a second: blocks/s and output voxels/s over the last ~10 s."""
        now = time.monotonic()
        if not self._samples or now - self._samples[-1][0] < 1.0:
            return
        while len(self._samples) > 1 and now - self._samples[1][0] >= RATE_WINDOW:
            self._samples.popleft()
        then, processed = self._samples[0]
        with self.lock:
            blocks = (self.processed - processed) / (now - then)
            self.throughput.append((time.time(), blocks, blocks * self.voxels_per_block))
        self._samples.append((now, self.processed))

    def run_ended(self, report: Any) -> None:
        self.tick()
        with self.lock:
            for block_id in list(self.in_flight):  # cancelled by a stop: pending again
                self._left_flight(block_id, PENDING)
            self.ended = True
            self.summary = report.summary()

    # read side (the dashboard): copies, taken under the lock

    def block_map(self, z: int | None = None) -> np.ndarray:
        """The block map's state codes: block layer ``z``, or the most telling state over
        all layers when ``z`` is None; at most ``MAX_SIDE`` cells per side.

        The projection costs O(cells) (counts kept as results arrive); a layer costs
        O(blocks of that layer).
        """
        if self.plan is None or self.states is None:
            return np.zeros((1, 1), np.uint8)
        ny, nx, layers = self.map.ny, self.map.nx, self.map.layers
        if z is None or layers == 1:
            with self.lock:
                return self.map.projection()
        return self.map.layer(self._layer(min(max(z, 0), layers - 1), ny, nx))

    def _layer(self, layer: int, ny: int, nx: int) -> np.ndarray:
        assert self.states is not None
        lo, hi = layer * ny * nx, (layer + 1) * ny * nx
        with self.lock:
            states = self.states[lo:hi].copy()
            in_flight = [i - lo for i in self.in_flight if lo <= i < hi]
            retried = [i for i in np.flatnonzero(states == FAILED) if i + lo not in self.map.failed]
        first = lo // 8  # unpack only this layer's bytes
        packed = self.skipped_bits[first : (hi + 7) // 8]
        bits = np.unpackbits(packed)[lo - 8 * first : hi - 8 * first].astype(bool)
        codes = np.full(hi - lo, PENDING, np.uint8)
        codes[states == DONE] = DONE_NOW
        codes[bits & (states == DONE)] = SKIPPED
        codes[states == FAILED] = FAILED_NOW
        codes[retried] = PENDING  # failed in an earlier run, and failed again since: to be retried
        if in_flight:
            ids = np.asarray(in_flight, np.int64)
            codes[ids[states[ids] != DONE]] = IN_FLIGHT
        return codes

    def counts(self) -> dict[str, Any]:
        with self.lock:
            total = self.plan.num_blocks if self.plan else 0
            return {
                "total": total,
                "done": self.processed + self.skipped,
                "processed": self.processed,
                "skipped": self.skipped,
                "failed": self.failed,
                "retries": self.retries,
                "in_flight": len(self.in_flight),
                "workers": len(self.workers),
                "ended": self.ended,
            }

"""The run's live state: what the dashboard page shows, fed by the runner.

A :class:`LiveState` lives in the blockpredict process, next to the ledger it
reads. For local and batch clusters that process also runs the Dask scheduler,
so the scheduler's dashboard page reads it in memory (:func:`lookup` by the
scheduler's address); for ``type: address`` the page is served by the
blockpredict process itself. Memory: the ledger's one byte per block is shared,
plus one bit per block for "skipped by resume" and the blocks in flight.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from typing import Any

import numpy as np

from .ledger import DONE, FAILED
from .observe import RunObserver

PENDING, IN_FLIGHT, DONE_NOW, FAILED_NOW, SKIPPED = range(5)
STATE_NAMES = ("pending", "in flight", "done", "failed", "skipped by resume")
STATE_COLORS = ("#d9d9d9", "#f2b701", "#2ca02c", "#d62728", "#1f77b4")

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

    def __init__(self, output_path: str = "", history: int = 3600) -> None:
        self.output_path = output_path
        self.lock = threading.Lock()
        self.plan: Any = None
        self.states: np.ndarray | None = None  # the ledger's own array (not a copy)
        self.skipped_bits = np.zeros(0, np.uint8)
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
            self.skipped_bits = np.packbits(ledger.states == DONE)
            self.skipped = int(np.count_nonzero(ledger.states == DONE))
            self.voxels_per_block = math.prod(plan.output_shape) / max(1, plan.num_blocks)
            self.start = time.time()
            self._samples.append((time.monotonic(), 0))

    def blocks_submitted(self, block_ids: Any) -> None:
        with self.lock:
            self.in_flight.update(block_ids)

    def block_finished(self, result: Any) -> None:
        with self.lock:
            self.in_flight.discard(result.block_id)
            self.processed += 1
            self.workers.add(result.worker)
            for phase in self.phase_totals:
                self.phase_totals[phase] += getattr(result, phase)

    def blocks_finished(self, results: Any) -> None:
        with self.lock:
            self.in_flight.difference_update(r.block_id for r in results)
            self.processed += len(results)
            self.workers.update(r.worker for r in results)
            for phase in self.phase_totals:
                self.phase_totals[phase] += sum(getattr(r, phase) for r in results)

    def block_failed(self, result: Any, final: bool) -> None:
        with self.lock:
            self.in_flight.discard(result.block_id)
            if not final:
                self.retries += 1
                return
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
            self.in_flight.clear()
            self.ended = True
            self.summary = report.summary()

    # read side (the dashboard): copies, taken under the lock

    def block_map(self, z: int | None = None, max_side: int = 512) -> np.ndarray:
        """2D state codes of the block grid at grid layer ``z`` (or the worst state over
        all layers when ``z`` is None), strided down to at most ``max_side`` per side.

        Only the layers shown are decoded, one at a time: memory stays at one layer.
        """
        if self.plan is None or self.states is None:
            return np.zeros((1, 1), np.uint8)
        grid = tuple(self.plan.grid_shape)
        ny, nx = ((1,) * 2 + grid)[-2:]
        layers = self.states.size // (ny * nx)
        step = max(1, math.ceil(max(ny, nx) / max_side))
        if z is not None:
            return self._layer(min(max(z, 0), layers - 1), ny, nx)[::step, ::step].copy()
        top = np.zeros((ny, nx), np.uint8)
        for layer in range(layers):
            np.maximum(top, _RANK[self._layer(layer, ny, nx)], out=top)
        return _CODE_OF_RANK[top][::step, ::step].copy()

    def _layer(self, layer: int, ny: int, nx: int) -> np.ndarray:
        assert self.states is not None
        lo, hi = layer * ny * nx, (layer + 1) * ny * nx
        with self.lock:
            states = self.states[lo:hi].copy()
            in_flight = [i - lo for i in self.in_flight if lo <= i < hi]
        first = lo // 8  # unpack only this layer's bytes
        packed = self.skipped_bits[first : (hi + 7) // 8]
        bits = np.unpackbits(packed)[lo - 8 * first : hi - 8 * first].astype(bool)
        codes = np.full(hi - lo, PENDING, np.uint8)
        codes[states == DONE] = DONE_NOW
        codes[bits & (states == DONE)] = SKIPPED
        codes[states == FAILED] = FAILED_NOW
        if in_flight:
            ids = np.asarray(in_flight, np.int64)
            codes[ids[states[ids] != DONE]] = IN_FLIGHT
        return codes.reshape(ny, nx)

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


# worst state first: failed > in flight > pending > done > skipped by resume
_RANK = np.array([2, 3, 1, 4, 0], np.uint8)  # code -> rank
_CODE_OF_RANK = np.array([SKIPPED, DONE_NOW, PENDING, IN_FLIGHT, FAILED_NOW], np.uint8)

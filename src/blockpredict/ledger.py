"""The done-ledger: one byte per block, in a zarr array next to the output.

Only the runner writes it, and only after a block's write returned. It stores
a hash of the geometry, so a ledger never vouches for blocks of another plan.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import zarr

from .errors import BlockpredictError

TODO, DONE, FAILED = 0, 1, 2
CHUNK = 1 << 20


class LedgerMismatchError(BlockpredictError, ValueError):
    """An existing ledger belongs to another geometry."""


def ledger_path(output_path: str) -> str:
    return output_path.rstrip("/") + "-ledger"


class Ledger:
    """Block states held in memory (1 byte each) and flushed to zarr in batches."""

    def __init__(self, path: str, geometry: dict[str, Any], states: np.ndarray) -> None:
        self.path = path
        self.geometry = geometry
        self.states = states
        self._dirty = False
        self._last_flush = time.monotonic()

    @staticmethod
    def exists(path: str) -> bool:
        return os.path.exists(path)

    @classmethod
    def create(cls, path: str, geometry: dict[str, Any], num_blocks: int) -> Ledger:
        array = zarr.create_array(
            path,
            shape=(num_blocks,),
            chunks=(min(CHUNK, num_blocks),),
            dtype="uint8",
            fill_value=TODO,
            overwrite=True,
        )
        array.attrs.update({"geometry_hash": geometry_hash(geometry), "geometry": geometry})
        return cls(path, geometry, np.zeros(num_blocks, dtype=np.uint8))

    @classmethod
    def open(cls, path: str, geometry: dict[str, Any] | None = None) -> Ledger:
        """Open an existing ledger; with ``geometry``, refuse one of another plan."""
        array = zarr.open_array(path, mode="r")
        stored = dict(array.attrs.get("geometry", {}))
        if geometry is not None and array.attrs.get("geometry_hash") != geometry_hash(geometry):
            changed = [
                _change(k, stored.get(k), geometry.get(k))
                for k in sorted(set(stored) | set(geometry))
                if stored.get(k) != geometry.get(k)
            ]
            raise LedgerMismatchError(
                f"the model or geometry changed since the ledger was written: {'; '.join(changed)}",
                path,
                "set output.overwrite: true to start over, or restore the workflow",
            )
        return cls(path, stored, np.asarray(array[:], dtype=np.uint8))

    def mark(self, block_id: int, state: int) -> None:
        self.states[block_id] = state
        self._dirty = True

    def pending(self, order: Iterator[int]) -> Iterator[int]:
        """Block ids of ``order`` that are not done."""
        return (i for i in order if self.states[i] != DONE)

    def counts(self) -> dict[str, int]:
        values = np.bincount(self.states, minlength=3)
        return {"todo": int(values[TODO]), "done": int(values[DONE]), "failed": int(values[FAILED])}

    def failed_ids(self) -> list[int]:
        return np.flatnonzero(self.states == FAILED).tolist()

    def flush(self, every: float = 0.0) -> None:
        """Write the states if changed and at least ``every`` seconds passed."""
        if not self._dirty or time.monotonic() - self._last_flush < every:
            return
        zarr.open_array(self.path, mode="r+")[:] = self.states
        self._dirty = False
        self._last_flush = time.monotonic()


def _change(key: str, old: Any, new: Any) -> str:
    """``key`` and, where both fit in a line, ``old -> new``."""
    if key != "model_weights" and len(repr(old)) + len(repr(new)) > 80:
        return key
    return f"{key} {json.dumps(old)} -> {json.dumps(new)}"


def geometry_hash(geometry: dict[str, Any]) -> str:
    """Short hash of the plain values that define which voxels each block id covers."""
    return hashlib.sha256(json.dumps(geometry, sort_keys=True).encode()).hexdigest()[:16]

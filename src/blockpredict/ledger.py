"""The done-ledger: one byte per block, in a zarr array next to the output.

For an output in an object store, the ledger lies in the same store
(``storage_options`` are the output's).

Only the runner writes it, and only after a block's write returned. It stores
a hash of the geometry, so a ledger never vouches for blocks of another plan.
A flush writes only the chunks that changed since the last one, and records how
far the event log (its journal, see ``events``) had been written at that moment.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import zarr

from .errors import BlockpredictError
from .stores import exists, zarr_store

TODO, DONE, FAILED = 0, 1, 2
CHUNK = 1 << 20


class LedgerMismatchError(BlockpredictError, ValueError):
    """An existing ledger belongs to another geometry."""


def ledger_path(output_path: str) -> str:
    return output_path.rstrip("/") + "-ledger"


class Ledger:
    """Block states held in memory (1 byte each) and flushed to zarr in batches."""

    def __init__(
        self,
        path: str,
        geometry: dict[str, Any],
        states: np.ndarray,
        storage_options: dict | None = None,
    ) -> None:
        self.path = path
        self.storage_options = dict(storage_options or {})
        self.geometry = geometry
        self.states = states
        self._dirty_chunks: set[int] = set()
        self._last_flush = time.monotonic()
        self.journal_offset = 0  # bytes of the event log this snapshot includes
        self._stored_offset = 0

    @staticmethod
    def exists(path: str, storage_options: dict | None = None) -> bool:
        return exists(path, storage_options)

    @classmethod
    def create(
        cls,
        path: str,
        geometry: dict[str, Any],
        num_blocks: int,
        storage_options: dict | None = None,
    ) -> Ledger:
        array = zarr.create_array(
            zarr_store(path, storage_options),
            shape=(num_blocks,),
            chunks=(min(CHUNK, num_blocks),),
            dtype="uint8",
            fill_value=TODO,
            overwrite=True,
        )
        array.attrs.update({"geometry_hash": geometry_hash(geometry), "geometry": geometry})
        return cls(path, geometry, np.zeros(num_blocks, dtype=np.uint8), storage_options)

    @classmethod
    def open(
        cls,
        path: str,
        geometry: dict[str, Any] | None = None,
        storage_options: dict | None = None,
    ) -> Ledger:
        """Open an existing ledger; with ``geometry``, refuse one of another plan."""
        array = zarr.open_array(zarr_store(path, storage_options, read_only=True), mode="r")
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
        ledger = cls(path, stored, np.asarray(array[:], dtype=np.uint8), storage_options)
        ledger.journal_offset = ledger._stored_offset = int(array.attrs.get("journal_offset", 0))
        return ledger

    @property
    def hash(self) -> str:
        return geometry_hash(self.geometry)

    def mark(self, block_id: int, state: int) -> None:
        self.states[block_id] = state
        self._dirty_chunks.add(block_id // CHUNK)

    def mark_many(self, block_ids: np.ndarray, state: int) -> None:
        """:meth:`mark` for many blocks at once (one task's)."""
        if len(block_ids):
            self.states[block_ids] = state
            self._dirty_chunks.update(np.unique(block_ids // CHUNK).tolist())

    def pending(self, order: Iterator[int]) -> Iterator[int]:
        """Block ids of ``order`` that are not done."""
        return (i for i in order if self.states[i] != DONE)

    def counts(self) -> dict[str, int]:
        values = np.bincount(self.states, minlength=3)
        return {"todo": int(values[TODO]), "done": int(values[DONE]), "failed": int(values[FAILED])}

    def failed_ids(self) -> list[int]:
        return np.flatnonzero(self.states == FAILED).tolist()

    def flush(self, every: float = 0.0) -> None:
        """Write the changed chunks if at least ``every`` seconds passed since the last flush."""
        changed = self._dirty_chunks or self.journal_offset != self._stored_offset
        if not changed or time.monotonic() - self._last_flush < every:
            return
        array = zarr.open_array(zarr_store(self.path, self.storage_options), mode="r+")
        chunk = array.chunks[0]
        for c in sorted({i * CHUNK // chunk for i in self._dirty_chunks}):
            array[c * chunk : (c + 1) * chunk] = self.states[c * chunk : (c + 1) * chunk]
        if self.journal_offset != self._stored_offset:  # after the states it vouches for
            array.attrs["journal_offset"] = self.journal_offset
            self._stored_offset = self.journal_offset
        self._dirty_chunks.clear()
        self._last_flush = time.monotonic()


def _change(key: str, old: Any, new: Any) -> str:
    """``key`` and, where both fit in a line, ``old -> new``."""
    if key != "model_weights" and len(repr(old)) + len(repr(new)) > 80:
        return key
    return f"{key} {json.dumps(old)} -> {json.dumps(new)}"


def geometry_hash(geometry: dict[str, Any]) -> str:
    """Short hash of the plain values that define which voxels each block id covers."""
    return hashlib.sha256(json.dumps(geometry, sort_keys=True).encode()).hexdigest()[:16]

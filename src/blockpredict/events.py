"""The event log: one JSON line per event, next to the ledger; also the ledger's journal.

A run appends ``run_started`` (the workflow's hash, the plan, versions),
``block_finished`` / ``block_failed`` as results reach the client, and
``run_ended`` (the summary). Lines are buffered and written at every turn of the
dispatch loop (batches of at most ~100 ms), so a client killed with ``kill -9``
loses at most the last batch, while the ledger snapshot is written only every
few seconds. A rerun :func:`replay` s the log into the ledger: every block the
log records as finished counts as done. A last line without its newline is an
unfinished write (a kill), not corruption: it is skipped, and cut off before
the next run appends.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .ledger import DONE, FAILED, Ledger
from .observe import RunObserver
from .urls import is_url

logger = logging.getLogger(__name__)

FLUSH_SECONDS = 0.1


def events_path(output_path: str) -> str:
    """``<output>-events.jsonl``, beside ``<output>-ledger``.

    An object store cannot append, so the log of a URL output lies in the current
    folder, named after the URL; the ledger in the store stays the record resume trusts.
    """
    if is_url(output_path):
        return (
            os.path.abspath(re.sub(r"[^A-Za-z0-9._-]+", "_", output_path.rstrip("/")))
            + "-events.jsonl"
        )
    return output_path.rstrip("/") + "-events.jsonl"


def read_events(path: str | os.PathLike[str], offset: int = 0) -> Iterator[dict[str, Any]]:
    """The events of a log from byte ``offset`` on, in order; a torn last line is skipped."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return
    with f:
        f.seek(offset)
        for line in f:
            if not line.endswith(b"\n"):  # the last line, torn by a kill
                return
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except ValueError:
                logger.warning("event log %s: a line that is not JSON was skipped", path)


def replay(ledger: Ledger, path: str | os.PathLike[str]) -> int:
    """Mark in ``ledger`` the outcomes the log recorded after its snapshot; returns how
    many blocks became done that the snapshot had missed.

    Reading starts where the snapshot's ``journal_offset`` says it was flushed, so
    replay stays short however long the log grows. Only events of a run with the
    ledger's hash count (a log of another geometry vouches for nothing). Replaying
    twice changes nothing.
    """
    mine = ledger.journal_offset > 0  # the snapshot itself vouched for this log
    recovered = 0
    for event in read_events(path, ledger.journal_offset):
        kind = event.get("event")
        if kind == "run_started":
            mine = event.get("workflow_hash") == ledger.hash
        elif not mine:
            continue
        elif kind == "block_finished":
            block = int(event["block"])
            if ledger.states[block] != DONE:
                ledger.mark(block, DONE)
                recovered += 1
        elif kind == "block_failed" and event.get("final"):
            block = int(event["block"])
            if ledger.states[block] != DONE:
                ledger.mark(block, FAILED)
    return recovered


def versions() -> dict[str, str]:
    import dask
    import distributed
    import torch

    from . import __version__

    return {
        "blockpredict": __version__,
        "torch": torch.__version__,
        "dask": dask.__version__,
        "distributed": distributed.__version__,
    }


class EventLog(RunObserver):
    """Appends a run's events to its log; written in batches at each loop turn."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.buffer: list[str] = []
        self.first_buffered = 0.0
        self.plan: Any = None
        self.ledger: Ledger | None = None

    def run_started(self, plan: Any, ledger: Ledger, workers: int) -> None:
        self.plan, self.ledger = plan, ledger
        _cut_torn_line(self.path)
        self._add(
            "run_started",
            workflow_hash=ledger.hash,
            plan=plan.to_dict(),
            blocks_done=ledger.counts()["done"],
            workers=workers,
            versions=versions(),
        )
        self.flush()

    def block_finished(self, result: Any) -> None:
        self.blocks_finished([result])

    def blocks_finished(self, results: Any) -> None:
        """One task's blocks: grid indices computed at once, lines formatted without json."""
        if not results:
            return
        grid = tuple(self.plan.grid_shape)
        indices = np.stack(np.unravel_index([r.block_id for r in results], grid), axis=1)
        now = round(time.time(), 3)
        if not self.buffer:
            self.first_buffered = time.monotonic()
        for r, index in zip(results, indices.tolist(), strict=True):
            self.buffer.append(
                f'{{"time":{now},"event":"block_finished","block":{r.block_id},'
                f'"index":[{",".join(map(str, index))}],"worker":{json.dumps(r.worker)},'
                f'"read":{round(r.read, 4)},"compute":{round(r.compute, 4)},'
                f'"write":{round(r.write, 4)},"written":{round(r.written, 3)}}}\n'
            )
        if time.monotonic() - self.first_buffered >= FLUSH_SECONDS:
            self.flush()

    def block_failed(self, result: Any, final: bool) -> None:
        self._add(
            "block_failed",
            block=result.block_id,
            index=list(self.plan.block_index(result.block_id)),
            worker=result.worker,
            error=result.error,
            final=final,
        )

    def tick(self) -> None:
        self.flush()

    def run_ended(self, report: Any) -> None:
        summary = report.to_dict()
        summary.pop("failed_blocks", None)  # each one has its block_failed line
        self._add("run_ended", summary=summary)
        self.flush()

    def _add(self, event: str, **fields: Any) -> None:
        if not self.buffer:
            self.first_buffered = time.monotonic()
        line = {"time": round(time.time(), 3), "event": event, **fields}
        self.buffer.append(json.dumps(line, separators=(",", ":")) + "\n")
        if time.monotonic() - self.first_buffered >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Append the buffered lines (one write, so a kill tears at most the last line)."""
        if not self.buffer:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as f:
            f.write("".join(self.buffer).encode())
            end = f.tell()
        self.buffer.clear()
        if self.ledger is not None:  # the next snapshot includes everything up to here
            self.ledger.journal_offset = end


def _cut_torn_line(path: Path) -> None:
    """Drop a last line without its newline, so the next line starts on a line of its own."""
    try:
        with open(path, "rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)
    except FileNotFoundError:
        pass


def reset(path: str | os.PathLike[str]) -> None:
    """Remove the log of an output that is being written anew."""
    Path(path).unlink(missing_ok=True)

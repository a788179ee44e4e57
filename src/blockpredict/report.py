"""The run report: what happened, in counts and seconds."""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .plan import Block
from .words import plural

SIGNAL_EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}


@dataclass
class FailedBlock:
    id: int
    index: list[int]
    write_roi: dict[str, list[int]]
    error: str

    @classmethod
    def of(cls, block: Block, error: str | None) -> FailedBlock:
        roi = {"offset": list(block.write_roi.offset), "shape": list(block.write_roi.shape)}
        return cls(block.id, list(block.index), roi, error or "unknown error")


class PhaseTimes:
    """Totals and percentiles of read/compute/write seconds, in constant memory.

    Percentiles come from a reservoir sample, so a run of a million blocks
    keeps a few thousand numbers, not a million.
    """

    PHASES = ("read", "compute", "write")

    def __init__(self, sample_size: int = 4096, seed: int = 0) -> None:
        self.totals = dict.fromkeys(self.PHASES, 0.0)
        self.samples: list[tuple[float, float, float]] = []
        self.seen = 0
        self.sample_size = sample_size
        self.random = random.Random(seed)

    def add(self, result: Any) -> None:
        values = tuple(getattr(result, p) for p in self.PHASES)
        for p, v in zip(self.PHASES, values, strict=True):
            self.totals[p] += v
        self.seen += 1
        if len(self.samples) < self.sample_size:
            self.samples.append(values)  # type: ignore[arg-type]
        else:
            j = self.random.randrange(self.seen)
            if j < self.sample_size:
                self.samples[j] = values  # type: ignore[assignment]

    def summary(self) -> dict[str, dict[str, float]]:
        if not self.samples:
            return {}
        values = np.asarray(self.samples)
        out = {}
        for i, p in enumerate(self.PHASES):
            q = np.percentile(values[:, i], [50, 90, 99])
            out[p] = {
                "total": round(self.totals[p], 3),
                "p50": round(float(q[0]), 4),
                "p90": round(float(q[1]), 4),
                "p99": round(float(q[2]), 4),
                "max": round(float(values[:, i].max()), 4),
            }
        return out


@dataclass
class RunReport:
    """Counts, timings and throughput of one run; ``exit_code`` 0 only when all is done."""

    blocks_total: int
    blocks_processed: int = 0
    blocks_skipped: int = 0
    blocks_failed: int = 0
    retries: int = 0
    failed_blocks: list[FailedBlock] = field(default_factory=list)
    wall_seconds: float = 0.0
    setup_seconds: float = 0.0  # of wall_seconds: loading the model on the workers
    output_voxels_per_second: float = 0.0
    output_roi: dict[str, list[int]] = field(default_factory=dict)
    output_voxel_size: list[int] = field(default_factory=list)
    output_path: str = ""
    ledger_path: str = ""
    workers: int = 0
    phase_seconds: dict[str, dict[str, float]] = field(default_factory=dict)
    interrupted: str | None = None
    fail_fast_error: str | None = None

    @property
    def blocks_done(self) -> int:
        return self.blocks_processed + self.blocks_skipped

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return SIGNAL_EXIT_CODES.get(self.interrupted, 1)
        return 0 if self.blocks_done == self.blocks_total else 1

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "exit_code": self.exit_code}

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def summary(self) -> str:
        lines = [
            f"blocks: {self.blocks_done}/{self.blocks_total} done "
            f"({self.blocks_processed} processed, {self.blocks_skipped} skipped), "
            f"{self.blocks_failed} failed, {plural(self.retries, 'retry', 'retries')}",
            f"time: {self.wall_seconds:.1f} s, "
            f"{self.output_voxels_per_second / 1e6:.2f} M output voxels/s, "
            f"{plural(self.workers, 'worker')}",
        ]
        if self.phase_seconds:
            phases = ", ".join(
                f"{k} {v['total']:.1f} s (median {v['p50'] * 1000:.0f} ms)"
                for k, v in self.phase_seconds.items()
            )
            lines.append(f"worker time: {phases}")
        lines.append(f"output: {self.output_path}")
        if self.output_roi:
            roi = self.output_roi
            lines.append(
                f"output voxel size {_coords(self.output_voxel_size)}, ROI offset "
                f"{_coords(roi['offset'])} shape {_coords(roi['shape'])} (world units)"
            )
        if self.fail_fast_error:
            lines.append(f"stopped early: the first blocks all failed with {self.fail_fast_error}")
        if self.interrupted:
            lines.append(f"interrupted by {self.interrupted}: rerun the workflow to resume")
        for failed in self.failed_blocks[:20]:
            lines.append(f"failed block {failed.id} {failed.index}: {failed.error}")
        if len(self.failed_blocks) > 20:
            lines.append(f"... and {plural(len(self.failed_blocks) - 20, 'more failed block')}")
        return "\n".join(lines)


def _coords(values: list[int]) -> str:
    return "(" + ", ".join(str(v) for v in values) + ")"

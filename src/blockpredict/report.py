"""The run report: what happened, in counts and seconds."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class FailedBlock:
    id: int
    index: list[int]
    write_roi: dict[str, list[int]]
    error: str


@dataclass
class RunReport:
    """Counts, timings and throughput of one run; ``exit_code`` 0 only when all is done."""

    blocks_total: int
    blocks_processed: int = 0
    blocks_failed: int = 0
    retries: int = 0
    failed_blocks: list[FailedBlock] = field(default_factory=list)
    wall_seconds: float = 0.0
    output_voxels_per_second: float = 0.0
    output_roi: dict[str, list[int]] = field(default_factory=dict)
    output_voxel_size: list[int] = field(default_factory=list)
    output_path: str = ""
    workers: int = 0
    phase_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return 0 if self.blocks_processed == self.blocks_total and not self.blocks_failed else 1

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def summary(self) -> str:
        lines = [
            f"blocks: {self.blocks_processed}/{self.blocks_total} done, "
            f"{self.blocks_failed} failed, {self.retries} retries",
            f"time: {self.wall_seconds:.1f} s, "
            f"{self.output_voxels_per_second / 1e6:.2f} M output voxels/s, "
            f"{self.workers} workers",
        ]
        if self.phase_seconds:
            phases = ", ".join(f"{k} {v:.1f} s" for k, v in self.phase_seconds.items())
            lines.append(f"worker time: {phases}")
        lines.append(f"output: {self.output_path}")
        for failed in self.failed_blocks[:20]:
            lines.append(f"failed block {failed.id} {failed.index}: {failed.error}")
        if len(self.failed_blocks) > 20:
            lines.append(f"... and {len(self.failed_blocks) - 20} more failed blocks")
        return "\n".join(lines)

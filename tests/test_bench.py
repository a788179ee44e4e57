"""`blockpredict bench` runs and prints its figures (the figures themselves are not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from blockpredict.bench_compare import steady_seconds


def test_bench_quick_prints_figures(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "blockpredict.cli", "bench", "--quick", "--json", "bench.json"]
        + ["--device-ms", "20", "--simulate-workers", "2"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr
    assert "blocks/s" in result.stdout and "of limit (wall)" in result.stdout
    figures = json.loads((tmp_path / "bench.json").read_text())
    modes = figures["compare"]["modes"]
    assert set(modes) == {"limit", "engine", "naive loop", "dask.array"}
    assert modes["limit"]["of_limit_wall"] == 1.0
    assert all(m["voxels_per_s"] > 0 and m["of_limit_steady"] > 0 for m in modes.values())
    assert {"read", "compute", "write"} <= set(figures["compare"]["engine_phases"])
    allocators = [r["allocator"] for r in figures["compare"]["limit_layouts"]]  # 2 layouts each
    assert allocators == ["default"] * 2 + ["pages kept"] * 2 + ["mimalloc"] * 2
    assert [r["blocks"] for r in figures["startup"]] == [1331]
    assert {r["blocks_per_task"] for r in figures["dispatch"]} == {"auto", 8}
    assert all(r["blocks_per_s"] > 0 and r["steady_blocks_per_s"] > 0 for r in figures["dispatch"])
    assert 0 < figures["device"]["busy"] <= 1.0
    assert [r["workers"] for r in figures["simulated_cluster"]] == [1, 2]


def test_bench_replaces_its_cubes_without_funlib_noise(tmp_path):
    """The simulated cluster makes input cubes of growing size in one folder."""
    result = subprocess.run(
        [sys.executable, "-m", "blockpredict.cli", "bench", "--quick", "--only", "cluster"]
        + ["--simulate-workers", "4", "--dir", str(tmp_path / "bench")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("simulated cluster:") == 3, result.stdout  # 1, 2 and 4 workers
    noise = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if "Shapes differ" in line or "Existing dataset" in line
    ]
    assert not noise, noise


def test_steady_state_starts_once_every_worker_wrote_its_first_block(tmp_path: Path):
    """Like the limit's untimed first forward per process: each worker's first block (its
    warm-up) and what came before the slower worker's are left out, by the workers' own
    clocks (the client heard of block 3 late)."""
    lines = [
        {"event": "run_started", "time": 100.0},
        {"event": "block_finished", "worker": "a", "written": 103.0, "time": 103.1},
        {"event": "block_finished", "worker": "a", "written": 104.0, "time": 104.1},
        {"event": "block_finished", "worker": "b", "written": 104.5, "time": 106.0},
        {"event": "block_finished", "worker": "a", "written": 105.0, "time": 106.0},
        {"event": "block_finished", "worker": "b", "written": 105.5, "time": 106.0},
        {"event": "block_finished", "worker": "a", "written": 106.5, "time": 106.6},
    ]
    (tmp_path / "pred-events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    report = {"output_path": str(tmp_path / "pred"), "wall_seconds": 9.0, "setup_seconds": 0.5}
    # 3 blocks written in the 2 s after 104.5: 6 blocks would take 4 s at that rate
    assert steady_seconds(report, 6) == 4.0
    for line in lines[1:]:  # one worker only: counted after its first block
        line["worker"] = "a"
    (tmp_path / "pred-events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    assert steady_seconds(report, 7) == 3.5 * 7 / 5

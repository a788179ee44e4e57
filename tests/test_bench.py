"""`blockpredict bench` runs and prints its figures (the figures themselves are not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys


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
    layouts = figures["compare"]["limit_layouts"]  # 2 layouts x 3 allocator settings
    assert [r["allocator"] for r in layouts] == ["default"] * 2 + ["pages kept"] * 2 + [
        "mimalloc"
    ] * 2
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

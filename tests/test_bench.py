"""`blockpredict bench` runs and prints its figures (the figures themselves are not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_quick_prints_figures(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "blockpredict.cli", "bench", "--quick", "--json", "bench.json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "blocks/s" in result.stdout and "plan" in result.stdout
    figures = json.loads((tmp_path / "bench.json").read_text())
    assert [r["blocks"] for r in figures["startup"]] == [8, 1331]
    assert {r["blocks_per_task"] for r in figures["dispatch"]} == {1, 8}
    assert all(r["blocks_per_s"] > 0 for r in figures["dispatch"])

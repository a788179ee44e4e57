"""Progress: a bar on a terminal, one summary line every N seconds without one."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import numpy as np
import pytest
from conftest import make_input, on_workers, write_factory, write_workflow

import blockpredict

SRC = str(Path(blockpredict.__file__).resolve().parents[1])


@pytest.fixture
def run_setup(tmp_path, cluster_address):
    write_factory(tmp_path, "slowp")
    cluster = on_workers(cluster_address, tmp_path)
    data = np.random.default_rng(0).random((34, 34, 34), dtype=np.float32)
    make_input(tmp_path / "in.zarr" / "raw", data, (1, 1, 1))
    path = write_workflow(
        tmp_path / "workflow.yaml",
        {
            "input": {"container": "in.zarr", "dataset": "raw"},
            "model": {"factory": "slowp:build", "kwargs": {"delay": 0.1}},
            "output": {"container": "out.zarr", "dataset": "pred"},
            "cluster": cluster,
        },
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), SRC])}
    command = [sys.executable, "-m", "blockpredict.cli", "predict", str(path)]
    return command, env, tmp_path


def test_a_terminal_gets_the_bar(run_setup):
    command, env, cwd = run_setup
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    proc = subprocess.Popen(command, cwd=cwd, env=env, stderr=slave, stdout=subprocess.DEVNULL)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=300) == 0
    os.close(master)
    text = b"".join(chunks).decode(errors="replace")
    bars = [part for part in re.split(r"[\r\n]", text) if "block/s" in part]
    assert bars, text
    final = bars[-1]
    assert "64/64" in final and "100%" in final, final
    assert re.search(r"[\d.]+ [kM] vox/s, failed 0, workers 2", final), final
    assert "progress:" not in text  # no summary lines on a terminal
    # the dashboard's URL, logged once the first blocks are in, has a line of its own above
    # the bar (tqdm clears the bar's line, writes the log line, and draws the bar again)
    parts = re.split(r"[\r\n]", text)
    url = next(i for i, part in enumerate(parts) if "dashboard: http" in part)
    assert parts[url].startswith("dashboard: http"), parts[url]
    assert any("block/s" in part for part in parts[url + 1 :]), text  # the bar, below it


def test_without_a_terminal_one_line_every_interval(run_setup):
    command, env, cwd = run_setup
    done = subprocess.run(
        [*command, "--progress-interval", "0.5"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr
    pattern = (
        r"progress: (\d+)/64 blocks \([\d.]+%\), [\d.]+ blocks/s, [\d.]+ [kM] output voxels/s, "
        r"ETA (\d+ s|\d+ min \d+ s|\?), (\d+) failed, (\d+) workers"
    )
    lines = [line for line in done.stderr.splitlines() if line.startswith("progress:")]
    assert len(lines) >= 2, done.stderr
    matches = [re.fullmatch(pattern, line) for line in lines]
    assert all(matches), lines
    counts = [int(m.group(1)) for m in matches if m]
    assert counts == sorted(counts) and counts[-1] == 64

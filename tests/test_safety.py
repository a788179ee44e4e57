"""Safe in a user's hands, through the real CLI with real worker processes.

The input is never the output; one run per output (a lock file); a changed
model is refused on resume (the fingerprint in the ledger's hash) while a
moved checkpoint resumes; Ctrl-C to the whole process group ends in seconds
with the ledger flushed and no traceback.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import cli_in_process, make_input, read_output, write_factory, write_workflow
from conftest import cli_process as cli

from blockpredict.build import build_model
from blockpredict.cluster import connect
from blockpredict.config import ClusterConfig, ModelConfig

GRACE = 120.0  # an interrupted run that waited this long would have waited for lost blocks


def run_cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = cli(*args, cwd=cwd)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def error_line(result: subprocess.CompletedProcess) -> str:
    """Exit code 2 and exactly one line ``error: ...``, no traceback."""
    context = f"exit {result.returncode}\n{result.stderr}"
    assert result.returncode == 2, context
    assert "Traceback" not in result.stderr, context
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), context
    return lines[0]


def tree(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


def ledger_done(tmp_path: Path) -> int:
    try:
        return int(
            (zarr.open_array(str(tmp_path / "out.zarr" / "pred-ledger"), mode="r")[:] == 1).sum()
        )
    except Exception:
        return 0


def wait_for_ledger(tmp_path: Path, done: int, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while ledger_done(tmp_path) < done and time.time() < deadline:
        time.sleep(0.1)
    assert ledger_done(tmp_path) >= done, "the run did not start"


def expected(data: np.ndarray) -> np.ndarray:
    return torch.nn.functional.avg_pool3d(torch.from_numpy(data)[None, None], 3, stride=1)[
        0, 0
    ].numpy()


@pytest.fixture
def slow(tmp_path: Path):
    """A 26^3 input (27 blocks of 8^3) and a workflow of the slow mean filter."""
    write_factory(tmp_path)
    data = np.random.default_rng(0).random((26, 26, 26), dtype=np.float32)
    make_input(tmp_path / "in.zarr" / "raw", data, (1, 1, 1))

    def workflow(delay: float, n_workers: int = 1, gate: str | None = None, **output) -> Path:
        return write_workflow(
            tmp_path / "workflow.yaml",
            {
                "input": {"container": "in.zarr", "dataset": "raw"},
                "model": {"factory": "slow:build", "kwargs": {"delay": delay, "gate": gate}},
                "output": {"container": "out.zarr", "dataset": "pred", **output},
                "cluster": {"type": "local", "n_workers": n_workers, "dashboard_address": ":0"},
                "execution": {"grace_period": GRACE},
            },
        )

    return tmp_path, data, workflow


# --- input is never output ---------------------------------------------------


@pytest.mark.parametrize(
    ("container", "dataset", "phrase"),
    [
        ("in.zarr", "raw", "the output is the input"),
        ("in.zarr/raw", "pred", "the output lies inside the input"),
        ("in.zarr/raw/..", ".", "the output contains the input"),
    ],
)
def test_output_that_is_or_holds_the_input_is_refused(slow, container, dataset, phrase):
    tmp_path, _, workflow = slow
    path = workflow(0.0, container=container, dataset=dataset, overwrite=True)
    before = tree(tmp_path / "in.zarr")
    for command in ("plan", "predict"):
        line = error_line(cli_in_process([command, str(path)], tmp_path))
        assert phrase in line
    assert tree(tmp_path / "in.zarr") == before


# --- one run per output --------------------------------------------------------


def test_a_second_run_is_refused_even_with_overwrite_and_the_first_finishes(slow):
    tmp_path, data, workflow = slow
    gate = tmp_path / "gate"  # blocks wait for it: the first run holds its lock meanwhile
    path = workflow(0.0, gate=str(gate), overwrite=True)
    first = cli("predict", str(path), "--no-progress", cwd=tmp_path)
    lock = tmp_path / "out.zarr" / "pred.lock"
    deadline = time.time() + 300
    while not lock.exists() and time.time() < deadline:
        time.sleep(0.1)
    assert json.loads(lock.read_text())["pid"] == first.pid
    status = cli_in_process(["status", str(path)], tmp_path)
    assert f"running: pid {first.pid} on {socket.gethostname()}" in status.stdout
    second = cli_in_process(["predict", str(path), "--no-progress"], tmp_path)
    line = error_line(second)
    assert "another run writes this output" in line and f"pid {first.pid}" in line
    assert first.poll() is None
    gate.touch()
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert "27/27 done" in err
    np.testing.assert_allclose(
        read_output(tmp_path / "out.zarr" / "pred")[0], expected(data), atol=1e-6
    )
    assert not (tmp_path / "out.zarr" / "pred.lock").exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over(slow):
    tmp_path, data, workflow = slow
    path = workflow(0.0)
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock = tmp_path / "out.zarr" / "pred.lock"
    lock.parent.mkdir()
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": "x"}))
    result = run_cli("predict", str(path), "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"warning: taking over a stale lock (pid {dead.pid}" in result.stderr
    assert not lock.exists()
    np.testing.assert_allclose(
        read_output(tmp_path / "out.zarr" / "pred")[0], expected(data), atol=1e-6
    )


def test_a_lock_from_another_host_is_refused_until_unlocked(slow):
    tmp_path, _, workflow = slow
    path = workflow(0.0)
    lock = tmp_path / "out.zarr" / "pred.lock"
    lock.parent.mkdir()
    lock.write_text(json.dumps({"host": "far-away", "pid": 1, "started": "x"}))
    line = error_line(cli_in_process(["predict", str(path), "--no-progress"], tmp_path))
    assert "pid 1 on far-away" in line and "blockpredict unlock" in line
    assert sorted(p.name for p in lock.parent.iterdir()) == ["pred.lock"]  # nothing written
    status = cli_in_process(["status", str(path)], tmp_path)
    assert "running: pid 1 on far-away" in status.stdout
    assert "done: 0/27" in status.stdout and status.returncode == 0
    unlocked = cli_in_process(["unlock", str(path)], tmp_path)
    assert unlocked.returncode == 0 and "unlocked" in unlocked.stdout
    assert not lock.exists()


# --- the model fingerprint ----------------------------------------------------

UNET = {
    "input_shape": [28, 28, 28],
    "num_fmaps": 2,
    "fmap_inc_factor": 2,
    "downsample_factors": [[2, 2, 2]],
}


def test_resume_with_another_model_is_refused_and_a_moved_checkpoint_resumes(tmp_path):
    rng = np.random.default_rng(1)
    make_input(
        tmp_path / "in.zarr" / "raw", rng.integers(0, 255, (40, 40, 40), dtype=np.uint8), (1, 1, 1)
    )
    model = build_model(ModelConfig.model_validate({"unet": UNET, "head": {"out_channels": 1}}))
    torch.save(model.state_dict(), tmp_path / "a.pt")
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    torch.save(model.state_dict(), tmp_path / "b.pt")
    path = write_workflow(
        tmp_path / "workflow.yaml",
        {
            "input": {"container": "in.zarr", "dataset": "raw"},
            "model": {"unet": UNET, "head": {"out_channels": 1}, "checkpoint": "a.pt"},
            "output": {"container": "out.zarr", "dataset": "pred"},
            "cluster": {"type": "local", "n_workers": 1, "dashboard_address": ":0"},
        },
    )
    first = run_cli("predict", str(path), "--no-progress", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    before = tree(tmp_path / "out.zarr")
    for override, phrase in [
        ("model.checkpoint=b.pt", "model_weights"),
        ("model.eval_activation=sigmoid", "activation"),
        ("input.normalize={scale: 0.5}", "normalization"),
        ("output.dtype=float16", "dtype"),
    ]:
        line = error_line(cli_in_process(["predict", str(path), "--set", override], tmp_path))
        assert "the model or geometry changed" in line and phrase in line, line
    assert tree(tmp_path / "out.zarr") == before
    (tmp_path / "moved").mkdir()
    (tmp_path / "a.pt").rename(tmp_path / "moved" / "a.pt")
    again = run_cli(
        "predict",
        str(path),
        "--set",
        "model.checkpoint=moved/a.pt",
        "--report",
        "r.json",
        "--no-progress",
        cwd=tmp_path,
    )
    assert again.returncode == 0, again.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["blocks_processed"] == 0 and report["blocks_skipped"] == report["blocks_total"]


# --- a clean interrupt ---------------------------------------------------------


def test_ctrl_c_to_the_process_group_stops_cleanly_and_the_rerun_resumes(slow):
    tmp_path, data, workflow = slow
    path = workflow(0.5, n_workers=2)
    proc = cli("predict", str(path), "--no-progress", cwd=tmp_path, start_new_session=True)
    wait_for_ledger(tmp_path, 2)
    start = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal does: the driver and its workers
    _, err = proc.communicate(timeout=300)
    elapsed = time.monotonic() - start
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err
    assert elapsed < GRACE / 2, f"waited {elapsed:.0f} s: blocks were lost, not finished"
    done = ledger_done(tmp_path)  # flushed on the way out
    assert 2 <= done < 27
    rerun = run_cli("predict", str(path), "--report", "r.json", "--no-progress", cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["blocks_skipped"] == done and report["blocks_processed"] == 27 - done
    np.testing.assert_allclose(
        read_output(tmp_path / "out.zarr" / "pred")[0], expected(data), atol=1e-6
    )


def test_a_second_ctrl_c_stops_at_once(slow):
    tmp_path, _, workflow = slow
    path = workflow(GRACE, n_workers=1)  # a block would outlast the whole grace period
    proc = cli("predict", str(path), "--no-progress", cwd=tmp_path, start_new_session=True)
    deadline = time.time() + 180
    # the model is loaded and blocks are being dispatched: the ledger alone is created
    # while the workers still load the model (2.7-2.9 s here), and a Ctrl-C then stops
    # the start-up instead (KeyboardInterrupt, "interrupted")
    events = tmp_path / "out.zarr" / "pred-events.jsonl"
    while time.time() < deadline and not (events.exists() and "run_started" in events.read_text()):
        time.sleep(0.2)
    time.sleep(2)  # the first block is running
    start = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(1)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    elapsed = time.monotonic() - start
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err
    assert elapsed < GRACE / 2, err
    assert (tmp_path / "out.zarr" / "pred-ledger").exists()
    assert not (tmp_path / "out.zarr" / "pred.lock").exists()


def _sigint_and_pid() -> tuple[str, int]:
    handler = signal.getsignal(signal.SIGINT)
    return getattr(handler, "name", repr(handler)), os.getpid()


async def _killed() -> None:  # as a block_timeout kill does (worker.py)
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_worker_restarted_by_its_nanny_ignores_sigint_too():
    config = ClusterConfig.model_validate({"n_workers": 1, "dashboard_address": ":0"})
    with connect(config) as client:
        ((address, (first, pid)),) = client.run(_sigint_and_pid).items()
        assert first == "SIG_IGN"
        client.run(_killed, workers=[address], wait=False)
        for _ in range(600):  # the nanny restarts it at a new address (60 s at most)
            workers = set(client.scheduler_info()["workers"])
            if workers and address not in workers:
                break
            time.sleep(0.1)
        client.wait_for_workers(1, timeout=60)
        ((_, (restarted, new_pid)),) = client.run(_sigint_and_pid).items()
    assert new_pid != pid
    assert restarted == "SIG_IGN"  # not Python's default_int_handler


PROBE = textwrap.dedent(
    """
    import torch
    from funlib.geometry import Coordinate
    from blockpredict.architectures import WrappedArchitecture
    from blockpredict.model import Model

    class Mean(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.avg_pool3d(x, 3, stride=1)

    def build(log, refuse_meta=False):
        device = str(torch.empty(0).device)  # where the weights would be made
        with open(log, "a") as f:
            f.write(device + "\\n")
        if refuse_meta and device == "meta":
            raise RuntimeError("this factory reads its weights")
        arch = WrappedArchitecture(Mean(), input_shape=Coordinate(10, 10, 10),
                                   num_in_channels=1, num_out_channels=1)
        return Model(arch, torch.nn.Identity())
    """
)


@pytest.mark.parametrize("refuse_meta", [False, True])
def test_status_before_a_run_counts_blocks_without_loading_the_model(tmp_path, capsys, refuse_meta):
    from blockpredict.cli import main

    module = f"probe_{refuse_meta}_{os.getpid()}"  # in-process: a module name of its own
    (tmp_path / f"{module}.py").write_text(PROBE)
    make_input(tmp_path / "in.zarr" / "raw", np.ones((26, 26, 26), np.float32), (1, 1, 1))
    log = tmp_path / "built.txt"
    path = write_workflow(
        tmp_path / "workflow.yaml",
        {
            "input": {"container": "in.zarr", "dataset": "raw"},
            "model": {
                "factory": f"{module}:build",
                "kwargs": {"log": str(log), "refuse_meta": refuse_meta},
            },
            "output": {"container": "out.zarr", "dataset": "pred"},
        },
    )
    assert main(["status", str(path)]) == 0
    assert "done: 0/27 (not started)" in capsys.readouterr().out  # [1, 25)^3 in 8^3 blocks
    assert log.read_text().split() == (["meta", "cpu"] if refuse_meta else ["meta"])
    assert not (tmp_path / "out.zarr").exists()


def test_plan_warns_how_far_the_output_roi_was_clipped(tmp_path, capsys):
    from blockpredict.cli import main

    make_input(tmp_path / "in.zarr" / "raw", np.ones((26, 26, 26), np.float32), (1, 1, 1))
    (tmp_path / "clip_probe.py").write_text(PROBE)
    path = write_workflow(
        tmp_path / "workflow.yaml",
        {
            "input": {"container": "in.zarr", "dataset": "raw"},
            "model": {"factory": "clip_probe:build", "kwargs": {"log": str(tmp_path / "log")}},
            "output": {
                "container": "out.zarr",
                "dataset": "pred",
                "roi": {"offset": [0, 4, 4], "shape": [30, 8, 8]},
            },
        },
    )
    assert main(["plan", str(path)]) == 0
    text = capsys.readouterr().out
    assert "output ROI         offset (1, 4, 4) shape (24, 8, 8) world" in text
    assert (
        "warning: output.roi was clipped to the input ROI less the context [1:25, 1:25, 1:25]: "
        "trimmed at the start by (1, 0, 0) world units = (1, 0, 0) voxels, at the end by "
        "(5, 0, 0) world units = (5, 0, 0) voxels; now offset (1, 4, 4) shape (24, 8, 8)"
    ) in text


@pytest.mark.parametrize("activation, warns", [(None, True), ("sigmoid", False)])
def test_uint8_output_of_an_unbounded_activation_warns(tmp_path, caplog, activation, warns):
    from blockpredict.cli import main

    make_input(tmp_path / "in.zarr" / "raw", np.ones((26, 26, 26), np.float32), (1, 1, 1))
    (tmp_path / f"uint8_probe_{warns}.py").write_text(PROBE)
    model = {"factory": f"uint8_probe_{warns}:build", "kwargs": {"log": str(tmp_path / "log")}}
    if activation:
        model["eval_activation"] = activation
    path = write_workflow(
        tmp_path / "workflow.yaml",
        {
            "input": {"container": "in.zarr", "dataset": "raw"},
            "model": model,
            "output": {"container": "out.zarr", "dataset": "pred", "dtype": "uint8"},
        },
    )
    assert main(["plan", str(path)]) == 0
    assert ("activation (none) is not bounded to [0, 1]" in caplog.text) == warns, caplog.text

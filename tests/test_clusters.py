"""Batch clusters: job scripts for SLURM/LSF/PBS/SGE, and real runs on a single-node SLURM.

The SLURM tests bring up Debian's slurm-wlm + munge with cluster/testbed/start-slurm.sh
(root and apt needed) and stop it again at the end of the session.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    SRC,
    alive_checkpoint,
    cli_in_process,
    make_input,
    max_abs_diff,
    read_output,
    reference,
    volume_of,
    workflow_on,
    write_factory,
    write_workflow,
)
from funlib.geometry import Coordinate, Roi

from blockpredict.build import build_model
from blockpredict.config import ClusterConfig, load_workflow
from blockpredict.errors import ConfigError
from blockpredict.jobqueue import job_script, lifetime_args, parse_walltime
from blockpredict.submit import driver_script
from blockpredict.workflow import prepare_workflow

TESTBED = Path(__file__).parents[1] / "cluster" / "testbed"
UNET = {"input_shape": [28, 28, 28], "num_fmaps": 3, "downsample_factors": [[2, 2, 2]]}


@pytest.mark.parametrize(
    "kind, walltime, gpu_line",
    [
        ("slurm", "02:00:00", "#SBATCH --gres=gpu:2"),
        ("lsf", "02:00", '#BSUB -gpu "num=2"'),
        ("pbs", "02:00:00", "#PBS -l ngpus=2"),
        ("sge", "02:00:00", "#$ -l gpu=2"),
    ],
)
def test_job_scripts_request_gpus_and_retire_workers_before_walltime(kind, walltime, gpu_line):
    config = ClusterConfig.model_validate(
        {
            "type": kind,
            "gpus_per_job": 2,
            "threads_per_worker": 2,
            "jobqueue": {"memory": "32GB", "walltime": walltime, "queue": "gpu"},
        }
    )
    lines = job_script(config).splitlines()
    assert gpu_line in lines
    command = lines[-1]
    assert "--nworkers 2" in command  # one worker process per GPU
    assert "--nthreads 2" in command
    assert "--lifetime 6120s --lifetime-stagger 360s" in command  # 2 h minus margins
    assert "--protocol tls://" in command and "--tls-key" in command  # per-run certificates
    queue = "-p gpu" if kind == "slurm" else "-q gpu"
    assert any(line.endswith(queue) for line in lines)


def test_walltime_and_lifetime():
    assert parse_walltime("1-02:00:00") == 93600
    assert parse_walltime("00:30") == 1800
    assert lifetime_args(3600) == ["--lifetime", "3060s", "--lifetime-stagger", "180s"]
    assert lifetime_args(60) == ["--lifetime", "42s", "--lifetime-stagger", "3s"]  # < walltime
    with pytest.raises(ConfigError, match="walltime"):
        parse_walltime("soon")


def test_unknown_jobqueue_option_gets_a_hint():
    config = ClusterConfig.model_validate(
        {"type": "slurm", "jobqueue": {"memory": "1GB", "walltme": "01:00:00"}}
    )
    with pytest.raises(ConfigError, match="unknown SLURMCluster option 'walltme'.*'walltime'"):
        job_script(config)


def test_unknown_cluster_type_is_a_config_error():
    with pytest.raises(Exception, match="cluster.type"):
        from blockpredict.config import validate_workflow

        validate_workflow(
            {
                "input": {"container": "a", "dataset": "b"},
                "model": {"factory": "m:f"},
                "output": {"container": "c"},
                "cluster": {"type": "kubernetes"},
            }
        )


def test_unreachable_scheduler_is_exit_2_quickly(tmp_path):
    make_input(tmp_path / "in.zarr" / "raw", volume_of((40, 40, 40)), (1, 1, 1))
    path = write_workflow(
        tmp_path / "wf.yaml",
        {
            "input": {"container": "in.zarr", "dataset": "raw"},
            "model": {"unet": UNET, "head": {"out_channels": 1}},
            "output": {"container": "out.zarr", "dataset": "pred"},
            "cluster": {"type": "address", "address": "tcp://127.0.0.1:9"},
        },
    )
    start = time.time()
    result = cli_in_process(["predict", str(path)], tmp_path)
    assert result.returncode == 2, result.stderr
    assert "error: no Dask scheduler answers at tcp://127.0.0.1:9" in result.stderr
    assert time.time() - start < 60
    assert not (tmp_path / "out.zarr").exists()


# --- a real SLURM ---------------------------------------------------------------------


def slurm_up() -> bool:
    if not shutil.which("sinfo"):
        return False
    out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    return out.returncode == 0 and any(s in out.stdout for s in ("idle", "mixed", "alloc"))


@pytest.fixture(scope="session")
def slurm():
    """A single-node SLURM, started by the project's testbed script if not running."""
    started = False
    if not slurm_up():
        if os.geteuid() != 0:
            pytest.skip("the SLURM testbed needs root (apt-get, munged, slurmctld)")
        subprocess.run(["bash", str(TESTBED / "start-slurm.sh")], check=True, timeout=600)
        started = True
    yield
    if started:
        subprocess.run(["bash", str(TESTBED / "stop-slurm.sh")], timeout=60)


def our_jobs(name: str = "blockpredict") -> list[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i %j %T"], capture_output=True, text=True)
    return [line for line in out.stdout.splitlines() if name in line]


def slurm_workflow(tmp_path: Path, **cluster) -> Path:
    make_input(tmp_path / "in.zarr" / "raw", volume_of((48, 48, 48)), (2, 2, 2))
    return write_workflow(
        tmp_path / "wf.yaml",
        {
            "input": {"container": "in.zarr", "dataset": "raw"},
            "model": alive_checkpoint(tmp_path, {"unet": UNET, "head": {"out_channels": 2}}),
            "output": {"container": "out.zarr", "dataset": "pred"},
            # loopback: the scheduler and its workers talk on this machine only
            "cluster": {
                "type": "slurm",
                "n_workers": 2,
                **cluster,
                "jobqueue": {
                    "memory": "2GB",
                    "walltime": "00:20:00",
                    "interface": "lo",
                    "log_directory": str(tmp_path / "logs"),
                    **cluster.pop("jobqueue", {}),
                },
            },
        },
    )


def expected_output(path: Path) -> np.ndarray:
    workflow = load_workflow(path)
    plan = prepare_workflow(workflow).plan
    volume = volume_of((48, 48, 48)).astype(np.float32)[None] / 255
    return reference(
        build_model(workflow.model), volume, Roi((0, 0, 0), (96, 96, 96)), Coordinate(2, 2, 2), plan
    )


def predict_watching_squeue(
    path: Path, cwd: Path, **kwargs
) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run ``blockpredict predict`` and collect the worker job ids squeue shows meanwhile."""
    seen: set[str] = set()
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.update(line.split()[0] for line in our_jobs("blockpredict-worker"))
            time.sleep(0.3)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "blockpredict.cli",
                "predict",
                str(path),
                "--report",
                "report.json",
                "--no-progress",
            ],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=400,
            **kwargs,
        )
    finally:
        stop.set()
        watcher.join()
    return result, seen


def test_predict_on_slurm(tmp_path, slurm):
    path = slurm_workflow(tmp_path)
    expected = expected_output(path)
    result, seen = predict_watching_squeue(path, tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(seen) >= 2, "the worker jobs never showed up in squeue"
    # the dashboard, connected to the batch scheduler once the first tasks were out
    assert "dashboard: http" in result.stderr and "no dashboard" not in result.stderr
    assert "blockpredict page: http" in result.stderr, result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["blocks_processed"] == report["blocks_total"] == 27
    assert max_abs_diff(read_output(tmp_path / "out.zarr" / "pred"), expected) <= 1e-4
    logs = list((tmp_path / "logs").glob("blockpredict-worker-*.err"))
    assert logs
    for log in logs:  # mimalloc was preloaded where the job found it, without ld.so's error
        assert "ld.so" not in log.read_text(), log.read_text()[-2000:]
    deadline = time.time() + 30
    while our_jobs("blockpredict-worker") and time.time() < deadline:
        time.sleep(0.5)
    assert not our_jobs("blockpredict-worker"), "worker jobs outlived the run"


def test_submit_runs_predict_as_a_job(tmp_path, slurm):
    path = slurm_workflow(tmp_path)
    expected = expected_output(path)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "blockpredict.cli",
            "submit",
            str(path),
            "--report",
            str(tmp_path / "report.json"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    job_id = lines["job"]
    assert job_id.isdigit()
    script = Path(lines["script"]).read_text()
    assert "#SBATCH -J blockpredict" in script and "blockpredict.cli predict" in script
    deadline = time.time() + 300
    while time.time() < deadline and not (tmp_path / "report.json").exists():
        time.sleep(1)
    while any(line.split()[0] == job_id for line in our_jobs()) and time.time() < deadline:
        time.sleep(0.5)
    logs = "".join(p.read_text() for p in Path(lines["logs"]).glob("blockpredict-*"))
    assert (tmp_path / "report.json").exists(), logs[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["exit_code"] == 0 and report["blocks_processed"] == 27
    assert max_abs_diff(read_output(tmp_path / "out.zarr" / "pred"), expected) <= 1e-4


def test_workers_that_never_arrive_time_out_with_the_reason(tmp_path, slurm):
    path = slurm_workflow(
        tmp_path, worker_timeout=8, jobqueue={"job_extra_directives": ["--begin=now+1hour"]}
    )
    result = subprocess.run(
        [sys.executable, "-m", "blockpredict.cli", "predict", str(path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1
    assert "no worker arrived within 8 s" in error[0]
    assert "PENDING" in error[0] and "BeginTime" in error[0]
    assert str(tmp_path / "logs") in error[0]
    assert not (tmp_path / "out.zarr").exists()
    deadline = time.time() + 30
    while our_jobs("blockpredict-worker") and time.time() < deadline:
        time.sleep(0.5)
    assert not our_jobs("blockpredict-worker")


@pytest.mark.parametrize("kind", ["slurm", "lsf", "pbs", "sge"])
def test_ready_to_edit_configs_render(kind, tmp_path, monkeypatch):
    import yaml

    home, here = tmp_path / "home", tmp_path / "here"
    here.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(here)
    section = yaml.safe_load((TESTBED.parent / f"{kind}.yaml").read_text())["cluster"]
    assert section["jobqueue"]["log_directory"] == "~/blockpredict-logs"
    script = job_script(ClusterConfig.model_validate(section))
    assert "--nworkers 4" in script and "gpu" in script and "--lifetime" in script
    # ~/blockpredict-logs is in the home folder, never a folder named '~' here
    assert f"{home}/blockpredict-logs/" in script
    assert (home / "blockpredict-logs").is_dir()
    assert list(here.iterdir()) == []


def test_worker_and_driver_jobs_expand_home_in_their_folders(tmp_path, monkeypatch):
    home, here = tmp_path / "home", tmp_path / "here"
    here.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(here)
    section = {
        "type": "slurm",
        "jobqueue": {"memory": "1GB", "log_directory": "~/logs", "local_directory": "~/scratch"},
    }
    lines = job_script(ClusterConfig.model_validate(section)).splitlines()
    assert f"#SBATCH -e {home}/logs/blockpredict-worker-%J.err" in lines
    assert f"--local-directory {home}/scratch" in lines[-1]
    workflow = workflow_on(section)
    script, logs = driver_script(here / "w.yaml", workflow, [], here / "r.json")
    assert logs == home / "logs" and logs.is_dir()
    assert f"#SBATCH -e {home}/logs/blockpredict-%J.err" in script.splitlines()
    assert "~" not in script
    assert list(here.iterdir()) == []


def test_workers_retired_at_their_lifetime_are_replaced(tmp_path, slurm):
    """A run longer than the job walltime finishes: retiring workers get new jobs."""
    write_factory(tmp_path)
    data = np.random.default_rng(0).random((34, 34, 34), dtype=np.float32)
    make_input(tmp_path / "in.zarr" / "raw", data, (1, 1, 1))
    path = write_workflow(
        tmp_path / "wf.yaml",
        {
            "input": {"container": "in.zarr", "dataset": "raw"},
            "model": {"factory": "slow:build", "kwargs": {"delay": 0.8}},  # 64 blocks, ~26 s
            "output": {"container": "out.zarr", "dataset": "pred"},
            "cluster": {
                "type": "slurm",
                "n_workers": 2,
                "jobqueue": {
                    "memory": "2GB",
                    "interface": "lo",
                    "walltime": "00:00:30",  # lifetime 22 s
                    "job_script_prologue": [f"export PYTHONPATH={tmp_path}:{SRC}"],
                    "log_directory": str(tmp_path / "logs"),
                },
            },
        },
    )
    result, seen = predict_watching_squeue(
        path, tmp_path, env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), SRC])}
    )
    assert result.returncode == 0, result.stderr
    assert len(seen) >= 4, f"no replacement jobs: {sorted(seen)}"
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["blocks_processed"] == 64 and report["blocks_failed"] == 0
    x = torch.from_numpy(data)[None, None]
    expected = torch.nn.functional.avg_pool3d(x, 3, stride=1)[0, 0].numpy()
    np.testing.assert_allclose(read_output(tmp_path / "out.zarr" / "pred")[0], expected, atol=1e-6)

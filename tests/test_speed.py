"""Speed features that users rely on for correctness: worker environment, pipeline, batching.

Speed itself is measured by ``blockpredict bench``, never here.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from distributed import Client

from blockpredict.cluster import connect
from blockpredict.config import ClusterConfig
from blockpredict.environment import ALLOCATOR_ENV
from blockpredict.jobqueue import job_script
from blockpredict.submit import driver_script

VARS = (*ALLOCATOR_ENV, "OMP_NUM_THREADS", "MKL_NUM_THREADS", "BLOCKPREDICT_EXTRA")


def _read_env() -> dict[str, str | None]:
    return {name: os.environ.get(name) for name in VARS}


def test_local_workers_see_allocator_thread_and_user_variables():
    config = ClusterConfig.model_validate(
        {
            "n_workers": 2,
            "dashboard_address": ":0",
            "worker_env": {"BLOCKPREDICT_EXTRA": "yes", "MALLOC_ARENA_MAX": "2"},
        }
    )
    with connect(config) as client:
        seen = client.run(_read_env)
    assert len(seen) == 2
    for env in seen.values():
        assert env["MALLOC_MMAP_THRESHOLD_"] == "4294967296"
        assert env["MALLOC_TRIM_THRESHOLD_"] == "17179869184"  # not the nanny's 65536
        assert env["MALLOC_ARENA_MAX"] == "2"  # worker_env overrides a default
        assert env["BLOCKPREDICT_EXTRA"] == "yes"  # and adds
        assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "1"  # 2 cores, 2 workers


def test_batch_worker_and_driver_jobs_export_the_variables(tmp_path: Path):
    section = {
        "type": "slurm",
        "jobqueue": {"memory": "8GB", "job_script_prologue": ["export MALLOC_ARENA_MAX=4"]},
        "threads_per_worker": 3,
        "worker_env": {"BLOCKPREDICT_EXTRA": "a b"},
    }
    lines = job_script(ClusterConfig.model_validate(section)).splitlines()
    assert "export MALLOC_TRIM_THRESHOLD_=17179869184" in lines
    assert "export OMP_NUM_THREADS=3" in lines
    assert "export BLOCKPREDICT_EXTRA='a b'" in lines
    # the user's own prologue comes after ours, so it wins
    assert lines.index("export MALLOC_ARENA_MAX=4") > lines.index("export MALLOC_ARENA_MAX=1")
    from blockpredict.config import validate_workflow

    workflow = validate_workflow(
        {
            "input": {"container": "in.zarr", "dataset": "raw"},
            "model": {"factory": "x:y"},
            "output": {"container": "out.zarr"},
            "cluster": section,
        }
    )
    script, _ = driver_script(tmp_path / "w.yaml", workflow, [], tmp_path / "r.json")
    assert "export MALLOC_MMAP_THRESHOLD_=4294967296" in script.splitlines()
    assert "export OMP_NUM_THREADS=1" in script.splitlines()


def test_one_worker_per_gpu_each_sees_only_its_own():
    """The GPU layout, started on the CPU: each worker reads back its CUDA_VISIBLE_DEVICES."""
    from blockpredict.cluster import gpu_cluster

    config = ClusterConfig.model_validate({"dashboard_address": ":0"})
    with gpu_cluster(config, ["0", "1"], {"BLOCKPREDICT_EXTRA": "gpu"}) as cluster:  # type: ignore[attr-defined]
        with Client(cluster) as client:
            seen = client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
    assert sorted(seen.values()) == ["0", "1"]

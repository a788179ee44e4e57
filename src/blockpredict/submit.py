"""``blockpredict submit``: run ``blockpredict predict`` itself as a small batch job.

The client (and the Dask scheduler in it) then lives on a compute node, not on
the login node, and the user can log out. The driver job's header comes from
the same dask-jobqueue job class as the workers', with 1 core and no GPU.
"""

from __future__ import annotations

import asyncio
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .config import Workflow
from .environment import export_lines, worker_environment
from .errors import ConfigError
from .jobqueue import cluster_class, expand_user_paths

# worker-only options that must not shape the driver job
WORKER_ONLY = {
    "processes",
    "cores",
    "memory",
    "job_cpu",
    "job_mem",
    "resource_spec",
    "worker_extra_args",
    "worker_command",
    "nanny",
    "interface",
    "protocol",
    "security",
    "shared_temp_directory",
    "scheduler_options",
    "death_timeout",
    "job_name",
    "name",
    "n_workers",
}


@dataclass(frozen=True)
class Submission:
    job_id: str
    script: Path
    log_directory: Path
    report: Path


def driver_script(
    workflow_path: Path,
    workflow: Workflow,
    overrides: list[str],
    report: Path,
    memory: str = "4GB",
) -> tuple[str, Path]:
    """The driver job script and its log folder."""
    config = workflow.cluster
    if not config.is_batch:
        raise ConfigError(
            f"submit needs a batch cluster, not {config.type!r}",
            "cluster.type",
            "use slurm, lsf, pbs or sge (or run blockpredict predict)",
        )
    options = expand_user_paths({k: v for k, v in config.jobqueue.items() if k not in WORKER_ONLY})
    log_directory = Path(options.pop("log_directory", workflow_path.parent / "blockpredict-logs"))
    log_directory = log_directory.resolve()
    job_cls = cluster_class(config.type).job_cls
    # the driver job plans and writes the ledger: the workers' allocator, one thread
    options["job_script_prologue"] = [
        *export_lines(worker_environment(1, config.worker_env)),
        *options.get("job_script_prologue", []),
    ]
    job = job_cls(
        scheduler="tcp://driver:0",
        name="blockpredict",
        cores=1,
        memory=memory,
        job_name="blockpredict",
        log_directory=str(log_directory),
        python=sys.executable,
        **options,
    )
    command = [
        sys.executable,
        "-m",
        "blockpredict.cli",
        "predict",
        str(workflow_path.resolve()),
        *[a for o in overrides for a in ("--set", o)],
        "--report",
        str(report),
        "--no-progress",
    ]
    # dask-jobqueue's script (header, prologue) with predict in place of the worker command
    lines = job.job_script().rstrip("\n").splitlines()
    lines[-1] = shlex.join(command)
    return "\n".join(lines) + "\n", log_directory


def submit(
    workflow_path: Path, workflow: Workflow, overrides: list[str], report: Path | None
) -> Submission:
    """Write the driver job script next to the workflow and submit it."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    report = (report or workflow_path.parent / f"blockpredict-report-{stamp}.json").resolve()
    script, log_directory = driver_script(workflow_path, workflow, overrides, report)
    log_directory.mkdir(parents=True, exist_ok=True)
    path = (workflow_path.parent / f"blockpredict-submit-{stamp}.sh").resolve()
    path.write_text(script)
    job_cls = cluster_class(workflow.cluster.type).job_cls
    job = job_cls(scheduler="tcp://driver:0", name="blockpredict", cores=1, memory="1GB")
    try:
        out = asyncio.run(job._submit_job(str(path)))
    except (OSError, RuntimeError) as e:
        raise ConfigError(
            f"submitting the job failed: {str(e).strip().splitlines()[-1]}",
            str(path),
            f"check that {job_cls.submit_command} works here",
        ) from None
    return Submission(job._job_id_from_submit_output(out), path, log_directory, report)

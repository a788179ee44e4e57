"""Batch clusters (SLURM, LSF, PBS, SGE) through dask-jobqueue.

The job scripts are dask-jobqueue's; what differs per scheduler here is data:
the GPU request directive and the command that shows job states. Options under
``cluster.jobqueue`` pass through to the dask-jobqueue cluster class.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import os
import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from distributed import Client

from .cluster import DASHBOARD_LATER
from .config import ClusterConfig
from .environment import export_lines, worker_environment
from .errors import BlockpredictError, ConfigError

logger = logging.getLogger(__name__)

CLUSTER_CLASSES = {
    "slurm": "SLURMCluster",
    "lsf": "LSFCluster",
    "pbs": "PBSCluster",
    "sge": "SGECluster",
}
GPU_DIRECTIVES = {
    "slurm": "--gres=gpu:{n}",
    "lsf": '-gpu "num={n}"',
    "pbs": "-l ngpus={n}",
    "sge": "-l gpu={n}",
}
STATUS_COMMANDS = {
    "slurm": ["squeue", "-h", "-o", "%i %T %r", "-j"],
    "lsf": ["bjobs", "-w"],
    "pbs": ["qstat", "-f"],
    "sge": ["qstat", "-j"],
}
DEFAULT_DIR = Path("~/.blockpredict")
# folders the user may write as ~/...: neither dask-jobqueue nor the batch header expands them
USER_PATHS = ("log_directory", "local_directory", "shared_temp_directory")
GPU_PRELOAD = "blockpredict.gpu_preload"


class WorkersMissingError(BlockpredictError, TimeoutError):
    """No worker joined the scheduler in time."""


def cluster_class(kind: str) -> type:
    """The dask-jobqueue cluster class for a scheduler, imported only when used."""
    import dask_jobqueue

    return getattr(dask_jobqueue, CLUSTER_CLASSES[kind])


def accepted_options(cls: type) -> set[str]:
    """Keyword arguments a dask-jobqueue cluster class (and its job class) takes."""
    names: set[str] = set()
    for klass in (*cls.__mro__, *cls.job_cls.__mro__):
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for p in inspect.signature(init).parameters.values():
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "self":
                names.add(p.name)
    return names


def expand_user_paths(options: dict[str, Any]) -> dict[str, Any]:
    """The options with ``~`` expanded in their folders (``~/logs``, never a folder named ``~``)."""
    return {
        k: os.path.expanduser(str(v)) if k in USER_PATHS and v is not None else v
        for k, v in options.items()
    }


def cluster_options(config: ClusterConfig) -> dict[str, Any]:
    """dask-jobqueue keyword arguments: the user's, plus GPUs, lifetime, TLS and logs."""
    cls = cluster_class(config.type)
    options = expand_user_paths(config.jobqueue)
    known = accepted_options(cls)
    for key in options:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            raise ConfigError(
                f"unknown {CLUSTER_CLASSES[config.type]} option {key!r}",
                "cluster.jobqueue",
                f"did you mean {close[0]!r}?" if close else "see the dask-jobqueue docs",
            )
    if "memory" not in options:
        raise ConfigError("missing memory per job", "cluster.jobqueue", "add memory: e.g. '16GB'")
    if config.gpus_per_job:
        options["processes"] = config.gpus_per_job  # one worker per GPU
        directive = GPU_DIRECTIVES[config.type].format(n=config.gpus_per_job)
        extra = list(options.get("job_extra_directives", []))
        if not any("gpu" in d for d in extra):
            extra.append(directive)
        options["job_extra_directives"] = extra
        # each worker process keeps only its own GPU (CUDA_VISIBLE_DEVICES), as local workers do
        options["worker_extra_args"] = [
            *options.get("worker_extra_args", []),
            "--preload",
            GPU_PRELOAD,
        ]
    options.setdefault("processes", 1)
    # allocator and thread variables before the worker starts; the user's prologue comes after
    gpu = config.gpus_per_job > 0
    env = worker_environment(config.threads_per_worker, config.worker_env, gpu=gpu)
    options["job_script_prologue"] = [
        *export_lines(env),
        *options.get("job_script_prologue", []),
    ]
    options.setdefault("cores", options["processes"] * config.threads_per_worker)
    options.setdefault("log_directory", str(Path("blockpredict-logs").resolve()))
    options.setdefault("job_name", "blockpredict-worker")
    walltime = options.get("walltime") or _default_walltime(config.type)
    if walltime:
        options["worker_extra_args"] = [
            *options.get("worker_extra_args", []),
            *lifetime_args(parse_walltime(walltime)),
        ]
    if config.tls:
        options["security"] = True  # per-run temporary certificates
        tls_dir = Path(options.pop("shared_temp_directory", DEFAULT_DIR / "tls")).expanduser()
        tls_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        options["shared_temp_directory"] = str(tls_dir)
    scheduler = dict(options.pop("scheduler_options", {}))
    scheduler.setdefault("dashboard_address", config.dashboard_address)
    scheduler.update(DASHBOARD_LATER)  # connected once the run is under way
    options["scheduler_options"] = scheduler
    return options


def _default_walltime(kind: str) -> str | None:
    import dask

    return dask.config.get(f"jobqueue.{kind}.walltime", None)


def parse_walltime(text: str) -> int:
    """Seconds of ``[D-]HH:MM[:SS]`` (SLURM, PBS, SGE) or ``HH:MM`` (LSF)."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+):(\d+)(?::(\d+))?", str(text).strip())
    if match is None:
        raise ConfigError(
            f"cannot read walltime {text!r}", "cluster.jobqueue.walltime", "write HH:MM:SS"
        )
    days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
    return days * 86400 + hours * 3600 + minutes * 60 + seconds


def lifetime_args(walltime: int) -> list[str]:
    """Workers retire before the job's walltime, staggered, so adaptive mode replaces them."""
    margin = max(min(60, walltime // 4), walltime // 10)
    stagger = max(1, walltime // 20)
    lifetime = max(1, walltime - margin - stagger)
    return ["--lifetime", f"{lifetime}s", "--lifetime-stagger", f"{stagger}s"]


def job_script(config: ClusterConfig) -> str:
    """The worker job script dask-jobqueue would submit for this config."""
    cls = cluster_class(config.type)
    with cls(**cluster_options(config)) as cluster:
        return cluster.job_script()


@contextmanager
def batch_cluster(config: ClusterConfig) -> Iterator[Client]:
    """Start a dask-jobqueue cluster, wait for its first worker, and yield a client."""
    cls = cluster_class(config.type)
    options = cluster_options(config)
    try:
        cluster = cls(**options)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e).splitlines()[0], "cluster.jobqueue", "fix the option") from None
    with cluster, Client(cluster) as client:
        minimum, maximum = (
            (config.adapt.minimum, config.adapt.maximum)
            if config.adapt
            else (config.n_workers, config.n_workers)
        )
        # adaptive even at a fixed size: workers retired at their lifetime are replaced
        cluster.adapt(minimum=max(minimum, 1), maximum=maximum)
        logger.info("submitted %s worker jobs; logs in %s", config.type, options["log_directory"])
        try:
            client.wait_for_workers(1, timeout=config.worker_timeout)
        except TimeoutError:
            raise WorkersMissingError(
                f"no worker arrived within {config.worker_timeout:g} s; "
                f"job states: {job_states(config.type, cluster)}",
                f"logs in {options['log_directory']}",
                "check the queue, the job logs, and cluster.jobqueue (or raise worker_timeout)",
            ) from None
        yield client


def job_states(kind: str, cluster: Any) -> str:
    """What the batch scheduler says about this cluster's jobs, on one line."""
    ids = [job.job_id for job in cluster.workers.values() if getattr(job, "job_id", None)]
    if not ids:
        return "no job was submitted"
    try:
        out = subprocess.run(
            [*STATUS_COMMANDS[kind], ",".join(ids)], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"jobs {', '.join(ids)} ({type(e).__name__} running {STATUS_COMMANDS[kind][0]})"
    text = re.sub(r"\s+", " ", (out.stdout or out.stderr).strip())
    return text[:300] or f"jobs {', '.join(ids)} not known to {STATUS_COMMANDS[kind][0]}"

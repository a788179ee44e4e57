"""The environment worker processes start with: an allocator that keeps its pages, and threads.

A CPU forward of a 108^3 U-Net spends about half its time page-faulting the
large buffers glibc mmaps and unmaps on every call (DESIGN.md, measured facts):
1.07 s per forward with glibc's defaults, 0.54 s with the variables below, and
Dask's nanny makes it worse by starting workers with
``MALLOC_TRIM_THRESHOLD_=65536``. The cost: a worker keeps its peak memory.

CPU workers on Linux run mimalloc (the ``cmeel-mimalloc`` wheel, a dependency),
preloaded with ``LD_PRELOAD`` and told to keep its memory (``MIMALLOC_PURGE_DELAY=-1``)
and not to ask for transparent huge pages (with them a first forward took 1.8-2.1 s
instead of 1.2-1.3 s). It reuses a forward's buffers by size class, where glibc's one
heap fragments as the pipeline's reads and writes interleave with the forward: in a loop
that keeps each output a while, a worker's first forward touched 98,000 new pages
instead of 141,000-151,000, and its memory stayed at 878 MB instead of growing to
980-1,250 MB. In the engine each worker's first four forwards took 1.0-1.4 s longer than
its later ones (median 1.2 s) instead of 1.0-2.5 s (median 1.6 s), 5 runs each in turns
on the development machine; later forwards took as long, and the output was the same to
the bit. glibc's variables stay set: they apply wherever the library cannot be preloaded
(not Linux, a batch node without the client's Python environment). A user's own
``LD_PRELOAD`` (in ``worker_env``, or already in the environment) wins; ``worker_env:
{LD_PRELOAD: ""}`` runs glibc. jemalloc with ``dirty_decay_ms:-1`` measured like glibc
keeping its pages (0.55 s a forward) and is not a Python package.

GPU workers run glibc, keeping the pages but not the single arena (mimalloc was not
measured on a GPU). Their forward's buffers live on the device, and their host work is
reading, decoding and writing in several threads at once (the pipeline's I/O threads
and zarrs' pool), which one arena serializes: on an H100 with 16 cores, a 108^3 block's
read took 12 ms (p50) with ``MALLOC_ARENA_MAX=1`` and 3.3 ms without, and the engine's
steady rate went from 0.30 to 0.41 of the bare forward. On the CPU under glibc the
single arena stays: a non-main arena's heap is at most 64 MiB, so a forward in a thread
of its own would mmap its large buffers again (a 108^3 forward's p50 took 1.8 s with
one arena against 2.6-3.1 s with 16, in the engine on 2 cores).

These variables must be set before the worker process starts, so local clusters get
them through ``distributed.nanny.pre-spawn-environ`` (and the warm start's forkserver
as it starts), and batch jobs (workers and the driver) as ``export`` lines before the
command. ``cluster.worker_env`` adds to or overrides them.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import shlex
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import ClusterConfig

# glibc: one arena, no mmap for large buffers, never give memory back to the system
ALLOCATOR_ENV = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_THRESHOLD_": "4294967296",
    "MALLOC_TRIM_THRESHOLD_": "17179869184",
}
# mimalloc, preloaded into CPU workers: memory kept, no transparent huge pages
MIMALLOC_ENV = {"MIMALLOC_PURGE_DELAY": "-1", "MIMALLOC_ALLOW_THP": "0"}
# what a process reads only as it starts (a warm start's forkserver fixes them for its forks)
START_VARS = (*ALLOCATOR_ENV, "LD_PRELOAD", *MIMALLOC_ENV)
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
# Dask's statistical profiler samples every worker thread each 10 ms; a task that secedes
# (every task does: see tasks.py) ends its thread, which races the sampler into a logged
# KeyError. The dashboard's Profile tab stays empty; the blockpredict page shows the phases.
# Dask's housekeeping wakes every event loop (scheduler, nannies, workers) 50 times a
# second to measure its own responsiveness (the tick), and samples memory and the system
# 10 and 2 times a second: an idle 2-worker cluster cost the client process 6-8% of a core
# and each worker 2-3%, taken from the forwards on a CPU. With these intervals (the tick
# as Dask's own test suite sets it) it cost 1.5% and 0.5%. The dashboard's system charts
# update every 2 s; memory is still checked twice a second.
# Batch jobs get these as variables; a nanny sends its own Dask config to its worker, so
# local clusters get them as config (nanny_environment).
DASK_CONFIG = {
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "500ms",
    "distributed.admin.system-monitor.interval": "2s",
    "distributed.worker.memory.monitor-interval": "500ms",
}
DASK_ENV = {  # the same settings as Dask reads them from the environment
    "DASK_" + key.upper().replace(".", "__").replace("-", "_"): str(value)
    for key, value in DASK_CONFIG.items()
}
PRE_SPAWN = "distributed.nanny.pre-spawn-environ"


def torch_threads(config: ClusterConfig) -> int:
    """Torch threads per worker on the CPU: the worker's share of the cores.

    A worker runs one forward at a time (its pipeline's forward stage), whatever its
    Dask threads, so a local worker's share is ``cores // n_workers``.
    """
    if config.type != "local":
        return config.threads_per_worker  # a batch job's cores are its workers' threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // config.n_workers)


@functools.cache
def mimalloc_library() -> str | None:
    """The mimalloc library installed with blockpredict, where a worker can preload it
    (Linux); else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        dist = importlib.metadata.distribution("cmeel-mimalloc")
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file("cmeel.prefix/lib/libmimalloc.so")))
    return str(path) if path.is_file() else None


def allocator_environment(gpu: bool = False) -> dict[str, str]:
    """The allocator a worker starts with: glibc keeping its pages (on a GPU with its
    arenas), and on the CPU mimalloc preloaded over it, unless a preload is already set."""
    glibc = {k: v for k, v in ALLOCATOR_ENV.items() if not (gpu and k == "MALLOC_ARENA_MAX")}
    library = None if gpu else mimalloc_library()
    # a preload of the user's own wins (ours may be left here by an earlier cluster's nanny)
    if library is None or os.environ.get("LD_PRELOAD", library) != library:
        return glibc
    return {**glibc, "LD_PRELOAD": library, **MIMALLOC_ENV}


def worker_environment(
    threads: int, overrides: Mapping[str, str] | None = None, gpu: bool = False
) -> dict[str, str]:
    """Allocator and thread variables for a worker whose torch uses ``threads`` threads
    (on a GPU glibc without the single arena, see above)."""
    env = {**allocator_environment(gpu), **DASK_ENV}
    env.update(dict.fromkeys(THREAD_VARS, str(max(1, threads))))
    env.update(overrides or {})
    return env


@contextmanager
def nanny_environment(env: Mapping[str, str]) -> Iterator[None]:
    """Nannies created inside this block start their workers with ``env`` (and
    ``DASK_CONFIG``).

    The nanny reads ``pre-spawn-environ`` when it is created, preferring this process's
    variables to the config's values: so ``env`` is also set here for the block. Else a
    variable exported in the shell, or left by an earlier cluster's nanny in this process
    (it sets them for good), wins: workers started with Dask's ``MALLOC_TRIM_THRESHOLD_``
    of 65536, or a second run's ``worker_env`` was ignored. A restart uses the values the
    nanny captured, so a worker restarted after a hung block gets the same environment.
    """
    import dask  # here, not at import: the warm start's forkserver starts before Dask loads

    merged = {**dask.config.get(PRE_SPAWN, {}), **env}
    with dask.config.set({PRE_SPAWN: merged, **DASK_CONFIG}), process_environment(env):
        yield


@contextmanager
def process_environment(env: Mapping[str, str]) -> Iterator[None]:
    """This process's environment with ``env`` set, restored after the block: what a
    process started inside it inherits."""
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def export_lines(env: Mapping[str, str]) -> list[str]:
    """``export NAME=value`` lines for a job script's prologue. A preloaded library is
    exported only where the node has it (a node without the client's Python environment
    would print ld.so's error for every command of the job)."""
    lines = []
    for name, value in env.items():
        line = f"export {name}={shlex.quote(value)}"
        if name == "LD_PRELOAD" and value and not any(c in value for c in ": "):
            line = f"if [ -e {shlex.quote(value)} ]; then {line}; fi"
        lines.append(line)
    return lines

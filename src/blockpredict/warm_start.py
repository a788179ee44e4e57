"""Local workers forked from a process that already imported torch: a warm start.

A worker process spawned fresh imports Python, Dask and torch before it can load the
model: 2-3 s of CPU per worker on the development machine (more for a CUDA build of
torch), started only once the client has imported torch itself and started the
cluster, one after the other. Instead, as soon as the workflow is read
(:func:`begin_for`), multiprocessing's forkserver starts and imports the workers'
modules once, on a core the client leaves idle while it imports its own; each local
worker is then a fork of it, and a worker restarted after a hung block too.

What a process reads only as it starts is fixed in the forkserver: the allocator
(mimalloc's preload and variables, glibc's variables), and whatever a user's
``worker_env`` sets (``LD_PRELOAD`` for another allocator, say). So the forkserver
starts with the workers' environment
(:func:`~blockpredict.environment.worker_environment`: a GPU worker's where a GPU is
likely, see :func:`cpu_cluster`), and a cluster whose workers need other such values (another
``worker_env``, or CPU workers after GPU ones, in the same Python process) spawns them
as before. Each worker still gets its whole environment from its nanny as it starts,
and torch's threads are set by the worker (``torch.set_num_threads``), so clusters of
different sizes share the forkserver. GPU workers fork from it too: the forkserver
imports torch but never starts CUDA (nothing it imports touches a GPU), and each GPU
worker's nanny sets its ``CUDA_VISIBLE_DEVICES`` as the process starts, before its
torch starts CUDA to load the model. A fork never inherits a CUDA context.

The forkserver and its forks ignore SIGINT from their start (a terminal's Ctrl-C
reaches the driver alone), and the forkserver is killed when the process that started
it exits: a run that stops on bad input before its cluster starts must not leave it
importing torch, holding the command's output pipes open.
"""

from __future__ import annotations

import atexit
import glob
import importlib.util
import logging
import multiprocessing
import multiprocessing.forkserver as forkserver
import os
import signal
from collections.abc import Iterable, Mapping

from .config import ClusterConfig
from .environment import START_VARS, process_environment, torch_threads, worker_environment
from .worker_signals import workers_ignore_sigint

logger = logging.getLogger(__name__)

# what a worker imports before its first block (the rest of blockpredict comes with these)
PRELOAD = ["torch", "blockpredict.worker", "blockpredict.worker_signals"]
METHOD = "distributed.worker.multiprocessing-method"

_started_with: dict[str, str] | None = None  # the forkserver's environment, once started
_started_user: set[str] = set()  # the variables a user's worker_env set in it


def cpu_cluster(config: ClusterConfig) -> bool:
    """A local cluster whose workers run on the CPU, told without importing torch.

    ``device: auto`` counts as the CPU unless a GPU device file exists and torch is a
    GPU build; the cluster decides again, with torch, when it starts (where the two
    disagree, its workers spawn).
    """
    if config.type != "local" or config.device == "cuda":
        return False
    return config.device == "cpu" or not _gpu_likely()


def _gpu_likely() -> bool:
    """A GPU device file, GPUs not hidden, and a GPU build of torch (its CUDA or ROCm
    library), told without importing torch."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "0").strip() in ("", "-1"):
        return False
    if not (glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/kfd")):
        return False
    spec = importlib.util.find_spec("torch")
    folders = list(spec.submodule_search_locations or []) if spec else []
    libraries = ("libtorch_cuda.so", "libtorch_hip.so")
    return any(os.path.exists(os.path.join(f, "lib", name)) for f in folders for name in libraries)


def local_environment(config: ClusterConfig) -> dict[str, str]:
    """The environment a local cluster's workers start with (a GPU worker's where a GPU is
    likely: the cluster decides with torch, later)."""
    threads = torch_threads(config)
    return worker_environment(threads, config.worker_env, gpu=not cpu_cluster(config))


def begin_for(config: ClusterConfig) -> None:
    """Start the forkserver now if this run's workers will be local workers, so that
    their imports overlap the client's."""
    if config.type == "local":
        begin(local_environment(config), config.worker_env)


def begin(env: Mapping[str, str], user: Iterable[str] = ()) -> bool:
    """Start the forkserver with ``env`` unless it runs; whether workers forked from it
    start as ``env`` asks (the allocator variables and the ``user``'s variables agree)."""
    global _started_with, _started_user
    if "forkserver" not in multiprocessing.get_all_start_methods():  # Windows
        return False
    if _started_with is None:
        forkserver.set_forkserver_preload(PRELOAD)
        try:
            # the forkserver inherits this environment, and SIGINT ignored, which its
            # forks keep from their first instruction (a terminal's Ctrl-C is the driver's)
            with process_environment(env), workers_ignore_sigint():
                forkserver.ensure_running()
        except OSError as e:  # workers spawn as before
            logger.debug("no forkserver: %s", e)
            return False
        _started_with, _started_user = dict(env), set(user)
        atexit.register(_stop)
        logger.debug("forkserver %s started for local workers", _pid())
    fixed = {*START_VARS, *_started_user, *user}
    return all(_started_with.get(name) == env.get(name) for name in fixed)


def _stop() -> None:
    """Kill the forkserver (at exit; the workers it forked are gone or on their own)."""
    pid = _pid()
    if pid is not None:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def _pid() -> int | None:
    """The forkserver's process id (multiprocessing keeps it on its private singleton)."""
    return getattr(getattr(forkserver, "_forkserver", None), "_forkserver_pid", None)

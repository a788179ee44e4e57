"""Build the Dask client a run talks to, from the ``cluster`` section.

A local cluster listens on loopback only; batch clusters (see ``jobqueue``)
use TLS with per-run certificates; ``address`` joins a running scheduler.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

import dask
from distributed import Client, LocalCluster

from . import warm_start
from .config import ClusterConfig
from .environment import nanny_environment, torch_threads, worker_environment
from .errors import ConfigError
from .worker_signals import worker_preloads, workers_ignore_sigint

logger = logging.getLogger(__name__)

# The schedulers blockpredict starts (local, GPU and batch) open their HTTP server at
# once but connect Dask's Bokeh dashboard only once the run is under way
# (attach_dashboard): importing Bokeh took about 0.6 s that the first block waited for.
DASHBOARD_LATER = {"dashboard": False}


@contextmanager
def connect(config: ClusterConfig) -> Iterator[Client]:
    """A client to a new local cluster (loopback only) or an existing scheduler."""
    if config.type == "address":
        try:
            client = Client(config.address, timeout="10s")
        except OSError as e:
            raise ConfigError(
                f"no Dask scheduler answers at {config.address}: {e}",
                "cluster.address",
                "start the scheduler or fix the address",
            ) from None
        try:
            yield client
        finally:
            client.close()
        return
    if config.is_batch:
        from .jobqueue import batch_cluster

        with batch_cluster(config) as client:
            yield client
        return
    if config.device == "cuda" and not _has_cuda():
        raise ConfigError(
            "cluster.device is cuda but no GPU is visible", "cluster.device", "use auto or cpu"
        )
    gpus = local_gpus(config)
    env = worker_environment(torch_threads(config), config.worker_env, gpu=bool(gpus))
    # workers fork from a process that already imported torch (started early by the CLI,
    # else now), for this run's restarts too
    warm = warm_start.begin(env, config.worker_env)
    method = {warm_start.METHOD: "forkserver"} if warm else {}
    if warm:
        _keep_forkserver_preload()
    with dask.config.set(method):  # for the cluster's start and every restart
        # workers ignore a terminal's Ctrl-C (it reaches the driver only), restarted ones
        # too (a preload), and get their allocator and thread variables before each starts
        with workers_ignore_sigint(), nanny_environment(env):
            if gpus:
                cluster = gpu_cluster(config, gpus, env)
            else:
                cluster = LocalCluster(
                    n_workers=config.n_workers,
                    threads_per_worker=config.threads_per_worker,
                    processes=True,
                    host="127.0.0.1",
                    dashboard_address=loopback(config.dashboard_address),
                    scheduler_kwargs=DASHBOARD_LATER,
                    silence_logs=logging.ERROR,
                    env=env,  # wins over variables already set in this process
                    preload=worker_preloads(),
                )
        with cluster, Client(cluster) as client:
            yield client


def _keep_forkserver_preload() -> None:
    """Stop distributed from setting the forkserver's preload as its first worker starts.

    It would import pandas and lz4 in this process only to list them (0.3-0.5 s on the
    event loop, before the second nanny starts), for a forkserver that runs already
    with the warm start's preload, which stays (``warm_start.PRELOAD``).
    """
    import distributed.utils

    if hasattr(distributed.utils, "_forkserver_preload_set"):  # a private flag of theirs
        distributed.utils._forkserver_preload_set = True


def attach_dashboard(client: Client) -> None:
    """Dask's dashboard, with our page, on the scheduler this process started without it.

    Called once the run is under way (``runner.run``'s ``under_way``). Imports Bokeh here,
    in the calling thread, and connects the dashboard on the scheduler's event loop; a
    scheduler of another process (``type: address``) or one that has its dashboard is
    left alone.
    """
    scheduler = getattr(getattr(client, "cluster", None), "scheduler", None)
    application = getattr(scheduler, "http_application", None)
    if application is None or application.applications:  # not ours, or connected
        return
    from .dashboard import install

    if not install():  # Bokeh missing: the server's plain routes stay
        return
    from distributed.dashboard.scheduler import connect as connect_dashboard

    async def attach() -> None:  # on the loop: Bokeh's server takes the current IOLoop
        connect_dashboard(application, scheduler.http_server, scheduler, prefix="/")

    client.sync(attach)


def loopback(address: str) -> str:
    """``:8787`` (all interfaces, for Dask) -> ``127.0.0.1:8787``: a local cluster stays local."""
    return "127.0.0.1" + address if address.startswith(":") else address


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


from distributed import SpecCluster  # noqa: E402 (used by the GPU layout below)


def local_gpus(config: ClusterConfig) -> list[str]:
    """The GPUs local workers use, one worker each: all visible, or the first ``n_workers``."""
    if config.device == "cpu" or not _has_cuda():
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    import torch

    gpus = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    if "n_workers" in config.model_fields_set:
        gpus = gpus[: config.n_workers]
    return gpus


def gpu_worker_spec(
    gpus: list[str], threads_per_worker: int, env: dict[str, str]
) -> dict[str, dict[str, object]]:
    """One nanny per GPU, each seeing only its own (``CUDA_VISIBLE_DEVICES``), as dask-cuda does."""
    from distributed import Nanny

    return {
        f"gpu-{gpu}": {
            "cls": Nanny,
            "options": {
                "nthreads": threads_per_worker,
                "host": "127.0.0.1",
                "silence_logs": logging.ERROR,
                "env": {**env, "CUDA_VISIBLE_DEVICES": gpu},
                "preload": worker_preloads(),
            },
        }
        for gpu in gpus
    }


def gpu_cluster(config: ClusterConfig, gpus: list[str], env: dict[str, str]) -> SpecCluster:
    """A local cluster of one worker process per GPU."""
    from distributed import Scheduler

    scheduler = {
        "cls": Scheduler,
        "options": {
            "host": "127.0.0.1",
            "dashboard_address": config.dashboard_address,
            **DASHBOARD_LATER,
        },
    }
    workers = gpu_worker_spec(gpus, config.threads_per_worker, env)
    return SpecCluster(workers=workers, scheduler=scheduler, silence_logs=logging.ERROR)

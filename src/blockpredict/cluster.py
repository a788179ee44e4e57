"""Build the Dask client a run talks to, from the ``cluster`` section.

A local cluster listens on loopback only; batch clusters (see ``jobqueue``)
use TLS with per-run certificates; ``address`` joins a running scheduler.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager

from distributed import Client, LocalCluster

from .config import ClusterConfig
from .errors import ConfigError

logger = logging.getLogger(__name__)


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
    with _workers_ignore_sigint():  # a terminal's Ctrl-C reaches the driver only
        cluster = LocalCluster(
            n_workers=config.n_workers,
            threads_per_worker=config.threads_per_worker,
            processes=True,
            host="127.0.0.1",
            dashboard_address=loopback(config.dashboard_address),
            silence_logs=logging.ERROR,
        )
    with cluster, Client(cluster) as client:
        yield client


def loopback(address: str) -> str:
    """``:8787`` (all interfaces, for Dask) -> ``127.0.0.1:8787``: a local cluster stays local."""
    return "127.0.0.1" + address if address.startswith(":") else address


@contextmanager
def _workers_ignore_sigint() -> Iterator[None]:
    """Start worker processes with SIGINT ignored (they inherit it across exec).

    Ctrl-C in a terminal signals the whole process group; the driver alone
    decides how a run stops (see the runner), so workers must not die of it.
    """
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: workers are not in a terminal's group then
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def torch_threads(config: ClusterConfig) -> int:
    """Torch threads per worker task on the CPU: the worker's share of the cores."""
    if config.type != "local":
        return config.threads_per_worker  # a batch job's cores are its workers' threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    share = (cores or 1) // (config.n_workers * config.threads_per_worker)
    return max(1, share)

"""Worker preload for batch jobs with several GPUs: each worker process sees only its own GPU.

dask-jobqueue starts one ``dask worker --nworkers N`` per job, and the batch
scheduler gives the job its N GPUs in ``CUDA_VISIBLE_DEVICES``, so every worker
process of the job would see all of them. As dask-cuda's ``LocalCUDACluster``
does for local workers (and ``cluster.gpu_worker_spec`` here), each process
keeps only its own: the i-th GPU for the worker named ``...-i`` (``dask worker``
appends the process number to the name). A preload runs when the worker process
starts, before torch initializes CUDA, so the worker's model lands on
``cuda:0``, its own GPU.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

logger = logging.getLogger(__name__)

MODULE = __name__  # for ``dask worker --preload``


def own_gpu(visible: str | None, worker_name: str) -> str | None:
    """The entry of ``visible`` (a ``CUDA_VISIBLE_DEVICES`` list) this worker keeps, or None
    where there is nothing to choose (no list, one GPU, or no process number in the name)."""
    gpus = [g for g in (visible or "").split(",") if g.strip()]
    match = re.search(r"-(\d+)$", worker_name)
    if len(gpus) < 2 or match is None:
        return None
    return gpus[int(match.group(1)) % len(gpus)].strip()


def dask_setup(worker: Any) -> None:
    """Narrow this worker process's ``CUDA_VISIBLE_DEVICES`` to its own GPU."""
    gpu = own_gpu(os.environ.get("CUDA_VISIBLE_DEVICES"), str(worker.name))
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
        logger.info("worker %s: GPU %s", worker.name, gpu)

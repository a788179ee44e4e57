"""Client side of a run: stream block ids to Dask with a bounded window.

Only block ids travel through the scheduler. At most ``window`` futures exist
at any time, so client memory does not grow with the number of blocks. A block
that raises is resubmitted (on any worker) up to ``max_retries`` times.
"""

from __future__ import annotations

import logging
import math
import sys
import time
import uuid
from collections.abc import Iterator

from distributed import Client, as_completed
from tqdm import tqdm

from .report import FailedBlock, RunReport
from .worker import PLUGIN_NAME, BlockResult, Job, ModelPlugin, process_block

logger = logging.getLogger(__name__)


def run(client: Client, job: Job, max_retries: int, progress: bool = True) -> RunReport:
    """Process every block of ``job.plan`` on ``client``'s workers."""
    plan = job.plan
    report = RunReport(
        blocks_total=plan.num_blocks,
        output_roi={"offset": list(plan.output_roi.offset), "shape": list(plan.output_roi.shape)},
        output_voxel_size=list(plan.output_voxel_size),
        output_path=job.output.path,
    )
    start = time.perf_counter()
    client.register_plugin(ModelPlugin(job), name=PLUGIN_NAME)
    workers = client.scheduler_info(n_workers=-1)["workers"]
    report.workers = len(workers)
    threads = sum(w["nthreads"] for w in workers.values()) or 1
    window = max(4, 2 * threads)
    phases = {"read": 0.0, "compute": 0.0, "write": 0.0}
    bar = tqdm(
        total=plan.num_blocks, unit="block", disable=not progress, file=sys.stderr, smoothing=0.1
    )
    token = uuid.uuid4().hex[:8]
    ids: Iterator[int] = iter(range(plan.num_blocks))
    attempts: dict[int, int] = {}
    futures = as_completed()
    owner: dict[str, int] = {}

    def submit(block_id: int) -> None:
        attempt = attempts.get(block_id, 0)
        key = f"block-{token}-{block_id}-{attempt}"
        future = client.submit(process_block, block_id, key=key, pure=False)
        owner[future.key] = block_id
        futures.add(future)

    for block_id in _take(ids, window):
        submit(block_id)
    for future in futures:
        block_id = owner.pop(future.key)
        if future.status == "finished":
            result: BlockResult = future.result()
            for phase in phases:
                phases[phase] += getattr(result, phase)
            report.blocks_processed += 1
            bar.update(1)
        else:
            error = _describe(future.exception())
            attempts[block_id] = attempts.get(block_id, 0) + 1
            if attempts[block_id] <= max_retries:
                report.retries += 1
                logger.warning("block %d failed (%s); retrying", block_id, error)
                submit(block_id)
                continue
            _record_failure(report, job, block_id, error)
            bar.update(1)
        future.release()
        for next_id in _take(ids, 1):
            submit(next_id)
    bar.close()
    report.wall_seconds = time.perf_counter() - start
    voxels = report.blocks_processed / max(1, plan.num_blocks) * math.prod(plan.output_shape)
    report.output_voxels_per_second = voxels / max(report.wall_seconds, 1e-9)
    report.phase_seconds = {k: round(v, 3) for k, v in phases.items()}
    return report


def _take(ids: Iterator[int], n: int) -> list[int]:
    taken = []
    for block_id in ids:
        taken.append(block_id)
        if len(taken) == n:
            break
    return taken


def _describe(exception: BaseException | None) -> str:
    if exception is None:
        return "unknown error"
    text = str(exception).strip().splitlines()
    return f"{type(exception).__name__}: {text[0] if text else ''}".rstrip(": ")


def _record_failure(report: RunReport, job: Job, block_id: int, error: str) -> None:
    block = job.plan.block(block_id)
    report.blocks_failed += 1
    report.failed_blocks.append(
        FailedBlock(
            id=block_id,
            index=list(block.index),
            write_roi={"offset": list(block.write_roi.offset), "shape": list(block.write_roi.shape)},
            error=error,
        )
    )
    logger.error("block %d failed after retries: %s", block_id, error)

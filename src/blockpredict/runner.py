"""Client side of a run: stream block ids to Dask with a bounded window.

Only block ids travel through the scheduler. At most ``window`` tasks exist at
any time, so client memory does not grow with the number of blocks beyond the
ledger. Blocks go out in Morton order, ``blocks_per_task`` adjacent blocks per
task. A failed block is resubmitted (on any worker) up to ``max_retries``
times; the ledger records a block only after its write returned.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from itertools import islice

import numpy as np
from distributed import Client, WorkerPlugin, as_completed

from .config import ExecutionConfig
from .events import EventLog, events_path
from .job import BlockResult, Job, describe
from .ledger import DONE, FAILED, Ledger
from .live import LiveState, publish
from .loading import Loading, start_loading
from .observe import Observers, RunObserver
from .order import morton_order
from .progress import Progress
from .report import FailedBlock, PhaseTimes, RunReport
from .signals import stop_on_signals
from .sizing import TaskSizer
from .tasks import kill_this_worker, process_blocks, running_blocks
from .words import plural
from .worker import ModelPlugin

logger = logging.getLogger(__name__)

# ``under_way`` waits for the first finished blocks, or this long after the first tasks
# went out: the workflow then imports Bokeh for the dashboard (0.6 s of CPU here), which
# would compete with the workers' first forwards for the cores
UNDER_WAY_DELAY_S = 2.0


class Dispatcher:
    """Keeps a bounded window of tasks in flight and accounts for each result."""

    def __init__(
        self,
        client: Client,
        job: Job,
        ledger: Ledger,
        execution: ExecutionConfig,
        observer: RunObserver,
    ) -> None:
        self.client = client
        self.job = job
        self.ledger = ledger
        self.execution = execution
        self.observer = observer
        plan = job.plan
        self.report = RunReport(
            blocks_total=plan.num_blocks,
            output_roi={
                "offset": list(plan.output_roi.offset),
                "shape": list(plan.output_roi.shape),
            },
            output_voxel_size=list(plan.output_voxel_size),
            output_path=job.output.path,
            ledger_path=ledger.path,
        )
        self.phases = PhaseTimes()
        self.order: Iterator[int] = ledger.pending(morton_order(job.plan.grid_shape))
        self.retry: deque[int] = deque()
        self.attempts: dict[int, int] = {}
        self.owner: dict[str, list[int]] = {}
        self.task_of: dict[int, object] = {}  # block id -> its future, while in flight
        # results come to the client as tasks finish, fetched in the background: the loop
        # never waits on a round trip to a worker for one task's result
        self.futures = as_completed(with_results=True, raise_errors=False)
        self.token = uuid.uuid4().hex[:8]
        self.submitted = 0  # tasks so far: every task gets a key of its own
        self.first_outcomes: list[str | None] = []
        self.stop_reason: str | None = None
        self.stop_now = False  # a second SIGINT/SIGTERM: cancel everything at once
        self.drained = False  # after a stop, tasks not yet running were cancelled
        self.worker_names: set[str] = set()
        self.sizer = TaskSizer(execution.blocks_per_task, execution.batch_size)
        self.taken = 0  # blocks taken from the pending order so far

    def submit_more(self, window: int) -> None:
        """Fill the window; the new tasks go to the scheduler in one message."""
        tasks: list[list[int]] = []
        while len(self.owner) + len(tasks) < window and self.stop_reason is None:
            ids = self._next_ids()
            if not ids:
                break
            tasks.append(ids)
        if not tasks:
            return
        keys = []
        for ids in tasks:
            self.submitted += 1
            keys.append(f"blocks-{self.token}-{self.submitted}-{ids[0]}")
        futures = self.client.map(process_blocks, tasks, key=keys, pure=False)
        for ids, future in zip(tasks, futures, strict=True):
            self.owner[future.key] = ids
            self.task_of.update(dict.fromkeys(ids, future))
            self.observer.blocks_submitted(ids)
        self.futures.update(futures)

    def _next_ids(self) -> list[int]:
        report = self.report
        remaining = report.blocks_total - report.blocks_skipped - self.taken + len(self.retry)
        n = self.sizer.size(remaining)
        if self.retry:
            return [self.retry.popleft() for _ in range(min(n, len(self.retry)))]
        ids = list(islice(self.order, n))
        self.taken += len(ids)
        return ids

    def collect(self, future, result: object) -> None:  # type: ignore[no-untyped-def]
        """One finished task and its result (fetched by ``as_completed``)."""
        ids = self.owner.pop(future.key, None)
        if ids is None:  # cancelled after a timeout: already accounted for
            return
        for i in ids:
            self.task_of.pop(i, None)
        if future.status == "finished":
            results: list[BlockResult] = result  # type: ignore[assignment]
        else:  # the whole task failed: a lost worker, a deserialization error, ...
            error = describe(future.exception()) if future.status == "error" else future.status
            results = [BlockResult(i, error=error) for i in ids]
        future.release()
        self._account_task(results)

    def _account_task(self, results: list[BlockResult]) -> None:
        """One task's results: the blocks done are counted together (O(1) calls per task)."""
        done = [r for r in results if r.error is None]
        for result in results:  # the first attempts' outcomes, for fail-fast
            if len(self.first_outcomes) >= self.execution.fail_fast:
                break
            if result.block_id not in self.attempts:
                self.first_outcomes.append(result.error)
        if done:
            self.ledger.mark_many(np.fromiter((r.block_id for r in done), np.int64), DONE)
            self.report.blocks_processed += len(done)
            self.worker_names.update(r.worker for r in done)
            for result in done:
                self.phases.add(result)
                self.sizer.observe(result)
            self.observer.blocks_finished(done)
        for result in results:
            if result.error is not None:
                self._account(result, counted=True)

    def _account(self, result: BlockResult, counted: bool = False) -> None:
        """A failed block: retried, or marked failed once its attempts are spent."""
        block_id, report = result.block_id, self.report
        if (
            not counted
            and len(self.first_outcomes) < self.execution.fail_fast
            and block_id not in self.attempts
        ):
            self.first_outcomes.append(result.error)
        self.attempts[block_id] = self.attempts.get(block_id, 0) + 1
        final = self.attempts[block_id] > self.execution.max_retries
        self.observer.block_failed(result, final)
        if not final:
            report.retries += 1
            logger.warning("block %d failed (%s); retrying", block_id, result.error)
            self.retry.append(block_id)
            return
        self.ledger.mark(block_id, FAILED)
        block = self.job.plan.block(block_id)
        report.blocks_failed += 1
        report.failed_blocks.append(FailedBlock.of(block, result.error))
        logger.error(
            "block %d failed after %s: %s",
            block_id,
            plural(self.attempts[block_id], "attempt"),
            result.error,
        )

    def finished_tasks(self, timeout: float) -> list[tuple[object, object]]:
        """The tasks finished so far, with their results; waits up to ``timeout`` for one
        (signals and timeouts get a turn in between).

        The wait is on the condition ``as_completed`` notifies as each task finishes,
        checked under it, so no finish is missed: polling every 5 ms took about a quarter
        of the client's CPU samples in a run's steady state, CPU the workers' forwards share.
        """
        futures = self.futures
        if self.owner and not futures.has_ready():
            with futures.thread_condition:
                if not futures.has_ready():
                    futures.thread_condition.wait(timeout)
        return futures.next_batch(block=False)

    def check_timeouts(self) -> None:
        """Fail blocks running longer than ``block_timeout``; restart their workers."""
        timeout = self.execution.block_timeout
        if timeout is None:
            return
        running = self.client.run(running_blocks, on_error="return")
        hung_workers = []
        for worker, blocks in running.items():
            if not isinstance(blocks, dict):
                continue
            for block_id, seconds in blocks.items():
                future = self.task_of.get(block_id)
                if seconds <= timeout or future is None:
                    continue
                ids = self.owner.pop(future.key, [])
                for i in ids:
                    self.task_of.pop(i, None)
                self.client.cancel([future], force=True)
                error = f"TimeoutError: block ran longer than block_timeout ({timeout:g} s)"
                self._account(BlockResult(block_id, worker=worker, error=error))
                self.retry.extend(i for i in ids if i != block_id)  # not their fault
                hung_workers.append(worker)
        if hung_workers:
            logger.warning("restarting hung workers: %s", ", ".join(hung_workers))
            self.client.run(kill_this_worker, workers=hung_workers, on_error="return")

    def failing_fast(self) -> str | None:
        """The shared error when the first ``fail_fast`` attempted blocks all failed alike."""
        n = self.execution.fail_fast
        outcomes = self.first_outcomes
        if n and len(outcomes) >= n and outcomes[0] is not None and len(set(outcomes[:n])) == 1:
            return outcomes[0]
        return None

    def cancel_waiting(self) -> None:
        """After a stop: cancel the tasks no worker has started; running ones may finish."""
        self.drained = True
        running = self.client.run(running_blocks, on_error="return")
        started = {i for blocks in running.values() if isinstance(blocks, dict) for i in blocks}
        waiting = [self.task_of[ids[0]] for ids in self.owner.values() if not started & set(ids)]
        for future in waiting:
            for i in self.owner.pop(future.key, []):  # type: ignore[attr-defined]
                self.task_of.pop(i, None)
        if waiting:
            self.client.cancel(waiting, force=True)

    def cancel_all(self) -> None:
        self.client.cancel(list(self.futures.futures), force=True)
        self.owner.clear()
        self.task_of.clear()


def run(
    client: Client,
    job: Job,
    ledger: Ledger,
    execution: ExecutionConfig,
    progress: bool = True,
    expected_threads: int = 0,
    plugin: WorkerPlugin | None = None,
    loading: Loading | None = None,
    under_way: Callable[[], None] | None = None,
) -> RunReport:
    """Process every pending block of ``job.plan`` on ``client``'s workers.

    ``expected_threads`` sizes the window for workers that are still arriving
    (batch clusters), so adaptive scaling sees enough queued work. ``plugin``
    replaces the model plugin (the bench's simulated device); ``loading`` is
    the plugin already being registered (times then count from its start).
    ``under_way`` is called once the first blocks are in, or ``UNDER_WAY_DELAY_S``
    after the first tasks went out, whichever comes first, and at the latest as the
    run ends (the workflow connects the dashboard then).
    """
    plan = job.plan
    loading = loading or start_loading(client, plugin or ModelPlugin(job))
    start = loading.started
    setup_seconds = loading.wait()
    workers = client.scheduler_info(n_workers=-1)["workers"]
    threads = sum(w["nthreads"] for w in workers.values()) or 1
    window = max(8, 4 * max(threads, expected_threads))
    skipped = ledger.counts()["done"]
    observer = watchers(client, job, ledger, execution, progress)
    observer.run_started(plan, ledger, len(workers))
    d = Dispatcher(client, job, ledger, execution, observer)
    d.report.blocks_skipped = skipped
    d.report.workers = len(workers)
    d.sizer.workers = max(len(workers), expected_threads)
    grace_end = math.inf
    next_timeout_check = time.perf_counter()
    with stop_on_signals(d):
        d.submit_more(window)
        due = time.perf_counter() + UNDER_WAY_DELAY_S
        try:
            while d.owner:
                now = time.perf_counter()
                if under_way is not None and (now >= due or d.report.blocks_processed):
                    under_way()  # the first blocks are in, or they went out a while ago
                    under_way = None
                if d.stop_reason and grace_end == math.inf:
                    grace_end = now + execution.grace_period
                if d.stop_reason and not d.drained:
                    d.cancel_waiting()
                if now > grace_end or d.stop_now:
                    logger.warning("grace period over: cancelling %s", plural(len(d.owner), "task"))
                    d.cancel_all()
                if now >= next_timeout_check:
                    d.check_timeouts()
                    next_timeout_check = now + 1.0
                done = d.finished_tasks(timeout=0.2)
                for future, result in done:
                    d.collect(future, result)
                error = d.failing_fast()
                if error and d.stop_reason is None:
                    d.stop_reason = "fail-fast"
                    d.report.fail_fast_error = error
                    d.cancel_all()
                d.submit_more(window)
                ledger.flush(every=2.0)
                observer.tick()
            if under_way is not None:  # a run over before its first blocks came in
                under_way()
        finally:
            observer.tick()
            ledger.flush()
    if d.report.fail_fast_error:  # once, after the failures of the tasks in flight
        n = execution.fail_fast
        first = "the first block" if n == 1 else f"the first {n} blocks all"
        logger.error("%s failed with: %s", first, d.report.fail_fast_error)
    report = d.report
    report.workers = max(report.workers, len(d.worker_names))
    report.interrupted = d.stop_reason if d.stop_reason in ("SIGINT", "SIGTERM") else None
    report.wall_seconds = time.perf_counter() - start
    report.setup_seconds = setup_seconds
    voxels = report.blocks_processed / max(1, plan.num_blocks) * math.prod(plan.output_shape)
    report.output_voxels_per_second = voxels / max(report.wall_seconds, 1e-9)
    report.phase_seconds = d.phases.summary()
    observer.run_ended(report)
    ledger.flush()
    return report


def watchers(
    client: Client, job: Job, ledger: Ledger, execution: ExecutionConfig, progress: bool
) -> Observers:
    """Who hears of each result: the event log, the dashboard's live state, progress."""
    live = LiveState(job.output.path)
    publish(client.scheduler.address, live)
    observers: list[RunObserver] = [EventLog(events_path(job.output.path)), live]
    if progress:
        observers.append(Progress(execution.progress_interval))
    return Observers(observers)

"""What the runner tells whoever watches a run: the event log, progress, the live state.

The runner calls these hooks on its own thread as results arrive; an observer
only records (it never drives the run). Every hook does nothing by default, so
an observer implements only what it needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .ledger import Ledger
    from .plan import BlockPlan
    from .report import RunReport
    from .worker import BlockResult


class RunObserver:
    """Hooks of one run, in the order the runner calls them."""

    def run_started(self, plan: BlockPlan, ledger: Ledger, workers: int) -> None:
        """Before the first task; ``ledger`` already counts the blocks done earlier."""

    def blocks_submitted(self, block_ids: Sequence[int]) -> None:
        """These blocks are now in flight."""

    def block_finished(self, result: BlockResult) -> None:
        """A block's write returned (the ledger marks it done)."""

    def blocks_finished(self, results: Sequence[BlockResult]) -> None:
        """The blocks of one task whose writes returned: one call per task, not per block.

        By default each goes to :meth:`block_finished`; observers that can, override this
        so the client's cost per block stays small (thousands of blocks per second).
        """
        for result in results:
            self.block_finished(result)

    def block_failed(self, result: BlockResult, final: bool) -> None:
        """A block failed; ``final`` when it will not be retried."""

    def tick(self) -> None:
        """Once per turn of the dispatch loop (at least every ~0.2 s): flush batches."""

    def run_ended(self, report: RunReport) -> None:
        """After the last result (also after an interrupt or fail-fast)."""


class Observers(RunObserver):
    """Several observers behind one: each hook goes to all, in order."""

    def __init__(self, observers: Sequence[RunObserver]) -> None:
        self.observers = list(observers)

    def run_started(self, plan: BlockPlan, ledger: Ledger, workers: int) -> None:
        for o in self.observers:
            o.run_started(plan, ledger, workers)

    def blocks_submitted(self, block_ids: Sequence[int]) -> None:
        for o in self.observers:
            o.blocks_submitted(block_ids)

    def block_finished(self, result: BlockResult) -> None:
        for o in self.observers:
            o.block_finished(result)

    def blocks_finished(self, results: Sequence[BlockResult]) -> None:
        for o in self.observers:
            o.blocks_finished(results)

    def block_failed(self, result: BlockResult, final: bool) -> None:
        for o in self.observers:
            o.block_failed(result, final)

    def tick(self) -> None:
        for o in self.observers:
            o.tick()

    def run_ended(self, report: RunReport) -> None:
        for o in self.observers:
            o.run_ended(report)

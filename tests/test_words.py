"""Counted nouns in what users read: one block, two blocks."""

from __future__ import annotations

from blockpredict.progress import Progress
from blockpredict.report import RunReport
from blockpredict.words import plural


def test_plural():
    assert plural(1, "block") == "1 block"
    assert plural(0, "block") == "0 blocks"
    assert plural(2, "retry", "retries") == "2 retries"
    assert plural(1, "spatial axis", "spatial axes") == "1 spatial axis"


def test_one_worker_one_block_one_retry_are_singular():
    summary = RunReport(blocks_total=1, blocks_processed=1, retries=1, workers=1).summary()
    assert "1 retry" in summary and "1 worker" in summary
    assert "1 retries" not in summary and "1 workers" not in summary
    progress = Progress(interval=60.0)
    progress.total = progress.done = progress.initial_workers = 1
    line = progress.line()
    assert line.startswith("progress: 1/1 block (100.0%)") and line.endswith("1 worker"), line

"""The block map's per-cell counts, kept up to date as results come, draw the same map as
decoding every block would: the most telling state of the blocks under each cell."""

from __future__ import annotations

import numpy as np
import pytest
from funlib.geometry import Coordinate, Roi

from blockpredict import blockmap
from blockpredict.blockmap import DONE_NOW, FAILED_NOW, IN_FLIGHT, PENDING, SKIPPED, BlockMap
from blockpredict.job import BlockResult
from blockpredict.ledger import DONE, FAILED, Ledger
from blockpredict.live import LiveState
from blockpredict.plan import make_plan
from blockpredict.report import RunReport

TELLING = [FAILED_NOW, IN_FLIGHT, PENDING, DONE_NOW, SKIPPED]  # the most telling first


def reference(codes: np.ndarray, step: int) -> np.ndarray:
    """Per-block codes (z, y, x) to the map: the most telling state under each cell, by brute
    force."""
    _, ny, nx = codes.shape
    out = np.zeros((-(-ny // step), -(-nx // step)), np.uint8)
    for cy in range(out.shape[0]):
        for cx in range(out.shape[1]):
            under = set(codes[:, cy * step : (cy + 1) * step, cx * step : (cx + 1) * step].flat)
            out[cy, cx] = next(c for c in TELLING if c in under)
    return out


@pytest.mark.parametrize("max_side", [512, 4])  # one cell per block; 3 x 3 blocks per cell
def test_the_map_follows_a_run_with_resume_retries_and_failures(tmp_path, max_side, monkeypatch):
    monkeypatch.setattr(blockmap, "SLAB", 40)  # the earlier run's ledger read 3 rows at a time
    grid = (3, 7, 11)
    plan = make_plan(
        input_roi=Roi((0, 0, 0), tuple(2 + 8 * n for n in grid)),
        input_voxel_size=Coordinate(1, 1, 1),
        output_voxel_size=Coordinate(1, 1, 1),
        eval_input_shape=Coordinate(10, 10, 10),
        eval_output_shape=Coordinate(8, 8, 8),
    )
    assert tuple(plan.grid_shape) == grid
    rng = np.random.default_rng(1)
    ledger = Ledger.create(str(tmp_path / "ledger"), {}, plan.num_blocks)
    truth = np.full(plan.num_blocks, PENDING, np.uint8)  # what the test knows of each block
    for block_id in rng.choice(plan.num_blocks, 60, replace=False).tolist():
        earlier_failed = block_id % 5 == 0
        ledger.mark(block_id, FAILED if earlier_failed else DONE)
        truth[block_id] = FAILED_NOW if earlier_failed else SKIPPED
    live = LiveState(max_side=max_side)
    live.run_started(plan, ledger, 2)
    step = live.map.step
    assert step == (1 if max_side == 512 else 3) and max(live.map.shape) <= max_side

    def check() -> None:
        codes = truth.reshape(grid)
        assert np.array_equal(live.block_map(), reference(codes, step))
        for z in range(grid[0]):
            assert np.array_equal(live.block_map(z), reference(codes[z : z + 1], step))

    check()
    todo = [i for i in range(plan.num_blocks) if truth[i] != SKIPPED]
    while todo:
        batch, todo = todo[:20], todo[20:]
        live.blocks_submitted(batch)
        live.blocks_submitted(batch[:3])  # resent after a timeout while still in flight
        truth[batch] = IN_FLIGHT
        check()
        done = []  # reported per task, as the runner does
        for block_id in batch[: int(rng.integers(5, 20))]:
            outcome = rng.integers(3)
            if outcome == 0:  # retried later
                live.block_failed(BlockResult(block_id, error="E"), final=False)
                truth[block_id] = PENDING
                todo.append(block_id)
            elif outcome == 1:
                ledger.mark(block_id, FAILED)
                live.block_failed(BlockResult(block_id, error="E"), final=True)
                truth[block_id] = FAILED_NOW
            else:
                ledger.mark(block_id, DONE)
                done.append(BlockResult(block_id, worker="w"))
                truth[block_id] = DONE_NOW
        live.blocks_finished(done)
        check()
        if len(todo) < 40:
            break
    live.run_ended(RunReport(blocks_total=plan.num_blocks))  # the rest was stopped: pending
    truth[truth == IN_FLIGHT] = PENDING
    check()
    assert live.counts()["skipped"] == int((truth == SKIPPED).sum())


def test_a_billion_block_map_stays_small():
    block_map = BlockMap((1000, 1000, 1000))
    assert block_map.step == 2 and block_map.shape == (500, 500)
    assert block_map.counts[PENDING].sum() == 10**9  # every block under exactly one cell
    block_map.submitted(999_999_999)
    block_map.move(999_999_999, IN_FLIGHT, DONE_NOW)
    codes = block_map.projection()
    assert codes.shape == (500, 500) and set(np.unique(codes)) == {PENDING}

"""The forward on one device: a batch of blocks in, their predictions out.

On CUDA the reader threads stage each block into a pinned host buffer
(``Forward.stage``); the forward thread then only queues work on the GPU and
returns (a :class:`~blockpredict.pipeline.Pending`): the copy to the device on a
stream of its own, the forward on another, the copy back into pinned buffers on
a third, ordered by CUDA events. So the next batch's copy in overlaps this
batch's forward, this batch's copy out the next one's forward, and the GPU has
the next forward queued while the thread goes back for it; the writer waits for
the copy out. ``execution.cuda_graphs`` replays a captured forward once its
batch shape was seen (``graphs.py``); ``execution.precision`` sets autocast and
``execution.compile`` wraps the model with ``torch.compile`` (either falling
back with one warning).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

import numpy as np
import torch

from .graphs import MAX_GRAPHS, Graph, capture
from .job import describe
from .pipeline import Pending
from .precision import autocast

logger = logging.getLogger(__name__)


class Forward:
    """Batched forward on one device: ``[(C, *read_shape)] -> [(C_out, *write_shape)]``.

    On CUDA, :meth:`stage` copies each block once into a pinned buffer of its
    own, in a reader thread, so that the forward thread only queues work: a
    call returns a :class:`Pending` whose ``wait()`` blocks until the outputs
    are in pinned host buffers of their own (a pipeline group holds up to 64
    blocks' outputs until its write, so no later forward may reuse them;
    torch's caching host allocator recycles them, and the staged inputs, only
    once the copies that used them are done). Each batch's device input is
    held for the forward's stream and its output for the copy-out stream
    (``record_stream``), so torch's allocator never hands them to the next
    batch too early. ``staging`` forces the staging on (to test it on the
    CPU, where a call returns the outputs themselves). With ``cuda_graphs``
    (CUDA, uncompiled), a batch shape seen before replays its captured graph
    on the forward's stream alone: the copy into the graph's input buffer, the
    replay and the copy out of its output buffer stay in that stream's order.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        device: torch.device,
        write_shape: tuple[int, ...],
        model_dims: int,
        precision: str = "fp32",
        compile: bool = False,
        staging: bool | None = None,
        cuda_graphs: bool = False,
    ) -> None:
        self.model = model
        self.device = device
        self.write_shape = tuple(write_shape)
        self.model_dims = model_dims
        self.precision = precision
        self.staging = device.type == "cuda" if staging is None else staging
        self.pin = device.type == "cuda"
        cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if cuda else None  # the forward's
        self.copy_in = torch.cuda.Stream(device) if cuda else None
        self.copy_out = torch.cuda.Stream(device) if cuda else None
        self.compiled: Callable[..., torch.Tensor] | None = None
        # batch shapes seen once (eager, the warm-up) and those captured
        self.graphs_on = cuda_graphs and device.type == "cuda" and not compile
        self.graphs: dict[tuple[int, ...], Graph] = {}
        self._seen: set[tuple[int, ...]] = set()
        if compile:
            try:
                self.compiled = torch.compile(model)
            except Exception as e:
                self._compile_failed(e)

    def __call__(self, blocks: list[np.ndarray]) -> list[np.ndarray] | Pending:
        channels, *spatial = blocks[0].shape
        model_shape = spatial[len(spatial) - self.model_dims :]
        shape = (len(blocks), channels, *model_shape)
        if self.stream is not None and self.staging:
            return self._queue(blocks, shape)
        x = self._to_device(blocks, shape)
        with torch.no_grad(), autocast(self.device, self.precision):
            out = self._run(x)
        return self._rows(out.float().cpu().numpy(), len(blocks))

    def _rows(self, y: np.ndarray, n: int) -> list[np.ndarray]:
        expected = self.write_shape[len(self.write_shape) - self.model_dims :]
        if tuple(y.shape[2:]) != expected:
            raise RuntimeError(
                f"model returned spatial shape {tuple(y.shape[2:])}, expected {expected}"
            )
        return [y[i].reshape(y.shape[1], *self.write_shape) for i in range(n)]

    def _queue(self, blocks: list[np.ndarray], shape: tuple[int, ...]) -> Pending:
        """Queue one batch on the GPU (copy in, forward, copy out) and return at once."""
        assert self.stream is not None and self.copy_in is not None and self.copy_out is not None
        begin = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        graph = self.graphs.get(shape)
        if graph is not None:  # all on the forward's stream: the graph's buffers are reused
            with torch.cuda.stream(self.stream):
                self._copy_rows(blocks, graph.input)
                begin.record()
                y = graph.replay()
                end.record()
            self.copy_out.wait_stream(self.stream)
        else:
            with torch.cuda.stream(self.copy_in):
                x = torch.empty(shape, dtype=torch.float32, device=self.device)
                self._copy_rows(blocks, x)
            self.stream.wait_stream(self.copy_in)
            x.record_stream(self.stream)
            with torch.cuda.stream(self.stream):
                begin.record()
                with torch.no_grad(), autocast(self.device, self.precision):
                    y = self._run(x).float()
                end.record()
                self._maybe_capture(x, shape)
            self.copy_out.wait_stream(self.stream)
            y.record_stream(self.copy_out)
        with torch.cuda.stream(self.copy_out):
            host = torch.empty(y.shape, dtype=torch.float32, pin_memory=True)
            host.copy_(y, non_blocking=True)
            if graph is not None:  # the next replay overwrites the output only after this
                self.stream.wait_stream(self.copy_out)
            landed = torch.cuda.Event()
            landed.record()

        def wait() -> float:
            landed.synchronize()
            return float(begin.elapsed_time(end)) / 1000

        return Pending(self._rows(host.numpy(), len(blocks)), wait)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        if self.compiled is not None:
            try:
                return self.compiled(x)
            except Exception as e:
                y = self.model(x)  # the model itself runs: compiling was the problem
                self._compile_failed(e)
                return y
        return self.model(x)

    def _maybe_capture(self, x: torch.Tensor, shape: tuple[int, ...]) -> None:
        """Capture ``shape``'s forward the second time it runs (the first warmed it up)."""
        if not self.graphs_on or len(self.graphs) >= MAX_GRAPHS:
            return
        if shape not in self._seen:
            self._seen.add(shape)
            return

        def run(v: torch.Tensor) -> torch.Tensor:
            with torch.no_grad(), autocast(self.device, self.precision, cache=False):
                return self.model(v)  # type: ignore[no-any-return]

        try:
            self.graphs[shape] = capture(run, x)
        except Exception as e:
            self.graphs_on = False
            self.graphs.clear()
            warnings.warn(
                f"execution.cuda_graphs: capture failed ({describe(e)}); running without",
                RuntimeWarning,
                stacklevel=2,
            )
            logger.warning("CUDA graph capture failed (%s); running without", describe(e))

    def _compile_failed(self, error: Exception) -> None:
        self.compiled = None
        warnings.warn(
            f"execution.compile: torch.compile failed ({describe(error)}); running uncompiled",
            RuntimeWarning,
            stacklevel=2,
        )
        logger.warning("torch.compile failed (%s); running uncompiled", describe(error))

    def stage(self, blocks: list[np.ndarray]) -> list[np.ndarray]:
        """Each block in a pinned, contiguous host buffer of its own (CUDA; the blocks as
        they are on the CPU). Called by the reader threads, off the forward's path: a
        108^3 block's strided copy takes about as long as its forward on a fast GPU."""
        if not self.staging:
            return blocks
        staged = []
        for block in blocks:
            buffer = torch.empty(block.shape, dtype=torch.float32, pin_memory=self.pin)
            buffer.copy_(torch.from_numpy(block))
            staged.append(buffer.numpy())  # the array keeps the buffer alive
        return staged

    def _to_device(self, blocks: list[np.ndarray], shape: tuple[int, ...]) -> torch.Tensor:
        if not self.staging:
            return torch.from_numpy(np.stack(blocks).reshape(shape)).to(self.device)
        x = torch.empty(shape, dtype=torch.float32, device=self.device)
        self._copy_rows(blocks, x)
        return x

    def _copy_rows(self, blocks: list[np.ndarray], x: torch.Tensor) -> None:
        """Each block into its row of ``x``: from a staged (pinned) block a DMA copy that
        returns at once; from any other array a copy through pageable memory."""
        for row, block in zip(x, blocks, strict=True):
            row.view(block.shape).copy_(torch.from_numpy(block), non_blocking=True)

"""The forward on one device: a batch of blocks in, their predictions out.

On CUDA the reader threads stage each block into a pinned host buffer
(``Forward.stage``), the forward copies them to the device with non-blocking
copies on a stream of its own, the outputs come back into pinned buffers, and
the forward replays a CUDA graph once its batch shape was seen
(``execution.cuda_graphs``, ``graphs.py``); ``execution.precision`` sets
autocast and ``execution.compile`` wraps the model with ``torch.compile``
(either falling back with one warning).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator

import numpy as np
import torch

from .graphs import MAX_GRAPHS, Graph, capture
from .job import describe
from .precision import autocast

logger = logging.getLogger(__name__)


class Forward:
    """Batched forward on one device: ``[(C, *read_shape)] -> [(C_out, *write_shape)]``.

    On CUDA, :meth:`stage` copies each block once into a pinned buffer of its
    own, in a reader thread, so that the forward thread only starts copies to
    the device (non-blocking, on a stream of the forward's own: the stream is
    synchronized before a call returns, so the caller may then drop its
    inputs). Each call's outputs come back into pinned buffers of their own:
    a pipeline group holds up to 64 blocks' outputs until its write, so no
    later forward may reuse them (torch's caching host allocator recycles
    them once the writer lets go). ``staging`` forces that path on (to test it
    on the CPU). With ``cuda_graphs`` (CUDA, uncompiled), a batch shape seen
    before replays its captured graph: the staged input is copied into the
    graph's input buffer and its output copied out, before the next replay.
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
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
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

    def __call__(self, blocks: list[np.ndarray]) -> list[np.ndarray]:
        channels, *spatial = blocks[0].shape
        model_shape = spatial[len(spatial) - self.model_dims :]
        shape = (len(blocks), channels, *model_shape)
        with self._on_stream():
            graph = self.graphs.get(shape)
            if graph is not None:
                self._copy_rows(blocks, graph.input)
                y = self._to_host(graph.replay())
            else:
                x = self._to_device(blocks, shape)
                with torch.no_grad(), autocast(self.device, self.precision):
                    out = self._run(x)
                y = self._to_host(out.float())
                self._maybe_capture(x, shape)
        expected = self.write_shape[len(self.write_shape) - self.model_dims :]
        if tuple(y.shape[2:]) != expected:
            raise RuntimeError(
                f"model returned spatial shape {tuple(y.shape[2:])}, expected {expected}"
            )
        return [y[i].reshape(y.shape[1], *self.write_shape) for i in range(len(blocks))]

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

    @contextlib.contextmanager
    def _on_stream(self) -> Iterator[None]:
        if self.stream is None:
            yield
            return
        with torch.cuda.stream(self.stream):
            yield
        self.stream.synchronize()

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

    def _to_host(self, y: torch.Tensor) -> np.ndarray:
        if not self.staging:
            return y.cpu().numpy()
        host = torch.empty(y.shape, dtype=torch.float32, pin_memory=self.pin)
        host.copy_(y, non_blocking=True)
        if self.stream is not None:
            self.stream.synchronize()
        return host.numpy()

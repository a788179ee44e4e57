"""The forward on one device: a batch of blocks in, their predictions out.

On CUDA the inputs go through a pinned host buffer and non-blocking copies on
a stream of the forward's own, and the outputs come back into pinned buffers;
``execution.precision`` sets autocast and ``execution.compile`` wraps the
model with ``torch.compile`` (falling back with one warning).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator

import numpy as np
import torch

from .job import describe
from .precision import autocast

logger = logging.getLogger(__name__)


class Forward:
    """Batched forward on one device: ``[(C, *read_shape)] -> [(C_out, *write_shape)]``.

    On CUDA, each block is copied once, straight into a pinned input buffer,
    which goes to the device with a non-blocking copy on a stream of the
    forward's own (the buffer is reused: the stream is synchronized before a
    call returns). Each call's outputs come back into pinned buffers of their
    own: a pipeline group holds up to 64 blocks' outputs until its write, so
    no later forward may reuse them (torch's caching host allocator recycles
    them once the writer lets go). ``staging`` forces that path on (to test it
    on the CPU).
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
    ) -> None:
        self.model = model
        self.device = device
        self.write_shape = tuple(write_shape)
        self.model_dims = model_dims
        self.precision = precision
        self.staging = device.type == "cuda" if staging is None else staging
        self.pin = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._input: torch.Tensor | None = None
        self.compiled: Callable[..., torch.Tensor] | None = None
        if compile:
            try:
                self.compiled = torch.compile(model)
            except Exception as e:
                self._compile_failed(e)

    def __call__(self, blocks: list[np.ndarray]) -> list[np.ndarray]:
        channels, *spatial = blocks[0].shape
        model_shape = spatial[len(spatial) - self.model_dims :]
        with self._on_stream():
            x = self._to_device(blocks, (len(blocks), channels, *model_shape))
            with torch.no_grad(), autocast(self.device, self.precision):
                y = self._run(x)
            y = self._to_host(y.float())
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

    def _to_device(self, blocks: list[np.ndarray], shape: tuple[int, ...]) -> torch.Tensor:
        if not self.staging:
            return torch.from_numpy(np.stack(blocks).reshape(shape)).to(self.device)
        staged = self._input
        if staged is None or tuple(staged.shape) != shape:
            staged = self._input = torch.empty(shape, dtype=torch.float32, pin_memory=self.pin)
        for row, block in zip(staged, blocks, strict=True):  # one copy each, views included
            row.view(block.shape).copy_(torch.from_numpy(block))
        return staged.to(self.device, non_blocking=True)

    def _to_host(self, y: torch.Tensor) -> np.ndarray:
        if not self.staging:
            return y.cpu().numpy()
        host = torch.empty(y.shape, dtype=torch.float32, pin_memory=self.pin)
        host.copy_(y, non_blocking=True)
        if self.stream is not None:
            self.stream.synchronize()
        return host.numpy()

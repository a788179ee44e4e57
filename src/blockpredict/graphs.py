"""CUDA graphs of the forward: one launch per batch instead of one per layer.

On a fast GPU a model of many small layers can be bound by the host: each layer
is a Python call and one or more kernel launches, and the pipeline's reader and
writer threads share that host time (and the GIL) with the forward thread. A
CUDA graph records the forward's kernels once and replays them with one call,
into the same device buffers each time. (The bench's 108^3 U-Net keeps an H100
busy for 3 ms per forward: there graphs gained 1-2%, hence opt-in.)

A batch shape is captured the second time it is seen (the first forward, run
as usual, warms up cuDNN and the caching allocator), at most ``MAX_GRAPHS``
shapes per worker: a full batch and a task's last, smaller one. Each graph
keeps a private memory pool, the size of one forward's activations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

MAX_GRAPHS = 2  # batch shapes captured per worker


@dataclass
class Graph:
    """One captured forward: fill ``input``, ``replay()``, read ``output`` (float32).

    ``output`` is overwritten by the next replay: copy it out first.
    """

    graph: torch.cuda.CUDAGraph
    input: torch.Tensor
    output: torch.Tensor

    def replay(self) -> torch.Tensor:
        self.graph.replay()  # on the current stream, after the copy into ``input``
        return self.output


def capture(run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Graph:
    """Record ``run(x)`` as a CUDA graph whose input buffer is ``x`` itself.

    ``run`` has already run once on a tensor of ``x``'s shape. The capture runs
    on a stream of torch's own in ``thread_local`` mode, so the pipeline's other
    threads (which free pinned buffers, recording CUDA events) cannot break it.
    A model that synchronizes with the host in its forward (``.item()``, a
    branch on a tensor's value) cannot be captured: that raises here.
    """
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        y = run(x).float()
    return Graph(graph, x, y)

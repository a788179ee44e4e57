"""The run's description for workers: what any worker needs to process any block.

It lives apart from the Dask plugin (``worker.py``) so that the workflow can
describe a run without importing the worker side.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # annotations only: the task module and the pipeline stay light to import
    from .config import ModelConfig, Scaling
    from .plan import BlockPlan
    from .storage import InputInfo, OutputInfo

Precision = Literal["fp32", "fp16", "bf16"]


@dataclass(frozen=True)
class Job:
    """All a worker needs to process any block of one run: small and picklable.

    ``model`` is either a :class:`ModelConfig` (rebuilt on the worker) or a
    model object passed from Python (serialized once, with the plugin).
    ``batch_size`` blocks share one forward; ``precision``, ``compile`` and
    ``cuda_graphs`` say how that forward runs; ``io_threads`` reader and writer threads feed it.
    ``model_shape`` (output channels and shape at the model's input shape, as the client
    built it) spares a worker the dummy forward that finds them.
    """

    plan: BlockPlan
    input: InputInfo
    normalize: str | Scaling
    output: OutputInfo
    model: ModelConfig | Any
    device: str = "auto"
    threads: int = 1
    batch_size: int = 1
    precision: Precision = "fp32"
    compile: bool = False
    cuda_graphs: bool = False
    io_threads: int | Literal["auto"] = "auto"
    model_shape: tuple[int, tuple[int, ...]] | None = None  # the client's Model.output_shape


@dataclass(frozen=True)
class BlockResult:
    """Timings of one block in seconds, or the error that stopped it, and when its write
    returned (``written``: the worker's clock, seconds since the epoch)."""

    block_id: int
    read: float = 0.0
    compute: float = 0.0
    write: float = 0.0
    worker: str = ""
    error: str | None = None
    written: float = 0.0


def describe(exception: BaseException) -> str:
    """``Type: first line of the message``, for reports and logs."""
    text = str(exception).strip().splitlines()
    return f"{type(exception).__name__}: {text[0] if text else ''}".rstrip(": ")

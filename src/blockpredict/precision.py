"""Forward precision: fp32, or autocast to fp16 (CUDA) or bf16 (CUDA, and CPUs that run it).

Outputs are always converted back to float32 before they are written, so the
output dtype does not depend on the precision. Measured tolerance against fp32
(tests/test_speed.py, the test U-Net on values in [0, 1]): see ``TOLERANCE``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .errors import ConfigError

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# largest absolute difference to fp32 that the tests allow, for outputs of order 1
# (measured, bf16: 0.037 on the CPU, 0.040-0.053 on an H100 with cuDNN; fp16: 0.007 there)
TOLERANCE = {"fp32": 0.0, "fp16": 1e-2, "bf16": 1e-1}


@contextmanager
def autocast(device: torch.device, precision: str, cache: bool = True) -> Iterator[None]:
    """Run the forward under autocast for ``fp16``/``bf16``; plain fp32 otherwise.

    ``cache=False`` for a CUDA graph's capture: autocast's cache of cast weights
    would be freed at its exit while the graph still reads them.
    """
    if precision == "fp32":
        with contextlib.nullcontext():
            yield
        return
    with torch.autocast(device.type, dtype=DTYPES[precision], cache_enabled=cache):
        yield


def unsupported(precision: str, device: torch.device) -> str | None:
    """Why ``device`` cannot run ``precision``, or None when it can."""
    if precision == "fp32":
        return None
    if device.type == "cpu" and precision == "fp16":
        return "fp16 needs a CUDA device"
    if device.type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        return "this GPU does not support bf16"
    try:  # a tiny convolution under autocast: the device runs it or it does not
        conv = torch.nn.Conv3d(1, 1, 3).to(device)
        with torch.no_grad(), autocast(device, precision):
            conv(torch.zeros(1, 1, 4, 4, 4, device=device))
    except Exception as e:  # torch raises several types for unsupported kernels
        return f"{precision} autocast fails on {device.type}: {type(e).__name__}"
    return None


def check_precision(precision: str, device_setting: str, cuda_expected: bool = False) -> None:
    """Refuse a precision the workers' device cannot run, before anything is written.

    ``device_setting`` is ``cluster.device``; with ``auto`` the client's own
    GPUs decide, unless the workers are known to get GPUs (``cuda_expected``).
    A GPU the client cannot see is checked on the worker when the model loads.
    """
    if precision == "fp32":
        return
    if device_setting == "cuda" or cuda_expected:
        if not torch.cuda.is_available():
            return  # batch GPUs: the worker checks when it loads the model
        device = torch.device("cuda")
    elif device_setting == "auto" and torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        device = torch.device("cpu")
    reason = unsupported(precision, device)
    if reason:
        raise ConfigError(
            f"execution.precision {precision} cannot run on {device.type}: {reason}",
            "execution.precision",
            "use fp32" + (" or bf16" if device.type == "cpu" and precision == "fp16" else ""),
        )

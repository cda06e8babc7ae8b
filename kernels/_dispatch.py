"""The guard that picks a Triton kernel or the PyTorch reference for one call.

Every op here has two implementations: a Triton kernel (CUDA only) and a plain-PyTorch
reference (every device). The Triton kernel runs when all of these hold:

- Triton can be imported (checked once per process; the answer is cached);
- every tensor argument is on a CUDA device and contiguous;
- the dtypes are ones the kernel was written for;
- every tensor has fewer than 2**31 elements (the kernels index with int32).

Otherwise the reference runs. That is a rule, not a silent fallback:
:func:`livediff.kernels.status.kernels_status` reports per op what runs and why, for the
engine to log at start-up.
"""

from __future__ import annotations

import functools
import os

import torch

INT32_LIMIT = 2**31 - 1
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.cache
def triton_unavailable_reason() -> str | None:
    """``None`` when Triton imports, else why it doesn't (cached: importing is not free)."""
    try:
        import triton
        import triton.language  # noqa: F401
    except Exception as error:  # any import failure means "no Triton", with its reason
        return f"triton cannot be imported ({type(error).__name__}: {error})"
    return None


def triton_interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1``: Triton kernels then run on the CPU, slowly (tests only)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def tensors_fit_triton(*tensors: torch.Tensor | None) -> bool:
    """Device, layout and size part of the guard (``None`` entries are optional inputs)."""
    for tensor in tensors:
        if tensor is None:
            continue
        if (
            tensor.device.type != "cuda"
            or not tensor.is_contiguous()
            or tensor.numel() > INT32_LIMIT
        ):
            return False
    return True


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """The whole guard, less the dtype rule that each op checks itself."""
    return tensors_fit_triton(*tensors) and triton_unavailable_reason() is None

"""The guard that picks a Triton kernel or the PyTorch reference for one call, and the record
of every call on CUDA that ran the reference.

Every op here has two implementations: a Triton kernel (CUDA only) and a plain-PyTorch
reference (every device). The Triton kernel runs when all of these hold:

- Triton can be imported (checked once per process; the answer is cached);
- every tensor argument is on a CUDA device and contiguous;
- the dtypes are ones the kernel was written for;
- every tensor has fewer than 2**31 elements (the kernels index with int32).

Off CUDA the reference is simply the implementation. On CUDA a call that runs the reference is
a *fallback*, and no fallback is silent: :func:`triton_refusal` names the reason,
:data:`FALLBACKS` logs a WARNING the first time each op falls back (with the reason) and counts
every such call, and :func:`livediff.kernels.status.kernels_status` reports them per op.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)

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


def triton_refusal(dtype_problem: str | None = None, **tensors: torch.Tensor | None) -> str | None:
    """Why the Triton kernel cannot take this call, or ``None`` when it can.

    ``tensors`` are the call's tensor arguments by name (``None``: an optional input left out);
    ``dtype_problem`` is the op's own dtype check, already phrased.
    """
    return _refusal(dtype_problem, tensors, dense_pixels=False)


def triton_refusal_by_strides(
    dtype_problem: str | None = None, **images: torch.Tensor | None
) -> str | None:
    """:func:`triton_refusal` for kernels that read ``[N, C, H, W]`` by strides: they need only
    dense rows of pixels (:func:`pixels_dense`: NCHW contiguous or channels-last)."""
    return _refusal(dtype_problem, images, dense_pixels=True)


def _refusal(
    dtype_problem: str | None, tensors: dict[str, torch.Tensor | None], *, dense_pixels: bool
) -> str | None:
    unavailable = triton_unavailable_reason()
    if unavailable is not None:
        return unavailable
    for name, tensor in tensors.items():
        if tensor is None:
            continue
        if tensor.device.type != "cuda":
            return f"{name} is on {tensor.device}, not CUDA"
        if dense_pixels and not pixels_dense(tensor):
            return (
                f"{name} {tuple(tensor.shape)} is neither contiguous nor channels-last "
                f"(strides {tensor.stride()})"
            )
        if not dense_pixels and not tensor.is_contiguous():
            return f"{name} {tuple(tensor.shape)} is not contiguous"
        if tensor.numel() > INT32_LIMIT:
            return f"{name} has {tensor.numel()} elements: the kernels index with int32"
    return dtype_problem


def pixels_dense(images: torch.Tensor) -> bool:
    """``[N, C, H, W]`` whose pixel ``(h, w)`` sits at ``(h · W + w) · stride(W)``: NCHW
    contiguous (stride 1) and channels-last (stride C) both are; a crop or a flip is not."""
    _, _, height, width = images.shape
    return height < 2 or width < 2 or images.stride(2) == width * images.stride(3)


def float_dtype_problem(name: str, dtype: torch.dtype) -> str | None:
    """The dtype part of the guard for ops written for float16, bfloat16 and float32."""
    if dtype in FLOAT_DTYPES:
        return None
    return f"{name} is {dtype}: the kernel takes float16, bfloat16 or float32"


class FallbackRecord:
    """Which ops fell back to their reference on CUDA, why (the first reason) and how often.

    One per process, :data:`FALLBACKS`, because the ops it watches are process-wide
    ``torch.library`` registrations. Thread-safe: the ops run on the GPU worker thread and
    ``kernels_status()`` reads from any other.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ops: dict[str, dict[str, Any]] = {}

    def fell_back(self, op: str, reason: str, device: torch.device) -> None:
        """Count one call of ``op`` that ran its reference; the first one per op is logged."""
        with self._lock:
            entry = self._ops.get(op)
            if entry is None:
                self._ops[op] = {"reason": reason, "calls": 1}
            else:
                entry["calls"] += 1
        if entry is None:
            log.warning(
                "kernel %s on %s runs its PyTorch reference, not Triton: %s (said once per op; "
                "kernels_status() counts the calls)",
                op,
                device,
                reason,
            )

    def snapshot(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {op: dict(entry) for op, entry in self._ops.items()}

    def clear(self) -> None:
        """Forget every fallback (tests; a long-running process that wants a fresh count)."""
        with self._lock:
            self._ops.clear()


FALLBACKS = FallbackRecord()


def run_triton(op: str, reason: str | None, device: torch.device) -> bool:
    """True when the Triton kernel should run; else the fallback is recorded and the caller
    runs the reference. Called from an op's CUDA implementation only.
    """
    if reason is None:
        return True
    FALLBACKS.fell_back(op, reason, device)
    return False


def implementation(
    op: Callable[..., Any],
    cuda: Callable[..., Any],
    reference: Callable[..., Any],
    device: torch.device,
) -> Callable[..., Any]:
    """What an op's public function calls: the registered custom op while ``torch.compile`` or
    ``torch.export`` traces (they need the op and its fake), else the device's implementation
    directly, the same code the op would dispatch to. The dispatcher's Python layers around a
    custom op cost more than a small kernel's launch, on each of the per-session calls of
    every batch: on a 2-core CPU with tiny tensors the fused step (an op that mutates its
    inputs) takes 63 µs a call through the op against 31 µs direct, postprocess 15 against 12."""
    if torch.compiler.is_compiling():
        return op
    return cuda if device.type == "cuda" else reference

"""Cosine similarity of two frames in one reduction, as a 0-d float32 tensor (no host sync).

Inputs are any float or uint8 tensors of equal shape (the two may differ in dtype); uint8 is
scaled to [-1, 1] as ``x / 127.5 - 1`` first, as
:func:`livediff.engine.similarity.similarity_signal` does. The value is::

    dot(a, b) / max(|a| * |b|, 1e-6)          (sums in float32)

Op: ``torch.ops.livediff.cosine_similarity``. It runs a Triton kernel on CUDA when the guard in
:mod:`livediff.kernels._dispatch` holds, and the PyTorch reference otherwise. The result stays
on the device; read it only where a sync is acceptable.
"""

from __future__ import annotations

import torch

from livediff.exceptions import KernelInputError
from livediff.kernels._dispatch import FLOAT_DTYPES, implementation, run_triton, triton_refusal

NORM_EPS = 1e-6
TRITON_DTYPES = (*FLOAT_DTYPES, torch.uint8)
TRITON_MAX_NUMEL = 4096 * 16384  # the kernel's BLOCK * MAX_PARTS (about 22 RGB 1080p frames)


def frame_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of two frames as a 0-d float32 tensor on their device."""
    return implementation(
        torch.ops.livediff.cosine_similarity,
        _cosine_similarity_cuda,
        _cosine_similarity_reference,
        a.device,
    )(a, b)


def _check(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise KernelInputError(
            f"frames must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.numel() == 0:
        raise KernelInputError("frames have no elements")
    for x in (a, b):
        if not (x.dtype.is_floating_point or x.dtype == torch.uint8):
            raise KernelInputError(f"frames must be float or uint8, got {x.dtype}")
    if a.device != b.device:
        raise KernelInputError(f"frames are on different devices: {a.device} and {b.device}")


def as_signal(x: torch.Tensor) -> torch.Tensor:
    """Flattened float32 values, uint8 scaled to [-1, 1]."""
    if x.dtype == torch.uint8:
        return x.reshape(-1).to(torch.float32) / 127.5 - 1.0
    return x.reshape(-1).to(torch.float32)


def reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    fa, fb = as_signal(a), as_signal(b)
    dot = torch.dot(fa, fb)
    norms = torch.linalg.vector_norm(fa) * torch.linalg.vector_norm(fb)
    return dot / norms.clamp_min(NORM_EPS)


def _cosine_similarity_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Reference implementation (every device)."""
    _check(a, b)
    return reference(a, b)


cosine_similarity = torch.library.custom_op("livediff::cosine_similarity", mutates_args=())(
    _cosine_similarity_reference
)


@cosine_similarity.register_kernel("cuda")
def _cosine_similarity_cuda(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    _check(a, b)
    if not run_triton(
        "livediff::cosine_similarity", triton_refusal(_misfit(a, b), a=a, b=b), a.device
    ):
        return reference(a, b)
    from livediff.kernels import _triton_similarity

    return _triton_similarity.cosine(a, b, NORM_EPS)


def _misfit(a: torch.Tensor, b: torch.Tensor) -> str | None:
    if a.numel() > TRITON_MAX_NUMEL:
        return f"the frames have {a.numel()} elements: the kernel takes at most {TRITON_MAX_NUMEL}"
    for name, x in (("a", a), ("b", b)):
        if x.dtype not in TRITON_DTYPES:
            return f"{name} is {x.dtype}: the kernel takes float16, bfloat16, float32 or uint8"
    return None


@cosine_similarity.register_fake
def _cosine_similarity_fake(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    _check(a, b)
    return a.new_empty((), dtype=torch.float32)

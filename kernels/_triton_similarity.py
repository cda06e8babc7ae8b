"""Triton kernels of :mod:`livediff.kernels.similarity` (imported lazily: needs Triton).

Two launches, deterministic: one program per ``BLOCK`` elements writes its partial ``a·b``,
``a·a``, ``b·b``; one program then sums the partials and divides. No atomics, so the result
does not depend on scheduling, and no zero-filled buffer is needed. (No loops with runtime
bounds: Triton 3.6's interpreter cannot run them under numpy >= 2.4.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096
MAX_PARTS = 16384  # the finishing program reads every partial at once
NUM_WARPS = 8


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _total(x):
    """``tl.sum``; spelled as a reduce with our own combine so that Triton's interpreter runs it
    even when ``triton.language`` was imported before ``TRITON_INTERPRET`` was set."""
    return tl.reduce(x, 0, _add)


@triton.jit
def _signal(ptr, offs, mask, IS_BYTE: tl.constexpr):
    x = tl.load(ptr + offs, mask=mask, other=0).to(tl.float32)
    if IS_BYTE:
        x = tl.where(mask, x / 127.5 - 1.0, 0.0)
    return x


@triton.jit
def _partials_kernel(
    a_ptr,
    b_ptr,
    part_ptr,
    numel,
    parts,
    A_BYTE: tl.constexpr,
    B_BYTE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    a = _signal(a_ptr, offs, mask, A_BYTE)
    b = _signal(b_ptr, offs, mask, B_BYTE)
    tl.store(part_ptr + pid, _total(a * b))
    tl.store(part_ptr + parts + pid, _total(a * a))
    tl.store(part_ptr + 2 * parts + pid, _total(b * b))


@triton.jit
def _finish_kernel(part_ptr, out_ptr, parts, eps, PARTS_POW2: tl.constexpr):
    offs = tl.arange(0, PARTS_POW2)
    mask = offs < parts
    dot = _total(tl.load(part_ptr + offs, mask=mask, other=0.0))
    aa = _total(tl.load(part_ptr + parts + offs, mask=mask, other=0.0))
    bb = _total(tl.load(part_ptr + 2 * parts + offs, mask=mask, other=0.0))
    tl.store(out_ptr, tl.div_rn(dot, tl.maximum(tl.sqrt_rn(aa) * tl.sqrt_rn(bb), eps)))


def cosine(a: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    numel = a.numel()
    parts = triton.cdiv(numel, BLOCK)  # <= MAX_PARTS, checked by the caller
    partials = torch.empty(3 * parts, dtype=torch.float32, device=a.device)
    out = torch.empty((), dtype=torch.float32, device=a.device)
    a_byte, b_byte = a.dtype == torch.uint8, b.dtype == torch.uint8
    _partials_kernel[(parts,)](
        a, b, partials, numel, parts, A_BYTE=a_byte, B_BYTE=b_byte, BLOCK=BLOCK, num_warps=NUM_WARPS
    )
    _finish_kernel[(1,)](
        partials, out, parts, eps, PARTS_POW2=max(16, triton.next_power_of_2(parts))
    )
    return out

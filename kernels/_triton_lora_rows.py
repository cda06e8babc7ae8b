"""Triton kernels of :mod:`livediff.kernels.lora_rows` (imported lazily: needs Triton).

Two ways to compute ``out[r] += Σ_s scale·(x[r]·A)·B``, chosen per call by the size of ``out``
(:data:`FUSED_MAX_OUTPUTS`):

- **fused**, one launch, grid ``(cdiv(T, BLOCK_T), cdiv(out, BLOCK_O), rows)``: a program owns
  a ``[BLOCK_T, BLOCK_O]`` tile of one row's ``out``; for each of the row's active slots it
  computes that slot's ``v = scale · x·A`` for its tokens (float32 accumulation, one rounding
  to ``A``'s dtype, as Punica's shrink) in registers and adds ``v·B`` for its columns; the sum
  goes to the tile once. The programs of one token block recompute ``v`` (``x`` from L2).
- **two launches**, as Punica's SGMV: *shrink*, grid ``(cdiv(T, BLOCK_T), rows * slots)``,
  writes each row's slots' ``v`` into a scratch buffer ``[rows, slots, T, rank]``; *expand*
  is the fused kernel's tile program reading ``v`` from there (``FUSED`` off), with the
  two-launch tiles.

On an H200 (fp16, rank 16, CUDA-graph timing, 2026-12-02, bench/results/README.md) the fused
kernel is faster where a layer is small and the launch dominates (1 row: 5.2 against 5.9 µs
at 4096 tokens × 320 → 320, 4.9 against 6.6 µs at 1024 × 640 → 640, 5.6 against 8.8 µs at
256 × 1280 → 1280) and slower where ``out`` is large and its recomputed shrink costs more than
the saved launch (23.9 against 13.7 µs at 4096 × 320 → 2560; every layer of 16 rows).

A program whose row (or slot) has no active LoRA returns after loading the indices and
scales: a row without LoRA costs only that. The rank is padded to a power of two of at least
16 (``tl.dot``'s smallest tile) with masked loads; float32 inputs use IEEE products (no
TF32), so the float32 result matches the reference to rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# the fused kernel's tiles
FUSED_BLOCK_T = 64
FUSED_BLOCK_I = 64
FUSED_BLOCK_O = 64
# the two-launch kernels' tiles
BLOCK_T = 32
BLOCK_I = 32
BLOCK_O = 64
NUM_WARPS = 4
# the fused kernel for calls of at most this many output elements (rows · tokens · out)
FUSED_MAX_OUTPUTS = 1 << 21


@triton.jit
def _active(index, scale, loras):
    return (index >= 0) & (index < loras) & (scale != 0.0)


@triton.jit
def _dot(p, q, IEEE: tl.constexpr):
    if IEEE:  # float32 inputs: IEEE products, no TF32
        product = tl.dot(p, q, input_precision="ieee")
    else:
        product = tl.dot(p, q)
    return product


@triton.jit
def _shrunk(
    x_ptr,
    a_ptr,
    row,
    index,
    t,
    k,
    T,
    K,
    IN: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr,
):
    """``x[row, t]·A[index]`` for the tokens ``t``, accumulated in float32 over ``in``."""
    acc = tl.full((BLOCK_T, BLOCK_K), 0.0, tl.float32)
    for start in range(0, IN, BLOCK_I):
        i = start + tl.arange(0, BLOCK_I)
        x = tl.load(
            x_ptr + (row * T + t[:, None]) * IN + i[None, :],
            mask=(t[:, None] < T) & (i[None, :] < IN),
            other=0.0,
        )
        a = tl.load(
            a_ptr + (index * IN + i[:, None]) * K + k[None, :],
            mask=(i[:, None] < IN) & (k[None, :] < K),
            other=0.0,
        )
        acc += _dot(x, a, IEEE)
    return acc


@triton.jit
def _b_tile(b_ptr, index, k, o, K, OUT):
    return tl.load(
        b_ptr + (index * K + k[:, None]) * OUT + o[None, :],
        mask=(k[:, None] < K) & (o[None, :] < OUT),
        other=0.0,
    )


@triton.jit
def _add_to_out(out_ptr, row, t, o, T, OUT, acc):
    """``out[row, t, o] += acc``, in float32, rounded once to ``out``'s dtype."""
    mask = (t[:, None] < T) & (o[None, :] < OUT)
    pointers = out_ptr + (row * T + t[:, None]) * OUT + o[None, :]
    base = tl.load(pointers, mask=mask, other=0.0).to(tl.float32)
    tl.store(pointers, (base + acc).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _out_tile_kernel(
    x_ptr,
    a_ptr,
    v_ptr,
    b_ptr,
    index_ptr,
    scale_ptr,
    out_ptr,
    T,
    K,
    OUT,
    L,
    IN: tl.constexpr,  # a constant: the interpreter cannot loop to a runtime bound
    S: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_O: tl.constexpr,
    FUSED: tl.constexpr,  # v from x·A here (fused), or from the shrink's scratch (expand)
    IEEE: tl.constexpr,
):
    """One ``[BLOCK_T, BLOCK_O]`` tile of one row's ``out``: the fused kernel, or the
    two-launch version's *expand*."""
    row = tl.program_id(2)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    k = tl.arange(0, BLOCK_K)
    acc = tl.full((BLOCK_T, BLOCK_O), 0.0, tl.float32)
    active = 0
    for s in tl.static_range(S):  # unrolled: ``active`` may change type from the first slot on
        index = tl.load(index_ptr + row * S + s)
        scale = tl.load(scale_ptr + row * S + s).to(tl.float32)
        is_active = _active(index, scale, L)
        active += is_active.to(tl.int32)
        if is_active:
            if FUSED:
                shrunk = _shrunk(
                    x_ptr, a_ptr, row, index, t, k, T, K, IN, BLOCK_T, BLOCK_I, BLOCK_K, IEEE
                )
                v = (shrunk * scale).to(a_ptr.dtype.element_ty)
            else:
                v = tl.load(
                    v_ptr + ((row * S + s) * T + t[:, None]) * K + k[None, :],
                    mask=(t[:, None] < T) & (k[None, :] < K),
                    other=0.0,
                )
            acc += _dot(v, _b_tile(b_ptr, index, k, o, K, OUT), IEEE)
    if active > 0:
        _add_to_out(out_ptr, row, t, o, T, OUT, acc)


@triton.jit
def _shrink_kernel(
    x_ptr,
    a_ptr,
    index_ptr,
    scale_ptr,
    v_ptr,
    T,
    K,
    L,
    S,
    IN: tl.constexpr,  # a constant: the interpreter cannot loop to a runtime bound
    BLOCK_T: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr,
):
    slot = tl.program_id(1)  # row * S + s
    row = slot // S
    index = tl.load(index_ptr + slot)
    scale = tl.load(scale_ptr + slot).to(tl.float32)
    if _active(index, scale, L):
        t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        k = tl.arange(0, BLOCK_K)
        acc = _shrunk(x_ptr, a_ptr, row, index, t, k, T, K, IN, BLOCK_T, BLOCK_I, BLOCK_K, IEEE)
        v = (acc * scale).to(v_ptr.dtype.element_ty)
        tl.store(
            v_ptr + (slot * T + t[:, None]) * K + k[None, :],
            v,
            mask=(t[:, None] < T) & (k[None, :] < K),
        )


def rank_block(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))


def lora_rows_add(
    out: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    indices: torch.Tensor,
    scales: torch.Tensor,
) -> None:
    rows, tokens, width = x.shape
    loras, _, rank = a.shape
    slots = indices.shape[1]
    features = b.shape[2]
    if rows == 0 or tokens == 0 or slots == 0:
        return
    fused = rows * tokens * features <= FUSED_MAX_OUTPUTS
    block_t, block_i, block_o = (
        (FUSED_BLOCK_T, FUSED_BLOCK_I, FUSED_BLOCK_O) if fused else (BLOCK_T, BLOCK_I, BLOCK_O)
    )
    block_k = rank_block(rank)
    ieee = x.dtype == torch.float32
    scratch = x  # the fused kernel keeps v in registers (the argument is not read)
    if not fused:
        scratch = torch.empty((rows, slots, tokens, rank), dtype=a.dtype, device=x.device)
        _shrink_kernel[(triton.cdiv(tokens, block_t), rows * slots)](
            x,
            a,
            indices,
            scales,
            scratch,
            tokens,
            rank,
            loras,
            slots,
            IN=width,
            BLOCK_T=block_t,
            BLOCK_I=block_i,
            BLOCK_K=block_k,
            IEEE=ieee,
            num_warps=NUM_WARPS,
        )
    _out_tile_kernel[(triton.cdiv(tokens, block_t), triton.cdiv(features, block_o), rows)](
        x,
        a,
        scratch,
        b,
        indices,
        scales,
        out,
        tokens,
        rank,
        features,
        loras,
        IN=width,
        S=slots,
        BLOCK_T=block_t,
        BLOCK_I=block_i,
        BLOCK_K=block_k,
        BLOCK_O=block_o,
        FUSED=fused,
        IEEE=ieee,
        num_warps=NUM_WARPS,
    )

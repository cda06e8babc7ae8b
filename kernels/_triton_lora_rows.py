"""Triton kernel of :mod:`livediff.kernels.lora_rows` (imported lazily: needs Triton).

One launch per layer, grid ``(cdiv(T, BLOCK_T), cdiv(out, BLOCK_O), rows)``: a program owns a
``[BLOCK_T, BLOCK_O]`` tile of one row's ``out``. For each of the row's active slots it
computes that slot's ``v = scale · x·A`` for its ``BLOCK_T`` tokens (float32 accumulation over
``in``, one rounding to ``A``'s dtype, as Punica's shrink) and adds ``v·B`` for its output
columns in float32; after the last slot it adds the sum to its ``out`` tile once.

``v`` never leaves the registers: the programs of one token block that own other output
columns recompute it (``x`` comes from L2 the second time; the shrink is a ``[BLOCK_T, in] ×
[in, rank]`` product, small next to the tile's expand and its ``out`` traffic). This replaced
a two-launch version (shrink into a scratch buffer, then expand; Punica's SGMV layout): one
launch instead of two per layer and no scratch round trip; bench/results/README.md has the
before and after.

A program whose row has no active slot returns after loading the row's indices and scales: a
row without LoRA costs only that. The rank is padded to a power of two of at least 16
(``tl.dot``'s smallest tile) with masked loads; float32 inputs use IEEE products (no TF32), so
the float32 result matches the reference to rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_T = 64
BLOCK_I = 64
BLOCK_O = 64
NUM_WARPS = 4


@triton.jit
def _active(index, scale, loras):
    return (index >= 0) & (index < loras) & (scale != 0.0)


@triton.jit
def _lora_rows_kernel(
    x_ptr,
    a_ptr,
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
    IEEE: tl.constexpr,
):
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
            shrunk = tl.full((BLOCK_T, BLOCK_K), 0.0, tl.float32)
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
                if IEEE:
                    shrunk += tl.dot(x, a, input_precision="ieee")
                else:
                    shrunk += tl.dot(x, a)
            v = (shrunk * scale).to(a_ptr.dtype.element_ty)
            b = tl.load(
                b_ptr + (index * K + k[:, None]) * OUT + o[None, :],
                mask=(k[:, None] < K) & (o[None, :] < OUT),
                other=0.0,
            )
            if IEEE:
                acc += tl.dot(v, b, input_precision="ieee")
            else:
                acc += tl.dot(v, b)
    if active > 0:
        mask = (t[:, None] < T) & (o[None, :] < OUT)
        pointers = out_ptr + (row * T + t[:, None]) * OUT + o[None, :]
        base = tl.load(pointers, mask=mask, other=0.0).to(tl.float32)
        tl.store(pointers, (base + acc).to(out_ptr.dtype.element_ty), mask=mask)


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
    grid = (triton.cdiv(tokens, BLOCK_T), triton.cdiv(features, BLOCK_O), rows)
    _lora_rows_kernel[grid](
        x,
        a,
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
        BLOCK_T=BLOCK_T,
        BLOCK_I=BLOCK_I,
        BLOCK_K=rank_block(rank),
        BLOCK_O=BLOCK_O,
        IEEE=x.dtype == torch.float32,
        num_warps=NUM_WARPS,
    )

"""Triton kernel of :mod:`livediff.kernels.fused_step` (imported lazily: needs Triton).

Grid: ``(cdiv(P, BLOCK), F)`` with ``P`` the elements of one row. A program owns ``BLOCK``
positions of frame ``j`` and walks the blocks from the last step down to the first (unrolled, ``STEPS`` is a
compile-time constant): the
step-``k`` row is read before the step-``k - 1`` iteration overwrites it with its shifted
successor, so ``x_t`` and ``stock`` update in place without a race (same positions, same
threads, program order). Math in float32 with IEEE division (as the reference), one
rounding per stored value.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 512
NUM_WARPS = 4
MODES = {"none": 0, "full": 1, "self": 2, "initialize": 3}


@triton.jit
def _load_stock(eps_ptr, stock_ptr, offs, mask, first_block, ONETIME: tl.constexpr):
    """The row's stock noise; Onetime-negative sets the first block's to its negative eps."""
    if ONETIME:
        if first_block:
            stock = tl.load(eps_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(stock_ptr + offs, stock.to(stock_ptr.dtype.element_ty), mask=mask)
        else:
            stock = tl.load(stock_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        stock = tl.load(stock_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return stock


@triton.jit
def _step_kernel(
    x_ptr,
    eps_ptr,
    stock_ptr,
    noise_ptr,
    coef_ptr,
    g_ptr,
    d_ptr,
    out_ptr,
    P,
    R,
    F,
    U,
    STEPS: tl.constexpr,
    MODE: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    j = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < P
    kind = x_ptr.dtype.element_ty
    g = tl.load(g_ptr).to(tl.float32)
    d = tl.load(d_ptr).to(tl.float32)
    # Unrolled, last block first (it reads x_t[k + 1] before block k overwrites it); k is a
    # compile-time constant (assigning a constexpr in the loop body is rejected by Triton 3.6).
    for k in tl.static_range(STEPS - 1, -1, -1):
        r = k * F + j
        alpha = tl.load(coef_ptr + r).to(tl.float32)
        beta = tl.load(coef_ptr + R + r).to(tl.float32)
        c_skip = tl.load(coef_ptr + 2 * R + r).to(tl.float32)
        c_out = tl.load(coef_ptr + 3 * R + r).to(tl.float32)
        x = tl.load(x_ptr + r * P + offs, mask=mask, other=0.0).to(tl.float32)
        cond = tl.load(eps_ptr + (U + r) * P + offs, mask=mask, other=0.0).to(tl.float32)
        stock = tl.full(
            (BLOCK,), 0.0, tl.float32
        )  # tl.zeros is a @jit helper the interpreter may not run
        if MODE == 0:
            guided = cond
        else:
            if MODE == 1:
                negative = tl.load(eps_ptr + r * P + offs, mask=mask, other=0.0).to(tl.float32)
            else:
                stock = _load_stock(eps_ptr, stock_ptr, r * P + offs, mask, k == 0, MODE == 3)
                negative = d * stock
            guided = negative + g * (cond - negative)
        x0 = tl.div_rn(c_out * (x - beta * guided), alpha) + c_skip * x
        if k == STEPS - 1:
            tl.store(out_ptr + j * P + offs, x0.to(kind), mask=mask)
        else:
            nxt = r + F
            alpha_next = tl.load(coef_ptr + nxt).to(tl.float32)
            beta_next = tl.load(coef_ptr + R + nxt).to(tl.float32)
            new_x = alpha_next * x0
            if HAS_NOISE:
                noise = tl.load(noise_ptr + nxt * P + offs, mask=mask, other=0.0).to(tl.float32)
                new_x = new_x + beta_next * noise
            new_x = new_x.to(kind)
            tl.store(x_ptr + nxt * P + offs, new_x, mask=mask)
            if MODE >= 2:
                x_ref = tl.div_rn(x - beta * stock, alpha)
                new_stock = tl.div_rn(new_x.to(tl.float32) - alpha_next * x_ref, beta_next)
                tl.store(stock_ptr + nxt * P + offs, new_stock.to(kind), mask=mask)


def step(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    stock: torch.Tensor | None,
    noise: torch.Tensor | None,
    coefficients: torch.Tensor,
    guidance_scale: torch.Tensor,
    delta: torch.Tensor,
    out: torch.Tensor,
    mode: str,
    frame_buffer_size: int,
) -> None:
    rows = x_t.shape[0]
    per_row = x_t[0].numel()
    grid = (triton.cdiv(per_row, BLOCK), frame_buffer_size)
    _step_kernel[grid](
        x_t,
        eps,
        stock if stock is not None else x_t,
        noise if noise is not None else x_t,
        coefficients,
        guidance_scale,
        delta,
        out,
        per_row,
        rows,
        frame_buffer_size,
        eps.shape[0] - rows,
        STEPS=rows // frame_buffer_size,
        MODE=MODES[mode],
        HAS_NOISE=noise is not None,
        BLOCK=BLOCK,
        num_warps=NUM_WARPS,
    )

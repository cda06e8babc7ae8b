"""Triton kernel of :mod:`livediff.kernels.preprocess` (imported lazily: needs Triton).

One program handles ``BLOCK`` output pixels of one frame and writes all three channels.
Each output pixel gathers its four bilinear neighbours from the source (RGB bytes, or Y plus
the replicated chroma sample), converts them to float RGB in [0, 255] and blends them in
the order ``interpolate`` uses, with IEEE division like the reference, so fp32 results
match it to a few ulp (FMA contraction is the remaining difference).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from livediff.kernels import yuv

RGB, I420, NV12 = 0, 1, 2

BLOCK = 512
NUM_WARPS = 4

_Y_SCALE = tl.constexpr(yuv.Y_SCALE)
_R_FROM_V = tl.constexpr(yuv.R_FROM_V)
_G_FROM_U = tl.constexpr(yuv.G_FROM_U)
_G_FROM_V = tl.constexpr(yuv.G_FROM_V)
_B_FROM_U = tl.constexpr(yuv.B_FROM_U)


@triton.jit
def _load_rgb(p0, p1, p2, n, row, col, H, W, CH, CW, mask, FORMAT: tl.constexpr):
    """Float RGB in [0, 255] of source pixels (row, col) of frame n."""
    if FORMAT == 0:
        base = p0 + n * H * W * 3 + (row * W + col) * 3
        red = tl.load(base, mask=mask, other=0).to(tl.float32)
        green = tl.load(base + 1, mask=mask, other=0).to(tl.float32)
        blue = tl.load(base + 2, mask=mask, other=0).to(tl.float32)
    else:
        luma = tl.load(p0 + n * H * W + row * W + col, mask=mask, other=0).to(tl.float32)
        chroma = n * CH * CW + (row // 2) * CW + col // 2
        if FORMAT == 1:
            cb = tl.load(p1 + chroma, mask=mask, other=0).to(tl.float32)
            cr = tl.load(p2 + chroma, mask=mask, other=0).to(tl.float32)
        else:
            cb = tl.load(p1 + chroma * 2, mask=mask, other=0).to(tl.float32)
            cr = tl.load(p1 + chroma * 2 + 1, mask=mask, other=0).to(tl.float32)
        luma = (luma - 16.0) * _Y_SCALE
        cb = cb - 128.0
        cr = cr - 128.0
        red = tl.minimum(tl.maximum(luma + cr * _R_FROM_V, 0.0), 255.0)
        green = tl.minimum(tl.maximum(luma - cb * _G_FROM_U - cr * _G_FROM_V, 0.0), 255.0)
        blue = tl.minimum(tl.maximum(luma + cb * _B_FROM_U, 0.0), 255.0)
    return red, green, blue


@triton.jit
def _source_index(dst, scale, size):
    """``interpolate``'s source coordinate: left index, right index, right weight."""
    real = tl.maximum((dst.to(tl.float32) + 0.5) * scale - 0.5, 0.0)
    low = tl.minimum(real.to(tl.int32), size - 1)  # real >= 0, so the cast floors
    high = tl.minimum(low + 1, size - 1)
    weight = tl.minimum(tl.maximum(real - low.to(tl.float32), 0.0), 1.0)
    return low, high, weight


@triton.jit
def _blend(v00, v01, v10, v11, wx, wy):
    return (1.0 - wy) * ((1.0 - wx) * v00 + wx * v01) + wy * ((1.0 - wx) * v10 + wx * v11)


@triton.jit
def _preprocess_kernel(
    p0,
    p1,
    p2,
    out_ptr,
    H,
    W,
    CH,
    CW,
    top,
    left,
    crop_h,
    crop_w,
    out_h,
    out_w,
    scale_h,
    scale_w,
    FORMAT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    n = tl.program_id(1)
    pixel = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    plane = out_h * out_w
    mask = pixel < plane
    oy = pixel // out_w
    ox = pixel % out_w
    y0, y1, wy = _source_index(oy, scale_h, crop_h)
    x0, x1, wx = _source_index(ox, scale_w, crop_w)
    y0 += top
    y1 += top
    x0 += left
    x1 += left
    r00, g00, b00 = _load_rgb(p0, p1, p2, n, y0, x0, H, W, CH, CW, mask, FORMAT)
    r01, g01, b01 = _load_rgb(p0, p1, p2, n, y0, x1, H, W, CH, CW, mask, FORMAT)
    r10, g10, b10 = _load_rgb(p0, p1, p2, n, y1, x0, H, W, CH, CW, mask, FORMAT)
    r11, g11, b11 = _load_rgb(p0, p1, p2, n, y1, x1, H, W, CH, CW, mask, FORMAT)
    red = tl.div_rn(_blend(r00, r01, r10, r11, wx, wy), 127.5) - 1.0
    green = tl.div_rn(_blend(g00, g01, g10, g11, wx, wy), 127.5) - 1.0
    blue = tl.div_rn(_blend(b00, b01, b10, b11, wx, wy), 127.5) - 1.0
    dst = out_ptr + n * 3 * plane + pixel
    kind = out_ptr.dtype.element_ty
    tl.store(dst, red.to(kind), mask=mask)
    tl.store(dst + plane, green.to(kind), mask=mask)
    tl.store(dst + 2 * plane, blue.to(kind), mask=mask)


def preprocess(
    fmt: int, planes: tuple[torch.Tensor, ...], crop: tuple[int, int, int, int], out: torch.Tensor
) -> None:
    """Fill ``out [N, 3, h, w]`` from contiguous source planes (shapes checked by the caller)."""
    top, left, crop_h, crop_w = crop
    n, _, out_h, out_w = out.shape
    height, width = planes[0].shape[1], planes[0].shape[2]
    chroma_h, chroma_w = yuv.chroma_size(height, width)
    p0 = planes[0]
    p1 = planes[1] if len(planes) > 1 else p0
    p2 = planes[2] if len(planes) > 2 else p0
    grid = (triton.cdiv(out_h * out_w, BLOCK), n)
    _preprocess_kernel[grid](
        p0,
        p1,
        p2,
        out,
        height,
        width,
        chroma_h,
        chroma_w,
        top,
        left,
        crop_h,
        crop_w,
        out_h,
        out_w,
        crop_h / out_h,
        crop_w / out_w,
        FORMAT=fmt,
        BLOCK=BLOCK,
        num_warps=NUM_WARPS,
    )

"""Triton kernels of :mod:`livediff.kernels.postprocess` (imported lazily: needs Triton).

Rounding half to even without libdevice: for ``v`` in [0, 255], ``(v + 2**23) - 2**23``
rounds to an integer in fp32 round-to-nearest-even (the ulp at 2**23 is 1), the same as
``torch.round``. Neither LLVM nor ptxas reassociates it without fast-math flags, and the
GPU parity test checks ties bit-exactly. I420 uses the same 16-bit fixed point as the
reference, so both kernels are bit-exact.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from livediff.kernels import yuv

BLOCK = 512
NUM_WARPS = 4

_YR, _YG, _YB = (tl.constexpr(c) for c in yuv.Y_FROM_RGB)
_UR, _UG, _UB = (tl.constexpr(c) for c in yuv.U_FROM_RGB)
_VR, _VG, _VB = (tl.constexpr(c) for c in yuv.V_FROM_RGB)
_Y_SHIFT = tl.constexpr(yuv.FIXED_SHIFT)
_Y_HALF = tl.constexpr(1 << (yuv.FIXED_SHIFT - 1))
_C_SHIFT = tl.constexpr(yuv.FIXED_SHIFT + 2)  # chroma sums are scaled to four samples
_C_HALF = tl.constexpr(1 << (yuv.FIXED_SHIFT + 1))


@triton.jit
def _to_byte(x):
    """[-1, 1] float → integer-valued float32 in [0, 255], as the reference rounds it."""
    v = tl.minimum(tl.maximum((x.to(tl.float32) + 1.0) * 127.5, 0.0), 255.0)
    return (v + 8388608.0) - 8388608.0


@triton.jit
def _rgb_kernel(src, dst, plane, BLOCK: tl.constexpr):
    n = tl.program_id(1)
    pixel = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = pixel < plane
    base = src + n * 3 * plane + pixel
    red = _to_byte(tl.load(base, mask=mask, other=0.0))
    green = _to_byte(tl.load(base + plane, mask=mask, other=0.0))
    blue = _to_byte(tl.load(base + 2 * plane, mask=mask, other=0.0))
    out = dst + (n * plane + pixel) * 3
    tl.store(out, red.to(tl.uint8), mask=mask)
    tl.store(out + 1, green.to(tl.uint8), mask=mask)
    tl.store(out + 2, blue.to(tl.uint8), mask=mask)


@triton.jit
def _pixel(src, plane, n, row, col, H, W, mask):
    """One pixel of the 2×2 block: its uint8 RGB as int32, whether it exists, and its Y."""
    present = mask & (row < H) & (col < W)
    base = src + n * 3 * plane + row * W + col
    red = _to_byte(tl.load(base, mask=present, other=0.0)).to(tl.int32)
    green = _to_byte(tl.load(base + plane, mask=present, other=0.0)).to(tl.int32)
    blue = _to_byte(tl.load(base + 2 * plane, mask=present, other=0.0)).to(tl.int32)
    luma = ((_YR * red + _YG * green + _YB * blue + _Y_HALF) >> _Y_SHIFT) + 16
    keep = present.to(tl.int32)
    return red * keep, green * keep, blue * keep, keep, luma, present


@triton.jit
def _i420_kernel(src, dst, H, W, CH, CW, BLOCK: tl.constexpr):
    n = tl.program_id(1)
    q = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    chroma = CH * CW
    mask = q < chroma
    row = (q // CW) * 2
    col = (q % CW) * 2
    plane = H * W
    out = dst + n * (plane + 2 * chroma)
    r0, g0, b0, c0, y0, m0 = _pixel(src, plane, n, row, col, H, W, mask)
    r1, g1, b1, c1, y1, m1 = _pixel(src, plane, n, row, col + 1, H, W, mask)
    r2, g2, b2, c2, y2, m2 = _pixel(src, plane, n, row + 1, col, H, W, mask)
    r3, g3, b3, c3, y3, m3 = _pixel(src, plane, n, row + 1, col + 1, H, W, mask)
    tl.store(out + row * W + col, y0.to(tl.uint8), mask=m0)
    tl.store(out + row * W + col + 1, y1.to(tl.uint8), mask=m1)
    tl.store(out + (row + 1) * W + col, y2.to(tl.uint8), mask=m2)
    tl.store(out + (row + 1) * W + col + 1, y3.to(tl.uint8), mask=m3)
    # Scale each block sum to four samples (x4 / count), then one shift divides and rounds.
    count = tl.maximum(c0 + c1 + c2 + c3, 1)
    factor = 4 // count
    red = (r0 + r1 + r2 + r3) * factor
    green = (g0 + g1 + g2 + g3) * factor
    blue = (b0 + b1 + b2 + b3) * factor
    u = ((_UR * red + _UG * green + _UB * blue + _C_HALF) >> _C_SHIFT) + 128
    v = ((_VR * red + _VG * green + _VB * blue + _C_HALF) >> _C_SHIFT) + 128
    u = tl.minimum(tl.maximum(u, 0), 255)
    v = tl.minimum(tl.maximum(v, 0), 255)
    tl.store(out + plane + q, u.to(tl.uint8), mask=mask)
    tl.store(out + plane + chroma + q, v.to(tl.uint8), mask=mask)


def to_rgb(images: torch.Tensor, out: torch.Tensor) -> None:
    n, _, height, width = images.shape
    plane = height * width
    _rgb_kernel[(triton.cdiv(plane, BLOCK), n)](
        images, out, plane, BLOCK=BLOCK, num_warps=NUM_WARPS
    )


def to_i420(images: torch.Tensor, out: torch.Tensor) -> None:
    n, _, height, width = images.shape
    chroma_h, chroma_w = yuv.chroma_size(height, width)
    grid = (triton.cdiv(chroma_h * chroma_w, BLOCK), n)
    _i420_kernel[grid](
        images, out, height, width, chroma_h, chroma_w, BLOCK=BLOCK, num_warps=NUM_WARPS
    )

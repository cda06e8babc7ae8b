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
_C_SHIFT = tl.constexpr(yuv.FIXED_SHIFT + yuv.CHROMA_WEIGHT_BITS)
_C_HALF = tl.constexpr(1 << (yuv.FIXED_SHIFT + yuv.CHROMA_WEIGHT_BITS - 1))


@triton.jit
def _to_byte(x):
    """[-1, 1] float → integer-valued float32 in [0, 255], as the reference rounds it."""
    v = tl.minimum(tl.maximum((x.to(tl.float32) + 1.0) * 127.5, 0.0), 255.0)
    return (v + 8388608.0) - 8388608.0


@triton.jit
def _rgb_kernel(src, dst, plane, sn, sc, sp, BLOCK: tl.constexpr):
    """``sn``, ``sc``, ``sp``: the input's strides of an image, a channel and a pixel (NCHW
    contiguous: 3·H·W, H·W, 1; channels-last: 3·H·W, 1, 3)."""
    n = tl.program_id(1)
    pixel = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = pixel < plane
    base = src + n * sn + pixel * sp
    red = _to_byte(tl.load(base, mask=mask, other=0.0))
    green = _to_byte(tl.load(base + sc, mask=mask, other=0.0))
    blue = _to_byte(tl.load(base + 2 * sc, mask=mask, other=0.0))
    out = dst + (n * plane + pixel) * 3
    tl.store(out, red.to(tl.uint8), mask=mask)
    tl.store(out + 1, green.to(tl.uint8), mask=mask)
    tl.store(out + 2, blue.to(tl.uint8), mask=mask)


@triton.jit
def _rgb_at(src, sn, sc, sp, n, row, col, W, mask):
    """The uint8 RGB of one pixel as int32, exactly as ``model_output_to_rgb`` rounds it."""
    base = src + n * sn + (row * W + col) * sp
    red = _to_byte(tl.load(base, mask=mask, other=0.0)).to(tl.int32)
    green = _to_byte(tl.load(base + sc, mask=mask, other=0.0)).to(tl.int32)
    blue = _to_byte(tl.load(base + 2 * sc, mask=mask, other=0.0)).to(tl.int32)
    return red, green, blue


@triton.jit
def _luma(red, green, blue):
    return ((red * _YR + green * _YG + blue * _YB + _Y_HALF) >> _Y_SHIFT) + 16


@triton.jit
def _i420_kernel(src, dst, H, W, CH, CW, sn, sc, sp, BLOCK: tl.constexpr):
    """One program per BLOCK chroma samples; each also writes the Y of its own 2×2 block."""
    n = tl.program_id(1)
    q = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    chroma = CH * CW
    mask = q < chroma
    row = (q // CW) * 2
    col = (q % CW) * 2
    col1 = tl.minimum(col + 1, W - 1)
    plane = H * W
    out = dst + n * (plane + 2 * chroma)
    # Rows 2j-1 … 2j+2 (edges clamped); the middle two hold this block's Y samples.
    ra, ga, ba = _rgb_at(src, sn, sc, sp, n, tl.maximum(row - 1, 0), col, W, mask)
    ra1, ga1, ba1 = _rgb_at(src, sn, sc, sp, n, tl.maximum(row - 1, 0), col1, W, mask)
    rb, gb, bb = _rgb_at(src, sn, sc, sp, n, row, col, W, mask)
    rb1, gb1, bb1 = _rgb_at(src, sn, sc, sp, n, row, col1, W, mask)
    rc, gc, bc = _rgb_at(src, sn, sc, sp, n, tl.minimum(row + 1, H - 1), col, W, mask)
    rc1, gc1, bc1 = _rgb_at(src, sn, sc, sp, n, tl.minimum(row + 1, H - 1), col1, W, mask)
    rd, gd, bd = _rgb_at(src, sn, sc, sp, n, tl.minimum(row + 2, H - 1), col, W, mask)
    rd1, gd1, bd1 = _rgb_at(src, sn, sc, sp, n, tl.minimum(row + 2, H - 1), col1, W, mask)
    right = mask & (col + 1 < W)
    lower = mask & (row + 1 < H)
    tl.store(out + row * W + col, _luma(rb, gb, bb).to(tl.uint8), mask=mask)
    tl.store(out + row * W + col + 1, _luma(rb1, gb1, bb1).to(tl.uint8), mask=right)
    tl.store(out + (row + 1) * W + col, _luma(rc, gc, bc).to(tl.uint8), mask=lower)
    tl.store(out + (row + 1) * W + col + 1, _luma(rc1, gc1, bc1).to(tl.uint8), mask=lower & right)
    # Horizontal pairs, vertical (1, 3, 3, 1): weights add up to 16 = 2**4.
    red = (ra + ra1) + 3 * (rb + rb1) + 3 * (rc + rc1) + (rd + rd1)
    green = (ga + ga1) + 3 * (gb + gb1) + 3 * (gc + gc1) + (gd + gd1)
    blue = (ba + ba1) + 3 * (bb + bb1) + 3 * (bc + bc1) + (bd + bd1)
    u = ((red * _UR + green * _UG + blue * _UB + _C_HALF) >> _C_SHIFT) + 128
    v = ((red * _VR + green * _VG + blue * _VB + _C_HALF) >> _C_SHIFT) + 128
    u = tl.minimum(tl.maximum(u, 0), 255)
    v = tl.minimum(tl.maximum(v, 0), 255)
    tl.store(out + plane + q, u.to(tl.uint8), mask=mask)
    tl.store(out + plane + chroma + q, v.to(tl.uint8), mask=mask)


def pixel_strides(images: torch.Tensor) -> tuple[int, int, int]:
    """Strides of an image, a channel and a pixel of ``[N, 3, H, W]`` whose rows of pixels
    are dense (``stride(H) == W · stride(W)``: NCHW contiguous or channels-last; one pixel a
    row steps by rows)."""
    width = images.shape[3]
    return images.stride(0), images.stride(1), images.stride(2 if width == 1 else 3)


def to_rgb(images: torch.Tensor, out: torch.Tensor) -> None:
    n, _, height, width = images.shape
    plane = height * width
    _rgb_kernel[(triton.cdiv(plane, BLOCK), n)](
        images, out, plane, *pixel_strides(images), BLOCK=BLOCK, num_warps=NUM_WARPS
    )


def to_i420(images: torch.Tensor, out: torch.Tensor) -> None:
    n, _, height, width = images.shape
    chroma_h, chroma_w = yuv.chroma_size(height, width)
    grid = (triton.cdiv(chroma_h * chroma_w, BLOCK), n)
    _i420_kernel[grid](
        images,
        out,
        height,
        width,
        chroma_h,
        chroma_w,
        *pixel_strides(images),
        BLOCK=BLOCK,
        num_warps=NUM_WARPS,
    )

"""Decoded frames → model input: crop, bilinear resize, NCHW, scaled to [-1, 1], in one pass.

Inputs: uint8 RGB ``[N, H, W, 3]``, or YUV 4:2:0 planes (I420 or NV12, BT.601 limited range;
see :mod:`livediff.kernels.yuv`). Output: ``[N, 3, height, width]`` in [-1, 1] as float16,
bfloat16 or float32.

Resampling is bilinear with ``align_corners=False`` and no antialiasing: output pixel centres
map to ``(i + 0.5) * in / out - 0.5`` in the crop, clamped at the edges. That is what
``torch.nn.functional.interpolate(mode="bilinear")`` does, and what a one-pass GPU kernel
can do cheaply. When the crop already has the output size, pixels are copied unresampled.

YUV input is converted to float RGB in [0, 255] (unrounded) before resampling, exactly as
:func:`~livediff.kernels.yuv.i420_to_rgb_float` does.

Ops (``torch.ops.livediff.*``): ``preprocess_rgb``, ``preprocess_i420``, ``preprocess_nv12``.
Each runs a Triton kernel on CUDA when the guard in :mod:`livediff.kernels._dispatch` holds,
and the PyTorch reference otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from livediff.exceptions import KernelInputError
from livediff.kernels import yuv
from livediff.kernels._dispatch import (
    FLOAT_DTYPES,
    float_dtype_problem,
    implementation,
    run_triton,
    triton_refusal,
)

Crop = tuple[int, int, int, int]  # top, left, height, width in source pixels

OUTPUT_DTYPES = (*FLOAT_DTYPES, torch.float64)


# ---------------------------------------------------------------------------- public API
def rgb_to_model_input(
    frames: torch.Tensor, height: int, width: int, crop: Crop, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``[N, H, W, 3]`` uint8 → ``[N, 3, height, width]`` in [-1, 1]."""
    top, left, crop_h, crop_w = crop
    return implementation(
        torch.ops.livediff.preprocess_rgb,
        _preprocess_rgb_cuda,
        _preprocess_rgb_reference,
        frames.device,
    )(frames, top, left, crop_h, crop_w, height, width, dtype)


def i420_to_model_input(
    y: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    height: int,
    width: int,
    crop: Crop,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """I420 planes ``y [N, H, W]``, ``u``/``v [N, ceil(H/2), ceil(W/2)]`` → model input."""
    top, left, crop_h, crop_w = crop
    return implementation(
        torch.ops.livediff.preprocess_i420,
        _preprocess_i420_cuda,
        _preprocess_i420_reference,
        y.device,
    )(y, u, v, top, left, crop_h, crop_w, height, width, dtype)


def nv12_to_model_input(
    y: torch.Tensor,
    uv: torch.Tensor,
    height: int,
    width: int,
    crop: Crop,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """NV12 planes ``y [N, H, W]``, ``uv [N, ceil(H/2), ceil(W/2), 2]`` → model input."""
    top, left, crop_h, crop_w = crop
    return implementation(
        torch.ops.livediff.preprocess_nv12,
        _preprocess_nv12_cuda,
        _preprocess_nv12_reference,
        y.device,
    )(y, uv, top, left, crop_h, crop_w, height, width, dtype)


# ---------------------------------------------------------------------------- checks
def check_resize(
    source_h: int, source_w: int, crop: Crop, height: int, width: int, dtype: torch.dtype
) -> None:
    top, left, crop_h, crop_w = crop
    if height < 1 or width < 1:
        raise KernelInputError(f"output size {width}×{height} must be at least 1×1", field="size")
    if (
        crop_h < 1
        or crop_w < 1
        or top < 0
        or left < 0
        or top + crop_h > source_h
        or left + crop_w > source_w
    ):
        raise KernelInputError(
            f"crop (top, left, height, width)={crop} does not fit a {source_w}×{source_h} frame",
            field="crop",
        )
    if dtype not in OUTPUT_DTYPES:
        raise KernelInputError(
            f"output dtype {dtype} is not supported: expected one of {OUTPUT_DTYPES}", field="dtype"
        )


def _check_rgb(frames: torch.Tensor) -> None:
    if frames.ndim != 4 or frames.shape[3] != 3 or frames.dtype != torch.uint8:
        raise KernelInputError(
            f"expected uint8 RGB frames [N, H, W, 3], got {frames.dtype} {tuple(frames.shape)}",
            field="frames",
        )


# ---------------------------------------------------------------------------- reference
def resize_reference(
    images: torch.Tensor, crop: Crop, height: int, width: int, dtype: torch.dtype
) -> torch.Tensor:
    """``[N, 3, H, W]`` float32 in [0, 255] → cropped, resized, scaled (the shared reference tail)."""
    top, left, crop_h, crop_w = crop
    region = images[:, :, top : top + crop_h, left : left + crop_w]
    if (crop_h, crop_w) != (height, width):
        region = F.interpolate(region, size=(height, width), mode="bilinear", align_corners=False)
    return (region / 127.5 - 1.0).to(dtype).contiguous()


def reference_rgb(
    frames: torch.Tensor, crop: Crop, height: int, width: int, dtype: torch.dtype
) -> torch.Tensor:
    top, left, crop_h, crop_w = crop
    region = frames[:, top : top + crop_h, left : left + crop_w, :]  # crop before converting
    images = region.permute(0, 3, 1, 2).to(torch.float32)
    return resize_reference(images, (0, 0, crop_h, crop_w), height, width, dtype)


def reference_i420(
    y: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    crop: Crop,
    height: int,
    width: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    return resize_reference(yuv.i420_to_rgb_float(y, u, v), crop, height, width, dtype)


def reference_nv12(
    y: torch.Tensor, uv: torch.Tensor, crop: Crop, height: int, width: int, dtype: torch.dtype
) -> torch.Tensor:
    return resize_reference(yuv.nv12_to_rgb_float(y, uv), crop, height, width, dtype)


def _empty_output(like: torch.Tensor, height: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    return like.new_empty((like.shape[0], 3, height, width), dtype=dtype)


def _triton_runs(op: str, dtype: torch.dtype, **planes: torch.Tensor) -> bool:
    reason = triton_refusal(float_dtype_problem("the output dtype", dtype), **planes)
    return run_triton(op, reason, next(iter(planes.values())).device)


# ---------------------------------------------------------------------------- RGB op
def _preprocess_rgb_reference(
    frames: torch.Tensor,
    top: int,
    left: int,
    crop_height: int,
    crop_width: int,
    height: int,
    width: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Reference implementation (every device)."""
    crop = (top, left, crop_height, crop_width)
    _check_rgb(frames)
    check_resize(frames.shape[1], frames.shape[2], crop, height, width, dtype)
    return reference_rgb(frames, crop, height, width, dtype)


preprocess_rgb = torch.library.custom_op("livediff::preprocess_rgb", mutates_args=())(
    _preprocess_rgb_reference
)


@preprocess_rgb.register_kernel("cuda")
def _preprocess_rgb_cuda(
    frames: torch.Tensor,
    top: int,
    left: int,
    crop_height: int,
    crop_width: int,
    height: int,
    width: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    crop = (top, left, crop_height, crop_width)
    _check_rgb(frames)
    check_resize(frames.shape[1], frames.shape[2], crop, height, width, dtype)
    if not _triton_runs("livediff::preprocess_rgb", dtype, frames=frames):
        return reference_rgb(frames, crop, height, width, dtype)
    from livediff.kernels import _triton_preprocess

    out = _empty_output(frames, height, width, dtype)
    _triton_preprocess.preprocess(_triton_preprocess.RGB, (frames,), crop, out)
    return out


@preprocess_rgb.register_fake
def _preprocess_rgb_fake(
    frames: torch.Tensor,
    top: int,
    left: int,
    crop_height: int,
    crop_width: int,
    height: int,
    width: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    _check_rgb(frames)
    check_resize(
        frames.shape[1], frames.shape[2], (top, left, crop_height, crop_width), height, width, dtype
    )
    return _empty_output(frames, height, width, dtype)


# ---------------------------------------------------------------------------- I420 op
def _preprocess_i420_reference(
    y: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    top: int,
    left: int,
    crop_height: int,
    crop_width: int,
    height: int,
    width: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Reference implementation (every device)."""
    crop = (top, left, crop_height, crop_width)
    yuv.check_i420_planes(y, u, v)
    check_resize(y.shape[1], y.shape[2], crop, height, width, dtype)
    return reference_i420(y, u, v, crop, height, width, dtype)


preprocess_i420 = torch.library.custom_op("livediff::preprocess_i420", mutates_args=())(
    _preprocess_i420_reference
)


@preprocess_i420.register_kernel("cuda")
def _preprocess_i420_cuda(
    y: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    top: int,
    left: int,
    crop_height: int,
    crop_width: int,
    height: int,
    width: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    crop = (top, left, crop_height, crop_width)
    yuv.check_i420_planes(y, u, v)
    check_resize(y.shape[1], y.shape[2], crop, height, width, dtype)
    if not _triton_runs("livediff::preprocess_i420", dtype, y=y, u=u, v=v):
        return reference_i420(y, u, v, crop, height, width, dtype)
    from livediff.kernels import _triton_preprocess

    out = _empty_output(y, height, width, dtype)
    _triton_preprocess.preprocess(_triton_preprocess.I420, (y, u, v), crop, out)
    return out


@preprocess_i420.register_fake
def _preprocess_i420_fake(
    y: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    top: int,
    left: int,
    crop_height: int,
    crop_width: int,
    height: int,
    width: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    yuv.check_i420_planes(y, u, v)
    check_resize(y.shape[1], y.shape[2], (top, left, crop_height, crop_width), height, width, dtype)
    return _empty_output(y, height, width, dtype)


# ---------------------------------------------------------------------------- NV12 op
def _preprocess_nv12_reference(
    y: torch.Tensor,
    uv: torch.Tensor,
    top: int,
    left: int,
    crop_height: int,
    crop_width: int,
    height: int,
    width: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Reference implementation (every device)."""
    crop = (top, left, crop_height, crop_width)
    yuv.check_nv12_planes(y, uv)
    check_resize(y.shape[1], y.shape[2], crop, height, width, dtype)
    return reference_nv12(y, uv, crop, height, width, dtype)


preprocess_nv12 = torch.library.custom_op("livediff::preprocess_nv12", mutates_args=())(
    _preprocess_nv12_reference
)


@preprocess_nv12.register_kernel("cuda")
def _preprocess_nv12_cuda(
    y: torch.Tensor,
    uv: torch.Tensor,
    top: int,
    left: int,
    crop_height: int,
    crop_width: int,
    height: int,
    width: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    crop = (top, left, crop_height, crop_width)
    yuv.check_nv12_planes(y, uv)
    check_resize(y.shape[1], y.shape[2], crop, height, width, dtype)
    if not _triton_runs("livediff::preprocess_nv12", dtype, y=y, uv=uv):
        return reference_nv12(y, uv, crop, height, width, dtype)
    from livediff.kernels import _triton_preprocess

    out = _empty_output(y, height, width, dtype)
    _triton_preprocess.preprocess(_triton_preprocess.NV12, (y, uv), crop, out)
    return out


@preprocess_nv12.register_fake
def _preprocess_nv12_fake(
    y: torch.Tensor,
    uv: torch.Tensor,
    top: int,
    left: int,
    crop_height: int,
    crop_width: int,
    height: int,
    width: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    yuv.check_nv12_planes(y, uv)
    check_resize(y.shape[1], y.shape[2], (top, left, crop_height, crop_width), height, width, dtype)
    return _empty_output(y, height, width, dtype)

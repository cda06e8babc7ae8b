"""Model output → frames for the sinks: uint8 RGB, or packed I420 for video encoders.

``[N, 3, H, W]`` float in [-1, 1] (float16, bfloat16 or float32) becomes:

- ``model_output_to_rgb``: ``[N, H, W, 3]`` uint8, ``(x + 1) * 127.5`` computed in float32,
  rounded half to even (``torch.round``) and clamped to [0, 255];
- ``model_output_to_i420``: packed I420 ``[N, H*W + 2*ceil(H/2)*ceil(W/2)]`` uint8 — the
  BT.601 limited-range encoding of exactly that RGB frame (fixed point, 2×2 mean chroma; see
  :mod:`livediff.kernels.yuv`). :func:`~livediff.kernels.yuv.split_i420` gives plane views.

Ops (``torch.ops.livediff.*``): ``postprocess_rgb``, ``postprocess_i420``. Each runs a Triton
kernel on CUDA when the guard in :mod:`livediff.kernels._dispatch` holds, and the PyTorch
reference otherwise. Both are bit-exact against their reference.
"""

from __future__ import annotations

import torch

from livediff.exceptions import KernelInputError
from livediff.kernels import yuv
from livediff.kernels._dispatch import (
    float_dtype_problem,
    implementation,
    run_triton,
    triton_refusal_by_strides,
)


def model_output_to_rgb(images: torch.Tensor) -> torch.Tensor:
    """``[N, 3, H, W]`` in [-1, 1] (any float dtype) → ``[N, H, W, 3]`` uint8, rounded, clamped."""
    return implementation(
        torch.ops.livediff.postprocess_rgb,
        _postprocess_rgb_cuda,
        _postprocess_rgb_reference,
        images.device,
    )(images)


def model_output_to_i420(images: torch.Tensor) -> torch.Tensor:
    """``[N, 3, H, W]`` in [-1, 1] → packed I420 ``[N, H*W + 2*ch*cw]`` uint8 (BT.601 limited)."""
    return implementation(
        torch.ops.livediff.postprocess_i420,
        _postprocess_i420_cuda,
        _postprocess_i420_reference,
        images.device,
    )(images)


def _check_images(images: torch.Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3 or not images.dtype.is_floating_point:
        raise KernelInputError(
            f"expected float images [N, 3, H, W], got {images.dtype} {tuple(images.shape)}"
        )


def reference_rgb(images: torch.Tensor) -> torch.Tensor:
    scaled = (images.to(torch.float32) + 1.0) * 127.5
    return scaled.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def reference_i420(images: torch.Tensor) -> torch.Tensor:
    return yuv.rgb_to_i420(reference_rgb(images))


def _triton_runs(op: str, images: torch.Tensor) -> bool:
    reason = triton_refusal_by_strides(float_dtype_problem("images", images.dtype), images=images)
    return run_triton(op, reason, images.device)


def _postprocess_rgb_reference(images: torch.Tensor) -> torch.Tensor:
    """Reference implementation (every device)."""
    _check_images(images)
    return reference_rgb(images)


postprocess_rgb = torch.library.custom_op("livediff::postprocess_rgb", mutates_args=())(
    _postprocess_rgb_reference
)


@postprocess_rgb.register_kernel("cuda")
def _postprocess_rgb_cuda(images: torch.Tensor) -> torch.Tensor:
    _check_images(images)
    if not _triton_runs("livediff::postprocess_rgb", images):
        return reference_rgb(images)
    from livediff.kernels import _triton_postprocess

    n, _, height, width = images.shape
    out = images.new_empty((n, height, width, 3), dtype=torch.uint8)
    _triton_postprocess.to_rgb(images, out)
    return out


@postprocess_rgb.register_fake
def _postprocess_rgb_fake(images: torch.Tensor) -> torch.Tensor:
    _check_images(images)
    n, _, height, width = images.shape
    return images.new_empty((n, height, width, 3), dtype=torch.uint8)


def _postprocess_i420_reference(images: torch.Tensor) -> torch.Tensor:
    """Reference implementation (every device)."""
    _check_images(images)
    return reference_i420(images)


postprocess_i420 = torch.library.custom_op("livediff::postprocess_i420", mutates_args=())(
    _postprocess_i420_reference
)


@postprocess_i420.register_kernel("cuda")
def _postprocess_i420_cuda(images: torch.Tensor) -> torch.Tensor:
    _check_images(images)
    if not _triton_runs("livediff::postprocess_i420", images):
        return reference_i420(images)
    from livediff.kernels import _triton_postprocess

    n, _, height, width = images.shape
    out = images.new_empty((n, yuv.i420_packed_length(height, width)), dtype=torch.uint8)
    _triton_postprocess.to_i420(images, out)
    return out


@postprocess_i420.register_fake
def _postprocess_i420_fake(images: torch.Tensor) -> torch.Tensor:
    _check_images(images)
    n, _, height, width = images.shape
    return images.new_empty((n, yuv.i420_packed_length(height, width)), dtype=torch.uint8)

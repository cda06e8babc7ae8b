"""Frames in and out: validation, fitting to the model resolution, and output frames.

Input is one RGB frame ``H × W × 3`` of any size, as a numpy array or a torch tensor on any
device. ``uint8`` is the native type; ``float16/32/64`` in [0, 1] is accepted too. It is fitted
to the model resolution by :class:`~livediff.engine.config.FitMode`:

- ``crop`` (default): the largest centred region with the target's aspect ratio, resized.
- ``resize``: the whole frame, stretched to the target.

A frame may also arrive as YUV 4:2:0 planes, the way video decoders hand it out
(:class:`YuvFrame`, BT.601 limited range): its planes go to the device as they are and a kernel
converts them there, so the host never converts colour. Resizing is bilinear (see
:mod:`livediff.kernels.preprocess`). Output frames are ``uint8`` RGB at the model resolution,
on the model's device; sessions that feed video encoders may ask for packed I420 instead
(:class:`OutputFormat`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np
import torch

from livediff.engine.config import FitMode
from livediff.exceptions import (
    EmptyFrameError,
    FrameDtypeError,
    FrameShapeError,
    FrameTooLargeError,
    NonFiniteFrameError,
)
from livediff.kernels.preprocess import Crop

MAX_FRAME_SIDE = 8192
_FLOAT_DTYPES = (torch.float16, torch.float32, torch.float64, torch.bfloat16)


class OutputFormat(str, Enum):
    """What a session's outputs hold: ``rgb`` ``[H, W, 3]`` uint8, or ``i420``: the packed
    ``[H*W + 2*ceil(H/2)*ceil(W/2)]`` uint8 planes a video encoder takes
    (:func:`livediff.kernels.yuv.split_i420` gives plane views), converted on the device."""

    RGB = "rgb"
    I420 = "i420"


@dataclass(frozen=True)
class YuvFrame:
    """One frame as I420 planes (uint8 tensors, host or device): ``y [H, W]``,
    ``u``/``v [ceil(H/2), ceil(W/2)]``, BT.601 limited range (what decoders produce)."""

    y: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width), like the first two dimensions of an RGB frame."""
        return int(self.y.shape[0]), int(self.y.shape[1])

    def planes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.y, self.u, self.v

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> YuvFrame:
        """The same frame with ``fn`` applied to each plane (pinning, moving to a device)."""
        return YuvFrame(fn(self.y), fn(self.u), fn(self.v))

    def is_pinned(self) -> bool:
        return all(plane.is_pinned() for plane in self.planes())


InputImage = torch.Tensor | YuvFrame  # what a Stream holds per input frame


def as_input_frame(frame: Any) -> InputImage:
    """Check a frame (RGB array or tensor, or :class:`YuvFrame`) and return it ready to queue."""
    if not isinstance(frame, YuvFrame):
        return as_uint8_frame(frame)
    height, width = frame.shape
    if frame.y.ndim != 2 or height == 0 or width == 0:
        raise FrameShapeError(f"a YUV frame's y plane must be [H, W], got {tuple(frame.y.shape)}")
    if height > MAX_FRAME_SIDE or width > MAX_FRAME_SIDE:
        raise FrameShapeError(
            f"frame {width}×{height} is too large: at most {MAX_FRAME_SIDE} pixels a side"
        )
    chroma = ((height + 1) // 2, (width + 1) // 2)
    for name, plane in (("u", frame.u), ("v", frame.v)):
        if tuple(plane.shape) != chroma:
            raise FrameShapeError(
                f"a YUV frame of {width}×{height} needs {name} planes of {chroma[1]}×{chroma[0]}, "
                f"got {tuple(plane.shape)}"
            )
    if any(plane.dtype != torch.uint8 for plane in frame.planes()):
        raise FrameDtypeError("YUV planes must be uint8")
    return frame


def frame_size(image: InputImage) -> tuple[int, int]:
    """(height, width) of an RGB tensor or a :class:`YuvFrame`."""
    return (int(image.shape[0]), int(image.shape[1]))


def as_uint8_frame(frame: Any) -> torch.Tensor:
    """Check one frame and return it as a uint8 ``[H, W, 3]`` tensor (no copy for uint8 input).

    Raises a specific :class:`~livediff.exceptions.InvalidFrameError` subclass per problem.
    """
    if isinstance(frame, np.ndarray):
        if frame.dtype == object or not (
            np.issubdtype(frame.dtype, np.number) or frame.dtype == np.bool_
        ):
            raise FrameDtypeError(
                f"frame dtype {frame.dtype} is not supported: expected uint8 RGB (or float in [0, 1])"
            )
        tensor = torch.from_numpy(np.ascontiguousarray(frame))
    elif isinstance(frame, torch.Tensor):
        tensor = frame
    else:
        raise FrameDtypeError(
            f"a frame must be a numpy array or a torch tensor, not {type(frame).__name__}"
        )
    if tensor.ndim != 3:
        raise FrameShapeError(
            f"frame shape {tuple(tensor.shape)} is not H×W×3: expected 3 dimensions, got {tensor.ndim}"
        )
    height, width, channels = tensor.shape
    if height == 0 or width == 0:
        raise EmptyFrameError(f"frame shape {tuple(tensor.shape)} has no pixels")
    if channels != 3:
        raise FrameShapeError(f"frame has {channels} channels: expected 3 (RGB, channels last)")
    if height > MAX_FRAME_SIDE or width > MAX_FRAME_SIDE:
        raise FrameTooLargeError(
            f"frame {width}×{height} is too large: at most {MAX_FRAME_SIDE} pixels a side",
            limit=MAX_FRAME_SIDE,
        )
    if tensor.dtype == torch.uint8:
        return tensor
    if tensor.dtype in _FLOAT_DTYPES:
        if not bool(torch.isfinite(tensor).all()):
            raise NonFiniteFrameError("frame holds NaN or infinite values")
        return (tensor.to(torch.float32).clamp(0, 1) * 255).round().to(torch.uint8)
    raise FrameDtypeError(
        f"frame dtype {tensor.dtype} is not supported: expected uint8 RGB (or float in [0, 1])"
    )


def upload_frame(image: torch.Tensor, device: torch.device) -> torch.Tensor:
    """An RGB frame ``[H, W, 3]`` on ``device`` (``non_blocking``: pinned sources overlap).

    A frame that is the ``[..., :3]`` view of a padded ``[H, W, 4]`` buffer (a JPEG decoded in
    place, :mod:`livediff.streams.frame_buffers`) goes up whole and loses its padding on the
    device: copying the view itself would make the host pack it first, a copy per frame.
    """
    host_to_device = image.device.type == "cpu" and device.type != "cpu"
    padded = _padded_base(image) if host_to_device else None
    if padded is None:
        return image.to(device, non_blocking=True)
    return padded.to(device, non_blocking=True)[..., :3].contiguous()


def _padded_base(image: torch.Tensor) -> torch.Tensor | None:
    """The ``[H, W, 4]`` buffer an ``[H, W, 3]`` view was cut from, or ``None``."""
    if image.is_contiguous() or image.ndim != 3 or image.shape[2] != 3:
        return None
    height, width = int(image.shape[0]), int(image.shape[1])
    if image.stride() != (4 * width, 4, 1):
        return None
    end = image.storage_offset() + height * width * 4  # in bytes: uint8
    if image.dtype != torch.uint8 or end > image.untyped_storage().nbytes():
        return None
    return image.as_strided((height, width, 4), (4 * width, 4, 1))


def fit_crop(source_h: int, source_w: int, target_h: int, target_w: int, mode: FitMode) -> Crop:
    """The source region (top, left, height, width) that is resized to the target."""
    if mode is FitMode.RESIZE:
        return 0, 0, source_h, source_w
    if source_w * target_h > source_h * target_w:  # source is wider: cut the sides
        crop_h, crop_w = source_h, max(1, round(source_h * target_w / target_h))
    else:
        crop_h, crop_w = max(1, round(source_w * target_h / target_w)), source_w
    return (source_h - crop_h) // 2, (source_w - crop_w) // 2, crop_h, crop_w


@dataclass(frozen=True)
class StreamOutput:
    """One output frame and the input it answers.

    ``index`` counts input frames from 0. ``skipped`` is true when the similarity filter
    skipped the input and this is the previous output again. ``tag`` is whatever the caller
    passed with the input (timestamps, for instance).
    """

    image: torch.Tensor  # uint8 [H, W, 3] on the model device
    index: int
    skipped: bool = False
    tag: Any = None

    def numpy(self) -> np.ndarray:
        return self.image.cpu().numpy()

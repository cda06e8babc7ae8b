"""Control images for ControlNets: the preprocessors, their parameters, and one entry point.

:func:`preprocess` turns a batch of frames (one row per session) into control images
``[N, 3, height, width]`` in [0, 1] at the model's size, what diffusers' ControlNet pipelines
feed their nets (``UNetBatch.control_images`` takes them as they are):

=================== ============================================== ==========================
preprocessor        what the image is                              parameters (per row)
=================== ============================================== ==========================
``canny``           white Canny edges on black                     :class:`CannyParams`
                    (:mod:`livediff.kernels.canny`)
``depth``           Depth Anything V2 Small, near bright, each     none
                    image scaled to [0, 1] (:mod:`.depth`)
``soft_edge``       HED soft edges, white on black (:mod:`.soft_edge`) none
``passthrough``     the frame itself (tile ControlNets)            none
``previous_output`` the session's previous output frame            none
                    (TemporalNet): pass that frame as ``frames``
``client``          an image the client sent (an openpose          none; it must have the
                    skeleton, a scribble), used as it is           model's size already
=================== ============================================== ==========================

Frames are uint8 RGB ``[N, H, W, 3]`` or float RGB ``[N, 3, H, W]`` in [0, 1] (a model
output in [-1, 1] goes through :func:`from_model_output` first), on the device where the
work should run; they are resized bilinearly to the model size first (``client`` images
are not resized: a wrong size is an error). The networks are loaded once and passed in
:class:`PreprocessorNetworks`. One call runs one preprocessor over every row given; the
engine calls it once per preprocessor per batch, over the rows of every session that needs
it, however many ControlNets use the result (:mod:`livediff.engine.control_batch`).
:func:`to_preview` turns control images into uint8 frames for a client's preview.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from livediff.exceptions import FrameShapeError, KernelInputError, ParameterError
from livediff.kernels.canny import canny
from livediff.kernels.postprocess import model_output_to_rgb
from livediff.models.compiled_canny import PaddedCanny
from livediff.models.control_uses import (
    PARAMS,
    CannyParams,
    Preprocessor,
    parse_preprocessor,
)
from livediff.models.depth import DepthEstimator
from livediff.models.soft_edge import SoftEdgeDetector


@dataclass
class PreprocessorNetworks:
    """The loaded networks :func:`preprocess` may need (``None``: not loaded)."""

    depth: DepthEstimator | None = None
    soft_edge: SoftEdgeDetector | None = None
    # canny compiled for the server's batch sizes (None: the op, eagerly), set by
    # :func:`~livediff.models.backends.runtime_bundle` for a compiled model with ControlNets
    canny: PaddedCanny | None = None


def from_model_output(images: torch.Tensor) -> torch.Tensor:
    """A decoded output ``[N, 3, H, W]`` in [-1, 1] → [0, 1] (TemporalNet's previous frame)."""
    return ((images + 1) / 2).clamp(0, 1)


def to_preview(images: torch.Tensor) -> torch.Tensor:
    """Control images ``[N, 3, H, W]`` in [0, 1] → uint8 RGB ``[N, H, W, 3]``, for a client
    that asks to see what its ControlNets see (the output path's own kernel)."""
    return model_output_to_rgb(images * 2 - 1)


def as_images(
    frames: torch.Tensor, size: tuple[int, int], dtype: torch.dtype | None = None
) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` or float ``[N, 3, H, W]`` in [0, 1] → float ``[N, 3, *size]``."""
    if frames.dtype == torch.uint8 and frames.ndim == 4 and frames.shape[3] == 3:
        images = frames.permute(0, 3, 1, 2).to(dtype or torch.float32) / 255
    elif frames.is_floating_point() and frames.ndim == 4 and frames.shape[1] == 3:
        images = frames.to(dtype or frames.dtype)
    else:
        raise KernelInputError(
            "expected uint8 frames [N, H, W, 3] or float images [N, 3, H, W], got "
            f"{frames.dtype} {tuple(frames.shape)}",
            field="frames",
        )
    if tuple(images.shape[-2:]) != tuple(size):
        images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
    return images.contiguous()


def _canny_rows(
    params: CannyParams | Sequence[CannyParams] | None, rows: int, device: torch.device
) -> list[torch.Tensor]:
    if params is None or isinstance(params, CannyParams):
        per_row = [params or CannyParams()] * rows
    else:
        per_row = list(params)
        if len(per_row) != rows:
            raise ParameterError(
                f"{len(per_row)} canny parameter sets for {rows} frames", field="params"
            )
    values = torch.tensor([[p.low, p.high, p.sigma] for p in per_row], dtype=torch.float32)
    return list(values.to(device).unbind(1))


def check_client_image(frames: torch.Tensor, size: tuple[int, int]) -> None:
    """A control image sent by a client must already have the model's size."""
    height, width = (
        (frames.shape[1], frames.shape[2]) if frames.dtype == torch.uint8 else frames.shape[-2:]
    )
    if (int(height), int(width)) != tuple(size):
        raise FrameShapeError(
            f"the control image is {width}×{height}; this session's model size is "
            f"{size[1]}×{size[0]}",
            field="control_image",
        )


def preprocess(
    kind: Preprocessor | str,
    frames: torch.Tensor,
    size: tuple[int, int],
    params: CannyParams | Sequence[CannyParams] | None = None,
    *,
    networks: PreprocessorNetworks | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Control images ``[N, 3, *size]`` in [0, 1] for ``frames`` (one row each).

    ``params``: one set for every row or one per row (canny only). ``dtype``: the output's
    float dtype (default: float32 for uint8 frames, else the frames' own).
    """
    kind = parse_preprocessor(kind)
    if params is not None and kind not in PARAMS:
        raise ParameterError(f"preprocessor {kind.value} takes no parameters", field="params")
    if kind is Preprocessor.CLIENT:
        check_client_image(frames, size)
    images = as_images(frames, size, dtype)
    if kind is Preprocessor.CANNY:
        low, high, sigma = _canny_rows(params, images.shape[0], images.device)
        if networks is not None and networks.canny is not None:
            return networks.canny(images, low, high, sigma)
        return canny(images, low, high, sigma)
    if kind is Preprocessor.DEPTH:
        return _network(networks, "depth")(images).to(images.dtype)
    if kind is Preprocessor.SOFT_EDGE:
        return _network(networks, "soft_edge")(images).to(images.dtype)
    return images.clamp(0, 1)


def _network(networks: PreprocessorNetworks | None, name: str) -> Any:
    network = getattr(networks, name, None) if networks is not None else None
    if network is None:
        raise ParameterError(
            f"the {name} preprocessor's network is not loaded on this server", field="preprocessor"
        )
    return network

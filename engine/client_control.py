"""Control images a client sends for its session's ControlNets (the ``client`` preprocessor).

A client feeds a ControlNet of its session its own control image (a depth map from its own
sensor, a pose skeleton drawn in the browser) instead of one made from its frames. The image
is decoded and fitted to the session's size here, on the engine's control thread (off the
event loop and off the hot path), exactly as its frames are fitted (the session's ``fit``:
centre crop to the model's aspect unless ``resize``, then bilinear), and kept as values in
[0, 1]. The session keeps the latest image per ControlNet, as that net's control input for
every frame from the next one on, until the next image replaces it; it survives a new Stream
(a degrade step, a fault). A ControlNet fed ``client`` whose first image has not arrived runs
at scale 0 (the session's output is as without that net) and the transports say so
(``awaiting_control_images``); nothing else stands in for the image.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping

import numpy as np
import torch

from livediff.engine.config import GenerationParams, StreamConfig
from livediff.engine.frames import fit_crop
from livediff.engine.session_plans import Plan, SetControlImage
from livediff.exceptions import FrameTooLargeError, InvalidFrameError, ParameterError
from livediff.kernels.preprocess import rgb_to_model_input
from livediff.models.bundle import ModelBundle
from livediff.models.control_images import from_model_output
from livediff.models.control_uses import Preprocessor

FIELD = "control_image"
MAX_IMAGE_BYTES = 16 * 1024 * 1024
MAX_PIXELS = 4096 * 4096


def client_slot(bundle: ModelBundle, params: GenerationParams, controlnet: str) -> int:
    """The slot of ``controlnet`` when ``params`` feed it client images; else ``ParameterError``."""
    loaded = [net.name for net in bundle.controlnets]
    if not loaded:
        raise ParameterError(
            "this server has no ControlNet to take a control image (start it with "
            "--controlnet SOURCE or [[model.controlnets]])",
            field=FIELD,
        )
    if controlnet not in loaded:
        raise ParameterError(
            f"controlnet {controlnet!r} is not loaded on this server; loaded: "
            f"{', '.join(sorted(loaded))}",
            field=FIELD,
        )
    if not any(
        use.controlnet == controlnet and use.preprocessor is Preprocessor.CLIENT
        for use in params.controlnets
    ):
        raise ParameterError(
            f"this session does not feed controlnet {controlnet!r} client images: choose "
            f'{{"controlnet": "{controlnet}", "preprocessor": "client"}} in controlnets first',
            field=FIELD,
        )
    return loaded.index(controlnet)


def awaiting(
    params: GenerationParams, bundle: ModelBundle, images: Mapping[int, object]
) -> list[str]:
    """The session's ControlNets fed ``client`` that have no image yet (they run at scale 0)."""
    slots = {net.name: k for k, net in enumerate(bundle.controlnets)}
    return [
        use.controlnet
        for use in params.controlnets
        if use.preprocessor is Preprocessor.CLIENT and slots.get(use.controlnet) not in images
    ]


def decode_control_image(data: bytes) -> np.ndarray:
    """An image file (PNG, JPEG, WebP …) → uint8 RGB ``[H, W, 3]``; refusals name ``control_image``."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > MAX_IMAGE_BYTES:
        raise FrameTooLargeError(
            f"the control image is {len(data)} bytes; at most {MAX_IMAGE_BYTES} are accepted",
            field=FIELD,
            limit=MAX_IMAGE_BYTES,
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size  # from the header, before a pixel is decoded
            if width * height > MAX_PIXELS:
                raise FrameTooLargeError(
                    f"the control image is {width}×{height}; at most {MAX_PIXELS} pixels "
                    "are accepted",
                    field=FIELD,
                    limit=MAX_PIXELS,
                )
            rgb = image.convert("RGB")
    except FrameTooLargeError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombWarning) as exc:
        raise InvalidFrameError(
            f"the control image ({len(data)} bytes) does not decode as an image file: "
            f"{type(exc).__name__}",
            field=FIELD,
        ) from None
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError … on corrupt data
        raise InvalidFrameError(
            f"the control image ({len(data)} bytes) does not decode: {type(exc).__name__}",
            field=FIELD,
        ) from None
    if width == 0 or height == 0:
        raise InvalidFrameError("the control image has no pixels", field=FIELD)
    return np.array(rgb)


def fit_control_image(
    image: np.ndarray | torch.Tensor, config: StreamConfig, bundle: ModelBundle
) -> torch.Tensor:
    """uint8 RGB ``[H, W, 3]`` → ``[1, 3, height, width]`` in [0, 1] at the session's size, on
    the model's device and dtype, fitted exactly as the session's frames are."""
    frame = torch.as_tensor(np.ascontiguousarray(image)) if isinstance(image, np.ndarray) else image
    if frame.dtype != torch.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise InvalidFrameError(
            f"a control image must be uint8 RGB [H, W, 3]; got {frame.dtype} {tuple(frame.shape)}",
            field=FIELD,
        )
    if frame.shape[0] * frame.shape[1] > MAX_PIXELS:
        raise FrameTooLargeError(
            f"the control image is {frame.shape[1]}×{frame.shape[0]}; at most {MAX_PIXELS} "
            "pixels are accepted",
            field=FIELD,
            limit=MAX_PIXELS,
        )
    assert config.width is not None and config.height is not None
    height, width = int(config.height), int(config.width)
    crop = fit_crop(int(frame.shape[0]), int(frame.shape[1]), height, width, config.fit)
    pixels = frame.to(bundle.device).unsqueeze(0)
    with torch.inference_mode():  # on the control thread, whose job() syncs before the worker
        return from_model_output(rgb_to_model_input(pixels, height, width, crop, bundle.dtype))


def place_control_image(
    plan: Plan, bundle: ModelBundle, controlnet: str, image: bytes | np.ndarray | torch.Tensor
) -> tuple[SetControlImage, list[str]]:
    """Control thread: check, decode and fit ``image`` for the session ``plan`` heads to; keep
    it in the plan (for later Streams) and return the item the worker applies, with the
    ControlNets still waiting for their first image."""
    slot = client_slot(bundle, plan.requested, controlnet)
    pixels = decode_control_image(image) if isinstance(image, bytes) else image
    fitted = fit_control_image(pixels, plan.config, bundle)
    plan.control_images[slot] = fitted
    return SetControlImage(plan.stream, slot, fitted), awaiting(
        plan.requested, bundle, plan.control_images
    )

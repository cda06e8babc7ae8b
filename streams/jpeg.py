"""JPEG to and from uint8 RGB arrays (Pillow). Both calls are CPU work: run them off the event loop."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

from livediff.exceptions import EmptyFrameError, FrameShapeError, InvalidFrameError

MAX_JPEG_SIDE = 4096


def decode_jpeg(data: bytes, *, max_side: int = MAX_JPEG_SIDE) -> np.ndarray:
    """One JPEG image → uint8 ``[H, W, 3]`` RGB. Anything else is an :class:`InvalidFrameError`."""
    if not data:
        raise EmptyFrameError("empty binary message: expected one JPEG image")
    if not data.startswith(b"\xff\xd8"):
        raise InvalidFrameError(
            f"binary message of {len(data)} bytes is not a JPEG image (no SOI marker)"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=("JPEG",))
            width, height = image.size
            if width > max_side or height > max_side:
                raise FrameShapeError(
                    f"JPEG of {width}×{height} is too large: at most {max_side} pixels a side"
                )
            rgb = image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as exc:
        if isinstance(exc, InvalidFrameError):
            raise
        raise InvalidFrameError(
            f"binary message of {len(data)} bytes is not a decodable JPEG image: {exc}"
        ) from None
    if width == 0 or height == 0:
        raise EmptyFrameError("JPEG image has no pixels")
    return np.array(rgb)  # writable: the engine wraps it in a tensor


def encode_jpeg(image: np.ndarray, *, quality: int = 85) -> bytes:
    """uint8 ``[H, W, 3]`` RGB → JPEG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()

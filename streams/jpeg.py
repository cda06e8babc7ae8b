"""JPEG to and from uint8 RGB arrays (Pillow). Both calls are CPU work: run them off the event loop."""

from __future__ import annotations

import io
import re
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from livediff.exceptions import EmptyFrameError, FrameShapeError, InvalidFrameError

MAX_JPEG_SIDE = 4096
_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


def decode_jpeg(
    data: bytes, *, max_side: int = MAX_JPEG_SIDE, max_pixels: int | None = None
) -> np.ndarray:
    """One JPEG image → uint8 ``[H, W, 3]`` RGB. Anything else is an :class:`InvalidFrameError`.

    The size is checked from the header Pillow read, before a pixel is decoded.
    """
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
            if max_pixels is not None and width * height > max_pixels:
                raise FrameShapeError(
                    f"JPEG of {width}×{height} = {width * height} pixels is too large: at most "
                    f"{max_pixels} ([server] max_frame_pixels)"
                )
            rgb = image.convert("RGB")
    except InvalidFrameError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise FrameShapeError(
            f"binary message of {len(data)} bytes is a JPEG whose header claims more pixels "
            "than Pillow will decode (a decompression bomb)"
        ) from None
    except UnidentifiedImageError:
        raise InvalidFrameError(
            f"binary message of {len(data)} bytes is not a decodable JPEG image: Pillow "
            "cannot identify it"
        ) from None
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError … on corrupt data
        raise InvalidFrameError(
            f"binary message of {len(data)} bytes is not a decodable JPEG image: {_describe(exc)}"
        ) from None
    if width == 0 or height == 0:
        raise EmptyFrameError("JPEG image has no pixels")
    return np.array(rgb)  # writable: the engine wraps it in a tensor


def _describe(exc: Exception) -> str:
    text = _OBJECT_REPR.sub("the data", str(exc)).strip()
    return text or type(exc).__name__


def encode_jpeg(image: np.ndarray, *, quality: int = 85) -> bytes:
    """uint8 ``[H, W, 3]`` RGB → JPEG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()

"""A frame counter painted into the picture, for glass-to-glass latency measurements.

The top quarter of the frame carries ``MARKER_BITS`` bits as black/white blocks, each bit
twice: white-over-black for 1, black-over-white for 0. A reader accepts a value only when
every pair is complementary, so a frame that was blurred, scaled or half-updated reads as
``None`` instead of a wrong number. Positions are fractions of the frame size, so a marker
survives scaling (the browser paints 640×480, the model answers 512×512).

A diffusion model does not keep the marker, so with ``[server] latency_marker = true`` the
server reads it from each input and paints it onto the output that answers that input
(``clients/web/app.js`` has the same layout in JavaScript).
"""

from __future__ import annotations

import numpy as np

MARKER_BITS = 10
MARKER_MODULUS = 1 << MARKER_BITS
_ROWS = 8  # each of the two bit rows is 1/8 of the height


def _block(image: np.ndarray, bit: int, row: int) -> tuple[slice, slice]:
    height, width = image.shape[:2]
    x0, x1 = bit * width // MARKER_BITS, (bit + 1) * width // MARKER_BITS
    y0, y1 = row * height // _ROWS, (row + 1) * height // _ROWS
    return slice(y0, y1), slice(x0, x1)


def _centre(image: np.ndarray, bit: int, row: int) -> np.ndarray:
    ys, xs = _block(image, bit, row)
    dy, dx = (ys.stop - ys.start) // 4, (xs.stop - xs.start) // 4
    return image[ys.start + dy : ys.stop - dy, xs.start + dx : xs.stop - dx]


def stamp_marker(image: np.ndarray, value: int) -> None:
    """Paint ``value % MARKER_MODULUS`` into ``image`` (uint8 ``[H, W, 3]``) in place."""
    value %= MARKER_MODULUS
    for bit in range(MARKER_BITS):
        on = (value >> bit) & 1
        image[_block(image, bit, 0)] = 255 if on else 0
        image[_block(image, bit, 1)] = 0 if on else 255


def read_marker(image: np.ndarray) -> int | None:
    """The value painted by :func:`stamp_marker`, or ``None`` if the frame carries none."""
    if image.shape[0] < 2 * _ROWS or image.shape[1] < 2 * MARKER_BITS:
        return None
    value = 0
    for bit in range(MARKER_BITS):
        top = float(_centre(image, bit, 0).mean())
        bottom = float(_centre(image, bit, 1).mean())
        if (top >= 128) == (bottom >= 128) or abs(top - bottom) < 96:
            return None
        value |= int(top >= 128) << bit
    return value

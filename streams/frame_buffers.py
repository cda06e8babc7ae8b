"""Host memory one session's decoded frames land in, so that a frame is never copied on the host.

A websocket frame's JPEG decodes straight into a buffer from here (:func:`decode_frame`):
Pillow keeps RGB pixels 4 bytes apart, so each buffer is ``uint8 [H, W, 4]`` and the frame
is its ``[..., :3]`` view. The engine takes the view as it is (``Session.submit(owned=True)``
copies nothing), does not pin it again when it is pinned already, and uploads the whole
buffer, dropping the padding byte on the device
(:func:`~livediff.engine.frames.upload_frame`). Host copies of the pixels before the
upload: none (greyscale and CMYK JPEGs: Pillow's conversion to RGB, then one pinned copy at
admission, as before).

On CUDA the buffers are page-locked and come from PyTorch's caching pinned allocator: a
buffer whose frame the engine has let go of, and whose upload has completed, is handed out
again for the next frame of the same size, so a session streaming at one resolution keeps
reusing the same few blocks and never page-locks new memory on the way.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from livediff.wire import decode_jpeg


class FrameBuffers:
    """Buffers for one session's frames: ``uint8 [H, W, 4]``, page-locked when ``pinned``."""

    def __init__(self, *, pinned: bool) -> None:
        self.pinned = pinned
        self.taken = 0  # buffers handed out (one a frame decoded in place)

    def take(self, height: int, width: int) -> torch.Tensor:
        self.taken += 1
        return torch.empty((height, width, 4), dtype=torch.uint8, pin_memory=self.pinned)


def decode_frame(
    data: bytes,
    buffers: FrameBuffers,
    *,
    max_pixels: int | None,
    decode: Callable[..., np.ndarray] = decode_jpeg,
) -> torch.Tensor:
    """One JPEG → uint8 ``[H, W, 3]`` RGB tensor, decoded into one of ``buffers`` (off the loop).

    The tensor is a view of the buffer tensor itself (not of a numpy alias of it), so the
    pinned allocator sees the upload that reads it and hands the block out again only after.
    ``decode`` is :func:`~livediff.wire.decode_jpeg` (or what wraps it); raises what it raises.
    """
    taken: list[torch.Tensor] = []

    def into(height: int, width: int) -> np.ndarray:
        taken.append(buffers.take(height, width))
        return taken[-1].numpy()

    array = decode(data, max_pixels=max_pixels, into=into)
    if taken:
        return taken[-1][..., :3]
    return torch.from_numpy(array)  # greyscale or CMYK: converted into a fresh array

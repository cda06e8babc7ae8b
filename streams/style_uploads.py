"""A style image a client uploads (websocket or data channel) → the session's ``ip_image``.

Both transports take the same message (:data:`livediff.wire.STYLE_IMAGE_MAGIC` + an image
file) and give the same answers; this is the part they share. The decode and the CLIP encode
run in ``executor`` (never on the event loop); the key then goes to the session as a live
update, so the next frame uses it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor

from livediff.exceptions import ParameterError
from livediff.streams.engine_protocol import SessionLike

StyleImages = Callable[[bytes], str]  # image file → key, blocking (EngineLike.encode_style_image)
FIELD = "ip_image"


async def use_style_image(
    session: SessionLike,
    style_images: StyleImages | None,
    image_file: bytes,
    executor: Executor | None = None,
) -> str:
    """Encode ``image_file`` and make it ``session``'s style image; returns its key.

    Raises ``ParameterError`` (no IP-Adapter on this server) or ``InvalidFrameError`` (the
    image does not decode or is too large), both with ``field="ip_image"``, and
    ``SessionClosedError`` when the session is gone.
    """
    if style_images is None:
        raise ParameterError("this server takes no style images (no IP-Adapter)", field=FIELD)
    key = await asyncio.get_running_loop().run_in_executor(executor, style_images, image_file)
    await session.update(ip_image=key)
    return key

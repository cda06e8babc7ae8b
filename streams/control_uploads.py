"""A control image a client uploads (websocket or data channel) → one ControlNet of its session.

Both transports take the same message (:data:`livediff.wire.CONTROL_IMAGE_MAGIC`, the net's
name, an image file) and give the same answers; this is the part they share. The engine
decodes and fits the image on its control thread (never the event loop, never the hot path)
and the session uses it from its next frame on (:mod:`livediff.engine.client_control`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from livediff.exceptions import ParameterError
from livediff.streams.engine_protocol import SessionLike
from livediff.wire import CONTROL_IMAGE_FIELD, CONTROL_IMAGE_MAGIC, control_image_of

# (session id, ControlNet name, image file) → the nets still waiting (EngineLike.set_control_image)
ControlImages = Callable[[str, str, bytes], Awaitable[list[str]]]
Awaiting = Callable[[str], list[str]]  # session id → its nets waiting for a first image


async def use_control_image(
    session: SessionLike, control_images: ControlImages | None, message: bytes
) -> tuple[str, list[str]]:
    """Hand the control image in ``message`` (a whole ``LDCN`` message) to ``session``'s net;
    returns (the net's name, the nets still waiting for their first image).

    Raises ``ProtocolError`` (no valid name), ``ParameterError`` (a net the session does not
    feed client images, a server without ControlNets) or ``InvalidFrameError`` (undecodable,
    too large), each with ``field="control_image"``, and ``SessionClosedError``.
    """
    parsed = control_image_of(message)
    assert parsed is not None  # the caller saw the prefix
    controlnet, image_file = parsed
    if control_images is None:
        raise ParameterError(
            "this server takes no control images (no ControlNet)", field=CONTROL_IMAGE_FIELD
        )
    waiting = await control_images(session.id, controlnet, image_file)
    return controlnet, waiting


def is_control_image(message: bytes) -> bool:
    """Whether a binary message carries a control image (its prefix)."""
    return message[: len(CONTROL_IMAGE_MAGIC)] == CONTROL_IMAGE_MAGIC

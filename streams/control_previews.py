"""Control previews: a connection that asks sees the control images its ControlNets took.

A client asks with the control message ``{"control_preview": true}`` (``false`` stops; the
key may come with other live parameters, and applies only if they do), on the websocket or
the WebRTC data channel; it is a setting of the connection, not of the session, and starts
off. While on, the server sends, at most every :data:`PREVIEW_INTERVAL_S` and only after the
session produced a new output, one binary message per ControlNet the session uses:
``b"LDCP"`` + one byte n + the net's name (n bytes) + a JPEG of the control image the net took
for the session's newest frame (:func:`livediff.wire.control_preview_message`). The image is
read from the worker's own UNet inputs (:mod:`livediff.engine.control_previews`), never
recomputed; it is scaled down to at most :data:`MAX_PREVIEW_SIDE` pixels a side and its JPEG
kept within :data:`MAX_PREVIEW_BYTES` (under the data channel's 64 KiB). A value other than
``true``/``false``, or asking on a server without ControlNets, is refused with ``{"error": …,
"field": "control_preview"}`` and changes nothing.
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import Executor
from typing import Any

import numpy as np

from livediff.exceptions import ParameterError, SessionClosedError
from livediff.wire import CONTROL_PREVIEW_FIELD, control_preview_message

PREVIEW_INTERVAL_S = 0.5  # at most two previews a second per net
MAX_PREVIEW_SIDE = 512
MAX_PREVIEW_BYTES = 60 * 1024  # the data channel carries 64 KiB messages everywhere
QUALITIES = (85, 70, 50, 30)

Previews = Callable[[str], Awaitable[Mapping[str, np.ndarray]]]  # EngineLike.control_previews


def previews_of(engine: Any) -> Previews | None:
    """The engine's ``control_previews`` when it has ControlNets loaded, else ``None``."""
    read = getattr(engine, "control_previews", None)
    options = getattr(engine, "control_options", None)
    return read if read is not None and options is not None and options() else None


def split_preview(changes: Mapping[str, Any]) -> tuple[bool | None, dict[str, Any]]:
    """(the ``control_preview`` asked for, ``None`` if absent; the other keys)."""
    rest = {key: value for key, value in changes.items() if key != CONTROL_PREVIEW_FIELD}
    if CONTROL_PREVIEW_FIELD not in changes:
        return None, rest
    value = changes[CONTROL_PREVIEW_FIELD]
    if not isinstance(value, bool):
        raise ParameterError(
            f"control_preview must be true or false, not {value!r}", field=CONTROL_PREVIEW_FIELD
        )
    return value, rest


def encode_preview(image: np.ndarray) -> bytes:
    """uint8 RGB ``[H, W, 3]`` → a JPEG of at most :data:`MAX_PREVIEW_SIDE` a side and
    :data:`MAX_PREVIEW_BYTES` (CPU work: off the event loop)."""
    from PIL import Image

    picture = Image.fromarray(np.ascontiguousarray(image))
    side = MAX_PREVIEW_SIDE
    while True:
        scale = min(1.0, side / max(picture.size))
        size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
        small = picture if size == picture.size else picture.resize(size, Image.Resampling.BILINEAR)
        for quality in QUALITIES:
            out = io.BytesIO()
            small.save(out, format="JPEG", quality=quality)
            if out.tell() <= MAX_PREVIEW_BYTES or side <= 16:
                return out.getvalue()
        side //= 2


class PreviewSender:
    """One connection's previews: off until :meth:`set`; :meth:`run` sends them while on."""

    def __init__(
        self,
        session_id: str,
        previews: Previews | None,
        send: Callable[[bytes], Awaitable[None]],
        outputs: Callable[[], int],
        log: logging.LoggerAdapter[Any] | logging.Logger,
        pool: Executor | None = None,
    ) -> None:
        self.session_id = session_id
        self.enabled = False
        self._previews = previews
        self._send = send
        self._outputs = outputs  # the connection's output count: a preview follows a new one
        self._log = log
        self._pool = pool
        self._wake = asyncio.Event()

    def check(self, on: bool) -> None:
        """Refuse ``on`` where there is nothing to preview (``ParameterError``)."""
        if on and self._previews is None:
            raise ParameterError(
                "this server has no ControlNet: there is no control image to preview",
                field=CONTROL_PREVIEW_FIELD,
            )

    def set(self, on: bool) -> None:
        self.check(on)
        self.enabled = on
        self._wake.set()

    async def run(self) -> None:
        """Until cancelled or the session closes: every interval, while on and after a new
        output, send each net's preview."""
        loop = asyncio.get_running_loop()
        last = self._outputs()
        while True:
            if not self.enabled:
                self._wake.clear()
                await self._wake.wait()
                # The first preview after asking comes now if the session has answered a
                # frame already, else with its first output (not before: the worker may hold
                # that frame's control image already, and the output would bring it again).
                last = -1 if self._outputs() else 0
            await asyncio.sleep(PREVIEW_INTERVAL_S)
            outputs = self._outputs()
            if not self.enabled or outputs == last or self._previews is None:
                continue
            last = outputs
            try:
                images = await self._previews(self.session_id)
            except SessionClosedError:
                return
            for name, image in images.items():
                jpeg = await loop.run_in_executor(self._pool, encode_preview, image)
                if self.enabled:
                    await self._send(control_preview_message(name, jpeg))

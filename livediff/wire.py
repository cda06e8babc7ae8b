"""The wire protocol of ``livediff serve``: the one contract the server and its clients share.

The server (``livediff.streams``) builds its messages here and the Python clients
(``livediff.clients``) read them here; neither side knows the other's code. This module is the
bottom of the import graph with :mod:`livediff.exceptions`: it imports nothing else from
livediff, and Pillow and numpy only when a JPEG helper runs, so a client that only talks JSON
loads neither. What the server does and when (limits, timeouts, which error for what) is
documented beside its handlers: :mod:`livediff.streams.ws_protocol` (``GET /ws``),
:mod:`livediff.streams.signaling` (``POST /offer``), :mod:`livediff.streams.peer` (the data
channel) and :mod:`livediff.streams.control_messages` (live parameters).

Websocket (``GET /ws``)
    Binary messages are frames: one JPEG image each, both ways (:func:`encode_jpeg`,
    :func:`decode_jpeg`). A binary message to the server that starts with the four bytes
    :data:`STYLE_IMAGE_MAGIC` (``b"LDIM"``) is no frame but a style image for the IP-Adapter:
    an image file (PNG, JPEG, WebP …) after the prefix (:func:`style_image_message`). It is not
    counted as a frame; the server answers ``{"ok": true, "ip_image": "<key>"}``
    (:func:`style_image_reply`) and the session's ``ip_image`` becomes that key from the next
    frame on, or ``{"error": …, "field": "ip_image"}``. A binary message that starts with
    :data:`CONTROL_IMAGE_MAGIC` (``b"LDCN"``) is a control image for one of the session's
    ControlNets (the ``client`` preprocessor): the prefix, one byte ``n`` (1–255), the net's
    name in ``n`` bytes of UTF-8, then an image file (:func:`control_image_message`). The
    server answers ``{"ok": true, "control_image": "<name>"}`` (:func:`control_image_reply`)
    or ``{"error": …, "field": "control_image"}``. A binary message from the server that starts
    with :data:`CONTROL_PREVIEW_MAGIC` (``b"LDCP"``) is no frame but a control preview: the
    prefix, one byte ``n``, the ControlNet's name in ``n`` bytes, then a JPEG of the control
    image that net last took in the session's UNet (:func:`control_preview_of`); the server
    sends them only to a connection that asked with the control message
    ``{"control_preview": true}``. Text messages are one JSON object each (UTF-8). Session parameters
    travel in the URL's query (:func:`query_string`); the server stamps every input with its
    arrival time in :data:`PTS_TIME_BASE` ticks.

Messages from the server (text, JSON objects; :func:`kind_of` tells them apart)
    - ``{"session": "<id>"}`` — the first message of an accepted websocket (:func:`hello`).
    - ``{"ok": true, "id": …}`` — a control message took effect (:func:`ok_reply`).
    - ``{"ok": true, "ip_image": "<key>"}`` — a style image was taken; ``ip_image`` may name
      it in later control messages (:func:`style_image_reply`).
    - ``{"ok": true, "control_image": "<net>"}`` — a control image was taken for that ControlNet
      (:func:`control_image_reply`). This reply, the hello and the ``ok`` to a control message
      that picks a ``client`` net may carry ``"awaiting_control_images": [<net> …]``: the
      session's client-fed nets that have no image yet and run at scale 0 until theirs comes.
    - ``{"error": "<why>", "id": …, "field": "<key>", "current": {…}}`` — a refused request
      (:func:`error_reply`): ``id`` echoes the request's, ``field`` names the key to blame and
      ``current`` holds the values the session keeps; each only when known. Without an ``id``
      it is a notice about no request in particular (a refused frame, a session that ended).
    - ``{"dropped": <frame index>, "reason": "<why>"}`` — a frame that gets no output
      (:func:`dropped`); the reasons are :data:`DROP_REASONS`.
    - ``{"stats": {…}}`` — the session's counters (WebRTC data channel, every few seconds).
    - ``{"closing": "<reason>"}`` — the server is about to close on purpose (data channel).

Messages to the server
    A control message: one JSON object of live parameters and an optional ``id`` (a string, or
    an integer below 2**53), answered by exactly one reply (:func:`control_message`). A WebRTC
    offer: ``POST /offer`` with :func:`offer_request`, answered ``{"sdp", "type", "session",
    "params"}`` or, with an HTTP error status, ``{"error": …}``.

Close codes (websocket)
    :data:`CLOSE_GOING_AWAY` 1001 server shutdown; :data:`CLOSE_INVALID_DATA` 1007 text that is
    not UTF-8; :data:`CLOSE_POLICY` 1008 bad session parameters, a refused token or an idle
    connection; :data:`CLOSE_TOO_BIG` 1009 a message over the size limit;
    :data:`CLOSE_INTERNAL` 1011 the session failed in the engine; :data:`CLOSE_TRY_AGAIN` 1013
    at capacity or shutting down, try again later. A close reason fits the websocket's 123
    bytes (:func:`close_reason`); the full text goes in an ``error`` message first.
"""

from __future__ import annotations

import io
import json
import re
import warnings
from collections.abc import Callable, Mapping
from enum import Enum
from fractions import Fraction
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from livediff.exceptions import (
    EmptyFrameError,
    FrameTooLargeError,
    InvalidFrameError,
    ProtocolError,
    UsageError,
)

if TYPE_CHECKING:
    import numpy as np

PTS_TIME_BASE = Fraction(1, 1_000_000)  # the server stamps inputs with their arrival time in µs

CLOSE_GOING_AWAY = 1001
CLOSE_INVALID_DATA = 1007
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL = 1011
CLOSE_TRY_AGAIN = 1013
CLOSE_MEANINGS = {
    CLOSE_GOING_AWAY: "the server is shutting down",
    CLOSE_INVALID_DATA: "a text message was not UTF-8",
    CLOSE_POLICY: "refused: bad parameters, token or idle",
    CLOSE_TOO_BIG: "a message was too large",
    CLOSE_INTERNAL: "the session failed on the server",
    CLOSE_TRY_AGAIN: "the server is busy: try again later",
}
MAX_CLOSE_REASON = 120  # bytes: the websocket limit is 123

DROP_REASONS = ("replaced", "deadline", "reconfigure", "outbox")

MAX_JPEG_SIDE = 4096
STYLE_IMAGE_MAGIC = b"LDIM"  # a binary message with this prefix is a style image, not a frame
CONTROL_IMAGE_MAGIC = b"LDCN"  # … a control image for one ControlNet (the client preprocessor)
CONTROL_IMAGE_FIELD = "control_image"
CONTROL_PREVIEW_MAGIC = b"LDCP"  # … from the server: a preview of a net's control image (JPEG)
CONTROL_PREVIEW_FIELD = "control_preview"  # the control message key that asks for previews
AWAITING_CONTROL_IMAGES = "awaiting_control_images"  # ControlNets at scale 0 until their image
_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


class MessageKind(str, Enum):
    """What a message from the server is (see the module docstring)."""

    HELLO = "session"
    REPLY = "reply"
    ERROR = "error"
    DROPPED = "dropped"
    STATS = "stats"
    CLOSING = "closing"
    UNKNOWN = "unknown"


# ---------------------------------------------------------------------------- server → client
def hello(session_id: str, awaiting: list[str] | None = None) -> str:
    """The first message of every accepted websocket (``awaiting``: the session's ControlNets
    fed by client images that have none yet, see :data:`AWAITING_CONTROL_IMAGES`)."""
    message: dict[str, Any] = {"session": session_id}
    if awaiting:
        message[AWAITING_CONTROL_IMAGES] = list(awaiting)
    return json.dumps(message)


def ok_reply(request_id: str | int | None = None, awaiting: list[str] | None = None) -> str:
    """``{"ok": true}`` with the request's ``id`` and, when some are, the session's ControlNets
    that wait for their first client image (they run at scale 0 until it arrives)."""
    reply: dict[str, Any] = {"ok": True}
    if request_id is not None:
        reply["id"] = request_id
    if awaiting:
        reply[AWAITING_CONTROL_IMAGES] = list(awaiting)
    return json.dumps(reply)


def error_reply(
    message: str,
    request_id: str | int | None = None,
    *,
    field: str | None = None,
    current: Mapping[str, Any] | None = None,
) -> str:
    """``{"error": message}``, plus the request's ``id``, the ``field`` to blame and the values
    the session keeps (``current``: for the keys the request tried to change), when known.
    """
    reply: dict[str, Any] = {"error": message}
    if request_id is not None:
        reply["id"] = request_id
    if field is not None:
        reply["field"] = field
    if current:
        reply["current"] = dict(current)
    return json.dumps(reply)


def style_image_reply(key: str) -> str:
    """The answer to a style image: the key of its encoding, now the session's ``ip_image``."""
    return json.dumps({"ok": True, "ip_image": key})


def control_image_reply(controlnet: str, awaiting: list[str] | None = None) -> str:
    """The answer to a control image: the ControlNet whose control input it now is, and the
    session's other client-fed nets still without one (when there are)."""
    reply: dict[str, Any] = {"ok": True, CONTROL_IMAGE_FIELD: controlnet}
    if awaiting:
        reply[AWAITING_CONTROL_IMAGES] = list(awaiting)
    return json.dumps(reply)


def control_preview_message(controlnet: str, jpeg: bytes) -> bytes:
    """A preview of ``controlnet``'s control image (JPEG bytes) as a binary message."""
    return CONTROL_PREVIEW_MAGIC + _named(controlnet, CONTROL_PREVIEW_FIELD) + jpeg


def dropped(index: int, reason: str) -> str:
    """The answer to a frame the server dropped: its index on the connection and why."""
    return json.dumps({"dropped": index, "reason": reason})


def close_reason(message: str) -> bytes:
    """A close reason that fits in a close frame (the full text goes in a preceding error message)."""
    encoded = message.encode()
    return (
        encoded
        if len(encoded) <= MAX_CLOSE_REASON
        else encoded[: MAX_CLOSE_REASON - 3].rsplit(b" ", 1)[0] + b"..."
    )


# ---------------------------------------------------------------------------- client → server
def control_message(params: Mapping[str, Any], request_id: str | int | None = None) -> str:
    """A control message: live parameters, and the ``id`` its reply will echo."""
    message = dict(params)
    if request_id is not None:
        message["id"] = request_id
    return json.dumps(message)


def style_image_message(image_file: bytes) -> bytes:
    """A style image (an image file's bytes) as a websocket binary message."""
    return STYLE_IMAGE_MAGIC + image_file


def style_image_of(message: bytes) -> bytes | None:
    """The image file a binary message carries when it is a style image, else ``None`` (a frame)."""
    return message[len(STYLE_IMAGE_MAGIC) :] if message[:4] == STYLE_IMAGE_MAGIC else None


def control_image_message(controlnet: str, image_file: bytes) -> bytes:
    """A control image for the session's ControlNet ``controlnet`` as a binary message."""
    return CONTROL_IMAGE_MAGIC + _named(controlnet, CONTROL_IMAGE_FIELD) + image_file


def _named(controlnet: str, field: str) -> bytes:
    """One byte n, then the ControlNet's name in n bytes of UTF-8."""
    name = controlnet.encode()
    if not 1 <= len(name) <= 255:
        raise ProtocolError(
            f"a ControlNet name of {len(name)} bytes: a binary message names its net in 1 to "
            "255 bytes of UTF-8",
            field=field,
        )
    return bytes((len(name),)) + name


def control_preview_of(message: bytes) -> tuple[str, bytes] | None:
    """(ControlNet name, JPEG) when a binary message from the server is a control preview,
    else ``None`` (a frame). A preview without a valid name is a :class:`ProtocolError`."""
    return _named_message(
        message,
        CONTROL_PREVIEW_MAGIC,
        "a control preview is LDCP, one byte n, the ControlNet's name in n bytes, then a "
        "JPEG; this one has no valid name",
        CONTROL_PREVIEW_FIELD,
    )


def control_image_of(message: bytes) -> tuple[str, bytes] | None:
    """(ControlNet name, image file) when a binary message is a control image, else ``None``.

    A message with the prefix but no valid name is a :class:`ProtocolError`
    (``field="control_image"``).
    """
    return _named_message(
        message,
        CONTROL_IMAGE_MAGIC,
        "a control image message is LDCN, one byte n, the ControlNet's name in n bytes of "
        "UTF-8, then an image file; this one has no valid name",
        CONTROL_IMAGE_FIELD,
    )


def _named_message(
    message: bytes, magic: bytes, malformed: str, field: str
) -> tuple[str, bytes] | None:
    """``magic``, one byte n, a name in n bytes of UTF-8, a payload → (name, payload)."""
    if message[: len(magic)] != magic:
        return None
    start = len(magic)
    size = message[start] if len(message) > start else 0
    name = message[start + 1 : start + 1 + size]
    try:
        text = name.decode()
    except UnicodeDecodeError:
        text = ""
    if size == 0 or len(name) < size or not text:
        raise ProtocolError(malformed, field=field)
    return text, message[start + 1 + size :]


def query_string(params: Mapping[str, Any]) -> str:
    """Session parameters as a websocket URL's query: lists as ``a,b``, ``None`` as ``null``."""
    return urlencode({key: _query_value(value) for key, value in params.items()})


def _query_value(value: Any) -> str:
    if value is None:
        return "null"
    return ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)


def offer_request(sdp: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The JSON body of ``POST /offer``: a complete offer (ICE gathered) and session parameters."""
    return {"sdp": sdp, "type": "offer", "params": dict(params or {})}


# ---------------------------------------------------------------------------- reading
def parse_message(text: str | bytes) -> dict[str, Any]:
    """One text message as a JSON object; anything else is a :class:`ProtocolError`."""
    try:
        message = json.loads(text)
    except ValueError as exc:
        raise ProtocolError(f"a text message is not JSON: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError(f"a text message must be a JSON object, not {type(message).__name__}")
    return message


def kind_of(message: Mapping[str, Any]) -> MessageKind:
    """Which of the server's messages ``message`` is. A reply has ``ok``, or ``error`` and ``id``."""
    if "session" in message:
        return MessageKind.HELLO
    if "ok" in message or ("error" in message and "id" in message):
        return MessageKind.REPLY
    for kind in (MessageKind.DROPPED, MessageKind.STATS, MessageKind.CLOSING, MessageKind.ERROR):
        if kind.value in message:
            return kind
    return MessageKind.UNKNOWN


def answers_style_image(message: Mapping[str, Any]) -> bool:
    """Whether ``message`` answers a style image: ok with its key, or an error about
    ``ip_image`` without an ``id`` (an upload has none to echo)."""
    if "ok" in message:
        return "ip_image" in message
    return message.get("field") == "ip_image" and "id" not in message


def answers_control_image(message: Mapping[str, Any]) -> bool:
    """Whether ``message`` answers a control image (ok with its net, or an id-less error about
    ``control_image``)."""
    if "ok" in message:
        return CONTROL_IMAGE_FIELD in message
    return message.get("field") == CONTROL_IMAGE_FIELD and "id" not in message


def close_meaning(code: int | None) -> str:
    """A websocket close code in words, for messages (``None``: the connection just ended)."""
    if code is None:
        return "no close code"
    return f"code {code}: {CLOSE_MEANINGS.get(code, 'closed')}"


# ---------------------------------------------------------------------------- JPEG
def decode_jpeg(
    data: bytes,
    *,
    max_side: int = MAX_JPEG_SIDE,
    max_pixels: int | None = None,
    into: Callable[[int, int], np.ndarray] | None = None,
) -> np.ndarray:
    """One JPEG image → uint8 ``[H, W, 3]`` RGB. Anything else is an :class:`InvalidFrameError`.

    CPU work: run it off the event loop. The size is checked from the header Pillow read,
    before a pixel is decoded (:class:`FrameTooLargeError`, whose ``limit`` is the bound).

    ``into(height, width)``, if given, returns a writable C-contiguous uint8 ``[H, W, 4]``
    array (pinned memory, say): an RGB JPEG (nearly all) then decodes straight into it, no
    copy at all, and the result is its ``[..., :3]`` view (the fourth byte is padding).
    Greyscale and CMYK JPEGs are converted into a fresh array as without ``into``.
    """
    import numpy as np
    from PIL import Image, UnidentifiedImageError

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
                raise FrameTooLargeError(
                    f"JPEG of {width}×{height} is too large: at most {max_side} pixels a side",
                    limit=max_side,
                )
            if max_pixels is not None and width * height > max_pixels:
                raise FrameTooLargeError(
                    f"JPEG of {width}×{height} = {width * height} pixels is too large: at most "
                    f"{max_pixels} ([server] max_frame_pixels)",
                    limit=max_pixels,
                )
            target = None
            if into is not None and image.mode == "RGB" and width and height:
                target = _checked_target(into(height, width), height, width)
                _decode_in_place(image, target)
            else:
                rgb = image.convert("RGB")
    except (InvalidFrameError, UsageError):  # UsageError: a bad `into`, not bad data
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise FrameTooLargeError(
            f"binary message of {len(data)} bytes is a JPEG whose header claims more pixels "
            "than Pillow will decode (a decompression bomb)",
            limit=Image.MAX_IMAGE_PIXELS,
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
    if target is not None:
        return target[..., :3]
    return np.array(rgb)  # writable: the engine wraps it in a tensor


def _checked_target(target: np.ndarray, height: int, width: int) -> np.ndarray:
    """``into``'s array, if a JPEG can decode into it (else the caller's bug: ``UsageError``)."""
    if target.shape != (height, width, 4) or target.dtype.itemsize != 1:
        raise UsageError(f"a {width}×{height} JPEG needs a uint8 [{height}, {width}, 4] target")
    if not (target.flags.c_contiguous and target.flags.writeable):
        raise UsageError("the target of a JPEG decode must be C-contiguous and writable")
    return target


def _decode_in_place(image: Any, target: np.ndarray) -> None:
    """Let Pillow's JPEG decoder write ``image`` into ``target`` (``[H, W, 4]`` uint8).

    Pillow keeps RGB as 4 bytes a pixel; ``load()`` decodes into the image's core if it has
    one already (it allocates only when not), so a core mapped on ``target`` with that stride
    receives the pixels themselves. That is Pillow's internals (tests/streams/test_wire.py
    checks it): should a version allocate anyway, the pixels are copied into ``target``, so
    the frame stays right.
    """
    import numpy as np
    from PIL import Image

    core = Image.core.map_buffer(target, image.size, "raw", 0, ("RGB", 4 * image.size[0], 1))
    image.im = core
    image.load()
    if image.im is not core:  # a Pillow whose load() decodes into memory of its own
        np.copyto(target[..., :3], np.asarray(image))  # still right, one copy more


def _describe(exc: Exception) -> str:
    text = _OBJECT_REPR.sub("the data", str(exc)).strip()
    return text or type(exc).__name__


def encode_jpeg(image: np.ndarray, *, quality: int = 85) -> bytes:
    """uint8 ``[H, W, 3]`` RGB → JPEG bytes (CPU work: run it off the event loop)."""
    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()

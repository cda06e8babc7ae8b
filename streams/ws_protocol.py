"""The websocket protocol of ``GET /ws``: JPEG frames in, JPEG frames out, JSON control.

Connecting
    ``ws://HOST:PORT/ws[?prompt=…&negative_prompt=…&seed=…&strength=…&guidance_scale=…]``.
    Query parameters (all optional) are the session's initial generation parameters.
    The server opens an engine session and sends one text message ``{"session": "<id>"}``.
    If it cannot, it sends ``{"error": "<why>"}`` and closes with code 1008 (bad parameters)
    or 1013 (at capacity: try again later).

Frames (binary messages)
    Client → server: one binary message is one JPEG image, any size up to 4096 pixels a
    side, RGB or grey (it is fitted to the model resolution as ``--fit`` says).
    Server → client: one binary message is one JPEG image at the model resolution.

    - Every output the engine produces is sent, in input order.
    - A frame that is replaced by a newer one before the model takes it (the client sends
      faster than the model runs) is **dropped: it gets no answer**. Keep one or two frames
      in flight, or expect drops.
    - A frame the similarity filter skips (``similarity_threshold``) **is answered with the
      previous output again** (the same JPEG bytes).
    - With ``steps = n`` Stream Batch the answer to frame *i* is produced when frame
      *i + n − 1* goes in: the first *n − 1* frames get their answers late, not never; at the
      end of a stream the last *n − 1* frames stay in flight.

Control (text messages)
    Client → server: one JSON object of live parameters, see :mod:`livediff.streams.control`
    (``prompt``, ``negative_prompt``, ``seed``, ``strength``, ``guidance_scale``, ``delta`` …
    and an optional ``id``). Answer: ``{"ok": true}`` once the change applies to the next
    frame, or ``{"error": "<what was wrong>"}`` with nothing changed (``"id"`` echoed).

Errors
    - A binary message that is not a decodable JPEG (or is too large in pixels):
      text ``{"error": "frame <n>: <why>"}``; the connection stays open, the frame is ignored.
    - Bad JSON, not an object, unknown keys, out-of-range values, a control message over
      64 KiB: text ``{"error": …}``; the connection stays open.
    - A message larger than ``[server] ws_max_message_bytes`` (default 4 MiB): the server
      closes with code 1009 (message too big).
    - Text that is not UTF-8: closed by the server with code 1007.
    - The session fails in the engine: ``{"error": …}`` then close 1011.
    - Server shutdown: close 1001 (going away).

Frames and control of one connection never affect another connection.
"""

from __future__ import annotations

import json
from fractions import Fraction

PTS_TIME_BASE = Fraction(1, 1_000_000)  # inputs are stamped with their arrival time in µs

CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008  # bad session parameters
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL = 1011
CLOSE_TRY_AGAIN = 1013  # at capacity
MAX_CLOSE_REASON = 120  # bytes: the websocket limit is 123


def close_reason(message: str) -> bytes:
    """A close reason that fits in a close frame (the full text goes in a preceding error message)."""
    encoded = message.encode()
    return (
        encoded
        if len(encoded) <= MAX_CLOSE_REASON
        else encoded[: MAX_CLOSE_REASON - 3].rsplit(b" ", 1)[0] + b"..."
    )


def hello(session_id: str) -> str:
    """The first message of every accepted connection."""
    return json.dumps({"session": session_id})

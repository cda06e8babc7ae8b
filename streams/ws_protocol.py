"""The websocket protocol of ``GET /ws``: JPEG frames in, JPEG frames out, JSON control.

This page says what the server does and when; the message shapes, close codes and JPEG helpers
themselves are :mod:`livediff.wire`, which the clients use too (its names are importable from
here as well).

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
    - Every frame the server drops gets a text message instead,
      ``{"dropped": <frame index>, "reason": "<why>"}``: ``replaced`` (a newer frame took its
      place before the model took it: the client sends faster than the model runs),
      ``deadline`` (it could not be answered within ``[runtime] deadline_ms``),
      ``reconfigure`` (the session's pipeline was rebuilt: new steps or size, or a fault), or
      ``outbox`` (its output was made but the client read too slowly). Frame indices count
      the binary messages of the connection from 0. A client that keeps one frame in flight
      never waits forever: each frame gets an output, a ``dropped`` message or an
      ``error``. A ``dropped`` message can arrive before the outputs of earlier frames.
    - A frame the similarity filter skips (``similarity_threshold``) **is answered with the
      previous output again** (the same JPEG bytes).
    - With ``steps = n`` Stream Batch the answer to frame *i* is produced when frame
      *i + n − 1* goes in: the first *n − 1* frames get their answers late, not never; at the
      end of a stream the last *n − 1* frames stay in flight.

Style images (binary messages starting with ``b"LDIM"``)
    Client → server: ``b"LDIM"`` + an image file (PNG, JPEG, WebP …, at most 4096×4096
    pixels; the message within ``ws_max_message_bytes``, else the connection closes 1009) is the session's new style image for the IP-Adapter (``--ip-adapter``),
    not a frame: it is not counted among the frame indices and gets no ``dropped`` message.
    It is decoded and encoded off the event loop and cached by content; the answer is
    ``{"ok": true, "ip_image": "<key>"}`` once the session's ``ip_image`` is that key (from
    the next frame on; another session may send the same key in a control message), or
    ``{"error": "<why>", "field": "ip_image"}`` for an image that does not decode, is too
    large, or a server without IP-Adapter; the session goes on either way. Uploads share the
    control messages' rate limit.

Control images and previews (binary messages starting with ``b"LDCN"`` / ``b"LDCP"``)
    Client → server: ``b"LDCN"`` + one byte n + a ControlNet's name + an image file is that
    net's control image (:mod:`livediff.streams.control_uploads`). Server → client, only
    after ``{"control_preview": true}``: ``b"LDCP"`` + one byte n + a net's name + a JPEG of
    the control image it took (:mod:`livediff.streams.control_previews`); neither is a frame.

Control (text messages)
    Client → server: one JSON object of live parameters, see :mod:`livediff.streams.control_messages`
    (``prompt``, ``negative_prompt``, ``seed``, ``strength``, ``guidance_scale``, ``delta`` …
    and an optional ``id``). Answer: ``{"ok": true}`` once the change applies to the next
    frame, or ``{"error": "<what was wrong>"}`` with nothing changed (``"id"`` echoed).

Errors
    - A binary message that is not a decodable JPEG (or too large in pixels, or too costly
      to decode: more scans than ``[server] max_jpeg_scans``): text ``{"error": "frame <n>:
      <why>"}``; the connection stays open, the frame is ignored.
    - Bad JSON, not an object, nested too deeply, unknown keys, wrong types, out-of-range
      values, a control message over 64 KiB: text ``{"error": …}`` (with ``"field"`` and the
      session's ``"current"`` values when a key is to blame); the connection stays open.
      Any other failure while handling a message is answered ``{"error": …}`` too, and
      logged; the connection stays open.
    - A message larger than ``[server] ws_max_message_bytes`` (default 4 MiB; a message of
      exactly that size is accepted): the server closes with code 1009 (message too big).
    - Text that is not UTF-8: closed by the server with code 1007.
    - The session fails in the engine: ``{"error": …}`` then close 1011.
    - Server shutdown: close 1001 (going away).

Frames and control of one connection never affect another connection.
"""

from __future__ import annotations

from livediff.wire import (
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL,
    CLOSE_INVALID_DATA,
    CLOSE_POLICY,
    CLOSE_TOO_BIG,
    CLOSE_TRY_AGAIN,
    MAX_CLOSE_REASON,
    PTS_TIME_BASE,
    close_reason,
    dropped,
    hello,
)

__all__ = [
    "CLOSE_GOING_AWAY",
    "CLOSE_INTERNAL",
    "CLOSE_INVALID_DATA",
    "CLOSE_POLICY",
    "CLOSE_TOO_BIG",
    "CLOSE_TRY_AGAIN",
    "MAX_CLOSE_REASON",
    "PTS_TIME_BASE",
    "close_reason",
    "dropped",
    "hello",
]

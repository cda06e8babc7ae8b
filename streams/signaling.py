"""``POST /offer``: one HTTP round trip from a WebRTC offer to a live session.

Request (``Content-Type: application/json``)::

    {"sdp": "<the offer, ICE gathering complete>", "type": "offer",
     "params": {"prompt": "a watercolor painting", "strength": 0.5, "seed": 7}}   # params optional

Answer ``200``: ``{"sdp": "<answer>", "type": "answer", "session": "<session id>"}``.

The offer must carry every ICE candidate (wait for gathering to complete: the server takes no
trickled candidates) and a ``sendrecv`` video transceiver: its video goes into the session
and the processed video comes back on the same transceiver. Codec choice is the offerer's
(``setCodecPreferences``); VP8 and H.264 are supported. Errors are JSON
``{"error": "<what was wrong>"}``, with ``"field"`` naming the body field or session parameter
to blame when there is one (``sdp``, ``type``, ``params``, ``strength`` …):

- ``400`` body not JSON (or nested more than 32 levels deep), not an object, missing/invalid
  ``sdp`` or ``type``, ``params`` that are unknown or out of range, SDP the server cannot use
  (no video section, a malformed line: the message names the line and what was expected);
- ``408`` the body did not arrive within ``[server] body_timeout_s``;
- ``413`` body larger than ``[server] max_offer_bytes``;
- ``401`` a token is configured and the request does not carry it (:mod:`livediff.streams.auth`);
- ``403`` a browser page from an origin that is not allowed;
- ``415`` content type other than ``application/json``;
- ``503`` (with ``Retry-After``) the server or the engine is at capacity (connections,
  sessions in all or per device), or the server is shutting down.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

from aiohttp import web

from livediff.engine.frames import OutputFormat
from livediff.exceptions import CapacityError, OfferError, ParameterError, ProtocolError
from livediff.streams import app_keys
from livediff.streams.control_messages import session_params, wire_params
from livediff.streams.control_previews import previews_of
from livediff.streams.drain import DRAIN, SHUTTING_DOWN
from livediff.streams.http_errors import json_error
from livediff.streams.json_text import loads_bounded
from livediff.streams.peer import LivePeer
from livediff.streams.sdp_check import check_offer_sdp
from livediff.wire import AWAITING_CONTROL_IMAGES

log = logging.getLogger(__name__)
RETRY_AFTER_S = "5"


def parse_offer(body: Any) -> tuple[str, dict[str, Any]]:
    """The SDP and the session parameters of an ``/offer`` body; :class:`OfferError` if malformed."""
    if not isinstance(body, dict):
        raise OfferError(f"the body must be a JSON object, not {type(body).__name__}")
    unknown = sorted(set(body) - {"sdp", "type", "params"})
    if unknown:
        raise OfferError(
            f"unknown field(s): {', '.join(unknown)}; expected sdp, type and optionally params",
            field=unknown[0],
        )
    sdp, kind = body.get("sdp"), body.get("type")
    if not isinstance(sdp, str) or not sdp.strip():
        raise OfferError(
            "missing field: sdp (the offer's session description, a string)", field="sdp"
        )
    if kind != "offer":
        raise OfferError(f'type must be "offer", got {kind!r}', field="type")
    params = body.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise OfferError("params must be a JSON object of session parameters", field="params")
    try:
        params = session_params(params)
    except ParameterError as exc:
        raise OfferError(str(exc), field=exc.field) from None
    check_offer_sdp(sdp)
    return sdp, params


async def handle_offer(request: web.Request) -> web.Response:
    app = request.app
    config, peers, metrics = app[app_keys.CONFIG], app[app_keys.PEERS], app[app_keys.METRICS]

    def reject(status: int, reason: str, message: str, **kwargs: Any) -> web.Response:
        metrics.rejected.labels("webrtc", reason).inc()
        log.info("offer from %s refused (%d): %s", request.remote, status, message)
        return json_error(status, message, **kwargs)

    def busy(reason: str, message: str, retry_after: float | None = None) -> web.Response:
        wait = RETRY_AFTER_S if retry_after is None else str(max(1, math.ceil(retry_after)))
        return reject(503, reason, message, headers={"Retry-After": wait})

    if app[DRAIN].draining:
        return busy("shutdown", SHUTTING_DOWN)
    if request.content_type != "application/json":
        return reject(
            415,
            "content_type",
            f"expected Content-Type: application/json, got {request.content_type!r}",
        )
    try:
        text = await asyncio.wait_for(request.read(), config.body_timeout_s)
    except asyncio.TimeoutError:
        return reject(
            408,
            "timeout",
            f"the request body did not arrive within {config.body_timeout_s:g} s "
            "([server] body_timeout_s)",
            headers={"Connection": "close"},
        )
    try:
        sdp, params = parse_offer(loads_bounded(text, what="the body"))
    except OfferError as exc:
        return reject(400, "fields", str(exc), field=exc.field)
    except ProtocolError as exc:
        return reject(400, "json", str(exc), field=exc.field)
    if len(peers) + len(app[app_keys.WEBSOCKETS]) >= config.max_connections:
        return busy("capacity", f"the server has {config.max_connections} connections, its limit")
    engine = app[app_keys.ENGINE]
    try:
        session = await engine.open_session(params, output=OutputFormat.I420)  # for the encoder
    except ParameterError as exc:
        return reject(400, "params", str(exc), field=exc.field)
    except CapacityError as exc:
        return busy("capacity", str(exc), exc.retry_after)
    try:
        ndi_out = app.get(app_keys.NDI_OUT)
        peer = LivePeer(
            session,
            config,
            metrics=metrics,
            on_closed=peers.discard,
            ndi_name=f"{ndi_out} {session.id}" if ndi_out else None,
            style_images=getattr(engine, "encode_style_image", None),
            control_images=getattr(engine, "set_control_image", None),
            awaiting=getattr(engine, "awaiting_control_images", None),
            previews=previews_of(engine),
        )
    except BaseException:
        await session.close()
        raise
    try:
        answer = await peer.answer(sdp)
    except OfferError as exc:
        await peer.close()
        return reject(400, "sdp", str(exc), field=exc.field or "sdp")
    except BaseException:
        await peer.close()  # releases the session whatever the connection's teardown does
        raise
    peers.add(peer)
    metrics.connections.labels("webrtc").set(len(peers))
    peer.log.info("new peer from %s", request.remote)
    body = {
        "sdp": answer.sdp,
        "type": answer.type,
        "session": peer.id,
        "params": wire_params(session.params),
    }
    waiting = peer.waiting_control_images()
    if waiting:  # its client-fed ControlNets run at scale 0 until their first image
        body[AWAITING_CONTROL_IMAGES] = waiting
    return web.json_response(body)

"""``GET /ws``: one websocket client, one engine session (protocol: :mod:`livediff.streams.ws_protocol`).

Two tasks per connection: the reader decodes JPEGs (in the executor, straight into the
session's frame buffers: :mod:`livediff.streams.frame_buffers`) and hands them over, and
applies control messages in order; the writer awaits the session's outputs, encodes them (in
the executor) and sends them. Sends are serialised by a lock. Whatever ends first — the client
closing, a close sent by the server, the session ending — ends both, and the session is closed.

Before a session opens the connection must pass the token check (:mod:`livediff.streams.auth`;
the origin check ran before the upgrade) and the server must not be shutting down. Limits
(:mod:`livediff.streams.limits`): frames over ``max_frame_pixels`` are refused from their JPEG
header, control messages over the rate are refused, and a connection that sends no frame for
``idle_timeout_s`` is closed. :meth:`WsConnection.stop_input` and :meth:`WsConnection.finish`
are the graceful shutdown (:mod:`livediff.streams.drain`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable
from concurrent.futures import Executor
from fractions import Fraction
from functools import partial
from typing import Any

from aiohttp import WSMsgType, web

from livediff.engine.session import DroppedFrame
from livediff.exceptions import (
    CapacityError,
    InvalidFrameError,
    MediaError,
    ParameterError,
    ProtocolError,
    SessionClosedError,
)
from livediff.streams import app_keys, ws_protocol
from livediff.streams.auth import ACCESS, TOKEN_QUERY, UNAUTHORIZED
from livediff.streams.control_messages import (
    params_from_query,
    parse_control,
    refusal_reply,
    session_params,
)
from livediff.streams.control_previews import Previews, PreviewSender, previews_of, split_preview
from livediff.streams.control_uploads import (
    Awaiting,
    ControlImages,
    is_control_image,
    use_control_image,
)
from livediff.streams.drain import DRAIN, SHUTTING_DOWN
from livediff.streams.engine_protocol import SessionLike
from livediff.streams.flow_stats import FlowStats
from livediff.streams.frame_buffers import FrameBuffers, decode_frame
from livediff.streams.limits import (
    DecodeLimits,
    Inactivity,
    TokenBucket,
    jpeg_refusal,
    read_jpeg_header,
)
from livediff.streams.media import MediaTime
from livediff.streams.ndi_io import SessionNdiOut
from livediff.streams.peer import SessionLogger
from livediff.streams.server_config import ServerConfig
from livediff.streams.style_uploads import StyleImages, use_style_image
from livediff.streams.transport_metrics import TransportMetrics
from livediff.wire import (
    CONTROL_IMAGE_FIELD,
    control_image_reply,
    decode_jpeg,
    encode_jpeg,
    error_reply,
    ok_reply,
    style_image_of,
    style_image_reply,
)

logger = logging.getLogger(__name__)
TRANSPORT = "websocket"


async def handle_ws(request: web.Request) -> web.WebSocketResponse:
    app = request.app
    config, metrics, sockets = app[app_keys.CONFIG], app[app_keys.METRICS], app[app_keys.WEBSOCKETS]
    ws = web.WebSocketResponse(  # aiohttp refuses a message of max_msg_size bytes: allow it
        max_msg_size=config.ws_max_message_bytes + 1, compress=False, heartbeat=30.0
    )
    await ws.prepare(request)

    async def refuse(code: int, reason: str, message: str) -> web.WebSocketResponse:
        metrics.rejected.labels(TRANSPORT, reason).inc()
        logger.info("websocket from %s refused: %s", request.remote, message)
        await ws.send_str(error_reply(message))
        await ws.close(code=code, message=ws_protocol.close_reason(message))
        return ws

    if app[DRAIN].draining:
        return await refuse(ws_protocol.CLOSE_TRY_AGAIN, "shutdown", SHUTTING_DOWN)
    if not app[ACCESS].authorized(request):
        return await refuse(ws_protocol.CLOSE_POLICY, "auth", UNAUTHORIZED)
    if len(sockets) + len(app[app_keys.PEERS]) >= config.max_connections:
        return await refuse(
            ws_protocol.CLOSE_TRY_AGAIN,
            "capacity",
            f"the server has {config.max_connections} connections, its limit",
        )
    try:
        query = {k: v for k, v in request.query.items() if k != TOKEN_QUERY}
        session = await app[app_keys.ENGINE].open_session(params_from_query(query))
    except ParameterError as exc:
        return await refuse(ws_protocol.CLOSE_POLICY, "params", str(exc))
    except CapacityError as exc:
        return await refuse(ws_protocol.CLOSE_TRY_AGAIN, "capacity", str(exc))
    ndi_out = app.get(app_keys.NDI_OUT)
    connection = WsConnection(
        ws,
        session,
        config,
        metrics,
        app[app_keys.DECODE_POOL],
        ndi_name=f"{ndi_out} {session.id}" if ndi_out else None,
        style_images=getattr(app[app_keys.ENGINE], "encode_style_image", None),
        control_images=getattr(app[app_keys.ENGINE], "set_control_image", None),
        awaiting=getattr(app[app_keys.ENGINE], "awaiting_control_images", None),
        previews=previews_of(app[app_keys.ENGINE]),
    )
    sockets.add(ws)
    app[DRAIN].websockets.add(connection)
    try:
        await connection.run()
    finally:
        sockets.discard(ws)
        app[DRAIN].websockets.discard(connection)
        connection.ended.set()
    return ws


class WsConnection:
    """The two tasks of one websocket client; :meth:`run` returns when the connection is over."""

    def __init__(
        self,
        ws: web.WebSocketResponse,
        session: SessionLike,
        config: ServerConfig,
        metrics: TransportMetrics,
        decode_pool: Executor | None = None,
        *,
        ndi_name: str | None = None,
        style_images: StyleImages | None = None,
        control_images: ControlImages | None = None,
        awaiting: Awaiting | None = None,
        previews: Previews | None = None,
    ) -> None:
        self.ws = ws
        self.session = session
        self._decode_pool = decode_pool
        self._limits = DecodeLimits(
            config.max_frame_pixels, config.max_jpeg_scans, config.max_jpeg_pixel_scans
        )
        session.report_drops()
        # frames decode into the session's own (pinned, on CUDA) buffers: no host copy
        self._buffers = FrameBuffers(pinned=bool(getattr(session, "pin_inputs", False)))
        self.config = config
        self.metrics = metrics
        self.flow = FlowStats(transport=TRANSPORT, metrics=metrics)  # counts /metrics too
        self.log = SessionLogger(logger, {"session": session.id})
        self._send_lock = asyncio.Lock()
        self._frames = 0
        self._last_pts = -1
        self._t0 = time.perf_counter()
        self._bucket = TokenBucket(config.control_rate_per_s, config.control_burst)
        self._activity = Inactivity(config.idle_timeout_s) if config.idle_timeout_s else None
        self._input_stopped = False
        self._no_frame_in_hand = asyncio.Event()
        self._no_frame_in_hand.set()
        self._finishing: str | None = None
        self._finisher: asyncio.Task[Any] | None = None
        self._writer: asyncio.Task[None] | None = None
        self.ended = asyncio.Event()  # set by the handler once the connection is over
        self._ndi = SessionNdiOut(ndi_name) if ndi_name else None
        self._style_images = style_images  # image file → key, blocking (None: no IP-Adapter)
        self._control_images = control_images  # (session, net, image file) → nets still waiting
        self._awaiting = awaiting  # session id → its client-fed nets without an image yet
        self._previews = PreviewSender(  # {"control_preview": true}: the nets' control images
            session.id, previews, self._send, lambda: self.flow.frames_out, self.log, decode_pool
        )

    async def run(self) -> None:
        self.log.info("websocket session open")
        await self._send(ws_protocol.hello(self.session.id, self._waiting()))
        self._writer = writer = asyncio.ensure_future(self._write())
        previews = asyncio.ensure_future(self._previews.run())
        watchdog = asyncio.ensure_future(self._watch_idle()) if self._activity else None
        try:
            await self._read()
        finally:
            # The client is gone or closed: nothing more can be sent (finish() has sent its part).
            writer.cancel()
            previews.cancel()
            await self._reap(writer)
            await self._reap(previews)
            if watchdog is not None:
                if watchdog is not self._finisher:  # else it is closing the connection: let it
                    watchdog.cancel()
                await self._reap(watchdog)
            with contextlib.suppress(SessionClosedError):
                await self.session.close()
            if self._ndi is not None:
                self._ndi.close()
            if not self.ws.closed:
                await self.ws.close()
            self.log.info(
                "websocket session closed (code %s) after %d frames in, %d out",
                self.ws.close_code,
                self.flow.frames_in,
                self.flow.frames_out,
            )

    async def _reap(self, task: asyncio.Task[Any]) -> None:
        await asyncio.wait({task})
        if not task.cancelled() and task.exception() is not None:
            self.log.info("a connection task ended with %r", task.exception())

    async def _send(self, data: str | bytes) -> None:
        async with self._send_lock:
            if self.ws.closed:
                return
            if isinstance(data, bytes):
                await self.ws.send_bytes(data)
            else:
                await self.ws.send_str(data)

    async def _read(self) -> None:
        async for message in self.ws:
            binary = message.type is WSMsgType.BINARY
            style_image = style_image_of(message.data) if binary else None
            if binary and is_control_image(message.data):
                await self._guarded(self._on_control_image(message.data), "control image")
            elif style_image is not None:
                await self._guarded(self._on_style_image(style_image), "style image")
            elif message.type is WSMsgType.BINARY:
                if self._input_stopped:
                    continue  # shutting down: frames already received are finished, not new ones
                self._no_frame_in_hand.clear()
                try:
                    await self._guarded(self._on_frame(message.data), "frame")
                finally:
                    self._no_frame_in_hand.set()
            elif message.type is WSMsgType.TEXT:
                await self._guarded(self._on_control(message.data), "control message")
            elif message.type is WSMsgType.ERROR:
                self.log.info("websocket error: %s", self.ws.exception() or message.data)
                self.metrics.rejected.labels(TRANSPORT, "protocol").inc()

    async def _on_frame(self, data: bytes) -> None:
        index = self._frames
        self._frames += 1
        arrived = time.perf_counter()
        header = read_jpeg_header(data)  # refuse a costly picture before decoding a single pixel
        refusal = None if header is None else jpeg_refusal(header, self._limits)
        if refusal is not None:
            await self._refuse_frame(f"frame {index}: {refusal}")
            return
        loop = asyncio.get_running_loop()
        decode = partial(
            decode_frame,
            data,
            self._buffers,
            max_pixels=self.config.max_frame_pixels,
            decode=decode_jpeg,
        )
        try:
            image = await loop.run_in_executor(self._decode_pool, decode)
        except InvalidFrameError as exc:
            await self._refuse_frame(f"frame {index}: {exc}")
            return
        except Exception as exc:  # a decoder failure nobody foresaw: this frame only
            self.log.error("frame %d: decoding failed", index, exc_info=exc)
            await self._refuse_frame(
                f"frame {index}: could not be decoded ({type(exc).__name__}; see the server log)"
            )
            return
        pts = max(self._last_pts + 1, int((arrived - self._t0) * 1_000_000))
        self._last_pts = pts
        try:
            self.session.submit(image, pts=pts, time_base=ws_protocol.PTS_TIME_BASE, owned=True)
        except InvalidFrameError as exc:
            await self._refuse_frame(f"frame {index}: {exc}")
            return
        except SessionClosedError as exc:
            await self._fail(str(exc))
            return
        if self._activity is not None:
            self._activity.touch()
        self.flow.frame_in(pts, arrived)

    async def _guarded(self, handling: Awaitable[None], what: str) -> None:
        """Handle one message; an error nobody foresaw is answered, logged, and the reader goes on."""
        try:
            await handling
        except Exception as exc:
            self.log.error("handling a %s failed", what, exc_info=exc)
            self._reject("internal", type(exc).__name__)
            await self._send(
                error_reply(
                    f"the server could not handle this {what} ({type(exc).__name__}; "
                    "see the server log)"
                )
            )

    async def _refuse_frame(self, message: str) -> None:
        self._reject("frame", message)
        await self._send(error_reply(message))

    async def _on_control(self, text: str) -> None:
        allowed = self._bucket.take()
        try:
            request = parse_control(text, max_bytes=self.config.ws_max_control_bytes)
        except ParameterError as exc:
            message = str(exc) if allowed else self._bucket.refusal()
            self._reject("control" if allowed else "rate", message)
            await self._send(error_reply(message))
            return
        if not allowed:
            self._reject("rate", self._bucket.refusal())
            await self._send(error_reply(self._bucket.refusal(), request.id))
            return
        try:
            preview, changes = split_preview(request.changes)
            if preview is not None:
                self._previews.check(preview)
            if changes:
                await self.session.update(**session_params(changes))
        except ParameterError as exc:
            self._reject("control", str(exc))
            await self._send(refusal_reply(exc, request, self.session.params))
            return
        except SessionClosedError as exc:
            await self._fail(str(exc))
            return
        except Exception as exc:  # a bug, not the client's fault: say so, keep the connection
            self.log.error("control message failed", exc_info=exc)
            self._reject("control", type(exc).__name__)
            await self._send(
                error_reply(
                    f"the server could not apply this message ({type(exc).__name__}; see the "
                    "server log); nothing changed",
                    request.id,
                )
            )
            return
        if preview is not None:
            self._previews.set(preview)
        self.log.info("updated %s", ", ".join(sorted(request.changes)))
        waiting = self._waiting() if "controlnets" in request.changes else None
        await self._send(ok_reply(request.id, waiting))

    def _waiting(self) -> list[str]:
        return self._awaiting(self.session.id) if self._awaiting is not None else []

    async def _on_control_image(self, message: bytes) -> None:
        """A control image for one of the session's ControlNets (decoded off the event loop)."""
        try:
            controlnet, waiting = await use_control_image(
                self.session, self._control_images, message
            )
        except (ParameterError, InvalidFrameError, ProtocolError) as exc:
            self._reject("control_image", str(exc))
            await self._send(error_reply(str(exc), field=CONTROL_IMAGE_FIELD))
            return
        except SessionClosedError as exc:
            await self._fail(str(exc))
            return
        self.log.info("control image for %s (%d bytes) in use", controlnet, len(message))
        await self._send(control_image_reply(controlnet, waiting))

    async def _on_style_image(self, image_file: bytes) -> None:
        """Encode a style image off the event loop and make it the session's ``ip_image``."""
        if not self._bucket.take():  # an encode costs a CLIP pass: rated like control messages
            self._reject("rate", self._bucket.refusal())
            await self._send(error_reply(self._bucket.refusal(), field="ip_image"))
            return
        try:
            key = await use_style_image(
                self.session, self._style_images, image_file, self._decode_pool
            )
        except (ParameterError, InvalidFrameError) as exc:
            self._reject("style_image", str(exc))
            await self._send(error_reply(str(exc), field="ip_image"))
            return
        except SessionClosedError as exc:
            await self._fail(str(exc))
            return
        self.log.info("style image %s… (%d bytes) in use", key[:12], len(image_file))
        await self._send(style_image_reply(key))

    def _reject(self, reason: str, message: str) -> None:
        self.flow.errors += 1
        self.metrics.rejected.labels(TRANSPORT, reason).inc()
        self.log.info("refused %s: %s", reason, message)

    async def _write(self) -> None:
        loop = asyncio.get_running_loop()
        previous: bytes | None = None
        while True:
            try:
                out = await self.session.next_event()
            except SessionClosedError as exc:
                if self._finishing is None:
                    await self._fail(str(exc))
                return
            if isinstance(out, DroppedFrame):
                await self._send(ws_protocol.dropped(out.index, out.reason.value))
                self.flow.frame_dropped()
                continue
            if out.skipped and previous is not None:
                data = previous
            else:
                data = await loop.run_in_executor(
                    None, partial(encode_jpeg, out.image, quality=self.config.jpeg_quality)
                )
            previous = data
            await self._send(data)
            if self._ndi is not None:
                await self._publish(out)
            self.flow.frame_out(out.pts)

    async def _publish(self, out: Any) -> None:
        """The output to this session's NDI source too; a failure ends the NDI output only."""
        assert self._ndi is not None
        time = None if out.pts is None else MediaTime(out.pts, out.time_base or Fraction(1))
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, self._ndi.send, out.image, time)
        except MediaError as exc:
            self.log.error("NDI output %r stopped: %s", self._ndi.name, exc)
            self._ndi.close()
            self._ndi = None

    async def _fail(self, message: str) -> None:
        """The session ended under us: tell the client and close."""
        if self.ws.closed or self._finishing is not None:
            return
        self.log.warning("session ended: %s", message)
        await self._send(error_reply(f"session ended: {message}"))
        async with self._send_lock:
            await self.ws.close(
                code=ws_protocol.CLOSE_INTERNAL, message=ws_protocol.close_reason(message)
            )

    # ------------------------------------------------------------------ ending on purpose
    async def _watch_idle(self) -> None:
        assert self._activity is not None
        await self._activity.expired()
        message = f"idle timeout: no frame for {self._activity.timeout_s:g} s"
        self.metrics.rejected.labels(TRANSPORT, "idle").inc()
        await self.finish(message, code=ws_protocol.CLOSE_POLICY, error=True)

    async def stop_input(self) -> None:
        """Take no more frames; return once the frame in hand (if any) has been submitted."""
        self._input_stopped = True
        await self._no_frame_in_hand.wait()

    async def wait_closed(self) -> None:
        await self.ended.wait()

    async def finish(
        self, reason: str, *, code: int = ws_protocol.CLOSE_GOING_AWAY, error: bool = False
    ) -> None:
        """End the session with ``reason``, send the outputs still queued, then close with ``code``
        (after ``{"error": reason}`` when ``error``). Idempotent.
        """
        if self._finishing is not None or self.ws.closed:
            return
        self._finishing = reason
        self._finisher = asyncio.current_task()
        self._input_stopped = True
        self.log.info("finishing: %s", reason)
        self.session.end(reason)  # outputs already queued stay readable
        if self._writer is not None:
            await asyncio.wait({self._writer})
        if error:
            await self._send(error_reply(reason))
        async with self._send_lock:
            if not self.ws.closed:
                await self.ws.close(code=code, message=ws_protocol.close_reason(reason))

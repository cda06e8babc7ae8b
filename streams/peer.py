"""One WebRTC peer of the server: its RTCPeerConnection, its engine session and its data channel.

Lifecycle: :meth:`LivePeer.answer` applies the browser's offer and returns the answer. The
remote video goes into the session (:func:`~livediff.streams.webrtc_tracks.forward_video`) and
a :class:`~livediff.streams.webrtc_tracks.SessionVideoTrack` goes back. The peer closes itself,
and its session, when the connection fails or closes, when the remote track ends, or when
the session ends; :meth:`close` is idempotent and safe to call from anywhere.

Data channel (any label, opened by the client; the first one is used): the client sends
control messages (:mod:`livediff.streams.control_messages`), each answered with ``{"ok": true}`` or
``{"error": ...}`` (also ``{"error": "rate limit: …"}`` over ``control_rate_per_s``), and
binary style images (``b"LDIM"`` + an image file, as on the websocket), each answered
``{"ok": true, "ip_image": key}`` or ``{"error": …, "field": "ip_image"}``, and binary
control images (``b"LDCN"`` …, :mod:`livediff.streams.control_uploads`), answered ``{"ok":
true, "control_image": net}`` or ``{"error": …, "field": "control_image"}`` (a rate-limit
refusal of an upload names its field too, ``ip_image`` or ``control_image``, and comes in its
turn); ``{"control_preview": true}`` asks for ``b"LDCP"``
previews of the nets' control images (:mod:`livediff.streams.control_previews`); the
server sends ``{"stats": {...}}`` every ``stats_interval_s``, ``{"error": "frame W×H … too
large …"}`` (at most once a second) while the remote video exceeds ``max_frame_pixels``, and
``{"closing": "<reason>"}`` before it closes the peer on purpose (server shutdown, idle timeout).

Timeouts: a peer not ``connected`` within ``connect_timeout_s`` of its answer is closed (its
session released); a connected peer whose video brings no frame for ``idle_timeout_s`` is
closed with ``{"closing": "idle timeout: …"}``. A peer that vanishes (no close, no packets)
is caught by the idle timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import traceback
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from aiortc import RTCDataChannel, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack
from aiortc.sdp import SessionDescription

from livediff.exceptions import (
    InvalidFrameError,
    OfferError,
    ParameterError,
    ProtocolError,
    SessionClosedError,
)
from livediff.ice import rtc_configuration
from livediff.streams.control_messages import parse_control, refusal_reply, session_params
from livediff.streams.control_previews import Previews, PreviewSender, split_preview
from livediff.streams.control_uploads import (
    Awaiting,
    ControlImages,
    is_control_image,
    use_control_image,
)
from livediff.streams.engine_protocol import SessionLike
from livediff.streams.flow_stats import FlowStats
from livediff.streams.limits import (
    Inactivity,
    PixelLimitedTrack,
    Throttle,
    TokenBucket,
    too_many_pixels,
)
from livediff.streams.ndi_io import SessionNdiOut
from livediff.streams.server_config import ServerConfig
from livediff.streams.style_uploads import StyleImages, use_style_image
from livediff.streams.transport_metrics import TransportMetrics
from livediff.streams.webrtc_tracks import SessionVideoTrack, drain, forward_video
from livediff.wire import (
    CONTROL_IMAGE_FIELD,
    control_image_reply,
    error_reply,
    ok_reply,
    style_image_of,
    style_image_reply,
)

logger = logging.getLogger(__name__)
TRANSPORT = "webrtc"
CHANNEL_CLOSE_WAIT_S = 2.0  # for the closing message to be delivered before the peer closes
OUTPUT_END_WAIT_S = 5.0  # for the outgoing video to send the outputs still queued


class SessionLogger(logging.LoggerAdapter):
    """Prefixes every message with the session id."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"[{self.extra['session'] if self.extra else '-'}] {msg}", kwargs


class LivePeer:
    """See the module docstring. Create one per offer, after the engine accepted the session."""

    def __init__(
        self,
        session: SessionLike,
        config: ServerConfig,
        *,
        metrics: TransportMetrics | None = None,
        on_closed: Callable[[LivePeer], None] | None = None,
        ndi_name: str | None = None,
        style_images: StyleImages | None = None,
        control_images: ControlImages | None = None,
        awaiting: Awaiting | None = None,
        previews: Previews | None = None,
    ) -> None:
        self.session = session
        self._style_images = style_images  # image file → key, blocking (None: no IP-Adapter)
        self._control_images = control_images  # (session, net, image file) → nets still waiting
        self._awaiting = awaiting  # session id → its client-fed nets without an image yet
        self._ndi_name = ndi_name  # publish the output as this NDI source too
        self.id: str = session.id
        self.config = config
        self.log = SessionLogger(logger, {"session": self.id})
        self.flow = FlowStats(transport=TRANSPORT, metrics=metrics)  # counts /metrics too
        self.codec: str | None = None
        self.pc = RTCPeerConnection(rtc_configuration(config.ice_servers))
        self._metrics = metrics
        self._on_closed = on_closed
        self._markers: OrderedDict[Any, int] | None = (
            OrderedDict() if config.latency_marker else None
        )
        self._outputs: list[SessionVideoTrack] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._channel: RTCDataChannel | None = None
        self._update_lock = asyncio.Lock()
        self._bucket = TokenBucket(config.control_rate_per_s, config.control_burst)
        self._pixel_reports = Throttle(1.0)
        self._connected = asyncio.Event()
        self._activity: Inactivity | None = None
        self._forward_task: asyncio.Task[Any] | None = None
        self._finishing: str | None = None
        self._closing = False
        self._closed = asyncio.Event()
        self._previews = PreviewSender(  # {"control_preview": true}: the nets' control images
            self.id, previews, self._send_bytes, lambda: self.flow.frames_out, self.log
        )
        self.pc.on("track", self._on_track)
        self.pc.on("datachannel", self._on_datachannel)
        self.pc.on("connectionstatechange", self._on_connection_state)

    # ---------------------------------------------------------------- negotiation
    async def answer(self, sdp: str) -> RTCSessionDescription:
        """Apply the remote offer and return the local answer. An offer that cannot be answered
        raises :class:`~livediff.exceptions.OfferError` (its SDP was checked for shape before).
        """
        try:
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        except Exception as exc:  # aiortc's SDP parser raises whatever the text trips it on
            raise OfferError(
                f"aiortc refused the offer's SDP: {_describe(exc)}", field="sdp"
            ) from exc
        if not self._outputs:
            raise OfferError(
                "the offer has no video track to receive (add a sendrecv video transceiver)",
                field="sdp",
            )
        try:
            await self.pc.setLocalDescription(await self.pc.createAnswer())
        except Exception as exc:
            raise OfferError(
                f"aiortc could not answer the offer: {_describe(exc)}", field="sdp"
            ) from exc
        local = self.pc.localDescription
        self.codec = _video_codec(local.sdp)
        self.log.info("answered; video codec %s", self.codec)
        self._spawn(self._watch())
        return local

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind != "video" or self._outputs:
            self.log.info("ignoring remote %s track", track.kind)
            self._spawn(drain(track))
            return
        output = SessionVideoTrack(
            self.session,
            self.flow,
            markers=self._markers,
            ndi=SessionNdiOut(self._ndi_name) if self._ndi_name else None,
        )
        self._outputs.append(output)
        self.pc.addTrack(output)
        limited = PixelLimitedTrack(track, self.config.max_frame_pixels, self._frame_refused)
        self._forward_task = self._spawn(self._forward(limited))

    def _frame_refused(self, width: int, height: int) -> None:
        self.flow.errors += 1
        if self._metrics is not None:
            self._metrics.rejected.labels(TRANSPORT, "frame").inc()
        if self._pixel_reports.ready():  # one report a second, however many frames
            message = f"frame {too_many_pixels(width, height, self.config.max_frame_pixels)}"
            self.log.warning(
                "refused %s (%d more since the last report)",
                message,
                self._pixel_reports.suppressed,
            )
            self._pixel_reports.suppressed = 0
            self._reply(error_reply(message))

    async def _forward(self, track: MediaStreamTrack) -> None:
        await forward_video(
            track,
            self.session,
            self.flow,
            self.log,
            markers=self._markers,
            on_input=self._count_input,
        )
        self._spawn(self.close())  # the remote track or the session ended: nothing left to do

    def _count_input(self) -> None:
        if self._activity is not None:
            self._activity.touch()

    async def _on_connection_state(self) -> None:
        state = self.pc.connectionState
        self.log.info("connection %s", state)
        if state == "connected":
            self._connected.set()
        if state in ("failed", "closed"):
            self._spawn(self.close())

    # ---------------------------------------------------------------- data channel
    def _on_datachannel(self, channel: RTCDataChannel) -> None:
        if self._channel is not None:
            self.log.warning("ignoring extra data channel %r", channel.label)
            return
        self._channel = channel
        self.log.info("data channel %r open", channel.label)
        channel.on("message", self._on_message)
        self._spawn(self._send_stats(channel))
        self._spawn(self._previews.run())

    def _on_message(self, message: str | bytes) -> None:
        if self._bucket.take():
            self._spawn(self._on_control(message))
            return
        if self._metrics is not None:
            self._metrics.rejected.labels(TRANSPORT, "rate").inc()
        upload = None
        if isinstance(message, bytes):
            upload = CONTROL_IMAGE_FIELD if is_control_image(message) else None
            upload = "ip_image" if style_image_of(message) is not None else upload
        if upload is not None:  # an upload: answered in its turn, naming what was refused
            self._spawn(self._refuse_in_order(error_reply(self._bucket.refusal(), field=upload)))
            return
        try:  # echo the id when there is one to echo
            request_id = parse_control(message, max_bytes=self.config.ws_max_control_bytes).id
        except ParameterError:
            request_id = None
        self._reply(error_reply(self._bucket.refusal(), request_id))

    async def _on_control(self, message: str | bytes) -> None:
        if isinstance(message, bytes):
            image_file = style_image_of(message)
            if is_control_image(message):
                await self._on_control_image(message)
            elif image_file is None:
                self._reply(
                    error_reply("binary messages on the control channel must be style images")
                )
            else:
                await self._on_style_image(image_file)
            return
        try:
            request = parse_control(message, max_bytes=self.config.ws_max_control_bytes)
        except ParameterError as exc:
            self._reply(error_reply(str(exc)))
            return
        async with self._update_lock:  # FIFO: updates apply in the order they were sent
            try:
                preview, changes = split_preview(request.changes)
                if preview is not None:
                    self._previews.check(preview)
                if changes:
                    await self.session.update(**session_params(changes))
            except ParameterError as exc:
                self._reply(refusal_reply(exc, request, self.session.params))
                return
            except SessionClosedError as exc:
                self._reply(error_reply(str(exc), request.id))
                return
            except Exception as exc:  # a bug, not the client's fault: say so, keep the channel
                self.log.error("control message failed", exc_info=exc)
                self._reply(
                    error_reply(
                        f"the server could not apply this message ({type(exc).__name__}; see "
                        "the server log); nothing changed",
                        request.id,
                    )
                )
                return
        if preview is not None:
            self._previews.set(preview)
        self.log.info("updated %s", ", ".join(sorted(request.changes)))
        waiting = self.waiting_control_images() if "controlnets" in request.changes else None
        self._reply(ok_reply(request.id, waiting))

    def waiting_control_images(self) -> list[str]:
        """The session's client-fed ControlNets without an image yet (at scale 0 until then)."""
        return self._awaiting(self.session.id) if self._awaiting is not None else []

    async def _refuse_in_order(self, reply: str) -> None:
        """A refused upload's answer, after the answers of those sent before it (a client
        pairs id-less answers with its uploads in order)."""
        async with self._update_lock:
            self._reply(reply)

    async def _on_control_image(self, message: bytes) -> None:
        async with self._update_lock:  # in order with the control messages around it
            try:
                controlnet, waiting = await use_control_image(
                    self.session, self._control_images, message
                )
            except (ParameterError, InvalidFrameError, ProtocolError) as exc:
                self._reply(error_reply(str(exc), field=CONTROL_IMAGE_FIELD))
                return
            except SessionClosedError as exc:
                self._reply(error_reply(str(exc)))
                return
        self.log.info("control image for %s (%d bytes) in use", controlnet, len(message))
        self._reply(control_image_reply(controlnet, waiting))

    async def _on_style_image(self, image_file: bytes) -> None:
        async with self._update_lock:  # in order with the control messages around it
            try:
                key = await use_style_image(self.session, self._style_images, image_file)
            except (ParameterError, InvalidFrameError) as exc:
                self._reply(error_reply(str(exc), field="ip_image"))
                return
            except SessionClosedError as exc:
                self._reply(error_reply(str(exc)))
                return
        self.log.info("style image %s… (%d bytes) in use", key[:12], len(image_file))
        self._reply(style_image_reply(key))

    def _reply(self, text: str) -> None:
        if self._channel is not None and self._channel.readyState == "open":
            self._channel.send(text)

    async def _send_bytes(self, data: bytes) -> None:
        if self._channel is not None and self._channel.readyState == "open":
            self._channel.send(data)

    async def _send_stats(self, channel: RTCDataChannel) -> None:
        while not self._closing:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._closed.wait(), timeout=self.config.stats_interval_s)
            if self._closing or channel.readyState == "closed":
                return
            if channel.readyState == "open":
                channel.send(json.dumps({"stats": self.stats()}, default=str))

    def stats(self) -> dict[str, Any]:
        """This peer's counters, with the engine's view of the session under ``engine``."""
        result: dict[str, Any] = {
            "session": self.id,
            "codec": self.codec,
            "state": self.pc.connectionState,
        }
        result.update(self.flow.snapshot())
        try:
            result["engine"] = self.session.stats()
        except SessionClosedError:
            result["engine"] = None
        return result

    # ---------------------------------------------------------------- timeouts, ending on purpose
    async def _watch(self) -> None:
        """Close a peer that never connects, or that sends no frame for ``idle_timeout_s``."""
        timeout = self.config.connect_timeout_s
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
        except asyncio.TimeoutError:
            self.log.info("not connected after %g s: closing", timeout)
            if self._metrics is not None:
                self._metrics.rejected.labels(TRANSPORT, "connect_timeout").inc()
            self.session.end(f"connect timeout: not connected within {timeout:g} s")
            await self.close()
            return
        if not self.config.idle_timeout_s:
            return
        self._activity = Inactivity(self.config.idle_timeout_s)
        await self._activity.expired()
        if self._metrics is not None:
            self._metrics.rejected.labels(TRANSPORT, "idle").inc()
        await self.finish(f"idle timeout: no video frame for {self.config.idle_timeout_s:g} s")

    async def stop_input(self) -> None:
        """Take no more remote video (graceful shutdown); frames already submitted are finished."""
        task = self._forward_task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task})

    async def finish(self, reason: str) -> None:
        """End the session with ``reason``, let the outgoing video send what is queued, tell the
        client ``{"closing": reason}`` on the data channel, and close. Idempotent.
        """
        if self._finishing is not None or self._closing:
            await self.wait_closed()
            return
        self._finishing = reason
        self.log.info("finishing: %s", reason)
        await self.stop_input()
        self.session.end(reason)  # queued outputs stay readable, then the track ends
        if self.pc.connectionState == "connected":
            with contextlib.suppress(asyncio.TimeoutError):  # bounded: the sender may be stuck
                await asyncio.wait_for(
                    asyncio.gather(*(_ended(output) for output in self._outputs)),
                    OUTPUT_END_WAIT_S,
                )
        channel = self._channel
        if channel is not None and channel.readyState == "open":
            channel.send(json.dumps({"closing": reason}))
            closed = asyncio.Event()
            channel.once("close", closed.set)
            channel.close()  # the reset goes out after the message: it arrives first
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(closed.wait(), CHANNEL_CLOSE_WAIT_S)
        await self.close()

    # ---------------------------------------------------------------- teardown
    def _spawn(self, coroutine: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.log.error("task failed", exc_info=task.exception())

    async def close(self) -> None:
        """Close the connection and the session; idempotent, and waits until both are done."""
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        current = asyncio.current_task()
        pending = [t for t in self._tasks if t is not current]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        try:
            for output in self._outputs:
                output.stop()
            await self.pc.close()
        except Exception as exc:  # aiortc's teardown (sctp, DTLS) can raise on a half-set-up peer
            self.log.warning("closing the connection raised %s: %s", type(exc).__name__, exc)
        finally:  # whatever the connection did, the session and its slot are released
            with contextlib.suppress(SessionClosedError):
                await self.session.close()
            self.log.info(
                "closed after %d frames in, %d out", self.flow.frames_in, self.flow.frames_out
            )
            self._closed.set()
            if self._on_closed is not None:
                self._on_closed(self)

    async def wait_closed(self) -> None:
        await self._closed.wait()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()


def _describe(exc: Exception) -> str:
    """``Type: message``, or where it was raised when the exception has no message (aiortc's asserts)."""
    text = str(exc).strip()
    if text:
        return f"{type(exc).__name__}: {text}"
    frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    where = f" in {Path(frame.filename).name}:{frame.lineno} ({frame.line})" if frame else ""
    return f"{type(exc).__name__}{where}"


def _video_codec(sdp: str) -> str | None:
    for media in SessionDescription.parse(sdp).media:
        if media.kind == "video" and media.rtp.codecs:
            return str(media.rtp.codecs[0].mimeType)
    return None


async def _ended(track: MediaStreamTrack) -> None:
    """Return once ``track`` has ended (its last frame has been taken by the sender)."""
    if track.readyState == "ended":
        return
    ended = asyncio.Event()
    track.once("ended", ended.set)
    await ended.wait()

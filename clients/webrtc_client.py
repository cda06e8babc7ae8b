"""A Python WebRTC peer (aiortc) for ``livediff serve``: send video, receive the processed video,
change parameters over the data channel.

As a library::

    client = WebRTCClient("http://127.0.0.1:8080", params={"prompt": "a cat"}, codec="vp8")
    await client.connect(ImageTrack(frames, fps=30))     # or MediaPlayer("clip.mp4").video
    frame = await client.recv_frame()                     # uint8 RGB numpy, the model's resolution
    reply = await client.update(prompt="a dog")           # {"ok": true} or {"error": ...}
    await client.ask_control_previews()                   # then, a few a second:
    name, image = await client.recv_control_preview()     # what a ControlNet took, uint8 RGB
    print(client.stats)                                   # the server's last {"stats": ...}
    await client.close()

As a command::

    python -m livediff.clients.webrtc_client --url http://127.0.0.1:8080 --input clip.mp4 \\
        --output styled.mp4 --seconds 10 --codec h264 --prompt "a cat" --update prompt="a dog"

It speaks only the wire protocol, :mod:`livediff.wire` (``POST /offer``, the data channel's
messages), and shares the ICE set-up with the server (:mod:`livediff.ice`). The client uses no
STUN server unless given one; ``--host-address 127.0.0.1`` makes it offer loopback candidates
(aioice never does on its own).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import fractions
import itertools
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp
import av
import numpy as np
from aiortc import (
    RTCDataChannel,
    RTCIceServer,
    RTCPeerConnection,
    RTCSessionDescription,
    VideoStreamTrack,
)
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rtcrtpsender import RTCRtpSender

from livediff import wire
from livediff.clients.media import FrameSource
from livediff.exceptions import LivediffError, SessionClosedError
from livediff.ice import HostAddressRestriction, IceServerLike, rtc_configuration

FrameFactory = Callable[[int], np.ndarray]


class ImageTrack(VideoStreamTrack):
    """A video track of numpy RGB frames at ``fps``: ``frames(i)`` gives frame ``i`` (uint8 ``H×W×3``)."""

    def __init__(self, frames: FrameFactory | np.ndarray, *, fps: int = 30) -> None:
        super().__init__()
        self._frames = frames
        self._fps = fps
        self._index = 0
        self._started_at: float | None = None

    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        loop = asyncio.get_running_loop()
        if self._started_at is None:
            self._started_at = loop.time()
        index = self._index
        self._index += 1
        wait = self._started_at + index / self._fps - loop.time()
        if wait > 0:
            await asyncio.sleep(wait)  # pacing to the frame rate, as a camera does
        image = self._frames(index) if callable(self._frames) else self._frames
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
        frame.pts, frame.time_base = index * (90000 // self._fps), fractions.Fraction(1, 90000)
        return frame


class SourceTrack(MediaStreamTrack):
    """A camera or file (:class:`~livediff.clients.media.FrameSource`) as a video track.

    Files play at their own frame rate and loop with rising timestamps (aiortc's ``MediaPlayer``
    stops pacing after the first loop).
    """

    kind = "video"

    def __init__(self, source: FrameSource) -> None:
        super().__init__()
        self._source = source
        self._frames = source.frames()

    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        item = await asyncio.get_running_loop().run_in_executor(None, next, self._frames, None)
        if item is None:
            self.stop()
            raise MediaStreamError
        frame = av.VideoFrame.from_ndarray(item.image, format="rgb24")
        frame.pts, frame.time_base = round(item.seconds * 90000), fractions.Fraction(1, 90000)
        return frame

    def stop(self) -> None:
        self._source.stop()
        super().stop()


class WebRTCClient:
    """One peer connection = one server session. See the module docstring."""

    def __init__(
        self,
        url: str,
        *,
        params: dict[str, Any] | None = None,
        codec: str | None = None,
        ice_servers: Sequence[IceServerLike] = (),
    ) -> None:
        self.url = url.rstrip("/")
        self.params = dict(params or {})
        self.codec = codec
        self.pc = RTCPeerConnection(rtc_configuration(ice_servers))
        self.session: str | None = None
        self.stats: dict[str, Any] | None = None
        self.stats_received = 0
        self.channel: RTCDataChannel = self.pc.createDataChannel("control")
        self._track: asyncio.Future[MediaStreamTrack] = asyncio.get_running_loop().create_future()
        self._open = asyncio.Event()
        self._stats_event = asyncio.Event()
        self._replies: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self._style_replies: collections.deque[asyncio.Future[dict[str, Any]]] = (
            collections.deque()
        )  # answered in the order sent, without an id
        self._control_replies: collections.deque[asyncio.Future[dict[str, Any]]] = (
            collections.deque()
        )  # the same, for control images
        # The session's client-fed ControlNets that had no image when it opened (scale 0).
        self.awaiting_control_images: list[str] = []
        # Control previews (b"LDCP" messages, after ask_control_previews): (net, JPEG)
        self._previews: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self.channel.on("open", self._open.set)
        self.channel.on("message", self._on_message)
        self.pc.on("track", self._on_track)

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "video" and not self._track.done():
            self._track.set_result(track)

    def _on_message(self, message: str | bytes) -> None:
        if isinstance(message, bytes):
            preview = wire.control_preview_of(message)
            if preview is not None:
                self._previews.put_nowait(preview)
            return
        data = wire.parse_message(message)
        if wire.kind_of(data) is wire.MessageKind.STATS:
            self.stats = data["stats"]
            self.stats_received += 1
            self._stats_event.set()
            return
        request_id = data.get("id")
        waiter = self._replies.pop(request_id, None) if isinstance(request_id, int) else None
        if waiter is None and self._style_replies and wire.answers_style_image(data):
            waiter = self._style_replies.popleft()
        if waiter is None and self._control_replies and wire.answers_control_image(data):
            waiter = self._control_replies.popleft()
        if waiter is not None and not waiter.done():
            waiter.set_result(data)

    async def connect(self, source: MediaStreamTrack) -> None:
        """Offer ``source`` and apply the server's answer; a refusal raises :class:`LivediffError`."""
        transceiver = self.pc.addTransceiver(source, direction="sendrecv")
        if self.codec:
            wanted = f"video/{self.codec}".lower()
            codecs = RTCRtpSender.getCapabilities("video").codecs
            preferred = [c for c in codecs if c.mimeType.lower() == wanted]
            if not preferred:
                raise LivediffError(f"codec {self.codec!r} is not supported; choose vp8 or h264")
            transceiver.setCodecPreferences(
                preferred + [c for c in codecs if c.mimeType.lower() == "video/rtx"]
            )
        await self.pc.setLocalDescription(
            await self.pc.createOffer()
        )  # aiortc gathers all candidates first
        offer = self.pc.localDescription
        body = wire.offer_request(offer.sdp, self.params)
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"{self.url}/offer", json=body) as response,
        ):
            answer = await response.json()
        if response.status != 200:
            await self.pc.close()
            raise LivediffError(
                f"the server refused the offer ({response.status}): {answer.get('error')}"
            )
        self.session = answer["session"]
        self.awaiting_control_images = list(answer.get(wire.AWAITING_CONTROL_IMAGES, []))
        await self.pc.setRemoteDescription(
            RTCSessionDescription(sdp=answer["sdp"], type=answer["type"])
        )

    async def output(self) -> MediaStreamTrack:
        """The processed video track from the server."""
        return await self._track

    async def recv_frame(self) -> np.ndarray:
        """The next processed frame as uint8 RGB; :class:`SessionClosedError` once the track ends."""
        frame = await self.recv_video_frame()
        return frame.to_ndarray(format="rgb24")

    async def recv_video_frame(self) -> av.VideoFrame:
        track = await self.output()
        try:
            frame = await track.recv()
        except MediaStreamError:
            raise SessionClosedError("the server's video track ended") from None
        assert isinstance(frame, av.VideoFrame)
        return frame

    async def update(self, **params: Any) -> dict[str, Any]:
        """Send live parameters over the data channel; returns ``{"ok": true}`` or ``{"error": ...}``."""
        await self._open.wait()
        request_id = next(self._ids)
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._replies[request_id] = waiter
        self.channel.send(wire.control_message(params, request_id))
        return await waiter

    async def send_style_image(self, image_file: bytes) -> dict[str, Any]:
        """Send a style image (an image file's bytes) over the data channel; returns
        ``{"ok": true, "ip_image": key}`` or ``{"error": ..., "field": "ip_image"}``. The
        message must fit the channel's message size (64 KiB is safe everywhere)."""
        await self._open.wait()
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._style_replies.append(waiter)
        self.channel.send(wire.style_image_message(image_file))
        return await waiter

    async def send_control_image(self, controlnet: str, image_file: bytes) -> dict[str, Any]:
        """Send a control image (an image file's bytes) for the session's ControlNet
        ``controlnet`` (fed ``client``) over the data channel; returns ``{"ok": true,
        "control_image": controlnet}`` or ``{"error": ..., "field": "control_image"}``. The
        message must fit the channel's message size (64 KiB is safe everywhere)."""
        message = wire.control_image_message(controlnet, image_file)
        await self._open.wait()
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._control_replies.append(waiter)
        self.channel.send(message)
        return await waiter

    async def ask_control_previews(self, on: bool = True) -> dict[str, Any]:
        """Ask for previews of the control images the session's ControlNets take (``False``:
        stop); returns the server's reply. Read them with :meth:`recv_control_preview`."""
        return await self.update(**{wire.CONTROL_PREVIEW_FIELD: on})

    async def recv_control_preview(self) -> tuple[str, np.ndarray]:
        """The next control preview: (ControlNet name, uint8 RGB ``[H, W, 3]``)."""
        name, jpeg = await self._previews.get()
        image = await asyncio.get_running_loop().run_in_executor(None, wire.decode_jpeg, jpeg)
        return name, image

    async def next_stats(self) -> dict[str, Any]:
        """Wait for the next ``{"stats": ...}`` message from the server."""
        self._stats_event.clear()
        await self._stats_event.wait()
        assert self.stats is not None
        return self.stats

    async def close(self) -> None:
        await self.pc.close()


def _parse_update(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--update {text!r} must look like key=value")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def _ice_url(text: str) -> str:
    if not text.startswith(("stun:", "stuns:", "turn:", "turns:")):
        raise argparse.ArgumentTypeError(
            f"--ice-server {text!r}: expected a URL starting with stun:, stuns:, turn: or turns:"
        )
    return text


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from aiortc.contrib.media import MediaBlackhole, MediaRecorder

    restriction = (
        HostAddressRestriction(args.host_address) if args.host_address else contextlib.nullcontext()
    )
    with restriction:
        params = {
            k: v
            for k, v in (("prompt", args.prompt), ("seed", args.seed), ("strength", args.strength))
            if v is not None
        }
        client = WebRTCClient(
            args.url,
            params=params,
            codec=args.codec,
            ice_servers=[RTCIceServer(urls=url) for url in args.ice_server or ()],
        )
        track = SourceTrack(FrameSource(args.input, loop=True))
        await client.connect(track)
        recorder = MediaRecorder(args.output) if args.output else MediaBlackhole()
        recorder.addTrack(await client.output())
        await recorder.start()
        replies = [await client.update(**dict([item])) for item in args.update or ()]
        await asyncio.sleep(args.seconds)  # how long the user asked to stream
        stats = client.stats
        await recorder.stop()
        await client.close()
        track.stop()
    return {"session": client.session, "replies": replies, "stats": stats, "output": args.output}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m livediff.clients.webrtc_client", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="the server's base URL")
    parser.add_argument(
        "--input", required=True, help="a media file (looped) or a camera (/dev/videoN)"
    )
    parser.add_argument("--output", help="record the processed video to this file")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long to stream")
    parser.add_argument("--codec", choices=("vp8", "h264"))
    parser.add_argument("--prompt")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--strength", type=float)
    parser.add_argument(
        "--update",
        action="append",
        type=_parse_update,
        metavar="KEY=VALUE",
        help="send a live parameter change once connected (repeatable)",
    )
    parser.add_argument(
        "--host-address", action="append", metavar="IP", help="offer only this ICE host address"
    )
    parser.add_argument(
        "--ice-server", action="append", type=_ice_url, metavar="URL", help="STUN/TURN server URL"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = asyncio.run(run(args))
    except (LivediffError, OSError, aiohttp.ClientError) as exc:
        print(f"webrtc_client: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

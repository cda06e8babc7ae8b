"""A websocket client for ``livediff serve``; it speaks only the wire protocol, :mod:`livediff.wire`.

As a library::

    async with await WsClient.connect("ws://127.0.0.1:8080/ws", params={"prompt": "a cat"}) as client:
        await client.send_frame(rgb_uint8_hwc)           # JPEG-encoded off the event loop
        image = await client.recv_frame()                # the next processed frame, uint8 RGB
        reply = await client.update(strength=0.7)        # {"ok": true} or {"error": ...}
        reply = await client.send_style_image(open("painting.png", "rb").read())
        # {"ok": true, "ip_image": "<key>"} (the session now uses it) or {"error": ...}
        reply = await client.send_control_image("pose", open("skeleton.png", "rb").read())
        # {"ok": true, "control_image": "pose"} or {"error": ..., "field": "control_image"}
        await client.ask_control_previews()              # {"ok": true}; then, a few a second:
        name, image = await client.recv_control_preview()  # what a ControlNet took, uint8 RGB

As a command::

    python -m livediff.clients.ws_client --url ws://127.0.0.1:8080/ws --input clip.mp4 \\
        --output styled.mp4 --prompt "a watercolor painting" [--max-frames 300] [--in-flight 2]

The command keeps at most ``--in-flight`` frames unanswered (the server drops the rest
anyway), writes every answer to ``--output`` at the input's frame rate, and prints a summary.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import itertools
import json
import sys
import time
from collections.abc import Sequence
from functools import partial
from types import TracebackType
from typing import Any

import numpy as np
from websockets.asyncio.client import ClientConnection, connect

from livediff import wire
from livediff.exceptions import LivediffError, ProtocolError, SessionClosedError

DEFAULT_MAX_SIZE = 8 * 1024 * 1024


class WsClient:
    """One connection = one server session. Use :meth:`connect`; close with :meth:`close` or ``async with``."""

    def __init__(self, connection: ClientConnection, session: str) -> None:
        self.connection = connection
        self.session = session
        self.errors: list[str] = []  # unsolicited {"error": ...} messages (refused frames)
        self.dropped: list[tuple[int, str]] = []  # (frame index, reason) the server dropped
        self._outputs: asyncio.Queue[bytes | None] = asyncio.Queue()
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
        self._previews: asyncio.Queue[tuple[str, bytes] | None] = asyncio.Queue()
        self._reader = asyncio.ensure_future(self._read())

    @classmethod
    async def connect(
        cls, url: str, *, params: dict[str, Any] | None = None, max_size: int = DEFAULT_MAX_SIZE
    ) -> WsClient:
        """Connect and wait for the server's ``{"session": id}``; a refusal raises :class:`LivediffError`."""
        if params:
            url = f"{url}{'&' if '?' in url else '?'}{wire.query_string(params)}"
        connection = await connect(url, max_size=max_size, compression=None)
        first = wire.parse_message(await connection.recv())
        if wire.kind_of(first) is not wire.MessageKind.HELLO:
            await connection.close()
            raise LivediffError(f"the server refused the session: {first.get('error', first)}")
        client = cls(connection, str(first["session"]))
        client.awaiting_control_images = list(first.get(wire.AWAITING_CONTROL_IMAGES, []))
        return client

    async def _read(self) -> None:
        try:
            async for message in self.connection:
                if isinstance(message, bytes):
                    try:
                        preview = wire.control_preview_of(message)
                    except ProtocolError as exc:
                        self.errors.append(str(exc))
                        continue
                    if preview is not None:
                        self._previews.put_nowait(preview)
                    else:
                        self._outputs.put_nowait(message)
                    continue
                reply = wire.parse_message(message)
                kind = wire.kind_of(reply)
                request_id = reply.get("id")
                waiter = (
                    self._replies.pop(request_id, None) if isinstance(request_id, int) else None
                )
                if waiter is None and self._style_replies and wire.answers_style_image(reply):
                    waiter = self._style_replies.popleft()
                if waiter is None and self._control_replies and wire.answers_control_image(reply):
                    waiter = self._control_replies.popleft()
                if waiter is not None:
                    waiter.set_result(reply)
                elif kind is wire.MessageKind.DROPPED:  # a frame that gets no output, and why
                    self.dropped.append((int(reply["dropped"]), str(reply.get("reason"))))
                elif "error" in reply:  # a notice, or the reply to a request nobody awaits
                    self.errors.append(str(reply["error"]))
        finally:
            self._outputs.put_nowait(None)
            self._previews.put_nowait(None)
            waiters = [*self._replies.values(), *self._style_replies, *self._control_replies]
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(
                        SessionClosedError("the connection closed before the reply")
                    )

    async def send_frame(self, frame: np.ndarray | bytes, *, quality: int = 85) -> None:
        """Send one frame: uint8 ``[H, W, 3]`` RGB (encoded here) or JPEG bytes as they are."""
        if not isinstance(frame, bytes):
            frame = await asyncio.get_running_loop().run_in_executor(
                None, partial(wire.encode_jpeg, frame, quality=quality)
            )
        await self.connection.send(frame)

    async def recv_jpeg(self) -> bytes:
        """The next processed frame as JPEG bytes; :class:`SessionClosedError` once the connection is over."""
        data = await self._outputs.get()
        if data is None:
            self._outputs.put_nowait(None)
            raise SessionClosedError(
                f"connection closed ({wire.close_meaning(self.connection.close_code)}; "
                f"{self.connection.close_reason!r})"
            )
        return data

    async def recv_frame(self) -> np.ndarray:
        """The next processed frame, decoded to uint8 RGB."""
        data = await self.recv_jpeg()
        return await asyncio.get_running_loop().run_in_executor(None, wire.decode_jpeg, data)

    async def update(self, **params: Any) -> dict[str, Any]:
        """Send a control message and return the server's reply (``{"ok": true}`` or ``{"error": ...}``)."""
        request_id = next(self._ids)
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._replies[request_id] = waiter
        await self.connection.send(wire.control_message(params, request_id))
        return await waiter

    async def send_style_image(self, image_file: bytes) -> dict[str, Any]:
        """Send a style image (an image file's bytes: PNG, JPEG, WebP …) for the IP-Adapter and
        return the server's answer: ``{"ok": true, "ip_image": key}`` (the session uses it from
        the next frame on) or ``{"error": ..., "field": "ip_image"}``."""
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._style_replies.append(waiter)
        await self.connection.send(wire.style_image_message(image_file))
        return await waiter

    async def send_control_image(self, controlnet: str, image_file: bytes) -> dict[str, Any]:
        """Send a control image (an image file's bytes) for the session's ControlNet
        ``controlnet``, which it must feed with the ``client`` preprocessor; returns the
        server's answer: ``{"ok": true, "control_image": controlnet}`` (its control input from
        the next frame on) or ``{"error": ..., "field": "control_image"}``."""
        message = wire.control_image_message(controlnet, image_file)
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._control_replies.append(waiter)
        await self.connection.send(message)
        return await waiter

    async def ask_control_previews(self, on: bool = True) -> dict[str, Any]:
        """Ask for previews of the control images the session's ControlNets take (``False``:
        stop); returns the server's reply. They come a few a second, after new outputs, one
        per net: read them with :meth:`recv_control_preview`."""
        return await self.update(**{wire.CONTROL_PREVIEW_FIELD: on})

    async def recv_control_preview(self) -> tuple[str, np.ndarray]:
        """The next control preview: (ControlNet name, uint8 RGB ``[H, W, 3]``);
        :class:`SessionClosedError` once the connection is over."""
        preview = await self._previews.get()
        if preview is None:
            self._previews.put_nowait(None)
            raise SessionClosedError("connection closed before a control preview")
        name, jpeg = preview
        image = await asyncio.get_running_loop().run_in_executor(None, wire.decode_jpeg, jpeg)
        return name, image

    async def close(self) -> None:
        await self.connection.close()
        with contextlib.suppress(Exception):
            await self._reader

    async def __aenter__(self) -> WsClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


async def stream_file(args: argparse.Namespace) -> dict[str, Any]:
    """Send ``args.input`` through the server and write the answers to ``args.output``."""
    from livediff.clients.media import FrameSource, FrameWriter, iterate_in_thread  # PyAV: lazily

    params = {
        k: v
        for k, v in (
            ("prompt", args.prompt),
            ("negative_prompt", args.negative_prompt),
            ("seed", args.seed),
            ("strength", args.strength),
        )
        if v is not None
    }
    source = FrameSource(
        args.input, loop=False, realtime=not args.no_realtime, max_frames=args.max_frames
    )
    answered = asyncio.Condition()
    outstanding = (
        0  # frames sent and not answered yet; a dropped frame is forgotten after answer_timeout
    )
    sink: FrameWriter | None = None
    received = sent = 0
    started = time.perf_counter()

    async def wait_for_room(limit: int) -> None:
        nonlocal outstanding
        async with answered:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(
                    answered.wait_for(lambda: outstanding <= limit), timeout=args.answer_timeout
                )
            outstanding = min(outstanding, limit)

    async with await WsClient.connect(args.url, params=params) as client:

        async def receive() -> None:
            nonlocal sink, received, outstanding
            while True:
                try:
                    image = await client.recv_frame()
                except SessionClosedError:
                    return
                async with answered:
                    outstanding = max(0, outstanding - 1)
                    answered.notify_all()
                if args.output:
                    if sink is None:
                        sink = FrameWriter(
                            args.output,
                            width=image.shape[1],
                            height=image.shape[0],
                            frame_rate=source.frame_rate,
                        )
                    sink.write(image)
                received += 1

        receiver = asyncio.ensure_future(receive())
        async for frame in iterate_in_thread(source.frames()):
            await wait_for_room(args.in_flight - 1)
            await client.send_frame(frame.image)
            outstanding += 1
            sent += 1
        await wait_for_room(0)
        await client.close()
        await receiver
        errors = list(client.errors)
    if sink is not None:
        sink.close()
    seconds = time.perf_counter() - started
    return {
        "session": client.session,
        "sent": sent,
        "received": received,
        "errors": errors,
        "fps": round(received / seconds, 2) if seconds else None,
        "output": args.output,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m livediff.clients.ws_client", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--url", default="ws://127.0.0.1:8080/ws")
    parser.add_argument("--input", required=True, help="media file or camera (/dev/videoN)")
    parser.add_argument("--output", help="file to write the processed frames to (.mp4, .y4m …)")
    parser.add_argument("--prompt")
    parser.add_argument("--negative-prompt")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--strength", type=float)
    parser.add_argument("--max-frames", type=int)
    parser.add_argument(
        "--in-flight", type=int, default=2, help="frames sent but not yet answered (default 2)"
    )
    parser.add_argument(
        "--answer-timeout",
        type=float,
        default=10.0,
        help="seconds to wait for an answer before sending on",
    )
    parser.add_argument(
        "--no-realtime",
        action="store_true",
        help="send a file as fast as answers come, not at its frame rate",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = asyncio.run(stream_file(args))
    except (LivediffError, OSError, ValueError) as exc:  # ValueError: a malformed --url
        print(f"ws_client: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

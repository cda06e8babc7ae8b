"""Helpers for the reliability tests: fault-injecting model bundles, resource counts, log checks.

Fault injection happens in the model bundle, where a real device fails: ``predict_noise`` is
the UNet call of every batch. There is no GPU here, so an out-of-memory batch is simulated by
raising the error CUDA raises (``torch.cuda.OutOfMemoryError``) or the generic
``RuntimeError("... out of memory ...")`` from the predictor, when a batch is larger than a
pretend memory cap.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import json
import logging
import os
import random
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

import aiohttp
import pytest
import torch
from aiortc import RTCDataChannel, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack

from livediff.clients.webrtc_client import WebRTCClient
from livediff.models.bundle import ModelBundle
from livediff.models.unet_batch import UNetBatch
from livediff.streams.server_config import ServerConfig

B = TypeVar("B", bound=ModelBundle)
T = TypeVar("T")
TOKEN = "test-token-5f2c9a7e41d04b8b"  # at least 16 printable characters (ServerConfig's rule)


def derived(cls: type[B], bundle: ModelBundle, **extra: Any) -> B:
    """``bundle``'s parts in a subclass that changes ``predict_noise``."""
    return cls(**{f.name: getattr(bundle, f.name) for f in fields(ModelBundle)}, **extra)


@dataclass
class GatedBundle(ModelBundle):
    """Every UNet call waits for ``gate``; ``entered`` is set when one is waiting (a frame in flight)."""

    gate: threading.Event = field(default_factory=threading.Event)
    entered: threading.Event = field(default_factory=threading.Event)

    def predict_noise(self, batch: UNetBatch) -> torch.Tensor:
        self.entered.set()
        self.gate.wait()
        return super().predict_noise(batch)


@dataclass
class MemoryCappedBundle(ModelBundle):
    """A UNet call over more than ``max_rows`` rows raises ``error()`` (a device out of memory)."""

    max_rows: int = 1_000_000
    generic_error: bool = False  # RuntimeError("... out of memory ...") instead of CUDA's own
    calls: list[int] = field(default_factory=list)  # rows of every call, failed or not

    def predict_noise(self, batch: UNetBatch) -> torch.Tensor:
        rows = int(batch.latents.shape[0])
        self.calls.append(rows)
        if rows > self.max_rows:
            if self.generic_error:
                raise RuntimeError(f"[backend] out of memory: a batch of {rows} rows")
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().predict_noise(batch)


# ---------------------------------------------------------------- resources
def rss_mb() -> float:
    """This process's resident set size in MiB (``/proc/self/status``)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmRSS in /proc/self/status")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@dataclass(frozen=True)
class Resources:
    tasks: int
    threads: int
    fds: int
    rss_mb: float
    thread_names: tuple[str, ...]

    @classmethod
    def now(cls) -> Resources:
        gc.collect()
        threads = threading.enumerate()
        return cls(
            tasks=len(asyncio.all_tasks()),
            threads=len(threads),
            fds=open_fds(),
            rss_mb=rss_mb(),
            thread_names=tuple(sorted(t.name for t in threads)),
        )


def live_instances(*types: type) -> dict[str, int]:
    """How many objects of each type the garbage collector can reach."""
    gc.collect()
    counts = {t.__name__: 0 for t in types}
    for obj in gc.get_objects():
        for kind in types:
            if type(obj) is kind:
                counts[kind.__name__] += 1
    return counts


# ---------------------------------------------------------------- logs
def problems(records: Iterable[logging.LogRecord], level: int = logging.WARNING) -> list[str]:
    """Log records at ``level`` or above, and any record carrying a traceback."""
    return [
        f"{r.levelname} {r.name}: {r.getMessage()}"
        for r in records
        if r.levelno >= level or r.exc_info is not None
    ]


def all_log_text(caplog: pytest.LogCaptureFixture, exclude: tuple[str, ...] = ()) -> str:
    """Every captured record (but those of loggers under ``exclude``), with arguments and traceback."""
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    return "\n".join(
        formatter.format(record)
        for record in caplog.records
        if not any(record.name == name or record.name.startswith(name + ".") for name in exclude)
    )


# ---------------------------------------------------------------- WebRTC clients
async def connect_with_headers(
    client: WebRTCClient, track: MediaStreamTrack, headers: dict[str, str]
) -> None:
    """``client.connect(track)`` with extra request headers on ``/offer`` (a bearer token)."""
    client.pc.addTransceiver(track, direction="sendrecv")
    await client.pc.setLocalDescription(await client.pc.createOffer())
    offer = client.pc.localDescription
    body = {"sdp": offer.sdp, "type": offer.type, "params": client.params}
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{client.url}/offer", json=body, headers=headers) as response,
    ):
        answer = await response.json()
    assert response.status == 200, answer
    client.session = answer["session"]
    await client.pc.setRemoteDescription(
        RTCSessionDescription(sdp=answer["sdp"], type=answer["type"])
    )


class ChannelLog:
    """Every message the server sends on a client's data channel, and whether it closed."""

    def __init__(self, channel: RTCDataChannel) -> None:
        self.messages: list[dict[str, Any]] = []
        self.closed = asyncio.Event()
        self._changed = asyncio.Event()
        channel.on("message", self._on_message)
        channel.on("close", self._on_close)

    def _on_message(self, message: str | bytes) -> None:
        self.messages.append(json.loads(message))
        self._changed.set()

    def _on_close(self) -> None:
        self.closed.set()
        self._changed.set()

    async def first(self, key: str) -> dict[str, Any]:
        """The first message that has ``key`` (waits for it)."""
        while True:
            for message in self.messages:
                if key in message:
                    return message
            self._changed.clear()
            await self._changed.wait()


class SilentTrack(MediaStreamTrack):
    """A video track that never produces a frame (a camera that froze)."""

    kind = "video"

    async def recv(self) -> Any:
        await asyncio.Event().wait()


def is_media(datagram: bytes) -> bool:
    """RTP or RTCP (first byte 128–191, RFC 7983); not STUN (0–3) or DTLS (20–63)."""
    return bool(datagram) and 128 <= datagram[0] <= 191


class LossyLink:
    """Drops a share of the media datagrams one ICE transport sends and receives.

    The wrapper sits where aiortc hands (S)RTP to ICE: ``RTCIceTransport._send`` and
    ``_recv``, which the DTLS transport looks up on every packet. STUN and DTLS (which
    carries the data channel) pass untouched, so the connection stays up the way a real
    lossy network keeps ICE consent alive. Seeded: the same packets drop on every run.
    """

    def __init__(
        self,
        ice_transport: Any,
        loss: float,
        seed: int = 7,
        lost_types: frozenset[int] = frozenset(),
    ) -> None:
        self.loss = loss
        self.lost_types = lost_types  # RTP payload types always dropped (retransmissions: RTX)
        self._random = random.Random(seed)
        self._send, self._recv = ice_transport._send, ice_transport._recv
        ice_transport._send, ice_transport._recv = self.send, self.recv
        self.dropped_out = self.dropped_in = 0
        self._changed = asyncio.Event()

    def _drop(self, datagram: bytes) -> bool:
        drop = is_media(datagram) and self._random.random() < self.loss
        if drop:
            self._changed.set()
        return drop

    async def dropped(self, count: int) -> None:
        """Return once ``count`` datagrams have been dropped in all."""
        while self.dropped_out + self.dropped_in < count:
            self._changed.clear()
            await self._changed.wait()

    async def send(self, datagram: bytes) -> None:
        if self._drop(datagram):
            self.dropped_out += 1
            return
        await self._send(datagram)

    async def recv(self) -> bytes:
        while True:
            datagram: bytes = await self._recv()
            if not self._drop(datagram):
                return datagram
            self.dropped_in += 1


# ---------------------------------------------------------------- a server for sync clients
class ThreadedServer:
    """``running_server`` on its own event loop in a thread, for synchronous clients (hypothesis)."""

    def __init__(self, bundle: ModelBundle, config: ServerConfig) -> None:
        self.bundle, self.config = bundle, config
        self.loop = asyncio.new_event_loop()
        self.base = ""
        self.app: Any = None
        self.engine: Any = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-server")

    def __enter__(self) -> ThreadedServer:
        self._thread.start()
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._done = asyncio.run_coroutine_threadsafe(self._serve(ready), self.loop)
        ready.result(timeout=120)
        return self

    async def _serve(self, ready: concurrent.futures.Future[None]) -> None:
        from helpers.streams_testing import running_server

        self._stop = asyncio.Event()
        async with running_server(self.bundle, self.config) as (base, app, engine):
            self.base, self.app, self.engine = base, app, engine
            ready.set_result(None)
            await self._stop.wait()

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the server's loop (to read its state safely) and return its result."""

        async def run() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout=60)

    def __exit__(self, *exc: object) -> None:
        assert self._stop is not None
        self.loop.call_soon_threadsafe(self._stop.set)
        self._done.result(timeout=120)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()

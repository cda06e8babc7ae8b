"""The live WebRTC peers of one app, so they can be listed, counted and closed at shutdown."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

from livediff.streams.peer import LivePeer


class PeerRegistry:
    """Peers by session id. A peer leaves by itself when it closes (pass :meth:`discard` as ``on_closed``)."""

    def __init__(self) -> None:
        self._peers: dict[str, LivePeer] = {}
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    def __len__(self) -> int:
        return len(self._peers)

    def __iter__(self) -> Iterator[LivePeer]:
        return iter(list(self._peers.values()))

    def get(self, session_id: str) -> LivePeer | None:
        return self._peers.get(session_id)

    def add(self, peer: LivePeer) -> None:
        self._peers[peer.id] = peer
        self._notify()

    def discard(self, peer: LivePeer) -> None:
        if peer.id in self._peers and self._peers[peer.id] is peer:
            del self._peers[peer.id]
            self._notify()

    def _notify(self) -> None:
        for count, waiter in self._waiters:
            if count == len(self._peers) and not waiter.done():
                waiter.set_result(None)

    async def wait_until(self, count: int) -> None:
        """Return once exactly ``count`` peers are registered (tests, graceful drain)."""
        if len(self._peers) == count:
            return
        entry = (count, asyncio.get_running_loop().create_future())
        self._waiters.append(entry)
        try:
            await entry[1]
        finally:
            self._waiters.remove(entry)

    async def close_all(self) -> None:
        await asyncio.gather(*(peer.close() for peer in self), return_exceptions=True)

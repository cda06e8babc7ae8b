"""The preview sender's rule: one preview per new output of the session, and after asking the
first comes now only if the session has answered a frame already (streams/control_previews.py).

The engine is replaced by two callables: ``outputs`` (the connection's output count) and
``previews`` (what the worker's Stream Batch holds). On a busy machine the worker can hold a
frame's control image before the output of that frame is counted; a preview sent then and
again with the output is the same image twice (CI saw it as an "unexpected preview").
"""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import pytest

from livediff.streams import control_previews
from livediff.streams.control_previews import PreviewSender

IMAGE = np.zeros((8, 8, 3), dtype=np.uint8)


async def _sent_over(counts: list[int], monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Previews sent while ``outputs`` answers ``counts`` call by call (then the last)."""
    monkeypatch.setattr(control_previews, "PREVIEW_INTERVAL_S", 0.01)
    sent: list[bytes] = []
    answers = iter(counts)
    seen = {"last": counts[0], "calls": 0}

    def outputs() -> int:
        seen["last"] = next(answers, seen["last"])
        seen["calls"] += 1
        return seen["last"]

    async def previews(_: str) -> dict[str, np.ndarray]:
        return {"edges": IMAGE}  # the worker already holds the frame's control image

    async def send(message: bytes) -> None:
        sent.append(message)

    sender = PreviewSender("s1", previews, send, outputs, logging.getLogger("test"))
    task = asyncio.create_task(sender.run())
    await asyncio.sleep(0)  # the sender waits, off, as a new connection's does
    sender.set(True)
    while seen["calls"] < len(counts) + 3:
        await asyncio.sleep(0.01)
    task.cancel()
    return sent


# outputs() is read when the sender starts, when it is asked, then at every interval.
async def test_asked_before_the_first_output_one_preview_comes_with_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert len(await _sent_over([0, 0, 0, 1], monkeypatch)) == 1


async def test_asked_after_an_output_one_preview_comes_now(monkeypatch: pytest.MonkeyPatch) -> None:
    assert len(await _sent_over([3, 3, 3], monkeypatch)) == 1


async def test_each_new_output_brings_one(monkeypatch: pytest.MonkeyPatch) -> None:
    assert len(await _sent_over([0, 0, 0, 1, 1, 2, 2, 2, 3], monkeypatch)) == 3

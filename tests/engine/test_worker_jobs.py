"""``Worker.between_batches``: device jobs (LoRA buffer writes) run on the worker thread, between
batches, while sessions stream; their results and errors reach the caller."""

from __future__ import annotations

import asyncio
import threading

import pytest
from runtime_testing import make_frame

from livediff.engine.config import StreamConfig
from livediff.engine.degrade import DegradePolicy
from livediff.engine.runtime import Engine, RuntimeConfig
from livediff.exceptions import ParameterError
from livediff.models.bundle import ModelBundle

CALM = RuntimeConfig(deadline_ms=3_600_000, degrade=DegradePolicy(enabled=False))


async def test_jobs_run_on_the_worker_between_batches_of_a_streaming_session(
    tiny_bundle: ModelBundle,
) -> None:
    engine = Engine(tiny_bundle, StreamConfig(width=64, height=64), CALM)
    worker = engine._devices[0].worker
    # Before the start there is no worker thread: the job runs in the caller's thread.
    assert worker.between_batches(lambda: threading.current_thread().name).result() == (
        threading.current_thread().name
    )
    await engine.start()
    try:
        session = await engine.open_session({"prompt": "a fox"})
        seen: list[str] = []
        for k in range(3):
            session.submit(make_frame(0, k))
            job = worker.between_batches(lambda: seen.append(threading.current_thread().name))
            await asyncio.wrap_future(job)
            await session.recv()
        assert seen == [worker.thread.name] * 3 and worker.thread.name.startswith("livediff-worker")

        def refuse() -> None:
            raise ParameterError("refused on the worker", field="name")

        with pytest.raises(ParameterError, match="refused on the worker"):
            await asyncio.wrap_future(worker.between_batches(refuse))
        session.submit(make_frame(0, 9))  # the worker goes on after a failed job
        await session.recv()
    finally:
        await engine.stop()
    # After the stop, jobs run in the caller's thread again.
    assert worker.between_batches(lambda: 7).result() == 7

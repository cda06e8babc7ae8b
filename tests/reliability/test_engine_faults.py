"""Engine faults on CPU: out-of-memory batches, a crashing worker thread, per-device caps.

No GPU here, so the device running out of memory is injected from the predictor
(``MemoryCappedBundle``): a UNet call over more rows than a pretend memory cap raises what
CUDA raises. The engine cannot tell the difference, which is the point.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import numpy as np
import pytest
from reliability_testing import MemoryCappedBundle, derived, problems

from livediff.engine.degrade import DegradePolicy
from livediff.engine.faults import RestartBudget, RowCap
from livediff.engine.placement import Placement
from livediff.engine.runtime import Engine, RuntimeConfig
from livediff.exceptions import CapacityError, ParameterError, SessionClosedError
from livediff.models.bundle import ModelBundle

RUNTIME = RuntimeConfig(
    deadline_ms=600_000, batch_buckets=(1, 2, 4, 8), degrade=DegradePolicy(enabled=False)
)


def frame(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (96, 96, 3), dtype=np.uint8)


async def acquire(semaphore: threading.Semaphore) -> None:
    """Wait on the event loop for a semaphore the worker thread releases."""
    await asyncio.to_thread(semaphore.acquire)


@pytest.mark.parametrize("generic", [False, True], ids=["cuda-oom", "runtime-error-oom"])
async def test_an_out_of_memory_batch_sheds_its_frames_and_its_sessions_go_on(
    tiny_bundle: ModelBundle, generic: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="livediff")
    bundle = derived(MemoryCappedBundle, tiny_bundle, max_rows=2, generic_error=generic)
    engine = Engine(bundle, None, RUNTIME, None)
    sessions = [await engine.open_session({"seed": k}) for k in range(4)]
    for k, session in enumerate(sessions):  # fed before the worker starts: one batch of 4 rows
        session.submit(frame(k))
    await engine.start()
    try:
        await engine.wait_idle()
        assert bundle.calls[0] == 4  # the first batch held all four: it ran out of memory
        for k, session in enumerate(sessions):  # each session still works, in smaller batches
            session.submit(frame(10 + k))
            output = await session.recv()
            assert output.index == 1 and output.image.shape == (128, 128, 3)
        faults = engine.metrics()["faults"]
        stats = [session.stats() for session in sessions]
    finally:
        await engine.stop()
    assert max(bundle.calls[1:]) <= 2
    assert faults == {
        "worker_restarts": 0,
        "worker_failed": False,
        "oom_batches": 1,
        "oom_frames": 4,
        "batch_row_cap": 2,
    }
    for item in stats:  # the shed frame is accounted for; nothing else was lost
        assert (item["closed"], item["dropped_reconfigure"], item["processed"]) == (False, 1, 1)
        assert item["received"] == 1
    messages = problems(caplog.records)
    assert len(messages) == 1 and "out of device memory in a batch of 4 rows" in messages[0]


async def test_a_session_that_runs_out_of_memory_alone_fails_and_the_others_go_on(
    tiny_bundle: ModelBundle,
) -> None:
    failures = threading.Semaphore(0)

    class Counting(MemoryCappedBundle):
        def predict_noise(self, batch: Any) -> Any:
            try:
                return super().predict_noise(batch)
            except RuntimeError:
                failures.release()
                raise

    bundle = derived(Counting, tiny_bundle, max_rows=2)
    engine = Engine(bundle, None, RUNTIME, None)
    await engine.start()
    try:
        heavy = await engine.open_session({"steps": 3, "seed": 1})  # 3 UNet rows: never fits
        light = await engine.open_session({"seed": 2})
        for attempt in range(3):
            heavy.submit(frame(attempt))
            await acquire(failures)
        with pytest.raises(SessionClosedError, match="OutOfMemoryError"):
            await heavy.recv()
        light.submit(frame(9))
        output = await light.recv()
        assert output.index == 0 and not light.closed
        assert list(engine.sessions) == [light.id]
    finally:
        await engine.stop()


async def test_a_crashed_worker_ends_its_sessions_and_a_new_thread_serves_new_ones(
    tiny_bundle: ModelBundle, caplog: pytest.LogCaptureFixture
) -> None:
    engine = Engine(tiny_bundle, None, RUNTIME, None)
    await engine.start()
    worker = engine._devices[0].worker  # white box: the fault is injected into its loop
    try:
        first, second = await engine.open_session({"seed": 1}), await engine.open_session()
        first.submit(frame(1))
        assert (await first.recv()).index == 0
        old_thread = worker.thread
        healthy_round = worker._round

        def crash_once() -> bool:
            worker._round = healthy_round  # the new thread is healthy
            raise RuntimeError("an injected bug in the worker loop")

        worker._round = crash_once
        first.submit(frame(2))
        for session in (first, second):
            with pytest.raises(SessionClosedError, match=r"engine worker failed \(RuntimeError"):
                await session.recv()
        assert old_thread is not None
        await asyncio.to_thread(old_thread.join)
        new_thread = worker.thread
        assert new_thread is not old_thread and new_thread is not None and new_thread.is_alive()
        third = await engine.open_session({"seed": 3})
        third.submit(frame(3))
        assert (await third.recv()).index == 0
        faults = engine.metrics()["faults"]
        assert (faults["worker_restarts"], faults["worker_failed"]) == (1, False)
        assert len(engine.sessions) == 1
    finally:
        await engine.stop()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
        "[engine] worker failed; closing its sessions"
    ]


async def test_a_worker_that_keeps_crashing_stays_down_and_new_sessions_are_refused(
    tiny_bundle: ModelBundle,
) -> None:
    engine = Engine(tiny_bundle, None, RUNTIME, None)
    await engine.start()
    worker = engine._devices[0].worker

    def crash() -> bool:
        raise RuntimeError("a broken device")

    worker._round = crash
    budget = worker.faults.restarts.max_restarts
    try:
        for _ in range(budget + 1):  # each new session wakes the worker, which crashes
            session = await engine.open_session()
            with pytest.raises(SessionClosedError, match="engine worker failed"):
                await session.recv()
        assert engine.metrics()["faults"] == {
            "worker_restarts": budget,
            "worker_failed": True,
            "oom_batches": 0,
            "oom_frames": 0,
            "batch_row_cap": 8,
        }
        with pytest.raises(CapacityError, match="worker failed repeatedly"):
            await engine.open_session()
    finally:
        await engine.stop()


async def test_sessions_per_device_are_capped(tiny_bundle: ModelBundle) -> None:
    runtime = RuntimeConfig(
        deadline_ms=600_000, max_sessions=8, max_sessions_per_device=2, degrade=RUNTIME.degrade
    )
    engine = Engine(tiny_bundle, None, runtime, None)
    await engine.start()
    try:
        first, _ = await engine.open_session(), await engine.open_session()
        with pytest.raises(CapacityError, match=r"limit of 2 sessions.*max_sessions_per_device"):
            await engine.open_session()
        assert engine.metrics()["devices"] == {"cpu": 2}
        await first.close()
        await engine.open_session()
        assert engine.metrics()["devices"] == {"cpu": 2}
    finally:
        await engine.stop()
    with pytest.raises(ParameterError, match="max_sessions_per_device=0"):
        RuntimeConfig(max_sessions_per_device=0)


def test_sessions_go_to_the_least_loaded_device_under_its_cap() -> None:
    placement = Placement(["cuda:0", "cuda:1", "cuda:2"], cap=2)
    assert [placement.acquire(f"s{k}") for k in range(6)] == [0, 1, 2, 0, 1, 2]
    assert placement.acquire("s6") is None
    placement.release("s4")
    placement.release("s4")  # idempotent
    placement.release("s0")
    assert placement.loads() == {"cuda:0": 1, "cuda:1": 1, "cuda:2": 2}
    assert [placement.acquire("a"), placement.acquire("b"), placement.acquire("c")] == [0, 1, None]
    unbounded = Placement(["cuda:0", "cuda:1"], cap=None)
    assert [unbounded.acquire(f"s{k}") for k in range(5)] == [0, 1, 0, 1, 0]


def test_the_row_cap_falls_below_a_failed_batch_and_rises_again_slowly() -> None:
    cap = RowCap((1, 2, 4, 8), recover_after=3)
    assert cap.value == 8
    assert cap.lower(8) == 4 and cap.lower(3) == 2 and cap.lower(1) == 1
    for _ in range(2):
        cap.succeeded()
    assert cap.value == 1
    cap.succeeded()
    assert cap.value == 2
    for _ in range(6):
        cap.succeeded()
    assert cap.value == 8


def test_the_restart_budget_counts_restarts_in_a_sliding_window() -> None:
    budget = RestartBudget(max_restarts=2, window_s=10.0)
    assert [budget.allow(t) for t in (0.0, 1.0, 2.0, 10.5, 11.5)] == [True, True, False, True, True]
    assert budget.total == 4

"""The live runtime end to end on CPU: real threads, a real event loop, the probe model.

Nothing here waits on time: tests await outputs, ``Engine.wait_idle()`` or task results.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import numpy as np
import prometheus_client
import pytest
from runtime_testing import ProbeBundle, accounting_holds, make_frame, receive, reference_outputs

from livediff.engine.config import GenerationParams, RCFGMode, StreamConfig
from livediff.engine.degrade import DegradePolicy
from livediff.engine.runtime import Engine, RuntimeConfig
from livediff.engine.runtime_config import BatchOverlap
from livediff.engine.stream import Stream
from livediff.exceptions import (
    CapacityError,
    FrameShapeError,
    NonFiniteFrameError,
    ParameterError,
    SessionClosedError,
)

CONFIG = StreamConfig(width=64, height=64)
BASE = GenerationParams(strength=0.5, steps=1)
# Content tests must not depend on the machine's speed: no deadline drops, no degrading.
CALM = RuntimeConfig(
    deadline_ms=3_600_000, inbox_size=8, outbox_size=16, degrade=DegradePolicy(enabled=False)
)


@pytest.mark.parametrize("overlap", [BatchOverlap.OFF, BatchOverlap.ON])
async def test_sessions_are_isolated_and_share_one_unet_call(
    probe_bundle: ProbeBundle, overlap: BatchOverlap
) -> None:
    """Four sessions with different prompts, seeds, inputs, step counts and RCFG modes run in
    the same batches; every output equals what that session's own single Stream answers, also
    when the next batch is launched before the last one is answered (overlap)."""
    setups = [
        (CONFIG, {"prompt": "a red fox", "seed": 1}),
        (CONFIG, {"prompt": "a blue whale", "seed": 2, "steps": 2}),
        (
            replace(CONFIG, rcfg=RCFGMode.SELF),
            {"prompt": "a green tree", "seed": 3, "steps": 2, "guidance_scale": 1.5},
        ),
        (
            replace(CONFIG, rcfg=RCFGMode.FULL),
            {"prompt": "a city", "seed": 4, "guidance_scale": 2.0, "negative_prompt": "blur"},
        ),
    ]
    frames = 4
    engine = Engine(probe_bundle, CONFIG, replace(CALM, overlap=overlap), BASE)
    sessions = [await engine.open_session(params, config=config) for config, params in setups]
    for k, session in enumerate(sessions):
        for i in range(frames):
            session.submit(make_frame(k, i), pts=1000 * k + i)
    await engine.start()  # every frame is already waiting, so each call takes all four sessions
    try:
        expected = [
            reference_outputs(
                probe_bundle,
                config,
                BASE.updated(**params),
                [make_frame(k, i) for i in range(frames)],
            )
            for k, (config, params) in enumerate(setups)
        ]
        for k, session in enumerate(sessions):
            outputs = await receive(session, len(expected[k]))
            assert [out.index for out in outputs] == sorted(expected[k])
            for out in outputs:
                assert out.pts == 1000 * k + out.index
                assert out.image.shape == (64, 64, 3) and out.image.dtype == np.uint8
                np.testing.assert_array_equal(out.image, expected[k][out.index])
        # The check has teeth: any two sessions answer the same index differently.
        firsts = [answers[min(answers)] for answers in expected]
        assert all(not np.array_equal(a, b) for i, a in enumerate(firsts) for b in firsts[i + 1 :])
        metrics = engine.metrics()
        assert metrics["batch_sessions"]["max"] == 4
        assert (
            metrics["batch_rows"]["max"] == 1 + 2 + 2 + 2
        )  # 1 step; 2 steps; 2 steps; 1 step + CFG row
    finally:
        await engine.stop()


async def test_update_changes_the_next_frame_only(probe_bundle: ProbeBundle) -> None:
    params = BASE.updated(prompt="a cat", seed=5)
    engine = Engine(probe_bundle, CONFIG, CALM, params)
    await engine.start()
    try:
        session = await engine.open_session()
        session.submit(make_frame(0, 0))
        first = await session.recv()
        await session.update(prompt="a dog")
        session.submit(make_frame(0, 1))
        second = await session.recv()
        assert session.params.prompt == (("a dog", 1.0),)
    finally:
        await engine.stop()
    stream = Stream(probe_bundle, CONFIG, params)
    unchanged = Stream(probe_bundle, CONFIG, params)
    np.testing.assert_array_equal(first.image, stream.process(make_frame(0, 0))[0].numpy())
    unchanged.process(make_frame(0, 0))
    stream.update(prompt="a dog")
    np.testing.assert_array_equal(second.image, stream.process(make_frame(0, 1))[0].numpy())
    assert not np.array_equal(second.image, unchanged.process(make_frame(0, 1))[0].numpy())


async def test_capacity_and_parameter_errors(probe_bundle: ProbeBundle) -> None:
    engine = Engine(probe_bundle, CONFIG, replace(CALM, max_sessions=2), BASE)
    await engine.start()
    try:
        with pytest.raises(ParameterError, match="unknown parameter"):
            await engine.open_session({"bogus": 1})
        with pytest.raises(ParameterError, match="strength"):
            await engine.open_session({"strength": 2.0})
        a = await engine.open_session(session_id="a")
        with pytest.raises(ParameterError, match="already open"):
            await engine.open_session(session_id="a")
        b = await engine.open_session()
        with pytest.raises(CapacityError, match="2 of 2"):
            await engine.open_session()
        await b.close()
        await engine.open_session()  # a slot is free again
        with pytest.raises(ParameterError, match="unknown parameter"):
            await a.update(colour="red")
        with pytest.raises(ParameterError, match="steps"):
            await a.update(steps=0)
        with pytest.raises(ParameterError, match="t_index_list"):  # checked against the schedule
            await a.update(t_index_list=[70])
        assert a.params.t_index_list is None  # a refused update changes nothing
        with pytest.raises(FrameShapeError):
            a.submit(np.zeros((8, 8), np.uint8))
        with pytest.raises(NonFiniteFrameError):
            a.submit(np.full((8, 8, 3), np.nan, np.float32))
        a.submit(make_frame(0, 0))
        assert (await a.recv()).index == 0  # the session goes on
        assert engine.metrics()["sessions_refused"]["capacity"] == 1
    finally:
        await engine.stop()


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"deadline_ms": 0}, "deadline_ms"),
        ({"max_sessions": 0}, "max_sessions"),
        ({"batch_buckets": (4, 2)}, "batch_buckets"),
        ({"batch_buckets": ()}, "batch_buckets"),
        ({"inbox_size": 0}, "inbox_size"),
        ({"batch_time_smoothing": 0.0}, "batch_time_smoothing"),
        ({"overlap": "sometimes"}, "overlap='sometimes' is not one of: auto, on, off"),
    ],
)
def test_runtime_config_is_checked(changes: dict[str, object], match: str) -> None:
    with pytest.raises(ParameterError, match=match):
        RuntimeConfig(**changes)  # type: ignore[arg-type]


def test_overlap_comes_from_its_name_and_is_off_by_default() -> None:
    assert RuntimeConfig().overlap is BatchOverlap.OFF
    assert RuntimeConfig(overlap="auto").overlap is BatchOverlap.AUTO  # type: ignore[arg-type]


async def test_close_mid_stream_and_stop(probe_bundle: ProbeBundle) -> None:
    engine = Engine(probe_bundle, CONFIG, CALM, BASE)
    await engine.start()
    a = await engine.open_session({"steps": 2})
    b = await engine.open_session()
    a.submit(make_frame(0, 0))  # enters a's Stream Batch pipeline: no output yet
    waiting = asyncio.create_task(a.recv())
    await engine.wait_idle()
    assert not waiting.done()
    await a.close()
    await a.close()  # idempotent
    with pytest.raises(SessionClosedError, match="closed by the client"):
        await waiting
    with pytest.raises(SessionClosedError):
        a.submit(make_frame(0, 1))
    with pytest.raises(SessionClosedError):
        await a.update(seed=3)
    assert a.id not in engine.sessions
    stats = a.stats()
    assert stats["in_flight"] == 1 and accounting_holds(stats)
    b.submit(make_frame(1, 0))
    assert (await b.recv()).index == 0  # the other session is unaffected
    await engine.stop()
    await engine.stop()  # idempotent
    with pytest.raises(SessionClosedError, match="engine stopped"):
        await b.recv()


async def test_no_session_starves(probe_bundle: ProbeBundle) -> None:
    """Six sessions, at most two per call: earliest deadline first makes them take turns."""
    engine = Engine(probe_bundle, CONFIG, replace(CALM, batch_buckets=(1, 2)), BASE)
    sessions = [await engine.open_session({"seed": k}) for k in range(6)]
    order: list[int] = []

    async def stream(k: int) -> None:
        for i in range(6):
            sessions[k].submit(make_frame(k, i))
            out = await sessions[k].recv()
            assert out.index == i
            order.append(k)

    await engine.start()
    try:
        await asyncio.gather(*(stream(k) for k in range(6)))
    finally:
        await engine.stop()
    counts = [0] * 6
    for k in order:
        counts[k] += 1
        assert max(counts) - min(counts) <= 2, f"a session fell behind: {counts} after {order}"
    assert engine.metrics()["batch_sessions"]["max"] == 2


async def test_prometheus_registry_is_per_engine(probe_bundle: ProbeBundle) -> None:
    engine = Engine(probe_bundle, CONFIG, CALM, BASE)
    await engine.start()
    try:
        session = await engine.open_session(session_id="s1")
        session.submit(make_frame(0, 0))
        await session.recv()
        text = prometheus_client.generate_latest(engine.registry).decode()
        assert 'livediff_frames_processed_total{session="s1"} 1.0' in text
        assert 'livediff_stage_seconds_count{stage="unet"} 1.0' in text
        assert "livediff_batch_rows_bucket" in text
        assert b"livediff_" not in prometheus_client.generate_latest(prometheus_client.REGISTRY)
        await session.close()
        text = prometheus_client.generate_latest(engine.registry).decode()
        assert 'session="s1"' not in text  # closed sessions leave no series behind
        assert engine.metrics()["frames"]["processed"] == 1  # but still count in the totals
    finally:
        await engine.stop()

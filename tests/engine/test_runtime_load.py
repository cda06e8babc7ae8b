"""Load on the live runtime: bounded queues, exact frame accounting, deadlines, degrade and recovery.

Deadlines and degrading depend on time. Where a test needs them to happen exactly, it gives the
engine a :class:`FakeClock` and lets the probe UNet advance it by a set amount per call: that
is a GPU of known speed, seen through the engine's only window on time, with no real waiting
and no dependence on how fast or loaded this machine is.
"""

from __future__ import annotations

import random

import pytest
from runtime_testing import (
    FakeClock,
    ProbeBundle,
    accounting_holds,
    make_frame,
    probe_from,
    receive,
)

from livediff.engine.config import GenerationParams, StreamConfig
from livediff.engine.degrade import DegradePolicy
from livediff.engine.runtime import Engine, RuntimeConfig, SessionOutput
from livediff.engine.runtime_config import BatchOverlap
from livediff.exceptions import CapacityError
from livediff.models.bundle import ModelBundle

CONFIG = StreamConfig(width=64, height=64)
BASE = GenerationParams(strength=0.5, steps=1)
NO_DEGRADE = DegradePolicy(enabled=False)


async def test_bounded_queues_and_exact_counts(probe_bundle: ProbeBundle) -> None:
    clock = FakeClock()
    runtime = RuntimeConfig(deadline_ms=100, inbox_size=2, outbox_size=3, degrade=NO_DEGRADE)
    engine = Engine(probe_bundle, CONFIG, runtime, BASE, clock=clock)
    a = await engine.open_session(session_id="a")
    # The producer outruns the engine (not even started): the inbox keeps the two newest frames.
    for i in range(10):
        a.submit(make_frame(0, i), pts=i)
        assert a.stats()["inbox_depth"] <= 2
    assert a.stats()["dropped_inbox"] == 8
    clock.advance(1.0)  # both waiting frames are now past their deadline
    await engine.start()
    try:
        await engine.wait_idle()
        stats = a.stats()
        assert (stats["dropped_deadline"], stats["processed"], stats["in_flight"]) == (2, 0, 0)
        # The consumer reads nothing: the outbox keeps the three newest outputs.
        for i in range(10, 17):
            a.submit(make_frame(0, i), pts=i)
            await engine.wait_idle()
            assert a.stats()["outbox_depth"] <= 3
        stats = a.stats()
        assert (stats["processed"], stats["outbox_depth"], stats["dropped_outbox"]) == (7, 3, 4)
        assert [out.pts for out in await receive(a, 3)] == [14, 15, 16]
        # Identical frames: the similarity filter skips them from the second on (the first is
        # the reference and has no earlier output that could be re-emitted).
        b = await engine.open_session({"similarity_threshold": 0.5, "max_skip_frames": 1000})
        outputs = []
        for _ in range(5):
            b.submit(make_frame(1, 0))
            outputs.append(await b.recv())
        assert [out.skipped for out in outputs] == [False, True, True, True, True]
        assert all(
            out.image is outputs[0].image for out in outputs[1:]
        )  # the previous output again
        assert [out.index for out in outputs] == [0, 1, 2, 3, 4]
        assert b.stats()["skipped"] == 4
        for session in (a, b):
            assert accounting_holds(session.stats()), session.stats()
        totals = engine.metrics()["frames"]
        assert (totals["submitted"], totals["dropped"], totals["skipped"]) == (22, 10, 4)
    finally:
        await engine.stop()


@pytest.mark.parametrize(("buckets", "late_runs"), [((2,), True), ((1, 2), False)])
async def test_a_late_frame_runs_in_the_batch_padding_instead_of_being_dropped(
    probe_bundle: ProbeBundle, buckets: tuple[int, ...], late_runs: bool
) -> None:
    """Session a's frame is past its deadline, b's is not. With a bucket of 2 the batch runs
    two rows whatever happens, so a's frame rides in b's padding (answered, counted late);
    with a bucket of 1 for b alone, dropping a's frame saves a row: it is dropped."""
    clock = FakeClock()
    runtime = RuntimeConfig(deadline_ms=100, batch_buckets=buckets, degrade=NO_DEGRADE)
    engine = Engine(probe_bundle, CONFIG, runtime, BASE, clock=clock)
    a = await engine.open_session(session_id="a")
    b = await engine.open_session(session_id="b")
    a.submit(make_frame(0, 0), pts=0)
    clock.advance(0.2)  # a's frame is now 100 ms past its deadline
    b.submit(make_frame(1, 0), pts=0)
    await engine.start()
    try:
        await engine.wait_idle()
        first, second = a.stats(), b.stats()
        assert (second["processed"], second["late"], second["dropped_deadline"]) == (1, 0, 0)
        expected = (1, 1, 0) if late_runs else (0, 0, 1)
        assert (first["processed"], first["late"], first["dropped_deadline"]) == expected
        if late_runs:
            assert [out.pts for out in await receive(a, 1)] == [0]
        for session in (a, b):
            assert accounting_holds(session.stats()), session.stats()
    finally:
        await engine.stop()


@pytest.mark.parametrize("overlap", [BatchOverlap.OFF, BatchOverlap.ON])
async def test_counts_add_up_under_random_load(
    probe_bundle: ProbeBundle, overlap: BatchOverlap
) -> None:
    """Bursts, a tight deadline, a slow reader, the filter, Stream Batch: every frame is accounted for."""
    rng = random.Random(0)
    runtime = RuntimeConfig(
        deadline_ms=5, inbox_size=2, outbox_size=2, overlap=overlap, degrade=NO_DEGRADE
    )
    engine = Engine(probe_bundle, CONFIG, runtime, BASE)
    await engine.start()
    sessions = [
        await engine.open_session(),
        await engine.open_session({"steps": 2}),
        await engine.open_session({"similarity_threshold": 0.9}),
    ]
    try:
        for burst in range(40):
            for k, session in enumerate(sessions):
                for _ in range(rng.randint(0, 3)):
                    session.submit(make_frame(k, burst % 3))
            if burst % 5 == 4:
                await engine.wait_idle()
                # A slow reader: it takes one output now and then. Only when one is waiting:
                # with a 5 ms deadline all of a burst's frames may have been dropped.
                if sessions[0].stats()["outbox_depth"]:
                    await sessions[0].recv()
        await engine.wait_idle()
    finally:
        await engine.stop()
    submitted = 0
    for session in sessions:
        stats = session.stats()
        assert accounting_holds(stats), stats
        assert stats["outbox_depth"] <= 2
        submitted += stats["submitted"]
    assert engine.metrics()["frames"]["submitted"] == submitted
    assert (
        sessions[1].stats()["in_flight"] == 1
    )  # the last frame waits in the Stream Batch pipeline


async def test_overlap_answers_in_order_and_holds_skips(probe_bundle: ProbeBundle) -> None:
    """With overlap a session's next frame is admitted while its last batch is in flight: a
    skip of it waits for that batch's answer (which is the image it repeats), so every
    session's outputs arrive in order and no skip precedes the output it repeats."""
    runtime = RuntimeConfig(
        deadline_ms=3_600_000,
        inbox_size=8,
        outbox_size=64,
        overlap=BatchOverlap.ON,
        degrade=NO_DEGRADE,
    )
    engine = Engine(probe_bundle, CONFIG, runtime, BASE)
    params = {"similarity_threshold": 0.5, "max_skip_frames": 1000}
    sessions = [await engine.open_session({**params, "seed": k}) for k in range(3)]
    frames = 6
    for k, session in enumerate(sessions):
        for i in range(frames):  # all waiting before the start: frame 1 meets frame 0 in flight
            session.submit(make_frame(k, 0), pts=i)
    await engine.start()
    try:
        for session in sessions:
            outputs = await receive(session, frames)
            assert [out.pts for out in outputs] == list(range(frames))
            assert [out.skipped for out in outputs] == [False] + [True] * (frames - 1)
            assert all(out.image is outputs[0].image for out in outputs[1:])
            assert accounting_holds(session.stats()), session.stats()
        assert engine.metrics()["frames"]["skipped"] == 3 * (frames - 1)
    finally:
        await engine.stop()


async def test_degrades_in_order_and_recovers_in_reverse(tiny_bundle: ModelBundle) -> None:
    clock = FakeClock()
    bundle = probe_from(tiny_bundle, clock=clock, unet_delay_s=0.3)  # a UNet call "takes" 300 ms
    policy = DegradePolicy(
        window_s=0.25, degrade_after=2, recover_after=2, steps=1, resolution_scale=0.5
    )
    runtime = RuntimeConfig(
        deadline_ms=100,
        inbox_size=2,
        batch_time_smoothing=1.0,  # the estimate follows the injected speed at once
        max_consecutive_deadline_drops=1,
        degrade=policy,
    )
    engine = Engine(bundle, StreamConfig(width=128, height=128), runtime, BASE, clock=clock)
    await engine.start()
    session = await engine.open_session({"steps": 2, "seed": 7})
    submitted = 0

    async def pump_until(done: object) -> SessionOutput:
        """Keep two frames in flight and receive outputs until ``done(output)``."""
        nonlocal submitted
        while True:
            while session.stats()["in_flight"] < 2:
                session.submit(make_frame(0, submitted, size=128))
                submitted += 1
            out = await session.recv()
            if done(out):  # type: ignore[operator]
                return out

    def level() -> int:
        return int(engine.metrics()["degrade"]["level_index"])

    try:
        out = await pump_until(
            lambda o: level() == 3 and session.stats()["steps"] == 1 and o.render_size == (64, 64)
        )
        assert out.image.shape == (128, 128, 3)  # outputs keep the session's size
        with pytest.raises(CapacityError, match="overloaded"):
            await engine.open_session()
        bundle.unet_delay_s = 0.01  # load falls
        out = await pump_until(
            lambda o: level() == 0 and session.stats()["steps"] == 2 and o.render_size == (128, 128)
        )
        history = [label for _, label, _ in engine.metrics()["degrade"]["history"]]
        assert history == [
            "fewer_steps",
            "lower_resolution",
            "refuse_sessions",
            "lower_resolution",
            "fewer_steps",
            "normal",
        ]
        await engine.open_session()  # accepted again
        stats = session.stats()
        assert accounting_holds(stats), stats
        assert stats["late"] > 0
        metrics = engine.metrics()
        assert metrics["sessions_refused"]["degraded"] == 1
        assert metrics["degrade"]["level"] == "normal"
    finally:
        await engine.stop()

"""One path for a frame's counters: ``Session.stats()`` and ``/metrics`` are the same numbers.

Every event of a frame (submitted, dropped with its reason, generated, skipped, late, read) is
recorded once, by the session's ledger (``engine.metrics.SessionMetrics``), which updates the
session's counts and its Prometheus series in the same step. This drives a session through
each kind of event and compares the two views after each step.
"""

from __future__ import annotations

from typing import Any

from runtime_testing import FakeClock, ProbeBundle, accounting_holds, make_frame, receive

from livediff.engine.config import GenerationParams, StreamConfig
from livediff.engine.degrade import DegradePolicy
from livediff.engine.metrics import DROP_REASONS
from livediff.engine.runtime import Engine, RuntimeConfig
from livediff.engine.session import Session

CONFIG = StreamConfig(width=64, height=64)
BASE = GenerationParams(strength=0.5, steps=1)


def prometheus_counts(engine: Engine, session_id: str) -> dict[str, float]:
    def sample(name: str, **labels: str) -> float:
        value = engine.registry.get_sample_value(name, {"session": session_id, **labels})
        assert value is not None, (name, labels)
        return value

    counts = {
        field: sample(f"livediff_frames_{field}_total")
        for field in ("submitted", "processed", "skipped", "late")
    }
    for reason in DROP_REASONS:
        counts[f"dropped_{reason}"] = sample("livediff_frames_dropped_total", reason=reason)
    counts["inbox_depth"] = sample("livediff_inbox_depth")
    counts["outbox_depth"] = sample("livediff_outbox_depth")
    counts["latency_count"] = sample("livediff_frame_latency_seconds_count")
    return counts


def assert_views_agree(engine: Engine, session: Session) -> dict[str, Any]:
    stats = session.stats()
    exported = prometheus_counts(engine, session.id)
    for field in ("submitted", "processed", "skipped", "late", "inbox_depth", "outbox_depth"):
        assert exported[field] == stats[field], (field, exported, stats)
    for reason in DROP_REASONS:
        assert exported[f"dropped_{reason}"] == stats[f"dropped_{reason}"], (reason, exported)
    assert exported["latency_count"] == stats["processed"] + stats["skipped"]
    assert accounting_holds(stats), stats
    return stats


async def test_stats_and_prometheus_count_every_event_alike(probe_bundle: ProbeBundle) -> None:
    clock = FakeClock()
    runtime = RuntimeConfig(
        deadline_ms=100, inbox_size=2, outbox_size=3, degrade=DegradePolicy(enabled=False)
    )
    engine = Engine(probe_bundle, CONFIG, runtime, BASE, clock=clock)
    a = await engine.open_session(session_id="a")
    assert_views_agree(engine, a)  # every series exists at zero from the start
    for i in range(6):  # the engine is not started: the inbox keeps the two newest
        a.submit(make_frame(0, i), pts=i)
    assert assert_views_agree(engine, a)["dropped_inbox"] == 4
    clock.advance(1.0)  # both waiting frames are past their deadline
    await engine.start()
    try:
        await engine.wait_idle()
        assert assert_views_agree(engine, a)["dropped_deadline"] == 2
        for i in range(6, 11):  # nobody reads: the outbox keeps three
            a.submit(make_frame(0, i), pts=i)
            await engine.wait_idle()
            assert_views_agree(engine, a)
        stats = assert_views_agree(engine, a)
        assert (stats["processed"], stats["dropped_outbox"], stats["outbox_depth"]) == (5, 2, 3)
        await receive(a, 3)
        assert assert_views_agree(engine, a)["received"] == 3
        # the similarity filter: the same frame again is skipped
        b = await engine.open_session(
            {"similarity_threshold": 0.5, "max_skip_frames": 1000}, session_id="b"
        )
        for _ in range(3):
            b.submit(make_frame(1, 0))
            await b.recv()
        assert assert_views_agree(engine, b)["skipped"] == 2
        totals = engine.metrics()["frames"]
        assert totals["submitted"] == a.stats()["submitted"] + b.stats()["submitted"]
    finally:
        await engine.stop()

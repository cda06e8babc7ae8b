"""One engine on several devices: a worker each, sessions placed on the least-loaded, isolated.

Two workers on the CPU (``cpu#0``, ``cpu#1``: two bundles of the probe model, whose every output
pixel depends on its own input, prompt and seed) stand in for two GPUs: placement, per-device
caps, isolation and a device whose worker fails are the same code on CUDA.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from runtime_testing import ProbeBundle, make_frame, probe_from, receive, reference_outputs

from livediff.engine.config import GenerationParams, StreamConfig
from livediff.engine.degrade import DegradePolicy
from livediff.engine.devices import device_labels, resolve_devices
from livediff.engine.runtime import Engine, RuntimeConfig
from livediff.exceptions import CapacityError, ParameterError, SessionClosedError
from livediff.models.bundle import ModelBundle

CONFIG = StreamConfig(width=64, height=64)
BASE = GenerationParams(strength=0.5, steps=1)
CALM = RuntimeConfig(deadline_ms=600_000, inbox_size=8, degrade=DegradePolicy(enabled=False))


@pytest.fixture
def two_devices(tiny_bundle: ModelBundle) -> list[ProbeBundle]:
    return [probe_from(tiny_bundle), probe_from(tiny_bundle)]


def test_devices_are_named_and_resolved() -> None:
    assert resolve_devices((), "cpu") == ["cpu"]
    assert resolve_devices(("cpu", "cpu"), "cuda") == ["cpu", "cpu"]
    with pytest.raises(ParameterError, match="'all' stands alone"):
        resolve_devices(("all", "cpu"), "cpu")
    with pytest.raises(ParameterError, match="not a device name"):
        resolve_devices(("gpu7",), "cpu")
    if not __import__("torch").cuda.is_available():
        with pytest.raises(ParameterError, match="no CUDA device"):
            resolve_devices(("all",), "cpu")


async def test_sessions_spread_over_the_devices_and_never_cross(
    two_devices: list[ProbeBundle],
) -> None:
    engine = Engine(two_devices, CONFIG, CALM, BASE)
    assert device_labels(two_devices) == ["cpu#0", "cpu#1"]
    setups = [
        {"prompt": p, "seed": k} for k, p in enumerate(["a fox", "a whale", "a cat", "a ship"])
    ]
    sessions = [await engine.open_session(params) for params in setups]
    assert [s.stats()["device"] for s in sessions] == ["cpu#0", "cpu#1", "cpu#0", "cpu#1"]
    assert engine.metrics()["devices"] == {"cpu#0": 2, "cpu#1": 2}
    for k, session in enumerate(sessions):
        for i in range(3):
            session.submit(make_frame(k, i))
    await engine.start()
    try:
        for k, params in enumerate(setups):
            frames = [make_frame(k, i) for i in range(3)]
            expected = reference_outputs(two_devices[0], CONFIG, BASE.updated(**params), frames)
            for out in await receive(sessions[k], len(expected)):
                np.testing.assert_array_equal(out.image, expected[out.index])
        per_device = engine.metrics()["per_device"]
        assert {label: d["sessions"] for label, d in per_device.items()} == {"cpu#0": 2, "cpu#1": 2}
        assert set(engine.health()["devices"]) == {"cpu#0", "cpu#1"}
    finally:
        await engine.stop()


async def test_each_device_has_its_own_cap(two_devices: list[ProbeBundle]) -> None:
    runtime = RuntimeConfig(
        deadline_ms=600_000, max_sessions_per_device=1, degrade=DegradePolicy(enabled=False)
    )
    engine = Engine(two_devices, CONFIG, runtime, BASE)
    await engine.start()
    try:
        first, second = await engine.open_session(), await engine.open_session()
        assert {first.stats()["device"], second.stats()["device"]} == {"cpu#0", "cpu#1"}
        assert engine.health()["max_sessions"] == 2
        with pytest.raises(CapacityError, match="every device is at its limit of 1 sessions"):
            await engine.open_session()
        place = second.stats()["device"]
        await second.close()
        third = await engine.open_session()
        assert third.stats()["device"] == place  # the freed slot
    finally:
        await engine.stop()


async def test_a_failing_device_ends_only_its_sessions_and_new_ones_go_elsewhere(
    two_devices: list[ProbeBundle],
) -> None:
    engine = Engine(two_devices, CONFIG, CALM, BASE)
    await engine.start()
    broken = engine._devices[1].worker  # white box: the fault is injected into its loop

    def crash() -> bool:
        raise RuntimeError("a broken device")

    try:
        healthy, doomed = await engine.open_session({"seed": 1}), await engine.open_session()
        assert (healthy.stats()["device"], doomed.stats()["device"]) == ("cpu#0", "cpu#1")
        broken._round = crash
        budget = broken.faults.restarts.max_restarts
        session, attempt = doomed, 0
        while True:  # every restart crashes too, until it stays down for good
            with pytest.raises(SessionClosedError, match="engine worker failed"):
                session.submit(make_frame(1, attempt))  # may already be refused: the worker
                await session.recv()  # crashes as soon as a session wakes it
            healthy.submit(make_frame(0, attempt))  # the other device goes on
            assert (await asyncio.wait_for(healthy.recv(), 60)).index == attempt
            attempt += 1
            if broken.failed:
                break
            assert attempt <= budget + 1
            session = await engine.open_session()
            if session.stats()["device"] != "cpu#1":  # it failed for good meanwhile
                assert broken.failed
                await session.close()
                break
        per_device = engine.metrics()["per_device"]
        assert per_device["cpu#1"]["failed"] and not per_device["cpu#0"]["failed"]
        assert not engine.health()["failed"]
        newcomers = [await engine.open_session() for _ in range(3)]
        assert {s.stats()["device"] for s in newcomers} == {"cpu#0"}  # only the healthy one
        assert not healthy.closed
    finally:
        await engine.stop()

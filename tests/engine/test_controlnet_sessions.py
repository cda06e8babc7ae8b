"""Sessions with and without ControlNets share one UNet call and each get what it would alone.

One tiny model with two ControlNets, three sessions in one engine: canny on the first net, the
frame itself on the second, no ControlNet at all. Every output must equal a single Stream's,
whose own correctness ``tests/core/test_stream_controlnet.py`` proves against diffusers' calls.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
import torch
from runtime_testing import make_frame, receive, reference_outputs

from livediff.engine.config import GenerationParams, StreamConfig
from livediff.engine.degrade import DegradePolicy
from livediff.engine.runtime import Engine, RuntimeConfig
from livediff.engine.runtime_config import ControlNetRows
from livediff.exceptions import ParameterError
from livediff.models.bundle import ModelBundle
from livediff.models.control_uses import ControlNetSpec
from livediff.models.controlnet_loading import load_controlnet
from livediff.models.unet_batch import UNetBatch

CONFIG = StreamConfig(width=64, height=64)
BASE = GenerationParams(strength=0.5, steps=2)
CALM = RuntimeConfig(
    deadline_ms=3_600_000, inbox_size=8, outbox_size=16, degrade=DegradePolicy(enabled=False)
)
TOLERANCE = (
    1  # uint8 levels: a call over padded rows may sum in another order (see test_runtime_model)
)
SETUPS = [
    {"prompt": "a red fox", "seed": 1, "controlnets": ("edges:1.2:canny",)},
    {"prompt": "a blue whale", "seed": 2, "controlnets": ("tile:0.6:passthrough", "edges:0.3")},
    {"prompt": "a tree", "seed": 3},
]


@pytest.fixture(scope="module")
def controlled(tiny_bundle: ModelBundle) -> ModelBundle:
    nets = [
        load_controlnet(ControlNetSpec("random", name=name, seed=seed), tiny_bundle)
        for name, seed in (("edges", 1), ("tile", 2))
    ]
    return tiny_bundle.with_controlnets(nets)


def assert_equal_images(actual: np.ndarray, expected: np.ndarray, note: object) -> None:
    difference = np.abs(actual.astype(np.int16) - expected.astype(np.int16))
    assert difference.max() <= TOLERANCE, (note, difference.max())


async def each_equals_alone(
    model: ModelBundle, reference: ModelBundle, runtime: RuntimeConfig
) -> dict[str, Any]:
    """The SETUPS sessions on one engine over ``model``, every frame waiting before it starts
    (so sessions that may share a call do); each output must be ``reference``'s single
    Stream's. Returns the engine's metrics."""
    frames = 4
    engine = Engine(model, CONFIG, runtime, BASE)
    sessions = [await engine.open_session(params) for params in SETUPS]
    for k, session in enumerate(sessions):
        for i in range(frames):
            session.submit(make_frame(k, i))
    await engine.start()
    try:
        for k, params in enumerate(SETUPS):
            inputs = [make_frame(k, i) for i in range(frames)]
            expected = reference_outputs(reference, CONFIG, BASE.updated(**params), inputs)
            outputs = await receive(sessions[k], len(expected))
            assert [out.index for out in outputs] == sorted(expected)
            for out in outputs:
                assert_equal_images(out.image, expected[out.index], (k, out.index))
            if params.get("controlnets"):  # the nets matter beyond the tolerance: it can fail
                plain = reference_outputs(
                    reference, CONFIG, BASE.updated(**{**params, "controlnets": ()}), inputs
                )
                gaps = [np.abs(plain[i].astype(np.int16) - expected[i]).max() for i in plain]
                assert max(gaps) > TOLERANCE, gaps
        return engine.metrics()
    finally:
        await engine.stop()


async def test_sessions_with_and_without_controlnets_share_calls_and_equal_alone(
    controlled: ModelBundle,
) -> None:
    metrics = await each_equals_alone(controlled, controlled, CALM)
    assert metrics["batch_sessions"]["max"] == 3


async def test_a_refused_use_reaches_its_caller_and_the_session_goes_on(
    controlled: ModelBundle,
) -> None:
    engine = Engine(controlled, CONFIG, CALM, BASE)
    await engine.start()
    try:
        session = await engine.open_session(SETUPS[0])
        with pytest.raises(ParameterError, match="'depth-net' is not loaded on this server"):
            await session.update(controlnets=["depth-net"])
        with pytest.raises(ParameterError, match="'depth-net' is not loaded"):
            await engine.open_session({"controlnets": ["depth-net"]})
        await session.update(controlnets=["tile:0.5:previous_output"])
        session.submit(make_frame(0, 0))
        session.submit(make_frame(0, 1))
        outputs = await receive(session, 1)
        assert outputs[0].index == 0
        assert session.stats()["closed"] is False
    finally:
        await engine.stop()


async def test_apart_sessions_without_nets_run_the_unet_alone_and_equal_alone(
    controlled: ModelBundle,
) -> None:
    """``controlnet_rows = "apart"``: the two sessions with nets share calls with control
    inputs, the one without runs calls without any (the UNet alone), and every output is
    still the single Stream's."""
    calls: list[tuple[int, bool]] = []
    model = dataclasses.replace(controlled)  # a shallow copy whose UNet calls are recorded
    predict = model.predict_noise

    def recording(batch: UNetBatch) -> torch.Tensor:
        calls.append((batch.rows, batch.control_images is not None))
        return predict(batch)

    model.predict_noise = recording  # type: ignore[method-assign]
    apart = dataclasses.replace(CALM, controlnet_rows=ControlNetRows.APART)
    metrics = await each_equals_alone(model, controlled, apart)
    assert metrics["batch_sessions"]["max"] == 2
    rows = BASE.steps  # a session's UNet rows: one per step (Stream Batch, no RCFG rows)
    with_nets = {r for r, control in calls if control}
    without = {r for r, control in calls if not control}
    assert with_nets == {2 * rows} and without == {rows}, calls

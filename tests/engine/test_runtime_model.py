"""The live runtime with the real tiny networks (random weights, float32, CPU)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

import numpy as np
import pytest
from runtime_testing import make_frame, receive, reference_outputs

from livediff.engine.config import GenerationParams, RCFGMode, StreamConfig
from livediff.engine.degrade import DegradePolicy
from livediff.engine.runtime import Engine, RuntimeConfig
from livediff.models.bundle import ModelBundle

CONFIG = StreamConfig(width=64, height=64)
BASE = GenerationParams(strength=0.5, steps=1)
CALM = RuntimeConfig(
    deadline_ms=3_600_000, inbox_size=8, outbox_size=16, degrade=DegradePolicy(enabled=False)
)
# float32 on CPU: a call over 8 padded rows may run other convolution/GEMM kernels than a call
# over 1 (oneDNN chooses by shape), which sums in another order. The difference is ~1e-6
# relative, enough to move a pixel across a rounding boundary of the uint8 output: 1 level.
TOLERANCE = 1


async def test_batched_sessions_equal_single_streams(tiny_bundle: ModelBundle) -> None:
    setups = [
        (CONFIG, {"prompt": "a red fox", "seed": 1}),
        (CONFIG, {"prompt": "a blue whale", "seed": 2, "steps": 2}),
        (
            replace(CONFIG, rcfg=RCFGMode.SELF),
            {"prompt": "a tree", "seed": 3, "steps": 2, "guidance_scale": 1.5},
        ),
        (
            replace(CONFIG, rcfg=RCFGMode.FULL),
            {"prompt": "a city", "seed": 4, "guidance_scale": 2.0, "negative_prompt": "blur"},
        ),
        (replace(CONFIG, use_denoising_batch=False), {"prompt": "a boat", "seed": 5, "steps": 2}),
    ]
    frames = 3
    engine = Engine(tiny_bundle, CONFIG, CALM, BASE)
    sessions = [await engine.open_session(params, config=config) for config, params in setups]
    for k, session in enumerate(sessions):
        for i in range(frames):
            session.submit(make_frame(k, i))
    await engine.start()  # all frames wait already: the four Stream Batch sessions share each call
    try:
        for k, (config, params) in enumerate(setups):
            inputs = [make_frame(k, i) for i in range(frames)]
            expected = reference_outputs(tiny_bundle, config, BASE.updated(**params), inputs)
            outputs = await receive(sessions[k], len(expected))
            assert [out.index for out in outputs] == sorted(expected)
            for out in outputs:
                difference = np.abs(
                    out.image.astype(np.int16) - expected[out.index].astype(np.int16)
                )
                assert difference.max() <= TOLERANCE, (k, out.index, difference.max())
        metrics = engine.metrics()
        assert metrics["batch_sessions"]["max"] == 4  # the sequential session is a group of its own
    finally:
        await engine.stop()


async def test_event_loop_is_never_blocked(
    tiny_bundle: ModelBundle, caplog: pytest.LogCaptureFixture
) -> None:
    """asyncio's debug mode logs every callback slower than ``slow_callback_duration``.

    One batched step of the tiny model at 128² takes well over 0.1 s on a CI core, so model
    work, prompt encoding or building a Stream on the loop would be logged; queue and
    bookkeeping work takes microseconds, leaving room for a busy machine.
    """
    loop = asyncio.get_running_loop()
    loop.set_debug(True)
    loop.slow_callback_duration = 0.1
    caplog.set_level(logging.WARNING, logger="asyncio")
    engine = Engine(tiny_bundle, StreamConfig(width=128, height=128), CALM, BASE)
    await engine.start()
    try:
        a = await engine.open_session({"prompt": "a fox"})
        b = await engine.open_session({"prompt": "a whale", "steps": 2})
        b.submit(make_frame(1, 0, size=128))
        for i in range(4):
            a.submit(make_frame(0, i, size=128))
            b.submit(make_frame(1, i + 1, size=128))
            if i == 2:
                await a.update(prompt="a wolf", seed=9)
            await asyncio.gather(a.recv(), b.recv())
        await a.close()
    finally:
        await engine.stop()
    slow = [
        r.getMessage() for r in caplog.records if r.name == "asyncio" and "took" in r.getMessage()
    ]
    assert not slow, slow

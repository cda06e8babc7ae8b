"""Sessions with different feature banks (and none) share one UNet call and each equal alone.

One tiny model with a feature bank, three sessions in one engine: a bank of 2 with fusion, a
bank of 1 with latent feedback, neither. Every output must equal a single Stream's on the same
model, whose own correctness ``tests/core/test_stream_feature_bank.py`` proves against
StreamV2V. Banks never cross sessions: each session's rows read and write only its slots.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
from runtime_testing import make_frame, receive, reference_outputs

from livediff.engine.config import GenerationParams, StreamConfig
from livediff.engine.degrade import DegradePolicy
from livediff.engine.runtime import Engine, RuntimeConfig
from livediff.models.bundle import ModelBundle

CONFIG = StreamConfig(width=64, height=64)
BASE = GenerationParams(strength=0.5, steps=2)
CALM = RuntimeConfig(
    deadline_ms=3_600_000, inbox_size=8, outbox_size=16, degrade=DegradePolicy(enabled=False)
)
TOLERANCE = 1  # uint8 levels: a call over padded rows may sum in another order
SETUPS = [
    {
        "prompt": "a red fox",
        "seed": 1,
        "feature_bank": 2,
        "bank_interval": 1,
        "fusion_threshold": 0.9,
    },
    {
        "prompt": "a blue whale",
        "seed": 2,
        "feature_bank": 1,
        "bank_interval": 2,
        "latent_feedback": 0.4,
    },
    {"prompt": "a tree", "seed": 3},
]


@pytest.fixture(scope="module")
def banked(tiny_bundle: ModelBundle) -> ModelBundle:
    return replace(tiny_bundle, unet=copy.deepcopy(tiny_bundle.unet)).with_feature_bank(
        frames=2, rows=8
    )


async def test_sessions_with_and_without_banks_share_calls_and_equal_alone(
    banked: ModelBundle,
) -> None:
    frames = 5
    engine = Engine(banked, CONFIG, CALM, BASE)
    sessions = [await engine.open_session(params) for params in SETUPS]
    assert banked.feature_bank is not None and banked.feature_bank.free_rows() == 8 - 2 - 2
    for k, session in enumerate(sessions):
        for i in range(frames):
            session.submit(make_frame(k, i))
    await engine.start()  # every frame waits already: the three sessions share each call
    try:
        for k, params in enumerate(SETUPS):
            inputs = [make_frame(k, i) for i in range(frames)]
            expected = reference_outputs(banked, CONFIG, BASE.updated(**params), inputs)
            outputs = await receive(sessions[k], len(expected))
            assert [out.index for out in outputs] == sorted(expected)
            for out in outputs:
                difference = np.abs(out.image.astype(np.int16) - expected[out.index])
                assert difference.max() <= TOLERANCE, (k, out.index, difference.max())
        assert engine.metrics()["batch_sessions"]["max"] == 3
        usage = [engine.metrics()["per_session"][s.id]["feature_bank"] for s in sessions]
        assert [u and u["rows"] for u in usage] == [2, 2, None]
    finally:
        await engine.stop()


def test_a_call_goes_unmasked_only_when_every_row_holds_a_full_bank() -> None:
    import torch

    from livediff.engine.feature_banks import bank_inputs
    from livediff.models.unet_batch import UNetBatch

    def batch(banks: bool) -> UNetBatch:
        rows = 2
        extra = {}
        if banks:
            extra = {
                "bank_slots": torch.tensor([1, 2]),
                "bank_frames": torch.ones(rows, 2),
                "bank_write": torch.tensor([3, 5]),
                "bank_fusion": torch.zeros(rows, 2),
            }
        return UNetBatch(
            torch.zeros(rows, 4, 8, 8), torch.zeros(rows), torch.zeros(rows, 7, 24), **extra
        )

    full = bank_inputs([batch(True), batch(True)], [True, True])
    assert [b.bank_frames for b in full] == [None, None]
    assert all(b.bank_slots is not None for b in full)
    for batches, fills in (
        ([batch(True), batch(True)], [True, False]),  # one session's bank still filling
        ([batch(True), batch(False)], [True, False]),  # a session without a bank shares it
    ):
        kept = bank_inputs(batches, fills)
        assert kept[0].bank_frames is not None

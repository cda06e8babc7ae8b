"""Preprocessing batched across sessions: one call per preprocessor per batch, same images.

A batch's sessions with different Canny thresholds share one canny call (thresholds per row),
every row needing depth one depth call, soft edges one call; a preprocessor two nets of one
session use runs once for it. Each session's control images must equal those it gets alone,
and in a running engine every batch must make one canny call and give each session the frames
a single Stream gives.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import torch
from runtime_testing import make_frame, receive, reference_outputs

from helpers.control_testing import boxed_pixels
from livediff.engine import control_batch
from livediff.engine.config import GenerationParams, StreamConfig
from livediff.engine.control_batch import ControlRequest, SlotUse, control_images
from livediff.engine.degrade import DegradePolicy
from livediff.engine.runtime import Engine, RuntimeConfig
from livediff.models.bundle import ModelBundle
from livediff.models.control_images import PreprocessorNetworks
from livediff.models.control_uses import CannyParams, ControlNetSpec
from livediff.models.control_uses import Preprocessor as P
from livediff.models.controlnet_loading import load_controlnet
from livediff.models.soft_edge import load_soft_edge_detector

SIZE = (64, 64)
SLOTS = 4


class FakeDepth:
    """A depth "network" that works row by row, as the real one does (it is slow on a CPU)."""

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean(dim=1, keepdim=True).expand_as(images).flip(-1).contiguous()


def counting(monkeypatch: pytest.MonkeyPatch) -> Counter[tuple[P, int]]:
    """Every preprocess call the batcher makes: (preprocessor, rows) → calls."""
    calls: Counter[tuple[P, int]] = Counter()
    real: Callable[..., torch.Tensor] = control_batch.preprocess

    def recorded(kind: Any, frames: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        calls[(P(kind), int(frames.shape[0]))] += 1
        return real(kind, frames, *args, **kwargs)

    monkeypatch.setattr(control_batch, "preprocess", recorded)
    return calls


def pixels(seed: int, rows: int) -> torch.Tensor:
    return boxed_pixels(seed, rows, SIZE)


def request(uses: list[SlotUse], seed: int, rows: int = 1, **extra: Any) -> ControlRequest:
    return ControlRequest(
        SLOTS, tuple(uses), SIZE, pixels(seed, rows), None, rows, torch.float32,
        torch.device("cpu"), **extra,
    )  # fmt: skip


def use(slot: int, kind: P, params: CannyParams | None = None) -> SlotUse:
    return SlotUse(slot, kind, params, 1.0)


def test_a_batch_runs_each_preprocessor_once_and_each_session_gets_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    networks = PreprocessorNetworks(depth=FakeDepth(), soft_edge=load_soft_edge_detector(seed=1))
    client = torch.rand(1, 3, *SIZE, generator=torch.Generator().manual_seed(9))
    requests = [
        # two nets on the same canny result: run once for this session
        request([use(0, P.CANNY, CannyParams(60, 140, 1.0)), use(1, P.CANNY, CannyParams(60, 140, 1.0))], 1),
        request([use(0, P.CANNY, CannyParams(20, 60, 0.0)), use(2, P.DEPTH)], 2, rows=2),
        request([use(0, P.CANNY), use(2, P.DEPTH), use(3, P.SOFT_EDGE), use(1, P.PASSTHROUGH)], 3),
        request([use(1, P.PREVIOUS_OUTPUT), use(3, P.CLIENT)], 4, client={3: client}),
    ]  # fmt: skip
    alone = [control_images([r], networks)[0] for r in requests]
    calls = counting(monkeypatch)
    together = control_images(requests, networks)
    assert calls == {
        (P.CANNY, 4): 1,  # 1 + 2 + 1 rows, each with its session's thresholds
        (P.DEPTH, 3): 1,
        (P.SOFT_EDGE, 1): 1,
        (P.PASSTHROUGH, 1): 2,  # the tile net's frame, and session 4's previous frame
    }
    for k, (mine, own) in enumerate(zip(together, alone, strict=True)):
        assert mine.shape == (requests[k].rows, SLOTS, 3, *SIZE)
        torch.testing.assert_close(mine, own, atol=1e-6, rtol=0, msg=f"session {k}")
    # The thresholds did reach their rows: session 1's low ones find more edges.
    assert together[1][:, 0].sum() > together[0][:, 0].sum() * 1.2
    assert torch.equal(together[0][:, 0], together[0][:, 1])  # one result, both nets
    assert torch.equal(together[3][0, 3], client[0])
    assert not together[0][:, 2:].any()  # unused slots stay zero


CONFIG = StreamConfig(width=64, height=64)
BASE = GenerationParams(strength=0.5, steps=2)
CALM = RuntimeConfig(
    deadline_ms=3_600_000, inbox_size=8, outbox_size=16, degrade=DegradePolicy(enabled=False)
)
SETUPS = [
    {"prompt": "a red fox", "seed": 1, "controlnets": ({"controlnet": "edges", "scale": 1.2, "preprocessor": "canny", "params": {"low": 30, "high": 90}},)},
    {"prompt": "a blue whale", "seed": 2, "controlnets": ({"controlnet": "edges", "scale": 0.8, "preprocessor": "canny", "params": {"low": 120, "high": 220, "sigma": 0}},)},
    {"prompt": "a tree", "seed": 3, "controlnets": ("edges:1:canny",)},
]  # fmt: skip


@pytest.fixture(scope="module")
def controlled(tiny_bundle: ModelBundle) -> ModelBundle:
    net = load_controlnet(ControlNetSpec("random", name="edges", seed=1), tiny_bundle)
    return tiny_bundle.with_controlnets([net])


async def test_sessions_with_different_thresholds_share_one_canny_call_per_batch(
    controlled: ModelBundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    frames = 4
    calls = counting(monkeypatch)
    unet_calls = 0
    predict = controlled.predict_noise

    def counted(batch: Any) -> torch.Tensor:
        nonlocal unet_calls
        unet_calls += 1
        return predict(batch)

    engine = Engine(controlled, CONFIG, CALM, BASE)
    monkeypatch.setattr(engine.bundle, "predict_noise", counted)
    sessions = [await engine.open_session(params) for params in SETUPS]
    for k, session in enumerate(sessions):
        for i in range(frames):
            session.submit(make_frame(k, i))
    await engine.start()  # every frame waits already: the three sessions share each call
    try:
        outputs = [await receive(s, frames - 1) for s in sessions]  # 2 steps: one frame behind
        assert engine.metrics()["batch_sessions"]["max"] == 3
    finally:
        await engine.stop()
    monkeypatch.undo()  # the references run alone
    canny_calls = sum(n for (kind, _), n in calls.items() if kind is P.CANNY)
    assert canny_calls == unet_calls, (calls, unet_calls)  # one per batch, all its sessions
    assert calls[(P.CANNY, 3)] >= 1  # ... and some batch held all three
    for k, params in enumerate(SETUPS):
        inputs = [make_frame(k, i) for i in range(frames)]
        expected = reference_outputs(controlled, CONFIG, BASE.updated(**params), inputs)
        for out in outputs[k]:
            gap = abs(out.image.astype(int) - expected[out.index].astype(int)).max()
            assert gap <= 1, (k, out.index, gap)  # a padded call may sum in another order

"""The live runtime on CUDA: its own CUDA stream, pinned copies, one event wait per batch."""

from __future__ import annotations

import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from runtime_testing import make_frame, probe_from, receive, reference_outputs

from livediff.engine.config import GenerationParams, StreamConfig
from livediff.engine.degrade import DegradePolicy
from livediff.engine.runtime import Engine, RuntimeConfig
from livediff.engine.runtime_config import BatchOverlap
from livediff.models.bundle import ModelBundle

pytestmark = pytest.mark.gpu

CONFIG = StreamConfig(width=64, height=64)
BASE = GenerationParams(strength=0.5, steps=1)
CALM = RuntimeConfig(
    deadline_ms=3_600_000, inbox_size=8, outbox_size=16, degrade=DegradePolicy(enabled=False)
)


@pytest.mark.parametrize("overlap", [BatchOverlap.OFF, BatchOverlap.AUTO])
async def test_cuda_sessions_equal_single_streams(
    cuda_tiny_bundle: ModelBundle, overlap: BatchOverlap
) -> None:
    """With the probe networks every row's arithmetic is elementwise, so batching on the
    worker's CUDA stream must give exactly what a single Stream gives on the default stream,
    also with the next batch launched behind the running one (overlap)."""
    probe = probe_from(cuda_tiny_bundle)
    setups = [{"prompt": "a fox", "seed": 1}, {"prompt": "a whale", "seed": 2, "steps": 2}]
    engine = Engine(probe, CONFIG, replace(CALM, overlap=overlap), BASE)
    sessions = [await engine.open_session(params) for params in setups]
    for k, session in enumerate(sessions):
        for i in range(4):
            session.submit(make_frame(k, i))
    await engine.start()
    try:
        for k, params in enumerate(setups):
            frames = [make_frame(k, i) for i in range(4)]
            expected = reference_outputs(probe, CONFIG, BASE.updated(**params), frames)
            for out in await receive(sessions[k], len(expected)):
                np.testing.assert_array_equal(out.image, expected[out.index])
                assert out.compute_ms is not None and out.compute_ms > 0
        assert engine.metrics()["batch_sessions"]["max"] == 2
    finally:
        await engine.stop()


async def test_no_hidden_host_syncs_while_streaming(cuda_tiny_bundle: ModelBundle) -> None:
    """The worker's only host wait is the output event; PyTorch's sync debug mode flags any
    other synchronising call (``.item()``, pageable copies …) made while frames stream."""
    engine = Engine(cuda_tiny_bundle, CONFIG, CALM, BASE)
    await engine.start()
    try:
        a = await engine.open_session({"prompt": "a fox"})
        b = await engine.open_session({"prompt": "a whale", "steps": 2})
        b.submit(make_frame(1, 0))
        for i in range(3):  # warm-up: first batches allocate and pick cuDNN algorithms
            a.submit(make_frame(0, i))
            b.submit(make_frame(1, i + 1))
            await a.recv()
            await b.recv()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                for i in range(3, 8):
                    a.submit(make_frame(0, i))
                    b.submit(make_frame(1, i + 1))
                    await a.recv()
                    await b.recv()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    finally:
        await engine.stop()
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
    assert not syncs, syncs


@pytest.mark.slow
async def test_graphed_bundle_serves_the_runtime(cuda_tiny_bundle: ModelBundle) -> None:
    """The compiled fast path: per-bucket CUDA graphs (captured before the engine starts) behind
    the batcher's bucket padding give what the eager bundle gives (fp16: a few levels)."""
    from livediff.models.backends import Backend, prepare_backend
    from livediff.models.graphed import GraphedBundle

    buckets = (1, 2, 4)
    graphed = GraphedBundle.wrap(prepare_backend(cuda_tiny_bundle, Backend.COMPILE))
    graphed.setup_graphs(unet_buckets=buckets, frame_buckets=buckets, latent_size=(8, 8))
    graphed.warm_up()
    outputs = {}
    for name, bundle in (("eager", cuda_tiny_bundle), ("graphed", graphed)):
        engine = Engine(bundle, CONFIG, replace(CALM, batch_buckets=buckets), BASE)
        sessions = [await engine.open_session({"seed": k}) for k in range(3)]
        for k, session in enumerate(sessions):
            for i in range(3):
                session.submit(make_frame(k, i))
        await engine.start()
        try:
            outputs[name] = [[o.image for o in await receive(s, 3)] for s in sessions]
        finally:
            await engine.stop()
    for eager, fast in zip(outputs["eager"], outputs["graphed"], strict=True):
        for x, y in zip(eager, fast, strict=True):
            assert np.abs(x.astype(np.int16) - y.astype(np.int16)).max() <= 4


@pytest.mark.slow
async def test_graphed_runtime_packs_rows_in_place_and_takes_yuv_answers_i420(
    cuda_tiny_bundle: ModelBundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows are packed straight into the graphs' static inputs (no second device copy); YUV
    planes in and I420 out go through the same graphs and agree with the eager bundle."""
    from livediff.engine.frames import OutputFormat, YuvFrame
    from livediff.kernels.yuv import rgb_to_i420, split_i420
    from livediff.models import graphed as graphed_module
    from livediff.models.backends import Backend, prepare_backend
    from livediff.models.graphed import GraphedBundle

    in_place: list[bool] = []
    original = graphed_module._same_view

    def recording(static: torch.Tensor, value: torch.Tensor) -> bool:
        in_place.append(original(static, value))
        return in_place[-1]

    monkeypatch.setattr(graphed_module, "_same_view", recording)
    buckets = (1, 2, 4)
    graphed = GraphedBundle.wrap(prepare_backend(cuda_tiny_bundle, Backend.COMPILE))
    graphed.setup_graphs(unet_buckets=buckets, frame_buckets=buckets, latent_size=(8, 8))
    graphed.warm_up()

    def yuv(k: int, i: int) -> YuvFrame:
        rgb = torch.from_numpy(make_frame(k, i))[None]
        y, u, v = split_i420(rgb_to_i420(rgb), 64, 64)
        return YuvFrame(y[0].clone(), u[0].clone(), v[0].clone())

    outputs = {}
    for name, bundle in (("eager", cuda_tiny_bundle), ("graphed", graphed)):
        engine = Engine(bundle, CONFIG, replace(CALM, batch_buckets=buckets), BASE)
        sessions = [
            await engine.open_session({"seed": k}, output=OutputFormat.I420) for k in range(3)
        ]
        for k, session in enumerate(sessions):
            for i in range(3):
                session.submit(yuv(k, i))
        await engine.start()
        try:
            outputs[name] = [[o.image for o in await receive(s, 3)] for s in sessions]
        finally:
            await engine.stop()
    assert in_place and all(in_place), in_place  # every graph input was the static buffer
    for eager, fast in zip(outputs["eager"], outputs["graphed"], strict=True):
        for x, y in zip(eager, fast, strict=True):
            assert x.shape == (64 * 64 * 3 // 2,)
            assert np.abs(x.astype(np.int16) - y.astype(np.int16)).max() <= 4

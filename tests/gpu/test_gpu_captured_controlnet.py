"""ControlNets inside the whole-step CUDA graph: the frames of the call-by-call Stream.

A compiled single stream with ControlNets (canny with its own thresholds, the previous output,
an image the client sends) is one graph replay per frame (:class:`CapturedStream` with
:mod:`livediff.engine.captured_control`); its frames must equal an eager Stream's on the same
nets, live threshold and scale changes must land on the next frame without a new graph or a
recompile, and a new preprocessor layout captures one new graph. The nets on their second
stream beside the UNet's first half give the noise of one stream.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from livediff.engine.backend_fit import make_stream
from livediff.engine.captured_stream import CapturedStream
from livediff.engine.config import StreamConfig
from livediff.engine.stream import Stream
from livediff.models.backends import Backend, prepare_backend
from livediff.models.bundle import ModelBundle
from livediff.models.control_uses import CannyParams, ControlNetSpec, ControlUse
from livediff.models.controlnet_loading import load_controlnet
from livediff.models.loading import ModelSpec, load_model
from livediff.models.unet_batch import UNetBatch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def with_nets() -> ModelBundle:
    bundle = load_model(ModelSpec(preset="tiny", weights="random"), device="cuda", dtype="fp16")
    nets = [
        load_controlnet(ControlNetSpec("random", name=name, seed=k), bundle)
        for k, name in ((1, "edges"), (2, "temporal"), (3, "pose"))
    ]
    return bundle.with_controlnets(nets)


def frames(count: int) -> list[torch.Tensor]:
    rng = np.random.default_rng(4)
    out = []
    for k in range(count):
        frame = rng.integers(40, 90, (128, 128, 3), dtype=np.uint8)
        frame[20 + 4 * k : 70 + 4 * k, 30:100] = 220  # a moving box: edges that change
        out.append(torch.from_numpy(frame).cuda())
    return out


def uses(low: float, scale: float, temporal: str = "previous_output") -> list[ControlUse]:
    """Thresholds (low, 2·low + 10): 5 finds the noise's edges too, 120 only the box's."""
    return [
        ControlUse("edges", scale, "canny", CannyParams(low, 2 * low + 10, 1.0)),  # type: ignore[arg-type]
        ControlUse("temporal", 0.7, temporal),  # type: ignore[arg-type]
        ControlUse("pose", 1.0, "client"),  # type: ignore[arg-type]
    ]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a.int() - b.int()).abs().max())


def run(stream: Stream, clip: list[torch.Tensor]) -> list[torch.Tensor]:
    return [o.image.clone() for f in clip for o in stream.process(f)]


def test_controlnets_replay_inside_the_whole_step_graph() -> None:
    eager_bundle, compiled = with_nets(), prepare_backend(with_nets(), Backend.COMPILE)
    config = StreamConfig(width=128, height=128)
    kwargs = {"prompt": "a boat", "steps": 2, "controlnets": uses(5.0, 0.9)}
    eager = Stream(eager_bundle, config, **kwargs)
    stale = Stream(eager_bundle, config, **kwargs)  # never updated: shows the update's effect
    captured = make_stream(compiled, Backend.COMPILE, config, **kwargs)
    assert isinstance(captured, CapturedStream)
    clip = frames(6)
    pose = torch.rand(1, 3, 128, 128, device="cuda", dtype=torch.float16)

    def both(clip: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return run(eager, clip), run(captured, clip)

    want, got = both(clip[:3])  # the client's net waits (scale 0) until its image arrives
    run(stale, clip[:3])
    for stream in (eager, captured, stale):
        stream.set_client_image(2, pose)
    run(stale, clip[3:])
    more_want, more_got = both(clip[3:])
    want, got = want + more_want, got + more_got
    assert len(got) == len(want) == 5
    assert all(max_diff(a, b) <= 3 for a, b in zip(got, want, strict=True))
    assert len(captured._graphs) == 1

    # Thresholds and scales change in the graph's buffers: the next frame, no new graph.
    graphs = dict(captured._graphs)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for stream in (eager, captured):
            stream.update(controlnets=uses(120.0, 0.3))
        want, got = both(clip)
    run(stale, clip)
    assert captured._graphs == graphs
    assert all(max_diff(a, b) <= 3 for a, b in zip(got, want, strict=True))
    # What the nets saw: the new edge map (not the stale one), the client's image, the scales.
    seen, expected, old = (s.batch.latest_control() for s in (captured, eager, stale))
    assert seen is not None and expected is not None and old is not None
    assert torch.equal(seen[0], expected[0]) and not torch.equal(seen[0], old[0])
    assert torch.equal(seen[2], pose[0])
    torch.testing.assert_close(captured.batch._control_scales, eager.batch._control_scales)

    # Another layout (the temporal net fed the frame itself) captures one more graph.
    for stream in (eager, captured):
        stream.update(controlnets=uses(120.0, 0.3, temporal="passthrough"))
    want, got = both(clip)
    assert len(captured._graphs) == 2
    assert all(max_diff(a, b) <= 3 for a, b in zip(got, want, strict=True))


@torch.inference_mode()
def test_controlnets_beside_the_unet_on_a_second_stream_give_the_same_noise() -> None:
    """The nets on a side stream beside the UNet's down blocks (``control_overlap``, the
    default): the noise of one stream, eagerly and replayed from a CUDA graph."""
    bundle = with_nets()
    serial = dataclasses.replace(bundle, control_overlap=False)
    gen = torch.Generator(device="cuda").manual_seed(2)
    seq, dim = bundle.embed_shape
    rows, nets = 2, len(bundle.controlnets)
    batch = UNetBatch(
        latents=torch.randn(rows, 4, 16, 16, device="cuda", generator=gen).half(),
        timesteps=torch.tensor([300, 700], device="cuda"),
        embeds=torch.randn(rows, seq, dim, device="cuda", generator=gen).half(),
        control_images=torch.rand(rows, nets, 3, 128, 128, device="cuda", generator=gen).half(),
        control_scales=torch.rand(rows, nets, device="cuda", generator=gen),
    )
    want = serial.predict_noise(batch)
    assert torch.equal(bundle.predict_noise(batch), want)
    for _ in range(2):  # warm-up on the capture's side stream, as CapturedStream does
        bundle.predict_noise(batch)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = bundle.predict_noise(batch)
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want)
    # The nets' part is live in the graph: other scales, other noise.
    batch.control_scales.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert not torch.equal(out, want)
    assert torch.equal(out, serial.predict_noise(batch))

"""The server's compiled canny on CUDA: bit for bit the op at every row count, with no compile
after :meth:`PaddedCanny.warm_up` (dynamo's error-on-recompile), also for per-row values
that come as strided views (the first H200 run recompiled on them: a 9.5 s stall)."""

from __future__ import annotations

import pytest
import torch

from livediff.kernels.canny import canny
from livediff.models.compiled_canny import PaddedCanny

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_compiled_padded_canny_is_the_op_without_recompiles() -> None:
    gen = torch.Generator(device="cuda").manual_seed(1)
    padded = PaddedCanny((1, 4))
    padded.warm_up((128, 128), device=torch.device("cuda"), dtype=torch.float16)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for rows in (1, 2, 3, 4, 6):
            images = torch.rand(rows, 3, 128, 128, device="cuda", generator=gen).half()
            images[:, :, 30:90, 40:100] += 0.5
            low = torch.linspace(0.05, 0.2, rows, device="cuda")
            values = torch.stack([low, low * 2 + 0.05, torch.ones(rows, device="cuda")], dim=1)
            low, high, sigma = values.unbind(1)  # strided views, as the engine passes them
            got = padded(images.clamp(0, 1), low, high, sigma)
            assert torch.equal(got, canny(images.clamp(0, 1), low, high, sigma))


def test_the_servers_batches_take_the_compiled_canny_without_a_compile() -> None:
    """A compiled model with a ControlNet, prepared for the server (per-bucket graphs, with
    and without control inputs): the engine's control images for two sessions with their own
    thresholds come from the canny compiled at start, equal the op's, and make no compile
    while sessions run; a call without control inputs replays a graph captured at start."""
    from livediff.engine.control_batch import ControlRequest, SlotUse, control_images
    from livediff.models.backends import Backend, prepare_backend, runtime_bundle
    from livediff.models.control_uses import CannyParams, ControlNetSpec, Preprocessor
    from livediff.models.controlnet_loading import load_controlnet
    from livediff.models.loading import ModelSpec, load_model
    from livediff.models.unet_batch import UNetBatch

    bundle = load_model(ModelSpec(preset="tiny", weights="random"), device="cuda", dtype="fp16")
    net = load_controlnet(ControlNetSpec("random", name="edges", seed=1), bundle)
    prepared = prepare_backend(bundle.with_controlnets([net]), Backend.COMPILE)
    graphed = runtime_bundle(
        prepared,
        Backend.COMPILE,
        latent_size=(16, 16),
        buckets=(1, 2),
        show_progress=False,
        plain_unet=True,  # controlnet_rows = "apart": the UNet alone is captured too
    )
    unet_graphs = graphed._graphs["unet"]._graphs  # type: ignore[attr-defined]
    assert len(unet_graphs) == 4  # buckets 1 and 2, with and without control inputs
    networks = graphed.control_networks
    assert networks is not None and isinstance(networks.canny, PaddedCanny)
    assert networks.canny.sizes == (1, 2)
    gen = torch.Generator(device="cuda").manual_seed(3)

    def request(low: float) -> ControlRequest:
        pixels = torch.rand(1, 3, 128, 128, device="cuda", generator=gen).half() * 2 - 1
        pixels[:, :, 30:90, 40:100] = 0.9
        use = SlotUse(0, Preprocessor.CANNY, CannyParams(low, 2 * low + 10, 1.0), 0.8)
        return ControlRequest(
            1, (use,), (128, 128), pixels, None, 1, torch.float16, torch.device("cuda")
        )

    requests = [request(20.0), request(90.0)]
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = control_images(requests, networks)
        alone = control_images(requests[:1], networks)
    want = control_images(requests, None)  # the op, eagerly
    seq, dim = graphed.embed_shape
    plain = UNetBatch(
        latents=torch.randn(2, 4, 16, 16, device="cuda", generator=gen).half(),
        timesteps=torch.tensor([300, 700], device="cuda"),
        embeds=torch.randn(2, seq, dim, device="cuda", generator=gen).half(),
    )
    noise = graphed.predict_noise(plain)  # a call without control inputs: its own graph
    assert noise.shape == (2, 4, 16, 16) and len(unet_graphs) == 4
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    assert torch.equal(alone[0], want[0])
    assert not torch.equal(want[0], want[1])  # each session's own thresholds

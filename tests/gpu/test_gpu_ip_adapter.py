"""IP-Adapter on CUDA in fp16: the compiled, per-bucket captured UNet call takes the image-prompt
tokens and scales as static inputs, answers as the eager call does, and does not recompile."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from livediff.models.backends import Backend, prepare_backend
from livediff.models.graphed import GraphedBundle
from livediff.models.image_prompts import ImagePromptEncoder, row_inputs
from livediff.models.ip_adapter_loading import load_ip_adapter
from livediff.models.ip_adapter_spec import IPAdapterSpec
from livediff.models.loading import ModelSpec, load_model
from livediff.models.unet_batch import UNetBatch

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("variant", ["plain", "plus"])
def test_graphed_bundle_runs_ip_adapter_per_row(variant: str) -> None:
    bundle = load_model(ModelSpec(preset="tiny", weights="random"), device="cuda", dtype="fp16")
    adapter = load_ip_adapter(IPAdapterSpec("random", variant=variant, seed=1), bundle)
    eager = bundle.with_ip_adapter(adapter)
    encoder = ImagePromptEncoder(adapter)
    pixels = np.random.RandomState(0)
    x, y = (encoder.encode_array(pixels.randint(0, 256, (48, 64, 3), dtype=np.uint8)) for _ in "xy")
    half = {"device": "cuda", "dtype": torch.float16}
    batches, expected = [], []
    for rows in (2, 3):
        tokens, scales = row_inputs([x, y, None][:rows], [0.6, 1.0, 0.0][:rows], adapter)
        batch = UNetBatch(
            torch.randn(rows, 4, 16, 16, **half),
            torch.randint(0, 999, (rows,), device="cuda"),
            torch.randn(rows, 77, 32, **half),
            ip_tokens=tokens,
            ip_scales=scales,
        )
        batches.append(batch)
        expected.append(eager.predict_noise(batch).clone())  # before the recipe changes the UNet
    last = batches[1]
    plain = bundle.predict_noise(UNetBatch(last.latents, last.timesteps, last.embeds)).clone()
    graphed = GraphedBundle.wrap(prepare_backend(eager, Backend.COMPILE))
    graphed.setup_graphs(unet_buckets=(2, 4), frame_buckets=(1, 2), latent_size=(16, 16))
    graphed.warm_up()
    for batch, want in zip(batches, expected, strict=True):
        with torch._dynamo.config.patch(error_on_recompile=True):
            got = graphed.predict_noise(batch).clone()
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got[2], plain[2], atol=2e-2, rtol=2e-2)  # scale 0: no image
    assert (got[0] - plain[0]).abs().max() > 0.1  # the image changes its row

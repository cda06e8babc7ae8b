"""``compile_batch``: per-bucket (one static graph per batch bucket) or shared (bucket 1 static,
one graph with a symbolic batch size for the larger buckets). The shared mode is checked on
the tiny UNet compiled by Inductor on the CPU, the options the recipe hands ``torch.compile``
(the mechanism is dynamo's, the same on CUDA): two graphs for four buckets, each bucket's
output equal to the eager UNet's."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from livediff.exceptions import ParameterError
from livediff.models.backends import recipe_for
from livediff.models.loading import ModelSpec, load_model
from livediff.models.recipe import Recipe, _compile_options
from livediff.models.spec import CompileBatch


def test_the_setting_reaches_the_recipe_and_its_label() -> None:
    bundle = load_model(
        ModelSpec(preset="tiny", weights="random", compile_batch="shared"),  # type: ignore[arg-type]
        device="cpu",
        dtype="fp32",
    )
    assert bundle.compile_batch is CompileBatch.SHARED
    recipe = recipe_for(bundle)
    assert recipe.compile_batch is CompileBatch.SHARED and "shared-batch" in recipe.label
    assert "shared-batch" not in Recipe().label  # the compile package's key tells them apart
    assert _compile_options(recipe)["dynamic"] is None
    assert _compile_options(Recipe())["dynamic"] is False
    with pytest.raises(ParameterError, match="compile_batch='sometimes': expected one of"):
        Recipe(compile_batch="sometimes")  # type: ignore[arg-type]


@pytest.mark.slow
def test_shared_buckets_compile_two_graphs_that_match_eager(tiny_bundle: object) -> None:
    unet = tiny_bundle.unet.eval()  # type: ignore[attr-defined]
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(
        unet.forward, **_compile_options(Recipe(compile_batch=CompileBatch.SHARED))
    )
    config = unet.config
    generator = torch.Generator().manual_seed(0)
    for rows in (1, 2, 4, 8):
        latents = torch.randn(rows, config.in_channels, 8, 8, generator=generator)
        timesteps = torch.full((rows,), 500)
        text = torch.randn(rows, 4, config.cross_attention_dim, generator=generator)
        with torch.inference_mode():
            got = compiled(latents, timesteps, encoder_hidden_states=text, return_dict=False)[0]
            want = unet(latents, timesteps, encoder_hidden_states=text, return_dict=False)[0]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert counters["stats"]["unique_graphs"] == 2  # bucket 1, then one for 2, 4 and 8
    torch._dynamo.reset()

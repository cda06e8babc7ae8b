"""The UNet's two halves (:mod:`livediff.models.unet_halves`) against diffusers' own forward.

``up(down(x))`` must be diffusers' ``UNet2DConditionModel.forward`` exactly (the same modules in
the same order), with and without ControlNet residuals, for the SD and the SDXL layouts; a
UNet whose configuration the halves do not transcribe is refused by name. fp32 on the CPU.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from diffusers import UNet2DConditionModel

from livediff.exceptions import ModelLoadError
from livediff.models.bundle import ModelBundle
from livediff.models.presets import get_preset
from livediff.models.unet_halves import UNetHalves, halves_of, install

SIZE = 16  # latent side of the tiny models at 128² pixels


def inputs(bundle: ModelBundle, rows: int, seed: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    seq, dim = bundle.embed_shape
    added = None
    if bundle.pooled_dim is not None:
        added = {
            "text_embeds": torch.randn(rows, bundle.pooled_dim, generator=gen),
            "time_ids": torch.randn(rows, 6, generator=gen).abs() * 100,
        }
    return {
        "sample": torch.randn(rows, 4, SIZE, SIZE, generator=gen),
        "timestep": torch.randint(100, 900, (rows,), generator=gen),
        "encoder_hidden_states": torch.randn(rows, seq, dim, generator=gen),
        "added_cond_kwargs": added,
    }


def residuals(
    halves: UNetHalves, given: dict[str, Any], seed: int
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Random residuals of the shapes of the skips and the middle block's output."""
    _, skips, _, _ = halves.down(*given.values())
    gen = torch.Generator().manual_seed(seed)
    down = [torch.randn(s.shape, generator=gen) for s in skips]
    mid_shape = skips[-1].shape  # the middle block keeps the last skip's shape
    return down, torch.randn(mid_shape, generator=gen)


@pytest.mark.parametrize("which", ["tiny_bundle", "tiny_sdxl_bundle"])
@pytest.mark.parametrize("with_residuals", [False, True])
@torch.inference_mode()
def test_the_halves_are_the_forward(
    request: pytest.FixtureRequest, which: str, with_residuals: bool
) -> None:
    bundle: ModelBundle = request.getfixturevalue(which)
    halves = UNetHalves(bundle.unet)
    given = inputs(bundle, 2, seed=3)
    down, mid = residuals(halves, given, seed=4) if with_residuals else (None, None)
    expected = bundle.unet(
        **given,
        down_block_additional_residuals=down,
        mid_block_additional_residual=mid,
        return_dict=False,
    )[0]
    got = halves.up(*halves.down(*given.values()), down, mid)
    assert torch.equal(got, expected)
    if with_residuals:  # the residuals reach the output
        plain = halves.up(*halves.down(*given.values()), None, None)
        assert (got - plain).abs().amax() > 1e-3


def test_an_odd_latent_size_takes_the_forwarded_upsample_sizes(tiny_bundle: ModelBundle) -> None:
    halves = UNetHalves(tiny_bundle.unet)
    given = inputs(tiny_bundle, 1, seed=5)
    given["sample"] = torch.randn(1, 4, 18, 14)  # not a multiple of the upsampling factor
    with torch.inference_mode():
        expected = tiny_bundle.unet(**given, return_dict=False)[0]
        got = halves.up(*halves.down(*given.values()), None, None)
    assert got.shape == (1, 4, 18, 14)
    assert torch.equal(got, expected)


def test_halves_are_installed_once_and_found(tiny_bundle: ModelBundle) -> None:
    unet = tiny_bundle.unet
    first = halves_of(unet)
    assert halves_of(unet) is first
    replaced = install(unet, None)
    assert halves_of(unet) is replaced is not first


def test_a_unet_with_class_embeddings_is_refused_by_name() -> None:
    config = dict(get_preset("tiny").unet_config, class_embed_type="timestep")
    unet = UNet2DConditionModel.from_config(config)
    with pytest.raises(ModelLoadError, match="class embeddings"):
        UNetHalves(unet)

"""The feature bank's pools made before the first compiled call (``ModelBundle.make_bank_pools``).

Each banked attention makes its pool on the first call at a token count; made inside a
compiled call, dynamo's guards on the processor change and the next call compiles the whole
UNet again. Here dynamo runs with its ``eager`` backend (no Inductor: seconds on a CPU) and
counts the graphs it made: one with the pools made first, two without; the pre-pass keeps and
reads nothing (only the empty slot's entry 0 is written).
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from livediff.models.bundle import ModelBundle
from livediff.models.feature_bank import bank_processors
from livediff.models.loading import ModelSpec, load_model
from livediff.models.unet_batch import UNetBatch


def banked() -> ModelBundle:
    spec = ModelSpec(preset="tiny", weights="random", feature_bank_frames=2, feature_bank_rows=4)
    bundle = load_model(spec, device="cpu", dtype="fp32")
    bundle = bundle.with_feature_bank(frames=2, rows=4)
    bundle.unet.forward = torch.compile(
        bundle.unet.forward, backend="eager", fullgraph=True, dynamic=False
    )
    return bundle


def batch(bundle: ModelBundle, seed: int) -> UNetBatch:
    gen = torch.Generator().manual_seed(seed)
    seq, dim = bundle.embed_shape
    return UNetBatch(
        latents=torch.randn(2, 4, 16, 16, generator=gen),
        timesteps=torch.tensor([300, 500]),
        embeds=torch.randn(2, seq, dim, generator=gen),
        bank_slots=torch.tensor([1, 2]),
        bank_frames=torch.tensor([[1.0, 0.0], [1.0, 1.0]]),
        bank_write=torch.tensor([3, 4]),
        bank_fusion=torch.tensor([[0.5, 0.9], [0.0, 0.9]]),
    )


@pytest.mark.parametrize("made_first", [True, False])
def test_pools_made_first_mean_one_compile(made_first: bool) -> None:
    torch._dynamo.reset()
    counters.clear()
    bundle = banked()
    if made_first:
        bundle.make_bank_pools(batch(bundle, 0))
        pools = [pool.clone() for proc in bank_processors(bundle.unet) for pool in proc.pools()]
        assert pools and all(pool[:, 1:].abs().amax() == 0 for pool in pools)  # entry 0 only
    with torch.inference_mode():
        for seed in range(3):
            bundle.predict_noise(batch(bundle, seed))
    assert counters["stats"]["unique_graphs"] == (1 if made_first else 2)
    torch._dynamo.reset()

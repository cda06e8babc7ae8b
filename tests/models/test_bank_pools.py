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
        assert pools and all(pool[1:].abs().amax() == 0 for pool in pools)  # entry 0 only
    with torch.inference_mode():
        for seed in range(3):
            bundle.predict_noise(batch(bundle, seed))
    assert counters["stats"]["unique_graphs"] == (1 if made_first else 2)
    torch._dynamo.reset()


@pytest.mark.slow  # Inductor compiles one attention on the CPU (~10-30 s)
@pytest.mark.parametrize(
    ("fuse", "tokens"),
    [(False, "full"), (True, "full"), (True, "merged"), (False, "pooled"), (True, "pooled")],
)
def test_compiled_bank_writes_touch_the_written_rows_only(fuse: bool, tokens: str) -> None:
    """Inductor writes a call's keys and values (and outputs, on a fusing layer) into the pools
    as scatters of the written rows: pools kept as views of one buffer made it copy each whole
    pool in every layer and call (the H200 profile: ~85 µs a layer on the 4096-token layers at
    512², at any batch size), and so did an output pool written before the fusion read it.
    Frames reduced to half or a quarter of their tokens are written the same way."""
    from diffusers.models.attention_processor import Attention
    from torch._inductor.utils import run_and_get_code

    from livediff.models.bank_tokens import BankTokens
    from livediff.models.feature_bank import BankContext, BankedSelfAttention, BankRows

    channels, slots, frames = 32, 5, 3
    entries = slots * frames  # one pool tensor: entries × stored tokens × channels
    attn = Attention(channels, heads=2, dim_head=16).eval()
    mode = BankTokens(tokens)
    context = BankContext(slots=slots, frames=frames, tokens=mode, reduce_from=16)
    stored = {"full": 16, "merged": 8, "pooled": 4}[tokens]
    processor = BankedSelfAttention("mid_block.attn1", context, fuse=fuse)
    attn.set_processor(processor)
    hidden = torch.randn(2, 16, channels)  # a 4×4 token grid
    context.rows = BankRows(
        slots=torch.tensor([1, 2]),
        frames=torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]),
        write=torch.tensor([4, 7]),
        fusion=torch.tensor([[0.8, 0.5], [0.0, 0.5]]),  # row 0 fuses (when the layer does)
        grid=(4, 4),
    )
    eager = attn(hidden)  # makes the pools (outside the compiled call, as the engine does)
    eager_rows = [pool[[4, 7]].clone() for pool in processor.pools()]
    for pool in processor.pools():
        pool.zero_()
    compiled = torch.compile(attn, fullgraph=True, dynamic=False)
    torch._dynamo.reset()
    with torch.inference_mode():
        out, codes = run_and_get_code(compiled, hidden)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    written = [pool[[4, 7]] for pool in processor.pools()]
    assert all(w.abs().amax() > 0 for w in written)  # the rows were written, as eager wrote them …
    for got, want in zip(written, eager_rows, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert all(pool[[0, 1, 2, 3, 5, 6]].abs().amax() == 0 for pool in processor.pools())
    assert {pool.shape[1] for pool in processor.pools()} == {stored}
    whole = {entries * stored * channels, 2 * entries * stored * channels}
    loops = [
        line for code in codes for line in code.splitlines()
        if "for(" in line and any(f"<static_cast<int64_t>({n}L)" in line for n in whole)
    ]  # fmt: skip
    assert not loops, loops  # … and nothing loops over a whole pool


def test_entries_kept_puts_the_written_entries_back() -> None:
    """What a graph capture's warm-up calls write into the pools is undone on exit; the
    entries not named keep what the calls wrote (they are not saved: nothing is copied)."""
    bundle = banked()
    bundle.make_bank_pools(batch(bundle, 0))
    pools = [pool for proc in bank_processors(bundle.unet) for pool in proc.pools()]
    with torch.inference_mode():  # the pools are inference tensors
        for k, pool in enumerate(pools):
            pool.copy_(torch.randn(pool.shape, generator=torch.Generator().manual_seed(k)))
    before = [pool.clone() for pool in pools]
    bank = bundle.feature_bank
    assert bank is not None
    with bank.entries_kept(torch.tensor([3, 4])), torch.inference_mode():
        for pool in pools:
            pool[[3, 4, 5]] = 7.0
    for pool, old in zip(pools, before, strict=True):
        torch.testing.assert_close(pool[[3, 4]], old[[3, 4]], rtol=0, atol=0)
        assert bool((pool[5] == 7.0).all())

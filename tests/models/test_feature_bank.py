"""The feature bank per row of a shared UNet call equals StreamV2V's, session by session.

The oracle is StreamV2V's cached attention written out plainly for one session
(``helpers/streamv2v_reference.py``), on its own copy of the UNet per session. The banked UNet
serves three such sessions in every call — bank sizes 2 (with fusion), 1 and 0, fed different
frames — and each row must equal its session's oracle frame after frame, as the bank fills,
wraps and (interval 2) skips frames.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from helpers.streamv2v_reference import (
    evens_first,
    install_streamv2v,
    random_bipartite_soft_matching,
)
from livediff.exceptions import ParameterError
from livediff.models.bank_tokens import BankTokens, halving
from livediff.models.bundle import ModelBundle
from livediff.models.feature_bank import (
    BankRows,
    bank_bytes,
    bank_processors,
    fuse_nearest,
    install_feature_bank,
)

# float64: with random weights every fusion token has several bank tokens within 1e-5 of its
# best cosine, so float32's summation order alone could pick another neighbour.
TOLERANCE = {"atol": 1e-9, "rtol": 1e-9}
FRAMES = 7


@dataclass
class Session:
    """One session's bank as the host keeps it: StreamV2V's deque as a ring of pool entries."""

    slot: int
    size: int  # frames kept (StreamV2V's max_frames)
    interval: int
    strength: float = 0.0
    threshold: float = 1.0
    calls: int = 0
    held: list[int] = field(default_factory=list)  # frames of the ring that hold a frame
    next_frame: int = 0

    def rows(self, frames: int) -> tuple[int, list[float], int, list[float]]:
        mask = [1.0 if f in self.held else 0.0 for f in range(frames)]
        write = 0  # the empty slot's entry
        if self.size and self.calls % self.interval == 0:
            write = self.slot * frames + self.next_frame
            if self.next_frame not in self.held:
                self.held.append(self.next_frame)
            self.next_frame = (self.next_frame + 1) % self.size
        self.calls += 1
        return self.slot, mask, write, [self.strength, self.threshold]


def bank_rows(
    sessions: list[Session], frames: int, grid: tuple[int, int] | None = None
) -> BankRows:
    slots, masks, writes, fusion = zip(*(s.rows(frames) for s in sessions), strict=True)
    return BankRows(
        slots=torch.tensor(slots),
        frames=torch.tensor(masks),
        write=torch.tensor(writes),
        fusion=torch.tensor(fusion),
        grid=grid,
    )


def inputs(unet: Any, rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A frame's latents: a slowly moving scene (so that fusion finds neighbours), per row."""
    g = torch.Generator().manual_seed(1000)
    base = torch.randn(rows, 4, 16, 16, generator=g)
    drift = torch.randn(rows, 4, 16, 16, generator=torch.Generator().manual_seed(seed))
    embeds = torch.randn(rows, 77, unet.config.cross_attention_dim, generator=g)
    return base + 0.05 * drift, torch.tensor([500] * rows), embeds


# reduced from 128 tokens: the tiny UNet's 256-token layers keep reduced frames, its 64-token
# ones whole frames (one call runs both kinds)
@pytest.mark.parametrize("tokens", list(BankTokens))
def test_each_row_of_a_shared_call_equals_streamv2v_for_its_session(
    tiny_bundle: ModelBundle, tokens: BankTokens
) -> None:
    base = copy.deepcopy(tiny_bundle.unet).double()
    unet = copy.deepcopy(base)
    context = install_feature_bank(unet, slots=4, frames=2, tokens=tokens, reduce_from=128)
    reduced: dict[str, Any] = {"reduce": tokens.value, "reduce_from": 128}
    sessions = [
        Session(slot=1, size=2, interval=1, strength=0.8, threshold=0.9),
        Session(slot=2, size=1, interval=2),
        Session(slot=3, size=0, interval=1),
    ]
    oracles = []
    for s in sessions:
        oracle = copy.deepcopy(base)
        install_streamv2v(
            oracle,
            use_feature_injection=s.strength > 0,
            feature_injection_strength=s.strength,
            feature_similarity_threshold=s.threshold,
            interval=s.interval,
            max_frames=s.size,
            **reduced,
        )
        oracles.append(oracle)
    unfused = copy.deepcopy(base)  # session 0's bank without fusion: fusion must show
    install_streamv2v(
        unfused,
        use_feature_injection=False,
        feature_injection_strength=0.0,
        feature_similarity_threshold=1.0,
        interval=1,
        max_frames=2,
        **reduced,
    )
    with torch.inference_mode():
        for frame in range(FRAMES):
            latents, t, embeds = (
                x.double() if x.is_floating_point() else x
                for x in inputs(unet, len(sessions), seed=frame)
            )
            context.rows = bank_rows(sessions, context.frames, grid=(16, 16))
            got = unet(latents, t, encoder_hidden_states=embeds, return_dict=False)[0]
            for row, oracle in enumerate(oracles):
                want = oracle(
                    latents[row : row + 1],
                    t[:1],
                    encoder_hidden_states=embeds[row : row + 1],
                    return_dict=False,
                )[0]
                torch.testing.assert_close(got[row : row + 1], want, **TOLERANCE)
            plain = base(latents, t, encoder_hidden_states=embeds, return_dict=False)[0]
            without = unfused(
                latents[:1], t[:1], encoder_hidden_states=embeds[:1], return_dict=False
            )[0]
            if frame:  # the bank changed the frames it could: sessions 0 and 1, never 2
                assert (got[0] - without[0]).abs().max() > 1e-3
                assert (got[0] - plain[0]).abs().max() > 1e-3
                assert (got[1] - plain[1]).abs().max() > 1e-3
            torch.testing.assert_close(got[2], plain[2], **TOLERANCE)
    assert bank_bytes(unet) > 0
    assert {p.fuse for p in bank_processors(unet)} == {True, False}
    pool_tokens = {t.shape[1] for p in bank_processors(unet) for t in p.pools()}
    want = {BankTokens.FULL: {256, 64}, BankTokens.MERGED: {128, 64}, BankTokens.POOLED: {64}}
    assert pool_tokens == want[tokens]


@pytest.mark.parametrize("tokens", [2, 7, 12])
def test_halving_is_streamv2v_bipartite_matching_with_the_split_fixed(tokens: int) -> None:
    g = torch.Generator().manual_seed(tokens)
    metric, values = (torch.randn(3, tokens, 5, generator=g, dtype=torch.float64) for _ in "kv")
    merge = halving(metric)
    want = random_bipartite_soft_matching(metric, evens_first(3, tokens))(metric, values)
    got = (merge(metric), merge(values))
    for a, b in zip(got, want, strict=True):
        assert a.shape == (3, tokens - tokens // 2, 5)
        torch.testing.assert_close(a, b, **TOLERANCE)
    # the merge averages: a kept token that drew sources moved, the total weight is kept
    assert not torch.equal(got[1], values[:, 1::2][:, : got[1].shape[1]])


@pytest.mark.parametrize("tokens", [BankTokens.MERGED, BankTokens.POOLED])
def test_a_reduced_bank_is_smaller_and_still_changes_the_output(
    tiny_bundle: ModelBundle, tokens: BankTokens
) -> None:
    """Reduced frames shrink the pools (what a session's bank costs) and the bank still acts."""
    sizes = {}
    outputs = {}
    for mode in (BankTokens.FULL, tokens):
        unet = copy.deepcopy(tiny_bundle.unet)
        context = install_feature_bank(unet, slots=2, frames=2, tokens=mode, reduce_from=1)
        plan = Session(slot=1, size=2, interval=1)
        with torch.inference_mode():
            for frame in range(3):
                latents, t, embeds = inputs(unet, 1, seed=frame)
                context.rows = bank_rows([plan], context.frames, grid=(16, 16))
                noise = unet(latents, t, encoder_hidden_states=embeds, return_dict=False)[0]
                outputs[mode] = noise
        sizes[mode] = bank_bytes(unet)
    # every layer's grid (16×16, 8×8) has even sides
    assert sizes[tokens] * (2 if tokens is BankTokens.MERGED else 4) == sizes[BankTokens.FULL]
    plain = tiny_bundle.unet(latents, t, encoder_hidden_states=embeds, return_dict=False)[0]
    assert (outputs[tokens] - plain).abs().max() > 1e-3
    assert (outputs[tokens] - outputs[BankTokens.FULL]).abs().max() > 1e-4


def test_a_pooled_bank_without_the_latent_size_is_refused(tiny_bundle: ModelBundle) -> None:
    unet = copy.deepcopy(tiny_bundle.unet)
    context = install_feature_bank(unet, slots=2, frames=2, tokens=BankTokens.POOLED, reduce_from=1)
    context.rows = bank_rows([Session(slot=1, size=2, interval=1)], context.frames)
    latents, t, embeds = inputs(unet, 1, seed=0)
    with torch.inference_mode(), pytest.raises(ParameterError, match="latent size"):
        unet(latents, t, encoder_hidden_states=embeds, return_dict=False)


def test_fusion_blends_matches_and_leaves_the_rest() -> None:
    out = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # two tokens
    past = torch.tensor([[[[1.0, 0.1], [-1.0, 0.0]]]])  # one past frame: near token 0 only
    held = torch.tensor([[True]])
    fused = fuse_nearest(out, past, held, torch.tensor([0.5]), torch.tensor([0.9]))
    torch.testing.assert_close(fused[0, 0], 0.5 * out[0, 0] + 0.5 * past[0, 0, 0])
    torch.testing.assert_close(fused[0, 1], out[0, 1])  # best cosine 0.1 < 0.9
    for strength, frames in ((0.0, [[True]]), (0.5, [[False]])):  # off, or nothing held
        same = fuse_nearest(
            out, past, torch.tensor(frames), torch.tensor([strength]), torch.tensor([0.0])
        )
        assert torch.equal(same, out)


def test_without_rows_or_with_empty_rows_the_unet_is_unchanged(tiny_bundle: ModelBundle) -> None:
    unet = copy.deepcopy(tiny_bundle.unet)
    context = install_feature_bank(unet, slots=2, frames=4)
    latents, t, embeds = inputs(unet, 2, seed=0)
    with torch.inference_mode():
        plain = tiny_bundle.unet(latents, t, encoder_hidden_states=embeds, return_dict=False)[0]
        assert torch.equal(
            unet(latents, t, encoder_hidden_states=embeds, return_dict=False)[0], plain
        )
        empty = BankRows(
            slots=torch.zeros(2, dtype=torch.long),
            frames=torch.zeros(2, 4),
            write=torch.zeros(2, dtype=torch.long),
            fusion=torch.zeros(2, 2),
        )
        for _ in range(3):  # writes land in the empty slot and are never read
            context.rows = empty
            got = unet(latents, t, encoder_hidden_states=embeds, return_dict=False)[0]
            torch.testing.assert_close(got, plain, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    ("slots", "frames", "message"), [(4, 0, "frames=0"), (4, 5, "frames=5"), (1, 2, "empty slot")]
)
def test_bad_pool_sizes_are_refused(
    tiny_bundle: ModelBundle, slots: int, frames: int, message: str
) -> None:
    with pytest.raises(ParameterError, match=message):
        install_feature_bank(copy.deepcopy(tiny_bundle.unet), slots=slots, frames=frames)


def test_the_banked_unet_compiles_as_one_graph_without_recompiles(
    tiny_bundle: ModelBundle,
) -> None:
    """``torch.compile(fullgraph=True)`` (the compile backend's recipe) traces the processors,
    pools included, and new row values (which frames are held, where the call writes) reuse
    the graph: once the pools exist (the first call at a size makes them, so the second
    compiles once more, within a graph bundle's warm-up), the bank fills and wraps with no
    recompile, and matches the eager bank."""
    eager, compiled = (copy.deepcopy(tiny_bundle.unet) for _ in range(2))
    contexts = [install_feature_bank(u, slots=3, frames=2) for u in (eager, compiled)]
    torch._dynamo.reset()  # dynamo caches per code object: diffusers' forward is shared
    forward = torch.compile(compiled.forward, backend="aot_eager", fullgraph=True, dynamic=False)
    plans = [Session(slot=1, size=2, interval=1), Session(slot=2, size=1, interval=1)]
    twins = [copy.deepcopy(plans) for _ in range(2)]
    with torch.inference_mode():
        for frame in range(5):
            latents, t, embeds = inputs(eager, 2, seed=frame)
            results = []
            for context, unet_call, sessions in zip(contexts, (eager, forward), twins, strict=True):
                context.rows = bank_rows(sessions, context.frames, grid=(16, 16))
                if frame > 1:  # call 0 makes the pools, call 1 compiles with them: then none
                    with torch._dynamo.config.patch(error_on_recompile=True):
                        results.append(unet_call(latents, t, encoder_hidden_states=embeds)[0])
                else:
                    results.append(unet_call(latents, t, encoder_hidden_states=embeds)[0])
            torch.testing.assert_close(results[1], results[0], atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()  # leave no compiled entries for the tests after this one

"""The feature bank's mask-free attention on CUDA: the flash kernel's parts merged by their
log-sum-exp equal the masked attention over the concatenated keys (fp16, SD-Turbo's layer
shapes), also compiled with ``fullgraph=True``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from livediff.models.feature_bank import attend_with_bank, attention_with_lse

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def masked(
    heads: int,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    past_k: torch.Tensor,
    past_v: torch.Tensor,
    held: torch.Tensor,
) -> torch.Tensor:
    rows, tokens = q.shape[:2]
    mask = torch.cat([held.new_ones(rows, tokens), held.repeat_interleave(tokens, dim=1)], 1)

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(rows, -1, heads, t.shape[-1] // heads).transpose(1, 2)

    out = F.scaled_dot_product_attention(
        split(q.float()),
        split(torch.cat([k, past_k], 1).float()),
        split(torch.cat([v, past_v], 1).float()),
        attn_mask=mask[:, None, None, :],
    )
    return out.transpose(1, 2).reshape(rows, tokens, -1)


@pytest.mark.parametrize("tokens,channels,heads", [(4096, 320, 5), (1024, 640, 10), (64, 1280, 20)])
def test_flash_parts_equal_the_masked_attention(tokens: int, channels: int, heads: int) -> None:
    gen = torch.Generator(device="cuda").manual_seed(2)
    rows, frames = 4, 2

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device="cuda", generator=gen).half()

    q, k, v = (
        rand(rows, tokens, channels),
        rand(rows, tokens, channels),
        rand(rows, tokens, channels),
    )
    past_k, past_v = rand(rows, frames * tokens, channels), rand(rows, frames * tokens, channels)
    held = torch.tensor([[0, 0], [1, 0], [0, 1], [1, 1]], device="cuda", dtype=torch.bool)
    want = masked(heads, q, k, v, past_k, past_v, held)
    got = attend_with_bank(heads, q, k, v, past_k, past_v, held)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), want, atol=2e-3, rtol=2e-3)
    compiled = torch.compile(attend_with_bank, fullgraph=True, dynamic=False)
    torch.testing.assert_close(
        compiled(heads, q, k, v, past_k, past_v, held).float(), want, atol=2e-3, rtol=2e-3
    )


def test_lse_is_the_flash_kernels() -> None:
    gen = torch.Generator(device="cuda").manual_seed(3)
    q, k, v = (torch.randn(2, 5, 256, 64, device="cuda", generator=gen).half() for _ in range(3))
    out, lse = attention_with_lse(q, k, v)
    scores = (q.float() @ k.float().transpose(-1, -2)) / 8.0
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(
        out.float(), torch.softmax(scores, -1) @ v.float(), atol=2e-3, rtol=2e-3
    )

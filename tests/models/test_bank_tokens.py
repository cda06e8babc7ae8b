"""Which layers keep reduced bank frames, and how a frame is pooled (``models/bank_tokens.py``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from livediff.exceptions import ParameterError
from livediff.models.bank_tokens import BankTokens, layer_grid, pooling, stored_tokens


@pytest.mark.parametrize(
    ("tokens", "latent", "grid"),
    [
        (4096, (64, 64), (64, 64)),
        (1024, (64, 64), (32, 32)),
        (1536, (64, 96), (32, 48)),  # 512×768 frames
        (64, (64, 96), None),  # no downsampling of that latent
        (25, (40, 40), (5, 5)),
    ],
)
def test_layer_grid_follows_the_unet_downsampling(
    tokens: int, latent: tuple[int, int], grid: tuple[int, int] | None
) -> None:
    assert layer_grid(tokens, latent) == grid


def test_stored_tokens_per_mode() -> None:
    latent = (64, 64)
    assert stored_tokens(BankTokens.FULL, 1, 4096, latent) == 4096
    assert stored_tokens(BankTokens.MERGED, 4096, 4096, latent) == 2048
    assert stored_tokens(BankTokens.POOLED, 4096, 4096, latent) == 1024
    assert stored_tokens(BankTokens.POOLED, 4096, 1024, latent) == 1024  # below reduce_from
    # a grid with an odd side keeps its frames whole; merging takes any count
    assert stored_tokens(BankTokens.POOLED, 1, 25, (40, 40)) == 25
    assert stored_tokens(BankTokens.MERGED, 1, 25, (40, 40)) == 13
    with pytest.raises(ParameterError, match="latent size"):
        stored_tokens(BankTokens.POOLED, 1, 4096, None)


def test_pooling_averages_the_2x2_blocks_of_a_non_square_grid() -> None:
    x = torch.randn(2, 4 * 6, 3, dtype=torch.float64)  # a 4×6 grid, row-major tokens
    image = x.transpose(1, 2).reshape(2, 3, 4, 6)
    want = F.avg_pool2d(image, 2).reshape(2, 3, -1).transpose(1, 2)
    torch.testing.assert_close(pooling(x, (4, 6)), want, rtol=1e-12, atol=1e-12)
    half = x.half()  # fp16 frames are summed in fp32
    torch.testing.assert_close(pooling(half, (4, 6)), want.half(), rtol=1e-3, atol=1e-3)

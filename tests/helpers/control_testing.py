"""Model inputs for control-image tests: noise with a bright box per row (edges to find)."""

from __future__ import annotations

import torch


def boxed_pixels(seed: int, rows: int, size: tuple[int, int]) -> torch.Tensor:
    """``[rows, 3, *size]`` model inputs in [-1, 1]: dark noise, one flat bright box per row."""
    g = torch.Generator().manual_seed(seed)
    out = torch.rand(rows, 3, *size, generator=g) * 0.2 - 0.6
    for row in range(rows):
        top, left = (int(v) for v in torch.randint(0, 32, (2,), generator=g))
        out[row, :, top : top + 20, left : left + 24] = 0.7
    return out

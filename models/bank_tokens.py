"""How many tokens a feature bank keeps of each frame: all, merged to half, or pooled to a quarter.

A bank of ``F`` frames makes a self-attention of ``T`` tokens attend to ``T + F·T`` keys; on the
largest layers (the five 64×64 layers of SD 2.1 / 1.5 at 512²) those keys are most of the bank's
cost (bench/results/README.md). Frames can go into the bank reduced, on layers of at least a
given number of tokens:

- :attr:`BankTokens.MERGED`: StreamV2V's token merging (``use_tome_cache``, its live demo's
  setting): bipartite soft matching on the keys (``random_bipartite_soft_matching``, ratio 0.5,
  mean), with its random split fixed (the even tokens merge into their most similar other
  token) and each frame merged on its own, so the bank stays a ring of frames (StreamV2V merges
  the cached frame with the new one). ``T + F·⌈T/2⌉`` keys.
- :attr:`BankTokens.POOLED`: each 2×2 block of the layer's token grid averaged into one token
  (a layer whose grid has an odd side keeps its frames whole). ``T + F·T/4`` keys.

Keys, values and (on fusing layers) outputs are reduced alike; the current frame's own tokens
are never reduced.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from enum import Enum

import torch
import torch.nn.functional as F

from livediff.exceptions import ParameterError

Reduce = Callable[[torch.Tensor], torch.Tensor]


class BankTokens(str, Enum):
    FULL = "full"  # every token of every bank frame
    MERGED = "merged"  # half, by StreamV2V's bipartite token merging on the keys
    POOLED = "pooled"  # a quarter, 2×2 average pooling of the token grid


# Layers of at least this many tokens keep reduced bank frames by default: at 512² the 64×64
# layers of SD 2.1 / 1.5, where the bank's keys cost most
DEFAULT_REDUCE_FROM = 4096
DEFAULT_BANK_TOKENS = BankTokens.POOLED


def layer_grid(tokens: int, latent: tuple[int, int]) -> tuple[int, int] | None:
    """The token grid (h, w) of a UNet layer of ``tokens`` over a ``latent`` (h, w) grid, or
    ``None`` when ``tokens`` is no power-of-two downsampling of it."""
    height, width = latent
    factor = math.isqrt(height * width // tokens) if tokens else 0
    if factor < 1 or height % factor or width % factor:
        return None
    grid = (height // factor, width // factor)
    return grid if grid[0] * grid[1] == tokens else None


def stored_tokens(
    mode: BankTokens, reduce_from: int, tokens: int, latent: tuple[int, int] | None
) -> int:
    """Tokens a bank frame keeps of a layer of ``tokens`` (see the module docstring)."""
    if mode is BankTokens.FULL or tokens < max(reduce_from, 2):
        return tokens
    if mode is BankTokens.MERGED:
        return tokens - tokens // 2
    grid = _pooled_grid(tokens, latent)
    return tokens if grid is None else grid[0] * grid[1] // 4


def reduction(
    mode: BankTokens, reduce_from: int, metric: torch.Tensor, latent: tuple[int, int] | None
) -> tuple[int, Reduce | None]:
    """For a frame's tensors like ``metric`` [rows, T, C] (the keys): the tokens the bank keeps
    of it, and the function that reduces them (``None`` when this layer keeps frames whole)."""
    tokens = metric.shape[1]
    kept = stored_tokens(mode, reduce_from, tokens, latent)
    if kept == tokens:
        return tokens, None
    if mode is BankTokens.MERGED:
        return kept, halving(metric)
    grid = _pooled_grid(tokens, latent)
    assert grid is not None
    return kept, lambda tensor: pooling(tensor, grid)


def _pooled_grid(tokens: int, latent: tuple[int, int] | None) -> tuple[int, int] | None:
    if latent is None:
        raise ParameterError("a pooled feature bank needs the call's latent size (BankRows.grid)")
    grid = layer_grid(tokens, latent)
    if grid is None or grid[0] % 2 or grid[1] % 2:
        return None
    return grid


def pooling(tensor: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``tensor`` [rows, h·w, C] (row-major tokens of an ``grid`` (h, w)) averaged over 2×2
    blocks: [rows, h·w/4, C]."""
    rows, _, channels = tensor.shape
    height, width = grid
    blocks = tensor.view(rows, height // 2, 2, width // 2, 2, channels)
    wide = torch.promote_types(tensor.dtype, torch.float32)  # fp16 sums in fp32
    return blocks.to(wide).mean(dim=(2, 4)).to(tensor.dtype).reshape(rows, -1, channels)


def halving(metric: torch.Tensor) -> Reduce:
    """StreamV2V's bipartite soft matching (ratio 0.5) on ``metric`` [rows, T, C], T ≥ 2, with
    its random split fixed: the ``T // 2`` even tokens before the last pair's end are the
    sources, the rest (the odd ones, and a last token of an odd T) the kept tokens. Returns a
    function that merges a tensor of the same tokens to ``T - T // 2``: each kept token
    averaged with the sources whose most similar kept token (cosine of ``metric``) it is, as
    ``scatter_reduce(mean)`` with the kept token included."""
    sources = metric.shape[1] // 2

    def split(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ends = 2 * sources
        kept = tensor[:, 1:ends:2]
        if tensor.shape[1] > ends:  # an odd token count: the last token is kept too
            kept = torch.cat([kept, tensor[:, ends:]], dim=1)
        return tensor[:, 0:ends:2], kept

    src, dst = (F.normalize(t, dim=-1) for t in split(metric))
    nearest = (src @ dst.transpose(1, 2)).argmax(dim=-1)  # [rows, sources]
    counts = torch.ones(dst.shape[:2], device=metric.device, dtype=torch.float32)
    counts = counts.scatter_add(1, nearest, torch.ones_like(nearest, dtype=torch.float32))

    def merge(tensor: torch.Tensor) -> torch.Tensor:
        moved, kept = split(tensor)
        index = nearest[..., None].expand(-1, -1, tensor.shape[-1])
        wide = torch.promote_types(tensor.dtype, torch.float32)  # fp16 sums in fp32
        total = kept.to(wide).scatter_add(1, index, moved.to(wide))
        return (total / counts[..., None]).to(tensor.dtype)

    return merge

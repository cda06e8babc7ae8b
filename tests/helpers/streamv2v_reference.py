"""StreamV2V's cached self-attention, written out plainly for one session (the oracle).

A transcription of ``CachedSTXFormersAttnProcessor`` and ``get_nn_feats`` from StreamV2V
(github.com/Jeff-LiangF/streamv2v, ``src/streamv2v/models/``) with PyTorch's SDPA in place of
xFormers: a deque of the last ``max_frames`` frames' keys, values and outputs per
self-attention, appended every ``interval`` calls; keys and values concatenated after the
current ones; on the mid block and the first two up blocks, outputs blended with their nearest
cached output where the cosine similarity reaches the threshold.

Reduced frames, applied to each frame as it is cached on layers of at least ``reduce_from``
tokens: ``reduce="merged"``, StreamV2V's ``random_bipartite_soft_matching`` (ratio 0.5,
``merge_kv_out``, metric: the keys) transcribed with its random permutation passed in — the
even tokens first, then the rest (StreamV2V merges the cached frame together with the new one;
livediff merges each frame on its own so that its bank stays a ring of frames);
``reduce="pooled"``, ``F.avg_pool2d`` over the layer's square token grid.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F


def get_nn_feats(x: torch.Tensor, y: Any, threshold: float) -> torch.Tensor:
    if isinstance(y, deque):
        y = torch.cat(list(y), dim=1)
    x_norm = F.normalize(x, p=2, dim=-1)
    y_norm = F.normalize(y, p=2, dim=-1)
    cosine_similarity = torch.matmul(x_norm, y_norm.transpose(1, 2))
    max_cosine_values, nearest_neighbors_indices = torch.max(cosine_similarity, dim=-1)
    mask = max_cosine_values < threshold
    indices_expanded = nearest_neighbors_indices.unsqueeze(-1).expand(-1, -1, x_norm.size(-1))
    nearest_neighbor_tensor = torch.gather(y, 1, indices_expanded)
    return torch.where(mask.unsqueeze(-1), x, nearest_neighbor_tensor)


def random_bipartite_soft_matching(
    metric: torch.Tensor, rand_idx: torch.Tensor, ratio: float = 0.5
) -> Callable[..., tuple[torch.Tensor, ...]]:
    B, N, _ = metric.shape
    r = int(ratio * N)
    a_idx = rand_idx[:, :r, :]
    b_idx = rand_idx[:, r:, :]

    def split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        C = x.shape[-1]
        a = x.gather(dim=1, index=a_idx.expand(B, r, C))
        b = x.gather(dim=1, index=b_idx.expand(B, N - r, C))
        return a, b

    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = split(metric)
    scores = a @ b.transpose(-1, -2)
    _, dst_idx = scores.max(dim=-1)
    dst_idx = dst_idx[..., None]

    def merge_kv_out(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        merged = []
        for x in tensors:
            src, dst = split(x)
            C = src.shape[-1]
            merged.append(dst.scatter_reduce(-2, dst_idx.expand(B, r, C), src, reduce="mean"))
        return tuple(merged)

    return merge_kv_out


def evens_first(batch: int, tokens: int) -> torch.Tensor:
    """The permutation livediff fixes: the ``tokens // 2`` even tokens, then the others."""
    evens = list(range(0, 2 * (tokens // 2), 2))
    rest = [t for t in range(tokens) if t not in evens]
    return torch.tensor(evens + rest).view(1, tokens, 1).expand(batch, -1, -1)


def avg_pooled(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each [B, side², C] tensor of a square token grid 2×2-average-pooled: [B, side²/4, C]."""
    pooled = []
    for x in tensors:
        B, N, C = x.shape
        side = math.isqrt(N)
        grid = x.transpose(1, 2).reshape(B, C, side, side)
        pooled.append(F.avg_pool2d(grid, 2).reshape(B, C, -1).transpose(1, 2))
    return tuple(pooled)


class StreamV2VAttention:
    def __init__(
        self,
        name: str,
        *,
        use_feature_injection: bool,
        feature_injection_strength: float,
        feature_similarity_threshold: float,
        interval: int,
        max_frames: int,
        reduce: str = "full",
        reduce_from: int = 0,
    ) -> None:
        self.name = name
        self.reduce = reduce
        self.reduce_from = reduce_from
        self.use_feature_injection = use_feature_injection
        self.fi_strength = feature_injection_strength
        self.threshold = feature_similarity_threshold
        self.frame_id = 0
        self.interval = interval
        self.cached_key: deque[torch.Tensor] = deque(maxlen=max_frames)
        self.cached_value: deque[torch.Tensor] = deque(maxlen=max_frames)
        self.cached_output: deque[torch.Tensor] = deque(maxlen=max_frames)

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **_: Any,
    ) -> torch.Tensor:
        batch_size = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        is_selfattn = encoder_hidden_states is None
        if is_selfattn:
            encoder_hidden_states = hidden_states
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        if is_selfattn:
            cached_key = key.clone()
            cached_value = value.clone()
            if len(self.cached_key) > 0:
                key = torch.cat([key, *self.cached_key], dim=1)
                value = torch.cat([value, *self.cached_value], dim=1)
        head_dim = key.shape[-1] // attn.heads
        q, k, v = (
            t.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            for t in (query, key, value)
        )
        hidden_states = F.scaled_dot_product_attention(q, k, v)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        hidden_states = hidden_states / attn.rescale_output_factor
        if is_selfattn:
            cached_output = hidden_states.clone()
            fusing = any(b in self.name for b in ("up_blocks.0", "up_blocks.1", "mid_block"))
            if self.use_feature_injection and fusing and len(self.cached_output) > 0:
                nn_hidden_states = get_nn_feats(hidden_states, self.cached_output, self.threshold)
                hidden_states = (
                    hidden_states * (1 - self.fi_strength) + self.fi_strength * nn_hidden_states
                )
        if self.frame_id % self.interval == 0 and is_selfattn:
            tokens = cached_key.shape[1]
            cached = (cached_key, cached_value, cached_output)
            if self.reduce == "merged" and self.reduce_from <= tokens:
                merge = random_bipartite_soft_matching(cached_key, evens_first(batch_size, tokens))
                cached_key, cached_value, cached_output = merge(*cached)
            elif self.reduce == "pooled" and self.reduce_from <= tokens:
                cached_key, cached_value, cached_output = avg_pooled(*cached)
            self.cached_key.append(cached_key)
            self.cached_value.append(cached_value)
            self.cached_output.append(cached_output)
        self.frame_id += 1
        return hidden_states


def install_streamv2v(unet: Any, **options: Any) -> None:
    """StreamV2V's processor on every self-attention of ``unet`` (its wrapper's replacement)."""
    for name, module in unet.named_modules():
        if name.endswith(".attn1"):
            module.set_processor(StreamV2VAttention(name, **options))

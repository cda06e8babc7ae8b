"""Prompt encoding (CLIP, and SDXL's two encoders) and weighted prompt blending.

- SD 1.5 / SD 2.1: the text encoder's last hidden state, ``[1, 77, D]``.
- SDXL: the penultimate hidden states of both encoders side by side (768 + 1280 = 2048), the
  second encoder's projected pooled output (1280), and the micro-conditioning time ids
  ``(H, W, 0, 0, H, W)``. An empty SDXL negative prompt is all zeros, as in diffusers.

Blending combines weighted prompts token by token:

- ``linear``: ``sum(w_i * e_i) / sum(w_i)``.
- ``slerp``: spherical interpolation, folded left to right: ``e = slerp(e, e_i, w_i / (W + w_i))``
  with ``W`` the weight so far. For two prompts that is the usual slerp at ``t = w2 / (w1 + w2)``;
  it keeps the embedding's norm where linear blending shrinks it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from livediff.exceptions import ModelLoadError
from livediff.models.blend_method import BlendMethod
from livediff.models.bundle import ModelBundle
from livediff.models.unet_batch import Conditioning

CACHE_SIZE = 64


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-7) -> torch.Tensor:
    """Spherical interpolation along the last dimension; falls back to lerp for parallel vectors."""
    a32, b32 = a.float(), b.float()
    a_n = a32 / a32.norm(dim=-1, keepdim=True).clamp_min(eps)
    b_n = b32 / b32.norm(dim=-1, keepdim=True).clamp_min(eps)
    dot = (a_n * b_n).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    omega = torch.arccos(dot)
    sin_omega = torch.sin(omega)
    parallel = sin_omega.abs() < 1e-4
    safe = torch.where(parallel, torch.ones_like(sin_omega), sin_omega)
    wa = torch.where(parallel, torch.full_like(omega, 1.0 - t), torch.sin((1.0 - t) * omega) / safe)
    wb = torch.where(parallel, torch.full_like(omega, t), torch.sin(t * omega) / safe)
    return (wa * a32 + wb * b32).to(a.dtype)


def blend(parts: Sequence[tuple[torch.Tensor, float]], method: BlendMethod) -> torch.Tensor:
    """Blend tensors of one shape by weight (see module docstring)."""
    if len(parts) == 1:
        return parts[0][0]
    if method is BlendMethod.LINEAR:
        total = sum(weight for _, weight in parts)
        mixed = sum(
            (tensor.float() * (weight / total) for tensor, weight in parts), torch.zeros(())
        )
        return mixed.to(parts[0][0].dtype)
    result, so_far = parts[0][0], parts[0][1]
    for tensor, weight in parts[1:]:
        if weight == 0:
            continue
        t = weight / (so_far + weight) if so_far + weight > 0 else 1.0
        result = slerp(result, tensor, t)
        so_far += weight
    return result


class PromptEncoder:
    """Encodes prompts for one :class:`ModelBundle`, caching the most recent texts."""

    def __init__(self, bundle: ModelBundle, width: int, height: int) -> None:
        self.bundle = bundle
        self.width = width
        self.height = height
        self._cache: OrderedDict[str, Conditioning] = OrderedDict()

    def _time_ids(self) -> torch.Tensor:
        h, w = self.height, self.width
        return torch.tensor(
            [[h, w, 0, 0, h, w]], device=self.bundle.device, dtype=self.bundle.dtype
        )

    @torch.inference_mode()
    def encode_text(self, text: str) -> Conditioning:
        cached = self._cache.get(text)
        if cached is not None:
            self._cache.move_to_end(text)
            return cached
        conditioning = self._encode_uncached(text)
        self._cache[text] = conditioning
        if len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return conditioning

    def _ids(self, tokenizer: object, text: str) -> torch.Tensor:
        tokens = tokenizer(  # type: ignore[operator]
            [text], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        )
        return tokens.input_ids.to(self.bundle.device)

    def _encode_uncached(self, text: str) -> Conditioning:
        bundle = self.bundle
        if not bundle.preset.is_sdxl:
            encoder, tokenizer = bundle.text_encoders[0], bundle.tokenizers[0]
            hidden = encoder(self._ids(tokenizer, text)).last_hidden_state
            return Conditioning(embeds=hidden.to(bundle.dtype))
        hidden_states = []
        pooled = None
        for encoder, tokenizer in zip(bundle.text_encoders, bundle.tokenizers, strict=True):
            output = encoder(self._ids(tokenizer, text), output_hidden_states=True)
            hidden_states.append(output.hidden_states[-2])
            if hasattr(output, "text_embeds"):
                pooled = output.text_embeds
        if pooled is None:
            raise ModelLoadError("SDXL's second text encoder must return text_embeds")
        return Conditioning(
            embeds=torch.cat(hidden_states, dim=-1).to(bundle.dtype),
            pooled=pooled.to(bundle.dtype),
            time_ids=self._time_ids(),
        )

    def encode(
        self, prompt: Sequence[tuple[str, float]], method: BlendMethod = BlendMethod.LINEAR
    ) -> Conditioning:
        """Encode and blend weighted prompts."""
        parts = [(self.encode_text(text), weight) for text, weight in prompt if weight > 0]
        if not parts:
            parts = [(self.encode_text(prompt[0][0]), 1.0)]
        embeds = blend([(c.embeds, w) for c, w in parts], method)
        pooled = None
        if parts[0][0].pooled is not None:
            pooled = blend([(c.pooled, w) for c, w in parts if c.pooled is not None], method)
        return Conditioning(embeds=embeds, pooled=pooled, time_ids=parts[0][0].time_ids)

    def encode_negative(self, text: str) -> Conditioning:
        """The negative side of guidance; SDXL's empty negative prompt is zeros (diffusers' rule)."""
        if self.bundle.preset.is_sdxl and not text:
            positive = self.encode_text("")
            assert positive.pooled is not None
            return Conditioning(
                embeds=torch.zeros_like(positive.embeds),
                pooled=torch.zeros_like(positive.pooled),
                time_ids=positive.time_ids,
            )
        return self.encode_text(text)

"""IP-Adapter per row: every row of a shared UNet call has its own image-prompt tokens and scale.

IP-Adapter (arXiv 2308.06721) adds a second cross-attention to each of the UNet's
cross-attention layers: the layer's query attends to the image-prompt tokens through the
adapter's own key/value projections (``to_k_ip``/``to_v_ip``), and the result, times a scale,
is added to the text attention before the output projection. That is diffusers'
``IPAdapterAttnProcessor2_0``; :class:`RowIPAdapterAttnProcessor` is that class with the
scale read per row from the batch instead of one float per processor:

- ``UNetBatch.ip_tokens`` ``[rows, T, D]``: the row's image-prompt tokens, which the adapter's
  image projection made from the row's image off the hot path
  (:mod:`livediff.models.image_prompts`). ``T`` is 4 (plain) or 16 (plus), ``D`` the UNet's
  cross-attention width; both are fixed by the loaded adapter, so the shapes are static.
- ``UNetBatch.ip_scales`` ``[rows]``: the row's scale; 0 turns the adapter off for that row.

There is no branch on values (CUDA graphs, ``torch.compile(fullgraph=True)``): a scale-0 row
still runs the image attention and adds ``0 * x``, so it gets exactly the plain UNet's output.
A call without these inputs takes the plain processors' path: the text attention is written as
diffusers' ``AttnProcessor2_0`` / ``FusedAttnProcessor2_0`` write it (fused QKV included), so
installing an adapter changes nothing for calls that do not use it.

The tokens reach the processors as ``encoder_hidden_states=(text, tokens, scales)``, as
diffusers hands its processors ``(text, [tokens])``; the ControlNets of the call see the text
embeddings alone, as in diffusers' ControlNet pipelines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, IPAdapterAttnProcessor2_0

from livediff.exceptions import BatchCompositionError, ModelLoadError
from livediff.models.ip_adapter_spec import IPAdapterVariant
from livediff.models.presets import Family

ImagePromptInputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # text, tokens, scales


class RowIPAdapterAttnProcessor(IPAdapterAttnProcessor2_0):
    """diffusers' IP-Adapter cross-attention with a scale per row (``to_k_ip.0``/``to_v_ip.0``)."""

    def __init__(self, hidden_size: int, cross_attention_dim: int, num_tokens: int) -> None:
        super().__init__(hidden_size, cross_attention_dim, num_tokens=(num_tokens,), scale=1.0)

    def __call__(  # type: ignore[override]
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | ImagePromptInputs | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        image: tuple[torch.Tensor, torch.Tensor] | None = None
        if isinstance(encoder_hidden_states, tuple):
            encoder_hidden_states, tokens, scales = encoder_hidden_states
            image = (tokens, scales)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(
                attention_mask, sequence_length, batch_size
            )
            attention_mask = attention_mask.view(
                batch_size, attn.heads, -1, attention_mask.shape[-1]
            )
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query, key, value = _projections(attn, hidden_states, encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        if image is not None:
            hidden_states = hidden_states + self._image_attention(attn, query, *image)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(
                batch_size, channel, height, width
            )
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _image_attention(
        self, attn: Attention, query: torch.Tensor, tokens: torch.Tensor, scales: torch.Tensor
    ) -> torch.Tensor:
        """``scale * attention(query, image tokens)`` per row, as diffusers computes it."""
        batch_size = query.shape[0]
        head_dim = query.shape[-1]
        ip_key = self.to_k_ip[0](tokens).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        ip_value = (
            self.to_v_ip[0](tokens).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        )
        image = F.scaled_dot_product_attention(
            query, ip_key, ip_value, attn_mask=None, dropout_p=0.0, is_causal=False
        )
        image = image.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        return scales.to(query.dtype).view(-1, 1, 1) * image.to(query.dtype)


def _projections(
    attn: Attention, hidden_states: torch.Tensor, context: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Query, key, value as ``AttnProcessor2_0`` (or, fused, ``FusedAttnProcessor2_0``) makes them."""
    fused = bool(getattr(attn, "fused_projections", False))
    if context is None:
        if fused:
            qkv = attn.to_qkv(hidden_states)
            query, key, value = torch.split(qkv, qkv.shape[-1] // 3, dim=-1)
            return query, key, value
        context = hidden_states
    elif attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    query = attn.to_q(hidden_states)
    if fused:
        kv = attn.to_kv(context)
        key, value = torch.split(kv, kv.shape[-1] // 2, dim=-1)
        return query, key, value
    return query, attn.to_k(context), attn.to_v(context)


@dataclass
class LoadedIPAdapter:
    """One IP-Adapter on the model's device and dtype.

    ``processors`` maps the UNet's cross-attention processor names (``…attn2.processor``) to
    their :class:`RowIPAdapterAttnProcessor`; ``projection`` is diffusers' ``ImageProjection``
    (plain) or ``IPAdapterPlusImageProjection`` (plus); ``image_encoder`` the CLIP vision
    model (``CLIPVisionModelWithProjection``) with ``image_size`` its input side.
    """

    name: str
    variant: IPAdapterVariant
    family: Family
    processors: dict[str, RowIPAdapterAttnProcessor]
    projection: Any
    image_encoder: Any
    num_tokens: int
    token_dim: int
    source: str

    @property
    def image_size(self) -> int:
        return int(self.image_encoder.config.image_size)

    @property
    def token_shape(self) -> tuple[int, int]:
        """``(T, D)`` of one row's ``ip_tokens``."""
        return self.num_tokens, self.token_dim

    def describe(self) -> str:
        return f"IP-Adapter {self.name!r} ({self.variant.value}, {self.family.label}, from {self.source})"

    def install(self, unet: Any) -> None:
        """Put the adapter's processors on ``unet``'s cross-attention layers, keep the others.

        Calls without image-prompt inputs give what they gave before (see the module
        docstring); the speed recipe calls this again after it resets the processors.
        """
        current = dict(unet.attn_processors)
        missing = sorted(set(self.processors) - set(current))
        if missing:
            raise ModelLoadError(
                f"{self.describe()} does not fit this UNet: it has no layer {missing[0]}",
                field="ip_adapter",
            )
        unet.set_attn_processor({name: self.processors.get(name, p) for name, p in current.items()})


def check_ip_inputs(
    adapter: LoadedIPAdapter | None,
    latents: torch.Tensor,
    tokens: torch.Tensor | None,
    scales: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shapes only (static under compile): one token block and one scale per row."""
    if tokens is None or scales is None:
        raise BatchCompositionError(
            "a batch with IP-Adapter inputs needs both ip_tokens and ip_scales",
            field="ip_tokens" if tokens is None else "ip_scales",
        )
    if adapter is None:
        raise BatchCompositionError(
            "the batch carries image-prompt tokens but the model has no IP-Adapter loaded",
            field="ip_tokens",
        )
    rows = latents.shape[0]
    expected = (rows, *adapter.token_shape)
    if tuple(tokens.shape) != expected:
        raise BatchCompositionError(
            f"ip_tokens is {tuple(tokens.shape)}; expected {expected} "
            f"(rows, the {adapter.variant.value} adapter's tokens, the UNet's cross-attention width)",
            field="ip_tokens",
        )
    if tuple(scales.shape) != (rows,):
        raise BatchCompositionError(
            f"ip_scales is {tuple(scales.shape)}; expected {(rows,)}", field="ip_scales"
        )
    return tokens, scales

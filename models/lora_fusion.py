"""Fused q/k/v projections in a UNet whose projections carry per-session LoRAs.

The speed recipe's ``fuse_qkv`` step (diffusers' ``Attention.fuse_projections``) concatenates
a self-attention's ``to_q``/``to_k``/``to_v`` weights into one ``to_qkv`` linear, and a
cross-attention's ``to_k``/``to_v`` into ``to_kv``, so its fused processors make one GEMM of
three. Per-session LoRA layers (:class:`~livediff.models.lora_layers.LoraRowsLinear`) have no
weight of their own on purpose, so diffusers' step refuses them; :func:`fuse_projections`
makes the same fusion for them: the fused base linear from the parts' base weights, and a
LoRA layer over the store's fused pair (:meth:`LoraStore.fuse`: the parts' down projections
side by side, their up projections block diagonal), so one kernel call adds every part's
update. ``x·W_qkv + Σ scale·(x·A)·B`` is then exactly ``[q | k | v]`` with each part's own
LoRAs, and loading, unloading and merging by layer name go on unchanged.

The fused pair holds ``parts × max_rank`` ranks, which the kernel takes up to
:data:`~livediff.models.lora_store.MAX_RANK` (:func:`fits`); a library of larger ranks keeps
the projections separate (:func:`livediff.models.backends.recipe_for` says so).
"""

from __future__ import annotations

from typing import Any, cast

import torch
from diffusers.models.attention_processor import Attention, FusedAttnProcessor2_0

from livediff.exceptions import ModelLoadError
from livediff.models.lora_layers import LoraRowsLinear, RowSelection
from livediff.models.lora_store import MAX_RANK, LoraCapacity, LoraStore

SELF_PARTS = ("to_q", "to_k", "to_v")
CROSS_PARTS = ("to_k", "to_v")


def fits(capacity: LoraCapacity) -> bool:
    """Whether a self-attention's three projections' LoRAs fit one kernel call."""
    return capacity.max_rank * len(SELF_PARTS) <= MAX_RANK


def fuse_projections(unet: Any, store: LoraStore, selection: RowSelection) -> int:
    """Fuse every attention's projections of ``unet`` in place, LoRA layers included, and
    switch it to diffusers' fused processors; returns how many attentions were fused."""
    if not fits(store.capacity):
        raise ModelLoadError(
            f"per-session LoRAs of max_rank {store.capacity.max_rank} cannot share a fused "
            f"q/k/v call (rank {store.capacity.max_rank * len(SELF_PARTS)} > {MAX_RANK}): "
            "keep fuse_qkv off"
        )
    count = 0
    for name, attn in unet.named_modules():
        if not isinstance(attn, Attention):
            continue
        if getattr(attn, "fused_projections", False):
            raise ModelLoadError(f"{name} has its projections fused already")
        parts = CROSS_PARTS if attn.is_cross_attention else SELF_PARTS
        layers = [getattr(attn, part) for part in parts]
        with_lora = [isinstance(layer, LoraRowsLinear) for layer in layers]
        if not any(with_lora):
            attn.fuse_projections(fuse=True)
        elif all(with_lora):
            fused = "to_kv" if attn.is_cross_attention else "to_qkv"
            names = [f"{name}.{part}" for part in parts]
            a, b = store.fuse(names, f"{name}.{fused}")
            for layer, part_name in zip(layers, names, strict=True):
                layer.a, layer.b = store.buffers[part_name]  # views: the old buffers are freed
            setattr(attn, fused, LoraRowsLinear(_fused_base(name, layers), a, b, selection))
            attn.fused_projections = True
        else:
            raise ModelLoadError(f"{name}: some of {', '.join(parts)} carry LoRA layers, some not")
        count += 1
    unet.set_attn_processor(FusedAttnProcessor2_0())
    return count


@torch.no_grad()
def _fused_base(name: str, layers: list[LoraRowsLinear]) -> torch.nn.Linear:
    kinds = {type(layer.base) for layer in layers}
    if kinds != {torch.nn.Linear}:
        names = ", ".join(sorted(kind.__name__ for kind in kinds))
        raise ModelLoadError(f"{name}: only plain linear projections fuse, not {names}")
    bases = [cast(torch.nn.Linear, layer.base) for layer in layers]
    weight = torch.cat([base.weight for base in bases])
    has_bias = bases[0].bias is not None
    fused = torch.nn.Linear(
        weight.shape[1], weight.shape[0], bias=has_bias, device=weight.device, dtype=weight.dtype
    )
    fused.weight.copy_(weight)
    if has_bias:
        fused.bias.copy_(torch.cat([base.bias for base in bases]))
    return fused.requires_grad_(False)

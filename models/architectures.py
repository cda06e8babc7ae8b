"""Build a preset's networks from its architecture configs, with random weights, offline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from livediff.models.presets import ModelPreset
from livediff.models.tokenizer import byte_level_clip_tokenizer


@dataclass
class Components:
    """Networks and tokenizers of one model, before they are placed on a device."""

    unet: UNet2DConditionModel
    text_encoders: tuple[Any, ...]
    tokenizers: tuple[Any, ...]
    tiny_vae: AutoencoderTiny | None = None
    full_vae: AutoencoderKL | None = None


def build_text_encoder(config: dict[str, Any], with_projection: bool) -> Any:
    clip_config = CLIPTextConfig(**config)
    if with_projection:
        return CLIPTextModelWithProjection(clip_config)
    return CLIPTextModel(clip_config)


def build_tiny_vae(preset: ModelPreset) -> AutoencoderTiny:
    return AutoencoderTiny(**preset.tiny_vae_config)


def build_full_vae(preset: ModelPreset) -> AutoencoderKL:
    return AutoencoderKL(**preset.full_vae_config, scaling_factor=preset.vae_scaling_factor)


def build_random(
    preset: ModelPreset,
    *,
    seed: int = 0,
    tiny_vae: bool = True,
    full_vae: bool = False,
    device: torch.device | str = "cpu",
) -> Components:
    """The preset's exact architecture with seeded random weights.

    Tokenizers are the offline byte-level CLIP tokenizer (see :mod:`livediff.models.tokenizer`).
    Weights are drawn on the CPU whatever ``device`` is, so a seed gives the same model on
    every device (the caller moves it; a large model takes a few seconds longer to build).
    """
    del device  # kept for callers; weights are always initialised on the CPU (see above)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(preset.unet_config)
        encoders = tuple(
            build_text_encoder(
                cfg, with_projection=preset.is_sdxl and i == len(preset.text_configs) - 1
            )
            for i, cfg in enumerate(preset.text_configs)
        )
        return Components(
            unet=unet,
            text_encoders=encoders,
            tokenizers=tuple(byte_level_clip_tokenizer() for _ in encoders),
            tiny_vae=build_tiny_vae(preset) if tiny_vae else None,
            full_vae=build_full_vae(preset) if full_vae else None,
        )

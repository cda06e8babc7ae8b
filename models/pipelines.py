"""A diffusers pipeline view of loaded components, for what diffusers does at pipeline level:
fusing LoRAs and saving a model folder."""

from __future__ import annotations

import logging
from typing import Any

from diffusers import LCMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

from livediff.models.architectures import Components
from livediff.models.fetch import fetch
from livediff.models.presets import LoraRef, ModelPreset

log = logging.getLogger(__name__)


def fuse_loras(
    preset: ModelPreset,
    components: Components,
    scheduler_config: dict[str, Any],
    loras: tuple[LoraRef, ...],
    offline: bool,
) -> None:
    """Fuse each LoRA into the UNet / text encoder weights, then drop the LoRA layers."""
    if not loras:
        return
    pipeline = as_pipeline(preset, components, scheduler_config)
    for index, lora in enumerate(loras):
        name = f"lora_{index}"
        kwargs: dict[str, Any] = {"adapter_name": name}
        if not preset.is_sdxl:
            # diffusers renumbers kohya keys in the original UNet's names (input_blocks_1_1_…)
            # only when it is given the UNet config; its SDXL loader passes it itself.
            kwargs["unet_config"] = pipeline.unet.config
        if lora.weight_name:
            kwargs["weight_name"] = lora.weight_name

        def load(local: bool, lora: LoraRef = lora, kwargs: dict[str, Any] = kwargs) -> None:
            pipeline.load_lora_weights(lora.source, local_files_only=local, **kwargs)

        fetch("LoRA", lora.source, offline, load)
        pipeline.fuse_lora(lora_scale=lora.scale, adapter_names=[name])
        log.info("fused LoRA %s at scale %.3g", lora.source, lora.scale)
    pipeline.unload_lora_weights()


def as_pipeline(
    preset: ModelPreset, components: Components, scheduler_config: dict[str, Any]
) -> Any:
    scheduler = LCMScheduler.from_config(scheduler_config)
    if preset.is_sdxl:
        return StableDiffusionXLPipeline(
            vae=components.full_vae,
            text_encoder=components.text_encoders[0],
            text_encoder_2=components.text_encoders[1],
            tokenizer=components.tokenizers[0],
            tokenizer_2=components.tokenizers[1],
            unet=components.unet,
            scheduler=scheduler,
        )
    return StableDiffusionPipeline(
        vae=components.full_vae,
        text_encoder=components.text_encoders[0],
        tokenizer=components.tokenizers[0],
        unet=components.unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )

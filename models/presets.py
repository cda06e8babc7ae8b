"""Model presets: what each supported model is, where it comes from, and its exact architecture.

The architecture configs below are the ones the pretrained checkpoints ship with
(``unet/config.json``, ``text_encoder/config.json`` …). They let ``weights="random"`` build the
same network offline, which is what benchmarks measure (weight values do not change speed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from livediff.exceptions import ParameterError


class Family(str, Enum):
    """Model families differ in text encoders and UNet conditioning."""

    SD15 = "sd15"  # CLIP ViT-L/14, 768-d
    SD21 = "sd21"  # OpenCLIP ViT-H/14, 1024-d
    SDXL = "sdxl"  # CLIP ViT-L + OpenCLIP bigG, pooled embeds + time ids

    @property
    def label(self) -> str:
        """How people name the family: ``SD 1.5``, ``SD 2.1``, ``SDXL``."""
        return {"sd15": "SD 1.5", "sd21": "SD 2.1", "sdxl": "SDXL"}[self.value]


SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "timestep_scaling": 10.0,
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
}

_CLIP_L: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
    "vocab_size": 49408,
    "max_position_embeddings": 77,
}
_OPENCLIP_H: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 23,
    "hidden_act": "gelu",
    "projection_dim": 512,
    "vocab_size": 49408,
    "max_position_embeddings": 77,
}
_OPENCLIP_BIGG: dict[str, Any] = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "hidden_act": "gelu",
    "projection_dim": 1280,
    "vocab_size": 49408,
    "max_position_embeddings": 77,
}

_SD_DOWN = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
_SD_UP = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]

_UNET_SD15: dict[str, Any] = {
    "sample_size": 64,
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": _SD_DOWN,
    "up_block_types": _SD_UP,
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
}
_UNET_SD21: dict[str, Any] = {
    "sample_size": 64,
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": _SD_DOWN,
    "up_block_types": _SD_UP,
    "layers_per_block": 2,
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "use_linear_projection": True,
}
_UNET_SDXL: dict[str, Any] = {
    "sample_size": 64,
    "block_out_channels": [320, 640, 1280],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 2,
    "attention_head_dim": [5, 10, 20],
    "transformer_layers_per_block": [1, 2, 10],
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
_TAESD: dict[str, Any] = {}  # AutoencoderTiny's defaults are TAESD / TAESDXL
_VAE_KL: dict[str, Any] = {
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 512,
}

# A few-MB model with the same structure (SD1.5-style), for tests and CI.
_TINY_UNET: dict[str, Any] = {
    "sample_size": 16,
    "block_out_channels": [32, 64],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 1,
    "attention_head_dim": 8,
    "cross_attention_dim": 32,
    "norm_num_groups": 32,
}
_TINY_TEXT: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "hidden_act": "quick_gelu",
    "projection_dim": 32,
    "vocab_size": 1000,
    "max_position_embeddings": 77,
}
_TINY_TAESD: dict[str, Any] = {
    "encoder_block_out_channels": [16, 16, 16, 16],
    "decoder_block_out_channels": [16, 16, 16, 16],
    "num_encoder_blocks": [1, 1, 1, 1],
    "num_decoder_blocks": [1, 1, 1, 1],
}
_TINY_VAE_KL: dict[str, Any] = {
    "block_out_channels": [8, 16, 16, 16],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 128,
}


@dataclass(frozen=True)
class LoraRef:
    """A LoRA to fuse at load: a HF id, a local folder or a ``.safetensors`` file, and a scale."""

    source: str
    scale: float = 1.0
    weight_name: str | None = None

    def __post_init__(self) -> None:
        if not self.source:
            raise ParameterError("a LoRA needs a source (HF id, folder or .safetensors file)")
        if not -10.0 <= self.scale <= 10.0:
            raise ParameterError(f"LoRA scale={self.scale} is out of range: expected [-10, 10]")


@dataclass(frozen=True)
class ModelPreset:
    """Everything livediff needs to know about one supported model."""

    name: str
    family: Family
    hf_id: str | None  # default pretrained source; None: the preset has no public weights
    width: int
    height: int
    tiny_vae_id: str | None
    full_vae_id: str | None  # None: the VAE in the main repo's ``vae`` subfolder
    unet_config: dict[str, Any]
    text_configs: tuple[dict[str, Any], ...]
    tiny_vae_config: dict[str, Any]
    full_vae_config: dict[str, Any]
    vae_scaling_factor: float
    default_strength: float = 0.5
    default_steps: int = 1
    loras: tuple[LoraRef, ...] = ()
    description: str = ""
    scheduler_config: dict[str, Any] = field(default_factory=lambda: dict(SCHEDULER_CONFIG))

    @property
    def is_sdxl(self) -> bool:
        return self.family is Family.SDXL


PRESETS: dict[str, ModelPreset] = {
    preset.name: preset
    for preset in (
        ModelPreset(
            name="sd-turbo",
            family=Family.SD21,
            hf_id="stabilityai/sd-turbo",
            width=512,
            height=512,
            tiny_vae_id="madebyollin/taesd",
            full_vae_id=None,
            unet_config=_UNET_SD21,
            text_configs=(_OPENCLIP_H,),
            tiny_vae_config=_TAESD,
            full_vae_config=_VAE_KL,
            vae_scaling_factor=0.18215,
            description="SD-Turbo (SD 2.1 distilled), 1–4 steps, 512².",
        ),
        ModelPreset(
            name="sdxl-turbo",
            family=Family.SDXL,
            hf_id="stabilityai/sdxl-turbo",
            width=512,
            height=512,
            tiny_vae_id="madebyollin/taesdxl",
            full_vae_id="madebyollin/sdxl-vae-fp16-fix",  # the stock SDXL VAE overflows in fp16
            unet_config=_UNET_SDXL,
            text_configs=(_CLIP_L, _OPENCLIP_BIGG),
            tiny_vae_config=_TAESD,
            full_vae_config=_VAE_KL,
            vae_scaling_factor=0.13025,
            description="SDXL-Turbo, 1–4 steps, 512².",
        ),
        ModelPreset(
            name="sd15-lcm",
            family=Family.SD15,
            hf_id="stable-diffusion-v1-5/stable-diffusion-v1-5",
            width=512,
            height=512,
            tiny_vae_id="madebyollin/taesd",
            full_vae_id=None,
            unet_config=_UNET_SD15,
            text_configs=(_CLIP_L,),
            tiny_vae_config=_TAESD,
            full_vae_config=_VAE_KL,
            vae_scaling_factor=0.18215,
            default_steps=2,
            loras=(LoraRef("latent-consistency/lcm-lora-sdv1-5", 1.0),),
            description="Any SD 1.5 checkpoint with LCM-LoRA fused, 2–4 steps, 512².",
        ),
        ModelPreset(
            name="tiny",
            family=Family.SD15,
            hf_id=None,
            width=128,
            height=128,
            tiny_vae_id=None,
            full_vae_id=None,
            unet_config=_TINY_UNET,
            text_configs=(_TINY_TEXT,),
            tiny_vae_config=_TINY_TAESD,
            full_vae_config=_TINY_VAE_KL,
            vae_scaling_factor=0.18215,
            description="A few-MB SD1.5-shaped model for tests; pretrained means a local folder.",
        ),
    )
}


def get_preset(name: str) -> ModelPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ParameterError(
            f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}"
        ) from None

"""Write a diffusers SD1.5-style pipeline as one checkpoint in the original LDM (CompVis) layout.

Community checkpoints (``model.safetensors``) keep the UNet under ``model.diffusion_model.``,
the VAE under ``first_stage_model.`` and the CLIP text encoder under
``cond_stage_model.transformer.``. Tests can only build models in diffusers format, so this is
the inverse of diffusers' ``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint`` and
``convert_ldm_clip_checkpoint``. It works for any int ``layers_per_block`` and number of levels.

Every conversion is checked by running diffusers' own forward conversion on the result: it
must give back every original tensor, bit for bit, and nothing else. A wrong mapping therefore
fails here, not as a silently half-initialised model in a later test.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_controlnet_checkpoint,
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)
from safetensors.torch import save_file
from transformers import CLIPTextModel

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."

_UNET_TOP_LEVEL = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL-style text_time conditioning
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_VAE_TOP_LEVEL = {"conv_norm_out": "norm_out"}  # conv_in, conv_out keep their names
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}  # norm1, conv1, norm2, conv2 keep theirs
_VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}
_VAE_ATTENTION_LINEAR = ("q.weight", "k.weight", "v.weight", "proj_out.weight")

_UNET_BLOCK = re.compile(
    r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)"
)
_UNET_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")
_VAE_BLOCK = re.compile(
    r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)"
)
_VAE_MID = re.compile(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)")


class ConversionError(AssertionError):
    """The LDM checkpoint would not load back into the same weights."""


def _rename_first(rest: str, table: Mapping[str, str]) -> str:
    for old, new in table.items():
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old) :]
    return rest


def _unet_key(key: str, layers_per_block: int, up_blocks_with_attention: set[int]) -> str:
    stride = layers_per_block + 1  # LDM numbers resnets and the resampler of a level together
    if match := _UNET_BLOCK.fullmatch(key):
        side, level, kind, index, rest = match.groups()
        level_i, index_i = int(level), int(index)
        if side == "down":
            if kind == "downsamplers":
                return f"input_blocks.{1 + level_i * stride + layers_per_block}.0.op.{rest.removeprefix('conv.')}"
            slot = "0" if kind == "resnets" else "1"
            inner = _rename_first(rest, _UNET_RESNET) if kind == "resnets" else rest
            return f"input_blocks.{1 + level_i * stride + index_i}.{slot}.{inner}"
        if kind == "upsamplers":
            slot = 2 if level_i in up_blocks_with_attention else 1
            return f"output_blocks.{level_i * stride + layers_per_block}.{slot}.{rest}"
        slot = "0" if kind == "resnets" else "1"
        inner = _rename_first(rest, _UNET_RESNET) if kind == "resnets" else rest
        return f"output_blocks.{level_i * stride + index_i}.{slot}.{inner}"
    if match := _UNET_MID.fullmatch(key):
        kind, index, rest = match.groups()
        if kind == "resnets":  # resnet, attention, resnet
            return f"middle_block.{2 * int(index)}.{_rename_first(rest, _UNET_RESNET)}"
        return f"middle_block.{2 * int(index) + 1}.{rest}"
    renamed = _rename_first(key, _UNET_TOP_LEVEL)
    if renamed == key:
        raise ConversionError(f"no LDM name for UNet parameter {key!r}")
    return renamed


def unet_to_ldm(
    state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """A UNet2DConditionModel state dict → ``model.diffusion_model.*`` keys."""
    layers_per_block = config["layers_per_block"]
    if not isinstance(layers_per_block, int):
        raise ConversionError("LDM checkpoints have one layers_per_block for every level")
    with_attention = {
        int(k.split(".")[1])
        for k in state_dict
        if k.startswith("up_blocks.") and ".attentions." in k
    }
    return {
        UNET_PREFIX + _unet_key(k, layers_per_block, with_attention): v
        for k, v in state_dict.items()
    }


def _vae_key(key: str, levels: int) -> str:
    if match := _VAE_BLOCK.fullmatch(key):
        coder, side, level, kind, index, rest = match.groups()
        # the decoder's levels are numbered from the lowest resolution in LDM
        ldm_level = int(level) if side == "down" else levels - 1 - int(level)
        if kind == "resnets":
            return f"{coder}.{side}.{ldm_level}.block.{index}.{_rename_first(rest, _VAE_RESNET)}"
        resample = "downsample" if kind == "downsamplers" else "upsample"
        return f"{coder}.{side}.{ldm_level}.{resample}.{rest}"
    if match := _VAE_MID.fullmatch(key):
        coder, kind, index, rest = match.groups()
        if kind == "resnets":
            return f"{coder}.mid.block_{int(index) + 1}.{_rename_first(rest, _VAE_RESNET)}"
        return f"{coder}.mid.attn_{int(index) + 1}.{_rename_first(rest, _VAE_ATTENTION)}"
    coder, _, rest = key.partition(".")
    if coder in ("encoder", "decoder"):
        return f"{coder}.{_rename_first(rest, _VAE_TOP_LEVEL)}"
    if key.split(".")[0] in ("quant_conv", "post_quant_conv"):
        return key
    raise ConversionError(f"no LDM name for VAE parameter {key!r}")


def vae_to_ldm(
    state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """An AutoencoderKL state dict → ``first_stage_model.*`` keys (attention as 1×1 convs, as LDM has it)."""
    levels = len(config["block_out_channels"])
    converted = {}
    for key, value in state_dict.items():
        ldm_key = _vae_key(key, levels)
        if ldm_key.endswith(_VAE_ATTENTION_LINEAR) and ".mid.attn_" in ldm_key:
            value = value[:, :, None, None]
        converted[VAE_PREFIX + ldm_key] = value
    return converted


def clip_to_ldm(text_encoder: CLIPTextModel) -> dict[str, torch.Tensor]:
    """A CLIPTextModel → ``cond_stage_model.transformer.text_model.*`` keys.

    transformers ≥ 5.6 dropped the ``text_model`` wrapper of ``CLIPTextModel``; the original
    checkpoints (a wrapped ``CLIPTextModel`` inside ``FrozenCLIPEmbedder``) still have it.
    """
    wrapped = hasattr(text_encoder, "text_model")
    return {
        CLIP_PREFIX + (k if wrapped else f"text_model.{k}"): v
        for k, v in text_encoder.state_dict().items()
    }


def _assert_same(
    what: str, expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor]
) -> None:
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if missing or extra:
        raise ConversionError(f"{what}: round trip lost {missing[:5]} and invented {extra[:5]}")
    for key, value in expected.items():
        back = got[key]
        if back.shape != value.shape or back.dtype != value.dtype or not torch.equal(back, value):
            raise ConversionError(f"{what}: {key} does not survive the round trip")


def pipeline_to_ldm(
    unet: UNet2DConditionModel, text_encoder: CLIPTextModel, vae: AutoencoderKL
) -> dict[str, torch.Tensor]:
    """One LDM-layout state dict for the three networks, verified against diffusers' forward conversion."""
    unet_sd, vae_sd = unet.state_dict(), vae.state_dict()
    clip_sd = text_encoder.state_dict()
    checkpoint = {
        **unet_to_ldm(unet_sd, unet.config),
        **vae_to_ldm(vae_sd, vae.config),
        **clip_to_ldm(text_encoder),
    }
    # the forward converters each get the whole file, as from_single_file gives it to them
    _assert_same("UNet", unet_sd, convert_ldm_unet_checkpoint(checkpoint, dict(unet.config)))
    _assert_same("VAE", vae_sd, convert_ldm_vae_checkpoint(checkpoint, dict(vae.config)))
    clip_back = convert_ldm_clip_checkpoint(checkpoint)
    if not hasattr(text_encoder, "text_model"):
        clip_back = {k.removeprefix("text_model."): v for k, v in clip_back.items()}
    _assert_same("text encoder", clip_sd, clip_back)
    return checkpoint


def save_ldm_checkpoint(model_dir: str | Path, path: str | Path) -> Path:
    """Read a diffusers SD1.5-style folder and write its UNet, text encoder and VAE as one LDM ``.safetensors``."""
    model_dir, path = Path(model_dir), Path(path)
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    text_encoder = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae")
    checkpoint = pipeline_to_ldm(unet, text_encoder, vae)
    save_file({k: v.contiguous() for k, v in checkpoint.items()}, str(path))
    return path


CONTROLNET_PREFIX = "control_model."
_CONTROLNET_ONLY = re.compile(
    r"controlnet_cond_embedding\.(conv_in|conv_out|blocks\.(\d+))\.(.+)"
    r"|controlnet_down_blocks\.(\d+)\.(.+)|controlnet_mid_block\.(.+)"
)


def _controlnet_key(key: str, layers_per_block: int, hint_blocks: int) -> str:
    if match := _CONTROLNET_ONLY.fullmatch(key):
        part, block, rest, zero, zero_rest, mid_rest = match.groups()
        if part == "conv_in":
            return f"input_hint_block.0.{rest}"
        if part == "conv_out":
            return f"input_hint_block.{2 * (hint_blocks + 1)}.{rest}"
        if block is not None:
            return f"input_hint_block.{2 * (int(block) + 1)}.{rest}"
        if zero is not None:
            return f"zero_convs.{zero}.0.{zero_rest}"
        return f"middle_block_out.0.{mid_rest}"
    return _unet_key(key, layers_per_block, set())


def controlnet_to_ldm(
    controlnet: Any, *, prefix: str = CONTROLNET_PREFIX
) -> dict[str, torch.Tensor]:
    """A diffusers ``ControlNetModel`` → the original ControlNet layout (``input_hint_block``,
    ``zero_convs``, ``middle_block_out`` …), under ``prefix`` as in the released ``.pth`` files
    (``""``: as thibaud's SD 2.1 files have it), verified by diffusers' forward conversion."""
    state = controlnet.state_dict()
    config = dict(controlnet.config)
    hint_blocks = sum(1 for k in state if k.startswith("controlnet_cond_embedding.blocks.")) // 2
    checkpoint = {
        prefix + _controlnet_key(k, config["layers_per_block"], hint_blocks): v
        for k, v in state.items()
    }
    _assert_same("ControlNet", state, convert_controlnet_checkpoint(checkpoint, config))
    return checkpoint

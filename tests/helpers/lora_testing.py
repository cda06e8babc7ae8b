"""Tiny UNets with linear projections and LoRA files written by hand in both key formats.

The files are real ``.safetensors`` files, laid out as diffusers / PEFT and as kohya / A1111
write them; nothing here uses livediff's LoRA code, so tests can compare against them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

# SD 2.1-like: linear proj_in / proj_out, cross attention, two levels.
TINY_LINEAR_UNET: dict[str, Any] = {
    "sample_size": 8,
    "block_out_channels": [32, 64],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 1,
    "attention_head_dim": 8,
    "cross_attention_dim": 24,
    "norm_num_groups": 8,
    "use_linear_projection": True,
}
TARGETS = (
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
    "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out",
)  # fmt: skip


def tiny_unet(seed: int = 0, **overrides: Any) -> UNet2DConditionModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config({**TINY_LINEAR_UNET, **overrides})
    return unet.eval().requires_grad_(False)


def linear_targets(unet: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """Every linear layer a LoRA of these tests touches, found independently of livediff."""
    return {
        name: module
        for name, module in unet.named_modules()
        if isinstance(module, torch.nn.Linear) and any(name.endswith(t) for t in TARGETS)
    }


def conv_targets(unet: torch.nn.Module) -> dict[str, torch.nn.Conv2d]:
    """The 1×1 convolution ``proj_in`` / ``proj_out`` of a UNet with
    ``use_linear_projection=False`` (SD 1.5's), found independently of livediff."""
    return {
        name: module
        for name, module in unet.named_modules()
        if isinstance(module, torch.nn.Conv2d)
        and name.endswith(("proj_in", "proj_out"))
        and module.kernel_size == (1, 1)
    }


def random_conv_lora(
    unet: torch.nn.Module, rank: int, seed: int, *, strength: float = 0.3
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module: (down [rank, in, 1, 1], up [out, rank, 1, 1])}`` on every 1×1 ``proj_in`` /
    ``proj_out`` convolution, as kohya and PEFT write a convolution LoRA."""
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for name, conv in sorted(conv_targets(unet).items()):
        down = torch.randn(rank, conv.in_channels, 1, 1, generator=gen) / conv.in_channels**0.5
        up = torch.randn(conv.out_channels, rank, 1, 1, generator=gen) * strength / rank**0.5
        layers[name] = (down, up)
    return layers


def random_lora(
    unet: torch.nn.Module, rank: int, seed: int, *, every: int = 1, strength: float = 0.3
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module: (down [rank, in], up [out, rank])}`` on every ``every``-th target layer; up is
    not zero (trained LoRAs' are not), so each layer's update shows."""
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for index, (name, module) in enumerate(sorted(linear_targets(unet).items())):
        if index % every:
            continue
        down = torch.randn(rank, module.in_features, generator=gen) / module.in_features**0.5
        up = torch.randn(module.out_features, rank, generator=gen) * strength / rank**0.5
        layers[name] = (down, up)
    return layers


def save_peft(
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]], path: Path, alpha: float | None = None
) -> Path:
    """diffusers' layout: ``unet.<module>.lora_A.weight`` / ``lora_B.weight``; ``alpha`` goes
    into ``lora_adapter_metadata`` as diffusers' ``save_lora_weights`` writes it."""
    tensors = {}
    for name, (down, up) in layers.items():
        tensors[f"unet.{name}.lora_A.weight"] = down.contiguous()
        tensors[f"unet.{name}.lora_B.weight"] = up.contiguous()
    metadata = {"format": "pt"}
    if alpha is not None:
        rank = next(iter(layers.values()))[0].shape[0]
        config = {
            "unet.r": rank,
            "unet.lora_alpha": alpha,
            "unet.target_modules": sorted(layers),
        }
        metadata["lora_adapter_metadata"] = json.dumps(config)
    save_file(tensors, str(path), metadata=metadata)
    return path


def save_kohya(
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]],
    path: Path,
    alpha: float | None = None,
    extra: dict[str, torch.Tensor] | None = None,
) -> Path:
    """kohya / A1111's layout: ``lora_unet_<module_with_underscores>.lora_down.weight`` …"""
    tensors = dict(extra or {})
    for name, (down, up) in layers.items():
        key = "lora_unet_" + name.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = down.contiguous()
        tensors[f"{key}.lora_up.weight"] = up.contiguous()
        if alpha is not None:
            tensors[f"{key}.alpha"] = torch.tensor(float(alpha))
    save_file(tensors, str(path))
    return path


def fused_copy(
    unet: UNet2DConditionModel,
    loras: list[tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]],
) -> UNet2DConditionModel:
    """A copy of ``unet`` with ``W += scale · up @ down`` for each (layers, scale): the LoRA
    equation written out, as the oracle."""
    import copy

    fused = copy.deepcopy(unet)
    modules = dict(fused.named_modules())
    with torch.no_grad():
        for layers, scale in loras:
            for name, (down, up) in layers.items():
                weight = modules[name].weight  # a 1×1 convolution's [out, in, 1, 1] too
                update = up.flatten(1).double() @ down.flatten(1).double()
                weight += scale * update.float().view_as(weight)
    return fused


def unet_inputs(rows: int, seed: int = 0, unet: Any = None) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    width = 24 if unet is None else int(unet.config.cross_attention_dim)
    return {
        "sample": torch.randn(rows, 4, 8, 8, generator=gen),
        "timestep": torch.randint(0, 1000, (rows,), generator=gen),
        "encoder_hidden_states": torch.randn(rows, 7, width, generator=gen),
    }


def original_unet_name(module: str, config: Any) -> str:
    """The original checkpoint's (LDM / SGM) spelling of a diffusers attention-block module, as
    kohya writes SDXL keys (``down_blocks.1.attentions.0.proj_in`` → ``input_blocks_4_1_proj_in``),
    from the UNet config's numbering (an int ``layers_per_block``)."""
    per_block = int(config.layers_per_block) + 1  # each block's resnets + its down/upsampler
    parts = module.split(".")
    if parts[0] == "mid_block":
        assert parts[1:3] == ["attentions", "0"], module
        prefix, rest = "middle_block_1", parts[3:]
    else:
        assert parts[2] == "attentions", module
        block, layer = int(parts[1]), int(parts[3])
        if parts[0] == "down_blocks":
            prefix = f"input_blocks_{1 + block * per_block + layer}_1"
        else:
            prefix = f"output_blocks_{block * per_block + layer}_1"
        rest = parts[4:]
    return "_".join([prefix, *rest])


def save_kohya_original(
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]],
    path: Path,
    config: Any,
    alpha: float | None = None,
    extra: dict[str, torch.Tensor] | None = None,
) -> Path:
    """kohya's SDXL layout: ``lora_unet_<original UNet name>.lora_down.weight`` … (see
    :func:`original_unet_name`)."""
    tensors = dict(extra or {})
    for name, (down, up) in layers.items():
        key = "lora_unet_" + original_unet_name(name, config)
        tensors[f"{key}.lora_down.weight"] = down.contiguous()
        tensors[f"{key}.lora_up.weight"] = up.contiguous()
        if alpha is not None:
            tensors[f"{key}.alpha"] = torch.tensor(float(alpha))
    save_file(tensors, str(path))
    return path


def unet_only_bundle(unet: Any, dtype: torch.dtype = torch.float32) -> Any:
    """A CPU ``ModelBundle`` of the tiny preset around ``unet`` alone (no VAE, no text
    encoders): enough for UNet calls and for attaching a LoRA library."""
    from livediff.models.bundle import ModelBundle
    from livediff.models.presets import get_preset
    from livediff.models.spec import WeightsMode

    return ModelBundle(
        preset=get_preset("tiny"),
        unet=unet,
        vae=None,
        text_encoders=(),
        tokenizers=(),
        scheduler_config={},
        device=torch.device("cpu"),
        dtype=dtype,
        weights=WeightsMode.RANDOM,
        source="test",
    )

"""IP-Adapter files in h94's layout for tests: a tiny encoder and random adapter weights.

``write_h94_folder`` writes what ``h94/IP-Adapter`` holds (``models/…``, ``sdxl_models/…``,
each ``image_encoder/`` a saved ``CLIPVisionModelWithProjection``) for a tiny UNet, so that
livediff's loader and diffusers' ``load_ip_adapter`` read the same files. The plus
projection is written in the original Resampler's key names, the inverse of diffusers'
conversion (``UNet2DConditionLoadersMixin._convert_ip_adapter_image_proj_to_diffusers``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers.models.embeddings import IPAdapterPlusImageProjection
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from livediff.models.ip_adapter_loading import TINY_ENCODER, cross_attention_layers

PLUS_TOKENS = 16


def tiny_encoder(seed: int) -> CLIPVisionModelWithProjection:
    torch.manual_seed(seed)
    return CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_ENCODER)).eval()


def _randn(*shape: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * 0.2


def plain_state_dict(unet: Any, embed_dim: int, seed: int) -> dict[str, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    width = int(unet.config.cross_attention_dim)
    image_proj = {
        "proj.weight": _randn(4 * width, embed_dim, gen=gen),
        "proj.bias": _randn(4 * width, gen=gen),
        "norm.weight": 1 + _randn(width, gen=gen),
        "norm.bias": _randn(width, gen=gen),
    }
    return {"image_proj": image_proj, "ip_adapter": _attention_weights(unet, gen)}


def _attention_weights(unet: Any, gen: torch.Generator) -> dict[str, torch.Tensor]:
    width = int(unet.config.cross_attention_dim)
    weights = {}
    for i, hidden in enumerate(cross_attention_layers(unet).values()):
        for kv in "kv":
            weights[f"{2 * i + 1}.to_{kv}_ip.weight"] = _randn(hidden, width, gen=gen)
    return weights


def plus_state_dict(
    unet: Any, encoder_hidden: int, seed: int
) -> dict[str, dict[str, torch.Tensor]]:
    """A Resampler in h94's names: diffusers' module with random weights, renamed back."""
    gen = torch.Generator().manual_seed(seed)
    width = int(unet.config.cross_attention_dim)
    module = IPAdapterPlusImageProjection(
        embed_dims=encoder_hidden,
        output_dims=width,
        hidden_dims=width,
        heads=max(1, width // 64),
        num_queries=PLUS_TOKENS,
    )
    ours = {
        k: _randn(*v.shape, gen=gen) + (1 if "ln" in k or "norm" in k or "ff.0" in k else 0)
        for k, v in module.state_dict().items()
    }
    image_proj: dict[str, torch.Tensor] = {}
    for key, value in ours.items():
        parts = key.split(".")
        if parts[0] != "layers":
            image_proj[key] = value
            continue
        i, rest = parts[1], ".".join(parts[2:])
        renamed = {
            "ln0.weight": "0.norm1.weight",
            "ln0.bias": "0.norm1.bias",
            "ln1.weight": "0.norm2.weight",
            "ln1.bias": "0.norm2.bias",
            "attn.to_q.weight": "0.to_q.weight",
            "attn.to_out.0.weight": "0.to_out.weight",
            "ff.0.weight": "1.0.weight",
            "ff.0.bias": "1.0.bias",
            "ff.1.net.0.proj.weight": "1.1.weight",
            "ff.1.net.2.weight": "1.3.weight",
        }
        if rest == "attn.to_k.weight":
            to_v = ours[f"layers.{i}.attn.to_v.weight"]
            image_proj[f"layers.{i}.0.to_kv.weight"] = torch.cat([value, to_v])
        elif rest != "attn.to_v.weight":
            image_proj[f"layers.{i}.{renamed[rest]}"] = value
    return {"image_proj": image_proj, "ip_adapter": _attention_weights(unet, gen)}


def save_adapter(parts: dict[str, dict[str, torch.Tensor]], path: Path) -> Path:
    """As h94 publishes: flat ``image_proj.*``/``ip_adapter.*`` safetensors, or a nested .bin."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        flat = {
            f"{head}.{k}": v.contiguous() for head, part in parts.items() for k, v in part.items()
        }
        save_file(flat, str(path))
    else:
        torch.save(parts, path)
    return path


def write_h94_folder(root: Path, unet: Any, *, sdxl: bool = False, seed: int = 0) -> Path:
    """h94's layout for ``unet``: plain (.safetensors) and plus (.bin), with their encoders."""
    encoder = tiny_encoder(seed)
    hidden, projection = TINY_ENCODER["hidden_size"], TINY_ENCODER["projection_dim"]
    encoder.save_pretrained(root / "models" / "image_encoder")
    if sdxl:
        tiny_encoder(seed + 1).save_pretrained(root / "sdxl_models" / "image_encoder")
        save_adapter(
            plain_state_dict(unet, projection, seed + 2),
            root / "sdxl_models" / "ip-adapter_sdxl.safetensors",
        )
        save_adapter(
            plus_state_dict(unet, hidden, seed + 3),
            root / "sdxl_models" / "ip-adapter-plus_sdxl_vit-h.safetensors",
        )
    else:
        save_adapter(
            plain_state_dict(unet, projection, seed + 2),
            root / "models" / "ip-adapter_sd15.safetensors",
        )
        save_adapter(
            plus_state_dict(unet, hidden, seed + 3), root / "models" / "ip-adapter-plus_sd15.bin"
        )
    return root

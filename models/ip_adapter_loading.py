"""Load an IP-Adapter for a model, or build one with random weights, checked against the model.

Sources (:class:`~livediff.models.ip_adapter_spec.IPAdapterSpec`):

- a Hugging Face repository in h94's layout (default ``h94/IP-Adapter``), through the HF
  cache; with ``HF_HUB_OFFLINE=1`` (or ``local_files_only=True``) only the cache is read, and
  an adapter that is not there is a :class:`~livediff.exceptions.ModelNotAvailableError`
  naming it and the cache folder;
- a local folder in the same layout (``models/ip-adapter_sd15.safetensors``,
  ``models/image_encoder/`` …);
- a single ``.safetensors`` / ``.bin`` file in h94's layout (``image_proj.*`` and
  ``ip_adapter.N.to_k_ip`` / ``to_v_ip`` …);
- ``"random"``: the family's exact architecture with seeded random weights — h94's CLIP vision
  encoder (OpenCLIP ViT-H/14, or ViT-bigG/14 for SDXL's plain adapter), the projection and one
  ``to_k_ip``/``to_v_ip`` pair per cross-attention layer. A UNet of no real family's width
  (the ``tiny`` preset) gets a tiny encoder instead.

The state dict is converted by diffusers' own ``UNet2DConditionLoadersMixin`` code
(``_convert_ip_adapter_image_proj_to_diffusers``, ``_convert_ip_adapter_attn_to_diffusers``),
after livediff has checked every shape against the model and the encoder, so a wrong file is
refused with a :class:`~livediff.exceptions.ModelLoadError` that names both shapes. SD 2.1
(``sd-turbo``) has no public IP-Adapter and is refused before anything is read.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.embeddings import ImageProjection, IPAdapterPlusImageProjection
from huggingface_hub import constants as hf_constants
from huggingface_hub import hf_hub_download
from safetensors import SafetensorError, safe_open
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from livediff.exceptions import ModelLoadError
from livediff.models.bundle import ModelBundle
from livediff.models.controlnet_loading import full_unet_config
from livediff.models.fetch import fetch, is_local
from livediff.models.ip_adapter import LoadedIPAdapter, RowIPAdapterAttnProcessor
from livediff.models.ip_adapter_spec import (
    OTHER_ENCODERS,
    IPAdapterSpec,
    IPAdapterVariant,
    published_adapter,
)
from livediff.models.loading import resolve_device, resolve_dtype
from livediff.models.presets import Family, ModelPreset

log = logging.getLogger(__name__)
WITHOUT_WEIGHTS = "an IP-Adapter with source 'random'"
ADAPTER_SUFFIXES = (".safetensors", ".bin")
PLAIN_TOKENS = 4
PLUS_TOKENS = 16
FAMILY_WIDTH = {Family.SD15: 768, Family.SDXL: 2048}  # cross-attention width of the real UNets
_VIT_H: dict[str, Any] = {  # h94's models/image_encoder (OpenCLIP ViT-H/14)
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 16,
    "num_hidden_layers": 32,
    "patch_size": 14,
    "image_size": 224,
    "projection_dim": 1024,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
}
_VIT_BIGG: dict[str, Any] = {  # h94's sdxl_models/image_encoder (OpenCLIP ViT-bigG/14)
    **_VIT_H,
    "hidden_size": 1664,
    "intermediate_size": 8192,
    "num_hidden_layers": 48,
    "projection_dim": 1280,
}
TINY_ENCODER: dict[str, Any] = {  # for UNets of no real family's width (the tiny preset)
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "patch_size": 8,
    "image_size": 32,
    "projection_dim": 32,
    "hidden_act": "gelu",
}


# ---------------------------------------------------------------- the model's side
def cross_attention_layers(unet: Any) -> dict[str, int]:
    """The UNet's cross-attention processor names, in order, with each layer's width."""
    config = unet.config
    widths = list(config.block_out_channels)
    layers: dict[str, int] = {}
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        if name.startswith("mid_block"):
            layers[name] = widths[-1]
        elif name.startswith("up_blocks"):
            layers[name] = list(reversed(widths))[int(name.split(".")[1])]
        else:
            layers[name] = widths[int(name.split(".")[1])]
    return layers


def _model_unet(model: ModelBundle | ModelPreset) -> Any:
    """The model's UNet (a preset's on the meta device: its config and layer names only)."""
    if isinstance(model, ModelBundle):
        return model.unet
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(full_unet_config(model))


def encoder_architecture(family: Family, variant: IPAdapterVariant, width: int) -> dict[str, Any]:
    """The config of the CLIP vision encoder h94 trained this family's adapter with."""
    if width != FAMILY_WIDTH.get(family):
        return dict(TINY_ENCODER)
    if family is Family.SDXL and variant is IPAdapterVariant.PLAIN:
        return dict(_VIT_BIGG)
    return dict(_VIT_H)


def build_projection(
    variant: IPAdapterVariant, encoder: dict[str, Any], width: int, family: Family
) -> Any:
    """diffusers' projection module for ``variant``, shaped as h94's for ``family``."""
    if variant is IPAdapterVariant.PLAIN:
        return ImageProjection(
            image_embed_dim=int(encoder["projection_dim"]),
            cross_attention_dim=width,
            num_image_text_embeds=PLAIN_TOKENS,
        )
    hidden = 1280 if family is Family.SDXL and width == FAMILY_WIDTH[Family.SDXL] else width
    return IPAdapterPlusImageProjection(
        embed_dims=int(encoder["hidden_size"]),
        output_dims=width,
        hidden_dims=hidden,
        heads=max(1, hidden // 64),
        num_queries=PLUS_TOKENS,
    )


# ---------------------------------------------------------------- reading and checking a file
def read_adapter_file(path: str) -> dict[str, dict[str, torch.Tensor]]:
    """h94's two-part state dict (``image_proj``, ``ip_adapter``) from a .safetensors or .bin."""
    if not os.path.isfile(path):
        raise ModelLoadError(f"IP-Adapter file not found: {path}", field="ip_adapter")
    try:
        if path.endswith(".safetensors"):
            parts: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
            with safe_open(path, framework="pt", device="cpu") as f:
                for key in f.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
                    head, _, rest = key.partition(".")
                    if head in parts:
                        parts[head][rest] = f.get_tensor(key)
        else:
            parts = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, EOFError) as exc:
        raise ModelLoadError(
            f"IP-Adapter file {path} cannot be read (a partial download?): {exc}",
            field="ip_adapter",
        ) from exc
    if not isinstance(parts, dict) or not parts.get("image_proj") or not parts.get("ip_adapter"):
        raise ModelLoadError(
            f"IP-Adapter file {path} is not in h94's layout: it needs image_proj.* and "
            "ip_adapter.* weights",
            field="ip_adapter",
        )
    return parts


def file_variant(image_proj: dict[str, torch.Tensor], label: str) -> IPAdapterVariant:
    """Which variant a state dict is, from its projection's keys (as diffusers tells them)."""
    if "proj.weight" in image_proj:
        return IPAdapterVariant.PLAIN
    if "latents" in image_proj and "proj_in.weight" in image_proj:
        return IPAdapterVariant.PLUS
    kind = "full-face" if "proj.3.weight" in image_proj else "FaceID"
    raise ModelLoadError(
        f"IP-Adapter {label!r} is a {kind} adapter, which livediff does not run; "
        "use a plain or plus adapter",
        field="ip_adapter",
    )


def _expect(label: str, what: str, found: Any, expected: Any) -> None:
    if tuple(found) != tuple(expected):
        raise ModelLoadError(
            f"IP-Adapter {label!r} does not fit: {what} is {tuple(found)}, expected "
            f"{tuple(expected)}",
            field="ip_adapter",
        )


def check_state_dict(
    label: str,
    parts: dict[str, dict[str, torch.Tensor]],
    variant: IPAdapterVariant,
    unet: Any,
    encoder_config: Any,
) -> None:
    """Every shape against the model's cross-attention layers and the encoder's outputs."""
    width = int(unet.config.cross_attention_dim)
    proj = parts["image_proj"]
    if variant is IPAdapterVariant.PLAIN:
        _expect(
            label,
            "image_proj.proj.weight",
            proj["proj.weight"].shape,
            (PLAIN_TOKENS * width, int(encoder_config.projection_dim)),
        )
    else:
        _expect(
            label,
            "image_proj.proj_in.weight's input width (the encoder's hidden size)",
            proj["proj_in.weight"].shape[1:],
            (int(encoder_config.hidden_size),),
        )
        _expect(
            label,
            "image_proj.proj_out.weight's output width (the UNet's cross-attention width)",
            proj["proj_out.weight"].shape[:1],
            (width,),
        )
    weights = parts["ip_adapter"]
    layers = cross_attention_layers(unet)
    expected_keys = {f"{2 * i + 1}.to_{kv}_ip.weight" for i in range(len(layers)) for kv in "kv"}
    if set(weights) != expected_keys:
        raise ModelLoadError(
            f"IP-Adapter {label!r} does not fit: it has {len(weights) // 2} cross-attention "
            f"layers, the UNet has {len(layers)}",
            field="ip_adapter",
        )
    for i, (name, hidden) in enumerate(layers.items()):
        for kv in "kv":
            key = f"{2 * i + 1}.to_{kv}_ip.weight"
            _expect(label, f"ip_adapter.{key} (for {name})", weights[key].shape, (hidden, width))


# ---------------------------------------------------------------- building the modules
def _convert(
    parts: dict[str, dict[str, torch.Tensor]], unet: Any, tokens: int
) -> tuple[Any, dict[str, RowIPAdapterAttnProcessor]]:
    """diffusers' conversion of h94's layout, then its attention weights into per-row processors."""
    projection = unet._convert_ip_adapter_image_proj_to_diffusers(
        parts["image_proj"], low_cpu_mem_usage=False
    )
    converted = unet._convert_ip_adapter_attn_to_diffusers([parts], low_cpu_mem_usage=False)
    processors = {}
    for name, hidden in cross_attention_layers(unet).items():
        row = RowIPAdapterAttnProcessor(hidden, int(unet.config.cross_attention_dim), tokens)
        row.load_state_dict(converted[name].state_dict(), strict=True)
        processors[name] = row
    return projection, processors


def _random_modules(
    spec: IPAdapterSpec, unet: Any, family: Family, encoder: dict[str, Any], device: torch.device
) -> tuple[Any, dict[str, RowIPAdapterAttnProcessor], Any]:
    """Seeded random modules, drawn on the CPU (a seed gives the same weights everywhere), or
    on the meta device when that is the target (shapes only)."""
    device = device if device.type == "meta" else torch.device("cpu")
    width = int(unet.config.cross_attention_dim)
    tokens = PLAIN_TOKENS if spec.variant is IPAdapterVariant.PLAIN else PLUS_TOKENS
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(spec.seed)
        projection = build_projection(spec.variant, encoder, width, family)
        processors = {
            name: RowIPAdapterAttnProcessor(hidden, width, tokens)
            for name, hidden in cross_attention_layers(unet).items()
        }
        image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**encoder))
    return projection, processors, image_encoder


def _offline(spec: IPAdapterSpec) -> bool:
    if spec.local_files_only is not None:
        return spec.local_files_only
    return bool(hf_constants.HF_HUB_OFFLINE)


def _weight_file(spec: IPAdapterSpec, family: Family, model_name: str, offline: bool) -> str:
    """The local path of the adapter's weights (downloaded into the HF cache if need be)."""
    if spec.source.endswith(ADAPTER_SUFFIXES):
        return spec.source
    published = published_adapter(family, spec.variant, model_name)
    path = (
        str(Path(published.subfolder, spec.weight_name))
        if spec.weight_name
        else published.weight_path
    )
    if is_local(spec.source):
        local = Path(spec.source, path)
        if not local.exists() and not spec.weight_name and local.with_suffix(".bin").exists():
            log.info(
                "IP-Adapter: %s has no %s; reading %s", spec.source, path, local.with_suffix(".bin")
            )
            local = local.with_suffix(".bin")
        if not local.exists():
            raise ModelLoadError(
                f"IP-Adapter folder {spec.source} has no {path} (h94's layout; pass "
                "weight_name for another file)",
                field="ip_adapter",
            )
        return str(local)
    what = f"IP-Adapter {spec.label!r}:"
    return fetch(
        what,
        spec.source,
        offline,
        lambda local: hf_hub_download(spec.source, path, local_files_only=local),
        without_weights=WITHOUT_WEIGHTS,
    )


def _encoder_location(
    spec: IPAdapterSpec, family: Family, model_name: str
) -> tuple[str, str | None]:
    """Where the encoder is: (source, subfolder inside it or None)."""
    if spec.image_encoder:
        return spec.image_encoder, None
    published = published_adapter(family, spec.variant, model_name)
    stem = Path(spec.weight_name or spec.source).stem
    inside = OTHER_ENCODERS.get(stem, published.encoder_path)
    if not spec.source.endswith(ADAPTER_SUFFIXES):
        return spec.source, inside
    file = Path(spec.source)
    for candidate in (file.parent.parent / inside, file.parent / "image_encoder"):
        if candidate.is_dir():
            return str(candidate), None
    raise ModelLoadError(
        f"IP-Adapter file {spec.source}: no image encoder beside it ({file.parent.parent / inside} "
        "or image_encoder/); pass image_encoder (a folder or HF id)",
        field="image_encoder",
    )


def _load_encoder(spec: IPAdapterSpec, family: Family, model_name: str, offline: bool) -> Any:
    source, subfolder = _encoder_location(spec, family, model_name)
    extra: dict[str, Any] = {"subfolder": subfolder} if subfolder else {}

    def load(local: bool) -> Any:
        return CLIPVisionModelWithProjection.from_pretrained(
            source, local_files_only=local, **extra
        )

    where = f"{source}/{subfolder}" if subfolder else source
    return fetch(
        f"IP-Adapter image encoder ({where})",
        source,
        offline,
        load,
        without_weights=WITHOUT_WEIGHTS,
    )


def load_ip_adapter(
    spec: IPAdapterSpec,
    model: ModelBundle | ModelPreset,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> LoadedIPAdapter:
    """Load or build the IP-Adapter ``spec`` names for ``model`` (a loaded model or a preset).

    ``device``/``dtype`` default to a loaded model's. Refuses SD 2.1 (no public IP-Adapter), a
    file of another variant or shape (``ModelLoadError`` naming both shapes), and an unknown
    variant (``ParameterError``, from the spec).
    """
    bundle = model if isinstance(model, ModelBundle) else None
    preset = bundle.preset if bundle is not None else model
    assert isinstance(preset, ModelPreset)
    family = preset.family
    published_adapter(family, spec.variant, preset.name)  # SD 2.1: refused before any read
    target = resolve_device(device) if device is not None or bundle is None else bundle.device
    torch_dtype = (
        bundle.dtype if dtype is None and bundle is not None else resolve_dtype(dtype, target)
    )
    unet = _model_unet(model)
    width = int(unet.config.cross_attention_dim)
    offline = _offline(spec)
    if spec.is_random:
        encoder_config = encoder_architecture(family, spec.variant, width)
        projection, processors, image_encoder = _random_modules(
            spec, unet, family, encoder_config, target
        )
        source = f"random init (seed {spec.seed})"
    else:
        path = _weight_file(spec, family, preset.name, offline)
        parts = read_adapter_file(path)
        found = file_variant(parts["image_proj"], spec.label)
        if found is not spec.variant:
            raise ModelLoadError(
                f"IP-Adapter {spec.label!r} ({Path(path).name}) is a {found.value} adapter; "
                f"variant={spec.variant.value!r} was asked for",
                field="variant",
            )
        image_encoder = _load_encoder(spec, family, preset.name, offline)
        check_state_dict(spec.label, parts, spec.variant, unet, image_encoder.config)
        tokens = (
            PLAIN_TOKENS
            if found is IPAdapterVariant.PLAIN
            else int(parts["image_proj"]["latents"].shape[1])
        )
        projection, processors = _convert(parts, unet, tokens)
        source = path
    return _place(
        spec, family, projection, processors, image_encoder, width, source, target, torch_dtype
    )


def _place(
    spec: IPAdapterSpec,
    family: Family,
    projection: Any,
    processors: dict[str, RowIPAdapterAttnProcessor],
    image_encoder: Any,
    width: int,
    source: str,
    device: torch.device,
    dtype: torch.dtype,
) -> LoadedIPAdapter:
    def place(module: Any) -> Any:
        return module.to(device=device, dtype=dtype).eval().requires_grad_(False)

    tokens = (
        PLAIN_TOKENS if spec.variant is IPAdapterVariant.PLAIN else int(projection.latents.shape[1])
    )
    adapter = LoadedIPAdapter(
        name=spec.label,
        variant=spec.variant,
        family=family,
        processors={name: place(p) for name, p in processors.items()},
        projection=place(projection),
        image_encoder=place(image_encoder),
        num_tokens=tokens,
        token_dim=width,
        source=source,
    )
    log.info("loaded %s on %s %s", adapter.describe(), device, dtype)
    return adapter


def check_family(preset: ModelPreset) -> None:
    """Refuse a model whose family has no public IP-Adapter (``ParameterError``)."""
    published_adapter(preset.family, IPAdapterVariant.PLAIN, preset.name)

"""Load a model from a HF id, a diffusers folder or a single checkpoint file, or build it randomly.

Sources (``ModelSpec.source``; ``None`` means the preset's HF id):

- a Hugging Face id such as ``stabilityai/sd-turbo``, through the normal HF cache. With
  ``HF_HUB_OFFLINE=1`` (or ``local_files_only=True``) only the cache is read;
- a local diffusers folder (``model_index.json``, ``unet/``, ``text_encoder/`` …);
- a single ``.safetensors`` / ``.ckpt`` checkpoint in the original (LDM) layout. Its
  architecture comes from ``config_source`` (default: the preset's HF id, which must then be
  cached, or any local diffusers folder).

The tiny VAE comes from ``vae_source``, else the preset's TAESD repo, else a ``vae_tiny/``
folder beside the model (what ``livediff export`` writes). LoRAs are fused into the weights
at load and their layers removed, so they cost nothing per frame.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, TypeVar

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    LCMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from huggingface_hub import constants as hf_constants
from safetensors import SafetensorError, safe_open
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from livediff.exceptions import ModelLoadError, ParameterError
from livediff.models.architectures import Components, build_random
from livediff.models.bundle import ModelBundle
from livediff.models.fetch import SINGLE_FILE_SUFFIXES, fetch
from livediff.models.fp8 import check_fp8_device
from livediff.models.pipelines import fuse_loras
from livediff.models.presets import ModelPreset, get_preset
from livediff.models.spec import ModelSpec as ModelSpec  # re-exported: defined here before
from livediff.models.spec import Precision, VaeKind, WeightsMode

log = logging.getLogger(__name__)
T = TypeVar("T")
TINY_VAE_FOLDER = "vae_tiny"


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ParameterError(
            f"device={device!s} was asked for, but this machine has no CUDA device"
        )
    if (
        resolved.type == "cuda" and resolved.index is None
    ):  # name the device: threads set it explicitly
        resolved = torch.device("cuda", torch.cuda.current_device())
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {
        "fp16": torch.float16,
        "float16": torch.float16,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp32": torch.float32,
        "float32": torch.float32,
    }
    if dtype not in table:
        raise ParameterError(f"dtype={dtype!r} is not one of: auto, {', '.join(table)}")
    return table[dtype]


def _offline(spec: ModelSpec) -> bool:
    if spec.local_files_only is not None:
        return spec.local_files_only
    return bool(hf_constants.HF_HUB_OFFLINE)


def _place(module: Any, device: torch.device, dtype: torch.dtype) -> Any:
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _load_diffusers_folder(
    preset: ModelPreset, source: str, spec: ModelSpec, offline: bool
) -> tuple[Components, dict[str, Any]]:
    what = f"model {preset.name}"
    common: dict[str, Any] = {"variant": spec.variant} if spec.variant else {}

    def load(local: bool) -> tuple[Components, dict[str, Any]]:
        unet = UNet2DConditionModel.from_pretrained(
            source, subfolder="unet", local_files_only=local, **common
        )
        names = ("text_encoder", "text_encoder_2")[: len(preset.text_configs)]
        encoders = []
        for i, name in enumerate(names):
            cls = (
                CLIPTextModelWithProjection
                if preset.is_sdxl and i == len(names) - 1
                else CLIPTextModel
            )
            encoders.append(
                cls.from_pretrained(source, subfolder=name, local_files_only=local, **common)
            )
        tokenizers = [
            CLIPTokenizer.from_pretrained(
                source, subfolder=name.replace("text_encoder", "tokenizer"), local_files_only=local
            )
            for name in names
        ]
        scheduler_config = dict(
            LCMScheduler.load_config(source, subfolder="scheduler", local_files_only=local)
        )
        return Components(
            unet=unet, text_encoders=tuple(encoders), tokenizers=tuple(tokenizers)
        ), scheduler_config

    return fetch(what, source, offline, load)


def _load_single_file(
    preset: ModelPreset, path: str, spec: ModelSpec, offline: bool
) -> tuple[Components, dict[str, Any], AutoencoderKL]:
    config = spec.config_source or preset.hf_id
    if config is None:
        raise ParameterError(
            f"loading preset {preset.name} from a single file needs config_source (a diffusers folder)"
        )
    pipeline_cls = StableDiffusionXLPipeline if preset.is_sdxl else StableDiffusionPipeline
    if not os.path.exists(path):
        raise ModelLoadError(f"checkpoint file not found: {path}")
    if path.endswith(".safetensors"):
        _check_safetensors(path)

    def load(local: bool) -> Any:
        return pipeline_cls.from_single_file(path, config=config, local_files_only=local)

    what = f"architecture config for {preset.name} (needed to read {Path(path).name})"
    pipe = fetch(what, config, offline, load)
    encoders = tuple(
        e for e in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if e is not None
    )
    tokenizers = tuple(
        t for t in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)) if t is not None
    )
    components = Components(unet=pipe.unet, text_encoders=encoders, tokenizers=tokenizers)
    return components, dict(pipe.scheduler.config), pipe.vae


def _check_safetensors(path: str) -> None:
    """Read the header now: inside ``fetch`` a broken file would be reported as an uncached config."""
    try:
        with safe_open(path, framework="pt"):
            pass
    except (SafetensorError, OSError) as exc:
        raise ModelLoadError(
            f"checkpoint {path} is not a readable .safetensors file (a partial download?): {exc}"
        ) from exc


def _tiny_vae_source(preset: ModelPreset, spec: ModelSpec, model_source: str | None) -> str:
    if spec.vae_source and spec.vae is VaeKind.TINY:
        return spec.vae_source
    for base in (model_source, spec.config_source):
        if base and os.path.isdir(os.path.join(base, TINY_VAE_FOLDER)):
            return os.path.join(base, TINY_VAE_FOLDER)
    if preset.tiny_vae_id:
        return preset.tiny_vae_id
    raise ParameterError(
        f"preset {preset.name} has no tiny VAE repo: pass vae_source, or keep a '{TINY_VAE_FOLDER}' folder beside the model"
    )


def _load_tiny_vae(
    preset: ModelPreset, spec: ModelSpec, model_source: str | None, offline: bool
) -> AutoencoderTiny:
    source = _tiny_vae_source(preset, spec, model_source)
    return fetch(
        "tiny VAE",
        source,
        offline,
        lambda local: AutoencoderTiny.from_pretrained(source, local_files_only=local),
    )


def _load_full_vae(
    preset: ModelPreset, spec: ModelSpec, model_source: str | None, offline: bool
) -> AutoencoderKL:
    own_source = spec.vae_source if spec.vae is VaeKind.FULL else None
    if own_source or preset.full_vae_id:
        source = own_source or preset.full_vae_id
        assert source is not None
        return fetch(
            "VAE",
            source,
            offline,
            lambda local: AutoencoderKL.from_pretrained(source, local_files_only=local),
        )
    if model_source is None:
        raise ParameterError("a full VAE needs a model source")
    return fetch(
        "VAE",
        model_source,
        offline,
        lambda local: AutoencoderKL.from_pretrained(
            model_source, subfolder="vae", local_files_only=local
        ),
    )


def load_components(
    spec: ModelSpec, *, tiny_vae: bool, full_vae: bool, device: torch.device
) -> tuple[Components, dict[str, Any], str]:
    """Networks (on CPU or ``device``, not yet cast) with the VAEs asked for, LoRAs fused.

    Returns the components, the scheduler config, and a description of the source.
    """
    preset = get_preset(spec.preset)
    offline = _offline(spec)
    loras = preset.loras if spec.loras is None else spec.loras
    if spec.weights is WeightsMode.RANDOM:
        components = build_random(
            preset, seed=spec.seed, tiny_vae=tiny_vae, full_vae=full_vae, device=device
        )
        scheduler_config = dict(preset.scheduler_config)
        described = f"random init (seed {spec.seed})"
        if spec.loras is None and preset.loras:
            log.info(
                "weights=random: not fusing the preset's LoRAs (%s); they change values, not speed",
                ", ".join(lora.source for lora in preset.loras),
            )
            loras = ()
    else:
        source = spec.source or preset.hf_id
        if source is None:
            raise ParameterError(
                f"preset {preset.name} has no published weights: pass a source folder, or use weights=random"
            )
        model_dir: str | None = None
        single_file_vae: AutoencoderKL | None = None
        if source.endswith(SINGLE_FILE_SUFFIXES):
            components, scheduler_config, single_file_vae = _load_single_file(
                preset, source, spec, offline
            )
        else:
            components, scheduler_config = _load_diffusers_folder(preset, source, spec, offline)
            model_dir = source
        if full_vae:
            if (
                single_file_vae is not None
                and not (spec.vae is VaeKind.FULL and spec.vae_source)
                and not preset.full_vae_id
            ):
                components.full_vae = single_file_vae
            else:
                components.full_vae = _load_full_vae(
                    preset, spec, model_dir or spec.config_source, offline
                )
        if tiny_vae:
            components.tiny_vae = _load_tiny_vae(
                preset, spec, model_dir or spec.config_source, offline
            )
        described = source
    fuse_loras(preset, components, scheduler_config, loras, offline)
    return components, scheduler_config, described


def load_model(
    spec: ModelSpec,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> ModelBundle:
    """Build or load the model ``spec`` names, on ``device`` in ``dtype`` (defaults: CUDA+fp16, else CPU+fp32)."""
    preset = get_preset(spec.preset)
    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target)
    if spec.precision is Precision.FP8:  # refused before anything loads
        check_fp8_device(target, torch_dtype)
    use_tiny = spec.vae is VaeKind.TINY
    components, scheduler_config, described = load_components(
        spec, tiny_vae=use_tiny, full_vae=not use_tiny, device=target
    )
    vae = components.tiny_vae if use_tiny else components.full_vae
    assert vae is not None
    bundle = ModelBundle(
        preset=preset,
        unet=_place(components.unet, target, torch_dtype),
        vae=_place(vae, target, torch_dtype),
        text_encoders=tuple(_place(e, target, torch_dtype) for e in components.text_encoders),
        tokenizers=components.tokenizers,
        scheduler_config=scheduler_config,
        device=target,
        dtype=torch_dtype,
        weights=spec.weights,
        source=described,
        precision=spec.precision,
        compile_batch=spec.compile_batch,
    )
    log.info("loaded %s", bundle.describe())
    return bundle

"""The speed recipe, in one ordered place (after diffusion-fast's loader).

Read top to bottom; each step assumes the ones above it:

1. dtype — fp16 (or bf16) weights and activations; done at load by :func:`load_model`.
2. SDPA — PyTorch's fused ``scaled_dot_product_attention`` (flash / memory-efficient kernels).
3. Fused QKV — one projection GEMM instead of three (self-attention) or two (cross-attention);
   per-session LoRA layers fuse with them (:mod:`livediff.models.lora_fusion`).
   FP8 (opt-in, ``precision=fp8``) — the transformer blocks' linears, fused ones included, as
   FP8 GEMMs with per-row scales (:mod:`livediff.models.fp8`); after the fusion, which reads
   the weights it quantizes. Convolutions, attention and the VAE are untouched.
4. channels_last — the memory format cuDNN and Inductor's convolutions are fastest in.
5. Inductor flags — 1×1 convolutions as GEMMs, no epilogue fusion into GEMMs (it costs more
   than it saves here), coordinate-descent tuning of the generated kernels and weight
   freezing when asked; cuDNN's benchmark mode picks the fastest convolution algorithms for
   the (static) shapes.
6. ``torch.compile(fullgraph=True, dynamic=False)`` of the UNet and each VAE half (with
   ``compile_batch=shared``, ``dynamic=None``: bucket 1 static, one graph with a symbolic batch
   size for the larger buckets, fewer compiles at a first start). CUDA graphs
   are applied afterwards, around the whole frame step or per batch bucket
   (:mod:`livediff.models.graphed`), not by ``mode="reduce-overhead"``: one graph for the whole
   step avoids the "output overwritten by a later replay" hazard between compiled modules.

Compiled artefacts go to Inductor's on-disk cache, so a second start skips most of the
compile (``TORCHINDUCTOR_CACHE_DIR``, default ``~/.cache/livediff/inductor``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0, FusedAttnProcessor2_0

from livediff.exceptions import BackendError, ParameterError
from livediff.models import feature_bank, lora_fusion, unet_halves
from livediff.models.bundle import ModelBundle
from livediff.models.controlnet import LoadedControlNet
from livediff.models.fp8 import check_fp8_support, install_fp8
from livediff.models.lora_library import LoraLibrary
from livediff.models.spec import CompileBatch, Precision

log = logging.getLogger(__name__)
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
SDPA_BACKENDS = ("auto", "flash", "cudnn", "efficient")


@dataclass(frozen=True)
class Recipe:
    """Which speed steps to apply; every flag can be turned off to measure its effect."""

    fuse_qkv: bool = True
    channels_last: bool = True
    compile: bool = True
    compile_mode: str = "default"
    coordinate_descent_tuning: bool = False
    cudnn_benchmark: bool = True
    freezing: bool = False
    sdpa_backend: str = "auto"  # auto | flash | cudnn | efficient — process-wide torch setting
    precision: Precision = Precision.NATIVE  # fp8: the transformer linears as FP8 GEMMs
    compile_batch: CompileBatch = CompileBatch.PER_BUCKET  # shared: one graph for buckets > 1

    def __post_init__(self) -> None:
        for name, kind in (("precision", Precision), ("compile_batch", CompileBatch)):
            value = getattr(self, name)
            try:
                object.__setattr__(self, name, kind(value))
            except ValueError:
                raise ParameterError(
                    f"{name}={value!r}: expected one of {', '.join(k.value for k in kind)}",
                    field=name,
                ) from None
        if self.sdpa_backend not in SDPA_BACKENDS:
            raise ParameterError(
                f"sdpa_backend={self.sdpa_backend!r}: expected one of {', '.join(SDPA_BACKENDS)}"
            )
        if self.compile_mode not in COMPILE_MODES:
            raise ParameterError(
                f"compile_mode={self.compile_mode!r}: expected one of {', '.join(COMPILE_MODES)}"
            )

    @property
    def label(self) -> str:
        parts = ["sdpa"]
        if self.fuse_qkv:
            parts.append("qkv")
        if self.precision is not Precision.NATIVE:  # native adds nothing: earlier labels hold
            parts.append(self.precision.value)
        if self.channels_last:
            parts.append("cl")
        if self.compile:
            parts.append(f"compile:{self.compile_mode}")
        if self.coordinate_descent_tuning:
            parts.append("cdt")
        if self.freezing:
            parts.append("freeze")
        if self.compile and self.compile_batch is CompileBatch.SHARED:
            parts.append("shared-batch")
        if self.cudnn_benchmark:
            parts.append("cudnn-bench")
        if self.sdpa_backend != "auto":
            parts.append(f"attn:{self.sdpa_backend}")
        return "+".join(parts)


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "livediff" / "inductor"


def _configure_inductor(recipe: Recipe) -> None:
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(default_cache_dir()))
    from torch._inductor import config as inductor

    inductor.conv_1x1_as_mm = True
    inductor.epilogue_fusion = False
    inductor.coordinate_descent_tuning = recipe.coordinate_descent_tuning
    inductor.coordinate_descent_check_all_directions = recipe.coordinate_descent_tuning
    inductor.fx_graph_cache = True
    inductor.freezing = recipe.freezing
    # One compiled graph per batch bucket and resolution: allow more than dynamo's default 8
    # before it would (silently) stop compiling new shapes.
    from torch._dynamo import config as dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo, name):
            setattr(dynamo, name, max(getattr(dynamo, name), 64))


def _select_sdpa(backend: str) -> None:
    """Leave only one SDPA kernel family enabled (a process-wide PyTorch switch)."""
    cuda = torch.backends.cuda
    cuda.enable_flash_sdp(backend == "flash")
    cuda.enable_cudnn_sdp(backend == "cudnn")
    cuda.enable_mem_efficient_sdp(backend == "efficient")
    cuda.enable_math_sdp(False)


def _compile_options(recipe: Recipe) -> dict[str, Any]:
    _configure_inductor(recipe)
    # shared: dynamo's automatic dynamic shapes (dynamic=None) compile the first bucket static
    # and, at the second, the one graph with a symbolic batch size that the rest reuse
    shared = recipe.compile_batch is CompileBatch.SHARED
    return {"fullgraph": True, "dynamic": None if shared else False, "mode": recipe.compile_mode}


def _fuse_qkv(net: Any) -> None:
    if isinstance(net, UNet2DConditionModel):
        cast(Any, net).fuse_qkv_projections()  # the stubs lack it
        return
    # A ControlNet's inherited fuse_qkv_projections skips these Attention blocks (diffusers
    # 0.42): fuse them as the UNet's own method does.
    for module in net.modules():
        if isinstance(module, Attention):
            module.fuse_projections(fuse=True)
    net.set_attn_processor(FusedAttnProcessor2_0())


def _speed_up_denoiser(net: Any, recipe: Recipe, loras: LoraLibrary | None = None) -> None:
    """Steps 2–6 for a UNet or a ControlNet (the same blocks, the same recipe); ``loras``: the
    UNet's per-session LoRA library, whose layers fuse with their projections."""
    banked = feature_bank.installed(net)  # a feature bank's processors stay (they use SDPA)
    net.set_attn_processor(AttnProcessor2_0())  # 2. SDPA
    if recipe.fuse_qkv and loras is not None:  # 3.
        loras.fuse_projections()
    elif recipe.fuse_qkv:
        _fuse_qkv(net)
    feature_bank.reinstall(net, banked)
    if recipe.precision is Precision.FP8:  # 3. FP8, after the fusion: it reads the weights
        log.info("fp8 on %s: %s", type(net).__name__, install_fp8(net).describe())
    if recipe.channels_last:  # 4.
        net.to(memory_format=torch.channels_last)
    if recipe.compile:  # 5, 6.
        net.forward = torch.compile(net.forward, **_compile_options(recipe))


def apply_recipe_to_controlnet(controlnet: LoadedControlNet, recipe: Recipe) -> LoadedControlNet:
    """The recipe for a ControlNet loaded after its model's backend was prepared (in place)."""
    parameter = next(controlnet.net.parameters())
    if recipe.compile and parameter.device.type != "cuda":
        raise BackendError("the compile backend needs a CUDA device; use --backend eager on CPU.")
    if recipe.precision is Precision.FP8:
        check_fp8_support(parameter.device, parameter.dtype)
    _speed_up_denoiser(controlnet.net, recipe)
    return controlnet


def apply_recipe(bundle: ModelBundle, recipe: Recipe) -> ModelBundle:
    """Apply ``recipe`` to ``bundle``'s networks in place (compilation itself happens on first call).

    Its ControlNets (``bundle.controlnets``) get the UNet's steps 2–6 too. With
    ``precision=fp8`` a device or dtype fp8 cannot run on is refused before anything changes,
    and ``bundle.precision`` says what was applied.
    """
    if recipe.compile and bundle.device.type != "cuda":
        raise BackendError(
            f"the compile backend needs a CUDA device; this model is on {bundle.device}. Use --backend eager on CPU."
        )
    if recipe.precision is Precision.FP8:
        check_fp8_support(bundle.device, bundle.dtype)
    if recipe.fuse_qkv and bundle.loras is not None and not lora_fusion.fits(bundle.loras.capacity):
        rank = bundle.loras.capacity.max_rank
        raise BackendError(
            f"per-session LoRAs of max_rank {rank} cannot share a fused q/k/v call (3 × "
            f"max_rank must be <= {lora_fusion.MAX_RANK}, the kernel's rank): use the recipe "
            "with fuse_qkv off (Recipe(fuse_qkv=False)), or a smaller max_rank (--lora-max-rank)"
        )
    vae = bundle.vae
    _speed_up_denoiser(bundle.unet, recipe, bundle.loras)
    for controlnet in bundle.controlnets:  # the UNet's steps, without its LoRAs
        _speed_up_denoiser(controlnet.net, recipe)
    bundle.precision = recipe.precision
    if bundle.ip_adapter is not None:  # step 2 reset the UNet's processors: put its own back
        bundle.ip_adapter.install(bundle.unet)
    if not unet_halves.unsupported(bundle.unet):  # what a step with ControlNets runs (5, 6.)
        unet_halves.install(bundle.unet, _compile_options(recipe) if recipe.compile else None)
    if recipe.sdpa_backend != "auto":
        _select_sdpa(recipe.sdpa_backend)
    if recipe.channels_last:  # 4.
        vae.to(memory_format=torch.channels_last)
    if recipe.cudnn_benchmark:  # static shapes: let cuDNN time its convolution algorithms once
        torch.backends.cudnn.benchmark = True
    if recipe.compile:  # 5, 6.
        options = _compile_options(recipe)
        for half in (
            vae.encoder,
            vae.decoder,
        ):  # the VAE wrappers do host-side work; compile the networks
            half.forward = torch.compile(half.forward, **options)
    log.info("speed recipe applied to %s: %s", bundle.preset.name, recipe.label)
    return bundle

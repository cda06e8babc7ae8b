"""Read a LoRA file and map its keys onto a UNet's linear layers, for per-session LoRAs.

Sources: a ``.safetensors`` file, a folder holding one (``weight_name`` picks it; else
``pytorch_lora_weights.safetensors``, else the folder's only ``.safetensors``), or a Hugging
Face id, through the HF cache with the rules of :mod:`livediff.models.fetch` (offline once
cached; ``HF_HUB_OFFLINE=1`` reads only the cache).

Key formats (the UNet part; one file may mix the spellings of one format):

- diffusers / PEFT: ``unet.<module>.lora_A.weight`` ``[rank, in]`` and ``.lora_B.weight``
  ``[out, rank]`` (also without the ``unet.`` prefix, or PEFT's ``base_model.model.``); the
  alpha comes from the file's ``lora_adapter_metadata`` (``unet.lora_alpha``, as diffusers
  writes it), else the scale is 1. diffusers' older ``<module>.lora.down.weight`` /
  ``.lora.up.weight`` (with ``<module>.alpha``) is read too.
- kohya / A1111: ``lora_unet_<module with _ for .>.lora_down.weight`` / ``.lora_up.weight`` and
  ``.alpha`` (scale ``alpha / rank``), with the diffusers module names (kohya's SD 1.5 / 2.1
  LoRAs: ``lora_unet_down_blocks_0_attentions_0_…``) or the original checkpoint's (LDM / SGM)
  names (kohya's SDXL LoRAs: ``lora_unet_input_blocks_4_1_…``, ``middle_block_1_…``,
  ``output_blocks_…``), which :mod:`livediff.models.lora_ldm_keys` maps for this UNet's layout.

Each UNet key must name one of the layers per-session LoRAs apply to (:func:`target_layers`):
the attention projections ``to_q``, ``to_k``, ``to_v``, ``to_out.0``, the feed-forward
``ff.net.0.proj`` and ``ff.net.2``, and ``proj_in`` / ``proj_out``, linear or (SD 1.5's,
``use_linear_projection=False``) 1×1 convolutions. A 1×1 convolution is a linear map over the
channels at every pixel, so its LoRA (down ``[rank, in, 1, 1]``, up ``[out, rank, 1, 1]``, as
kohya and PEFT write it) is the linear's ``[rank, in]`` / ``[out, rank]``. Any other
convolution LoRA (4-d weights on a linear, a key on a resnet's 3×3 convolution, a LoCon) is
refused naming the key: fused mode (``--lora``, :func:`livediff.models.pipelines.fuse_loras`)
applies those. So is a key on any other layer, or one the UNet does not have (a LoRA of
another family), and a shape that does not fit (the message names both shapes). Text-encoder
parts (``text_encoder.``, ``lora_te_``, ``lora_te1_``, ``lora_te2_`` …) are not applied per session: they are counted in
:attr:`LoraFile.ignored_text_encoder_keys` and logged.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

import torch
from huggingface_hub import constants as hf_constants
from safetensors import SafetensorError, safe_open

from livediff.exceptions import ModelLoadError
from livediff.models.fetch import fetch, is_local
from livediff.models.fp8 import Fp8Linear
from livediff.models.lora_ldm_keys import LdmLayout

log = logging.getLogger(__name__)

DEFAULT_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
TARGET_SUFFIXES = (
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out.0",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
    "ff.net.0.proj",
    "ff.net.2",
    "proj_in",
    "proj_out",
)
CONV_TARGET_SUFFIXES = ("proj_in", "proj_out")  # where they are 1×1 convolutions
TEXT_ENCODER_PREFIXES = ("text_encoder", "lora_te")
_PEFT = re.compile(r"^(?:unet\.|base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>A|B)\.weight$")
_LEGACY = re.compile(r"^(?:unet\.)?(?P<module>.+)\.lora\.(?P<part>down|up)\.weight$")
_KOHYA = re.compile(r"^lora_unet_(?P<module>.+)\.lora_(?P<part>down|up)\.weight$")
_ALPHA = re.compile(r"^(?:unet\.|lora_unet_)?(?P<module>.+)\.alpha$")
_PART = {"A": "down", "B": "up", "down": "down", "up": "up"}
# Cross-attention key width → family, to say which family a misfitting LoRA was made for.
_CROSS_WIDTH = {768: "SD 1.5", 1024: "SD 2.1", 2048: "SDXL"}


@dataclass(frozen=True)
class LoraPair:
    """One layer's update ``scale · x·down.T·up.T``: ``down`` ``[rank, in]``, ``up`` ``[out, rank]``."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float  # alpha / rank (1 when the file has no alpha)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclass(frozen=True)
class LoraFile:
    """A LoRA read from disk and mapped onto a UNet: ``layers`` by UNet module name."""

    name: str
    source: str
    path: Path
    layers: dict[str, LoraPair]
    ignored_text_encoder_keys: int = 0
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return max(pair.rank for pair in self.layers.values())

    def bytes_at(self, dtype: torch.dtype) -> int:
        """What its own weights take in ``dtype`` (unpadded)."""
        size = torch.empty((), dtype=dtype).element_size()
        return sum((p.down.numel() + p.up.numel()) * size for p in self.layers.values())


def is_pointwise_conv(module: torch.nn.Module) -> bool:
    """A 1×1 ``Conv2d`` that is a linear map over channels at every pixel (stride 1, no
    padding, groups or dilation): SD 1.5's ``proj_in`` / ``proj_out``."""
    return (
        isinstance(module, torch.nn.Conv2d)
        and tuple(module.kernel_size) == (1, 1)
        and tuple(module.stride) == (1, 1)
        and tuple(module.dilation) == (1, 1)
        and module.padding in ((0, 0), 0, "valid")
        and module.groups == 1
    )


def is_linear(module: torch.nn.Module) -> TypeGuard[torch.nn.Linear | Fp8Linear]:
    """A linear layer, in the model's dtype or as FP8 (``--precision fp8``): LoRAs add to either."""
    return isinstance(module, torch.nn.Linear | Fp8Linear)


def target_layers(unet: torch.nn.Module) -> dict[str, torch.nn.Linear | torch.nn.Conv2d]:
    """The UNet's layers per-session LoRAs apply to, by module name: the target linears and
    the 1×1 convolution ``proj_in`` / ``proj_out``."""
    return {name: module for name, module in unet.named_modules() if _is_target(name, module)}


def layer_features(layer: torch.nn.Module) -> tuple[int, int]:
    """``(in, out)`` of a target layer: features of a linear, channels of a 1×1 convolution."""
    if isinstance(layer, torch.nn.Conv2d):
        return int(layer.in_channels), int(layer.out_channels)
    if is_linear(layer):
        return int(layer.in_features), int(layer.out_features)
    raise ModelLoadError(f"a {type(layer).__name__} is not a layer per-session LoRAs apply to")


def _is_target(name: str, module: torch.nn.Module) -> bool:
    if is_linear(module):
        return name.endswith(TARGET_SUFFIXES)
    return name.endswith(CONV_TARGET_SUFFIXES) and is_pointwise_conv(module)


def resolve_file(
    source: str, *, weight_name: str | None = None, local_files_only: bool | None = None
) -> Path:
    """The ``.safetensors`` file of ``source`` (a file, a folder or a HF id)."""
    offline = bool(hf_constants.HF_HUB_OFFLINE) if local_files_only is None else local_files_only

    def load(local: bool) -> Path:
        if is_local(source):
            path = Path(os.path.expanduser(source))
        else:
            from huggingface_hub import snapshot_download

            patterns = [weight_name] if weight_name else ["*.safetensors"]
            path = Path(snapshot_download(source, allow_patterns=patterns, local_files_only=local))
        return path if path.is_file() else _file_in(path, weight_name)

    return fetch("LoRA", source, offline, load, without_weights="no LoRA")


def _file_in(folder: Path, weight_name: str | None) -> Path:
    if weight_name:
        chosen = folder / weight_name
        if not chosen.is_file():
            raise ModelLoadError(f"LoRA folder {folder} has no {weight_name}", field="loras")
        return chosen
    if (folder / DEFAULT_WEIGHT_NAME).is_file():
        return folder / DEFAULT_WEIGHT_NAME
    found = sorted(folder.rglob("*.safetensors"))
    if len(found) != 1:
        names = ", ".join(p.name for p in found) or "none"
        raise ModelLoadError(
            f"LoRA folder {folder} holds {len(found)} .safetensors files ({names}): name one "
            "with weight_name",
            field="loras",
        )
    return found[0]


def read_lora(
    path: Path | str, unet: torch.nn.Module, *, name: str, source: str | None = None
) -> LoraFile:
    """Read ``path`` and map it onto ``unet``'s target layers, refusing what doesn't fit."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as exc:
        raise ModelLoadError(
            f"LoRA {name!r}: {path} is not a readable .safetensors file ({exc})", field="loras"
        ) from exc
    parts, alphas, ignored = _split(tensors, name)
    if not parts:
        raise ModelLoadError(
            f"LoRA {name!r} ({path}) has no UNet LoRA weights (lora_A/lora_B, lora.down/up or "
            "lora_unet_… lora_down/lora_up keys)",
            field="loras",
        )
    modules = {module_name: _unwrapped(m) for module_name, m in unet.named_modules()}
    underscored = {module_name.replace(".", "_"): module_name for module_name in modules}
    layout = LdmLayout.of(modules)
    peft_alpha = _peft_alpha(metadata)
    layers = {}
    for (spelled, kohya), pair in sorted(parts.items()):
        key = pair.get("key_down") or pair.get("key_up")
        module_name = _kohya_module(spelled, underscored, layout) if kohya else spelled
        if module_name is None or module_name not in modules:
            raise ModelLoadError(
                f"LoRA {name!r}: key {key} targets a layer this UNet does not have: a LoRA "
                "of another model family (or another layout) cannot be applied",
                field="loras",
            )
        if "down" not in pair or "up" not in pair:
            missing = "down" if "down" not in pair else "up"
            raise ModelLoadError(f"LoRA {name!r}: key {key} has no {missing} weight", field="loras")
        alpha = alphas.get(spelled, peft_alpha if not kohya else None)
        layers[module_name] = _fit(name, str(key), modules[module_name], module_name, pair, alpha)
    if ignored:
        log.warning(
            "LoRA %r: %d text-encoder keys are not applied per session (fused mode applies them)",
            name,
            ignored,
        )
    return LoraFile(name, source or str(path), path, layers, ignored, metadata)


def _kohya_module(spelled: str, underscored: dict[str, str], layout: LdmLayout) -> str | None:
    """The UNet module a kohya key names: diffusers' spelling, else the original UNet's."""
    if spelled in underscored:
        return underscored[spelled]
    ldm = layout.diffusers_spelling(spelled)
    return None if ldm is None else underscored.get(ldm)


def _unwrapped(module: torch.nn.Module) -> torch.nn.Module:
    """The base layer of a layer rewritten for per-session LoRAs (it keeps it as ``base``)."""
    base = getattr(module, "base", None)
    return (
        base
        if base is not None and (is_linear(base) or isinstance(base, torch.nn.Conv2d))
        else module
    )


def _split(
    tensors: dict[str, torch.Tensor], name: str
) -> tuple[dict[tuple[str, bool], dict[str, Any]], dict[str, float], int]:
    """Group keys by (module spelling, is_kohya) into down/up weights; alphas; ignored count."""
    parts: dict[tuple[str, bool], dict[str, Any]] = {}
    alphas: dict[str, float] = {}
    ignored = 0
    for key, tensor in tensors.items():
        if key.startswith(TEXT_ENCODER_PREFIXES):
            ignored += 1
            continue
        match = _KOHYA.match(key) or _LEGACY.match(key) or _PEFT.match(key)
        if match is not None:
            kohya = match.re is _KOHYA
            entry = parts.setdefault((match["module"], kohya), {})
            part = _PART[match["part"]]
            entry[part] = tensor
            entry[f"key_{part}"] = key
            continue
        alpha = _ALPHA.match(key)
        if alpha is not None and tensor.numel() == 1:
            alphas[alpha["module"]] = float(tensor)
            continue
        raise ModelLoadError(
            f"LoRA {name!r}: key {key} is not a LoRA weight livediff can apply per session "
            "(LoHa / LoKr / DoRA and other LyCORIS kinds are not supported)",
            field="loras",
        )
    return parts, alphas, ignored


def _peft_alpha(metadata: dict[str, str]) -> float | None:
    """``lora_alpha`` from diffusers' ``lora_adapter_metadata`` (the UNet's, else the only one)."""
    text = metadata.get("lora_adapter_metadata")
    if not text:
        return None
    config = json.loads(text)
    value = config.get("unet.lora_alpha", config.get("lora_alpha"))
    return None if value is None else float(value)


def _fit(
    name: str,
    key: str,
    module: torch.nn.Module,
    module_name: str,
    pair: dict[str, Any],
    alpha: float | None,
) -> LoraPair:
    down, up = pair["down"], pair["up"]
    pointwise = _is_target(module_name, module) and isinstance(module, torch.nn.Conv2d)
    linear = is_linear(module)
    if not pointwise and (down.ndim != 2 or up.ndim != 2 or not linear):
        what = "4-d" if linear else f"a {type(module).__name__}"
        if isinstance(module, torch.nn.Conv2d):
            what = f"a {_conv_text(module)}"
        raise ModelLoadError(
            f"LoRA {name!r}: key {key} is a convolution LoRA ({what}, weights "
            f"{tuple(down.shape)}): per-session mode applies linear LoRAs and 1×1 proj_in / "
            "proj_out convolution LoRAs only; load it in fused mode (--lora) instead",
            field="loras",
        )
    if linear and not module_name.endswith(TARGET_SUFFIXES):
        raise ModelLoadError(
            f"LoRA {name!r}: key {key} targets {module_name}; per-session LoRAs apply to the "
            "attention projections, feed-forward and proj_in/proj_out linears only (fused "
            "mode applies the rest)",
            field="loras",
        )
    rank = down.shape[0]
    features_in, features_out = layer_features(module)
    expected_down: tuple[int, ...] = (rank, features_in)
    expected_up: tuple[int, ...] = (features_out, rank)
    layer = f"Linear({features_in} → {features_out})"
    if isinstance(module, torch.nn.Conv2d):  # the 1×1 proj_in / proj_out (checked above)
        expected_down, expected_up = (*expected_down, 1, 1), (*expected_up, 1, 1)
        layer = f"a {_conv_text(module)}"
    if tuple(down.shape) != expected_down or tuple(up.shape) != expected_up:
        hint = ""
        family = _CROSS_WIDTH.get(int(down.shape[1])) if "attn2.to_k" in module_name else None
        if family is not None:
            hint = f" (its cross-attention width {down.shape[1]} is {family}'s)"
        raise ModelLoadError(
            f"LoRA {name!r}: key {key} has down {tuple(down.shape)} and up {tuple(up.shape)}; "
            f"the UNet's {module_name} is {layer} "
            f"and needs down {expected_down} and up {expected_up}: a LoRA of another model "
            f"family or size{hint}",
            field="loras",
        )
    scale = 1.0 if alpha is None else alpha / rank
    # A 1×1 convolution's down [rank, in, 1, 1] / up [out, rank, 1, 1] are the linear's.
    return LoraPair(down.flatten(1).to(torch.float32), up.flatten(1).to(torch.float32), scale)


def _conv_text(conv: torch.nn.Conv2d) -> str:
    height, width = conv.kernel_size
    return f"{height}×{width} Conv2d({conv.in_channels} → {conv.out_channels})"

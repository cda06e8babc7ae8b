"""Load a ControlNet for a model, or build one with random weights, checked against the model.

Sources (:class:`~livediff.models.controlnet.ControlNetSpec`):

- a Hugging Face id, through the HF cache; with ``HF_HUB_OFFLINE=1`` (or
  ``local_files_only=True``) only the cache is read, and a net that is not there is a
  :class:`~livediff.exceptions.ModelNotAvailableError` naming the id and the cache folder;
- a diffusers folder (``config.json`` and ``diffusion_pytorch_model.safetensors``);
- a single ``.safetensors`` / ``.ckpt`` file, in diffusers' layout or the original ControlNet
  layout (``input_hint_block``, ``zero_convs`` …, converted by diffusers). Its architecture
  is ``config_source`` (a folder or a cached HF id), else the model family's architecture;
- ``"random"``: the family's exact ControlNet architecture, which is what diffusers'
  ``ControlNetModel.from_unet`` builds from the model's UNet config (conditioning embedding
  ``(16, 32, 96, 256)``, as every net in the README's table has), with seeded random weights.
  diffusers starts the "zero convolutions" at zero; here they are random too, so a random
  net changes the UNet's answer as a trained one does (tests need that).

The config is read before the weights: a net of another family (an SDXL ControlNet on
SD 2.1) or of another shape is refused with a :class:`~livediff.exceptions.ModelLoadError`
that names both, before gigabytes are read.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from diffusers import ControlNetModel, ControlNetUnionModel, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
from huggingface_hub import constants as hf_constants
from safetensors import SafetensorError
from safetensors.torch import load_file

from livediff.exceptions import ModelLoadError, ParameterError
from livediff.models.bundle import ModelBundle
from livediff.models.controlnet import ControlNetSpec, LoadedControlNet, union_control_index
from livediff.models.fetch import SINGLE_FILE_SUFFIXES, fetch
from livediff.models.loading import resolve_device, resolve_dtype
from livediff.models.presets import Family, ModelPreset

log = logging.getLogger(__name__)
WITHOUT_WEIGHTS = "a ControlNet with source 'random'"
# Config keys that decide whether a net's residuals fit a UNet (shapes and conditioning).
FIT_KEYS = (
    "in_channels",
    "block_out_channels",
    "layers_per_block",
    "cross_attention_dim",
    "addition_embed_type",
    "addition_time_embed_dim",
    "projection_class_embeddings_input_dim",
)
_CROSS_ATTENTION_FAMILY = {768: Family.SD15, 1024: Family.SD21, 2048: Family.SDXL}


def controlnet_family(config: dict[str, Any]) -> Family | None:
    """The family a ControlNet (or UNet) config belongs to; ``None`` for shapes none has."""
    if config.get("addition_embed_type") == "text_time":
        return Family.SDXL
    family = _CROSS_ATTENTION_FAMILY.get(int(config.get("cross_attention_dim") or 0))
    return None if family is Family.SDXL else family


def check_fits(
    label: str,
    config: dict[str, Any],
    spec: ControlNetSpec,
    preset: ModelPreset,
    unet: dict[str, Any],
) -> None:
    """Refuse a net whose family or shape is not the model's (``preset``, ``unet`` config)."""
    own = controlnet_family(config)
    if spec.family is not None and spec.family is not preset.family:
        raise ModelLoadError(
            f"controlnet {label!r} is declared for {spec.family.label}; "
            f"the model {preset.name} is {preset.family.label}",
            field="controlnet",
        )
    if own is not None and own is not preset.family:
        raise ModelLoadError(
            f"controlnet {label!r} is an {own.label} ControlNet; "
            f"the model {preset.name} is {preset.family.label}",
            field="controlnet",
        )
    for key in FIT_KEYS:
        if _normalised(config.get(key)) != _normalised(unet.get(key)):
            raise ModelLoadError(
                f"controlnet {label!r} does not fit the model {preset.name} "
                f"({preset.family.label}): its {key} is {config.get(key)!r}, "
                f"the UNet's is {unet.get(key)!r}",
                field="controlnet",
            )
    if len(config["down_block_types"]) != len(unet["down_block_types"]):
        raise ModelLoadError(
            f"controlnet {label!r} has {len(config['down_block_types'])} down blocks; "
            f"the UNet of {preset.name} has {len(unet['down_block_types'])}",
            field="controlnet",
        )


def _normalised(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def _is_union(config: dict[str, Any], spec: ControlNetSpec) -> bool:
    if spec.union is not None:
        return spec.union
    return "Union" in str(config.get("_class_name", "")) or "num_control_type" in config


def _net_class(union: bool) -> Any:
    return ControlNetUnionModel if union else ControlNetModel


def family_architecture(unet_config: dict[str, Any], *, union: bool) -> dict[str, Any]:
    """The config of the family's ControlNets: ``from_unet`` of a UNet with ``unet_config``.

    Built on the meta device, so no weights are allocated. Union nets project the first
    block's channels (320 in SDXL, the only family with union nets); for other widths the
    projection follows the UNet's first block so that small test models can be built.
    """
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(dict(unet_config))
        net = _net_class(union).from_unet(unet, load_weights_from_unet=False)
    config = {k: v for k, v in net.config.items() if not k.startswith("_")}
    if union:
        width = int(unet_config["block_out_channels"][0])
        config.update(num_trans_channel=width, num_proj_channel=width)
    return config


def build_random_controlnet(
    unet_config: dict[str, Any], *, union: bool = False, seed: int = 0
) -> Any:
    """The family's ControlNet architecture with seeded random weights (zero convs included)."""
    config = family_architecture(unet_config, union=union)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = _net_class(union).from_config(config)
        for module in net.modules():
            weight = getattr(module, "weight", None)
            if (
                isinstance(module, (torch.nn.Conv2d, torch.nn.Linear))
                and weight is not None
                and not weight.detach().any()
            ):
                module.reset_parameters()
    return net


def _offline(spec: ControlNetSpec) -> bool:
    if spec.local_files_only is not None:
        return spec.local_files_only
    return bool(hf_constants.HF_HUB_OFFLINE)


def _load_config(what: str, source: str, offline: bool) -> dict[str, Any]:
    def load(local: bool) -> dict[str, Any]:
        return dict(ControlNetModel.load_config(source, local_files_only=local))

    return fetch(what, source, offline, load, without_weights=WITHOUT_WEIGHTS)


def _load_pretrained(
    spec: ControlNetSpec, preset: ModelPreset, unet: dict[str, Any], offline: bool
) -> tuple[Any, dict[str, Any]]:
    label, source = spec.label, spec.source
    what = f"controlnet {label!r}:" if spec.name else "controlnet"
    config = _load_config(what, source, offline)
    check_fits(label, config, spec, preset, unet)
    cls = _net_class(_is_union(config, spec))
    extra: dict[str, Any] = {"variant": spec.variant} if spec.variant else {}

    def load(local: bool) -> Any:
        return cls.from_pretrained(source, local_files_only=local, **extra)

    return fetch(what, source, offline, load, without_weights=WITHOUT_WEIGHTS), config


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    if not os.path.exists(path):
        raise ModelLoadError(f"controlnet file not found: {path}", field="controlnet")
    try:
        if path.endswith(".safetensors"):
            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise ModelLoadError(
            f"controlnet file {path} cannot be read (a partial download?): {exc}",
            field="controlnet",
        ) from exc
    return dict(state.get("state_dict", state))


def _is_original_layout(state: dict[str, torch.Tensor]) -> bool:
    return any(
        key.startswith(("control_model.", "input_hint_block.", "zero_convs.")) for key in state
    )


def _load_single_file(
    spec: ControlNetSpec, preset: ModelPreset, unet: dict[str, Any], offline: bool
) -> tuple[Any, dict[str, Any]]:
    path, label = spec.source, spec.label
    state = _read_state_dict(path)
    union = bool(spec.union)
    if spec.config_source:
        config = _load_config(
            f"architecture config for controlnet {label!r}", spec.config_source, offline
        )
        union = _is_union(config, spec)
    else:
        config = family_architecture(unet, union=union)
    check_fits(label, config, spec, preset, unet)
    if _is_original_layout(state):
        state = convert_controlnet_checkpoint(state, config)
    with torch.device("meta"):
        net = _net_class(union).from_config(config)
    try:
        net.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise ModelLoadError(
            f"controlnet file {path} does not match the {'union ' if union else ''}ControlNet "
            f"architecture of {preset.name} ({preset.family.label}); pass "
            f"config_source for another architecture: {str(exc)[:400]}",
            field="controlnet",
        ) from exc
    return net, config


def load_controlnet(
    spec: ControlNetSpec,
    model: ModelBundle | ModelPreset,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> LoadedControlNet:
    """Load or build the ControlNet ``spec`` names for ``model`` (a loaded model or a preset).

    ``device``/``dtype`` default to a loaded model's, else as :func:`~.loading.load_model`
    chooses them. Refuses (``ModelLoadError``) a net of another family or shape; a union net
    needs ``control_type``, and a plain one refuses it (``ParameterError``).
    """
    bundle = model if isinstance(model, ModelBundle) else None
    preset = bundle.preset if bundle is not None else model
    assert isinstance(preset, ModelPreset)
    target = resolve_device(device) if device is not None or bundle is None else bundle.device
    if dtype is None and bundle is not None:
        torch_dtype = bundle.dtype
    else:
        torch_dtype = resolve_dtype(dtype, target)
    unet = full_unet_config(model)
    offline = _offline(spec)
    if spec.is_random:
        union = bool(spec.union)
        config = family_architecture(unet, union=union)
        check_fits(spec.label, config, spec, preset, unet)
        net = build_random_controlnet(unet, union=union, seed=spec.seed)
        source = f"random init (seed {spec.seed})"
    elif spec.source.endswith(SINGLE_FILE_SUFFIXES):
        net, config = _load_single_file(spec, preset, unet, offline)
        source = spec.source
    else:
        net, config = _load_pretrained(spec, preset, unet, offline)
        source = spec.source
    net = net.to(device=target, dtype=torch_dtype).eval().requires_grad_(False)
    loaded = LoadedControlNet(
        name=spec.label,
        net=net,
        source=source,
        family=controlnet_family(config),
        guess_mode=spec.guess_mode,
        **_union_mode(spec, net, target, torch_dtype),
    )
    log.info("loaded %s on %s %s", loaded.describe(), target, torch_dtype)
    return loaded


def _union_mode(
    spec: ControlNetSpec, net: Any, device: torch.device, dtype: torch.dtype
) -> dict[str, Any]:
    """``control_type``/``control_index`` for a union net; refuses a mode that does not fit."""
    union = isinstance(net, ControlNetUnionModel)
    if not union:
        if spec.control_type is not None:
            raise ParameterError(
                f"controlnet {spec.label!r} is not a union ControlNet: it takes no control_type",
                field="control_type",
            )
        return {}
    if spec.control_type is None:
        raise ParameterError(
            f"controlnet {spec.label!r} is a union ControlNet: give it a control_type "
            "(canny, depth, soft_edge, openpose, …)",
            field="control_type",
        )
    index = union_control_index(spec.control_type)
    modes = int(net.config.num_control_type)
    if index >= modes:
        raise ParameterError(
            f"control_type {spec.control_type!r} (index {index}) is not one of the "
            f"{modes} modes of controlnet {spec.label!r}",
            field="control_type",
        )
    one_hot = torch.zeros(modes, device=device, dtype=dtype)
    one_hot[index] = 1
    return {"control_type": one_hot, "control_index": index}


def full_unet_config(model: ModelBundle | ModelPreset) -> dict[str, Any]:
    """The model's UNet config with every default filled in (a preset's: built on meta)."""
    if isinstance(model, ModelBundle):
        return dict(model.unet.config)
    with torch.device("meta"):
        return dict(UNet2DConditionModel.from_config(dict(model.unet_config)).config)

"""What to load (:class:`ModelSpec`, ``[model]`` in TOML) and the enums that name its modes.

Light on purpose (no torch): the command line builds its flags from these declarations.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from livediff.exceptions import ParameterError
from livediff.models.bank_tokens import DEFAULT_BANK_TOKENS, DEFAULT_REDUCE_FROM, BankTokens
from livediff.models.control_uses import ControlNetSpec
from livediff.models.feature_bank import MAX_BANK_FRAMES
from livediff.models.ip_adapter_spec import IPAdapterSpec, IPAdapterVariant, published_adapter
from livediff.models.presets import PRESETS, LoraRef
from livediff.settings import as_tuple, check_settings, setting


class WeightsMode(str, Enum):
    """``pretrained`` loads real weights; ``random`` builds the exact architecture offline."""

    PRETRAINED = "pretrained"
    RANDOM = "random"


class VaeKind(str, Enum):
    """``tiny`` is TAESD / TAESDXL (fast, the default); ``full`` is the checkpoint's own VAE."""

    TINY = "tiny"
    FULL = "full"


class Precision(str, Enum):
    """How the denoisers' linear layers compute (:mod:`livediff.models.fp8`).

    ``native``: in the model's dtype (``--dtype``), as always. ``fp8``: the transformer blocks'
    linears of the UNet and its ControlNets as FP8 GEMMs with per-row scales, output in the
    model's dtype (opt-in: a CUDA GPU of compute capability 8.9 or newer, fp16 or bf16).
    """

    NATIVE = "native"
    FP8 = "fp8"


class CompileBatch(str, Enum):
    """How the compile backend's graphs cover the batch buckets (:mod:`livediff.models.recipe`).

    ``per-bucket``: one compiled graph per bucket, every shape static (the default, measured).
    ``shared``: bucket 1 keeps its static graph; the larger buckets share one graph whose batch
    size is symbolic, so a first start compiles two graphs per network instead of one per
    bucket (CUDA graphs are still captured per bucket).
    """

    PER_BUCKET = "per-bucket"
    SHARED = "shared"


def lora_from_text(text: str) -> LoraRef:
    """``"my/lora"`` or ``"my/lora:0.8"`` (a scale after the last colon, when it is a number)."""
    source, separator, scale = text.rpartition(":")
    if separator and source and _is_float(scale):
        return LoraRef(source=source, scale=float(scale))
    return LoraRef(source=text)


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _loras(value: Any, name: str) -> tuple[LoraRef, ...]:
    """LoRAs as given in Python, a TOML list of tables (``{ source, scale }``) or of strings."""
    items = []
    for item in as_tuple(value, name):
        if isinstance(item, LoraRef):
            items.append(item)
        elif isinstance(item, Mapping):
            try:
                items.append(LoraRef(**item))
            except TypeError:
                raise ParameterError(
                    f"{name}: a LoRA table has source, scale and weight_name, got {sorted(item)}",
                    field=name,
                ) from None
        elif isinstance(item, str):
            items.append(lora_from_text(item))
        else:
            raise ParameterError(f"{name}: expected LoRA sources or tables", field=name)
    return tuple(items)


def _controlnet_specs(value: Any, name: str) -> tuple[ControlNetSpec, ...]:
    """ControlNets to load: specs, ``{ source, name, … }`` tables, or sources."""
    known = set(ControlNetSpec.__dataclass_fields__)
    items = []
    for item in as_tuple(value, name):
        if isinstance(item, ControlNetSpec):
            items.append(item)
        elif isinstance(item, str):
            items.append(ControlNetSpec(item))
        elif isinstance(item, Mapping):
            unknown = sorted(set(item) - known, key=str)
            if unknown or "source" not in item:
                raise ParameterError(
                    f"{name}: a ControlNet table takes {', '.join(sorted(known))}"
                    + (
                        f"; unknown: {', '.join(map(str, unknown))}"
                        if unknown
                        else "; source missing"
                    ),
                    field=name,
                )
            items.append(ControlNetSpec(**item))
        else:
            raise ParameterError(f"{name}: expected ControlNet sources or tables", field=name)
    labels = [spec.label for spec in items]
    if len(set(labels)) < len(labels):
        raise ParameterError(
            f"{name}: two ControlNets named {next(n for n in labels if labels.count(n) > 1)!r}; "
            "give each its own name",
            field=name,
        )
    return tuple(items)


def ip_adapter_from_text(text: str) -> IPAdapterSpec:
    """``"h94/IP-Adapter"``, ``"random:plus"`` or ``"/adapters:plain"`` (a variant after the
    last colon, when it names one)."""
    source, separator, variant = text.rpartition(":")
    if separator and source and variant in {v.value for v in IPAdapterVariant}:
        return IPAdapterSpec(source=source, variant=IPAdapterVariant(variant))
    return IPAdapterSpec(source=text)


def _ip_adapter_spec(value: Any, name: str) -> IPAdapterSpec:
    """An IP-Adapter to load: a spec, a ``{ source, variant, … }`` table, or SOURCE[:VARIANT]."""
    try:
        return _ip_adapter_spec_of(value, name)
    except ParameterError as exc:
        if exc.field == name:
            raise
        raise ParameterError(f"{name}: {exc}", field=name) from None


def _ip_adapter_spec_of(value: Any, name: str) -> IPAdapterSpec:
    if isinstance(value, IPAdapterSpec):
        return value
    if isinstance(value, str):
        return ip_adapter_from_text(value)
    if isinstance(value, Mapping):
        known = set(IPAdapterSpec.__dataclass_fields__)
        unknown = sorted(set(value) - known, key=str)
        if unknown:
            raise ParameterError(
                f"{name}: an IP-Adapter table takes {', '.join(sorted(known))}; "
                f"unknown: {', '.join(map(str, unknown))}",
                field=name,
            )
        return IPAdapterSpec(**value)
    raise ParameterError(f"{name}: expected an IP-Adapter source or table", field=name)


@dataclass(frozen=True)
class ModelSpec:
    """Which model to load. ``loras=None`` takes the preset's own LoRAs (LCM-LoRA for ``sd15-lcm``)."""

    preset: str = setting("sd-turbo", doc="model preset", choices=tuple(PRESETS), flag="--model")
    weights: WeightsMode = setting(
        WeightsMode.PRETRAINED,
        doc="'random' builds the exact architecture with random weights, offline (smoke tests, benchmarks)",
        flag="--weights",
    )
    source: str | None = setting(
        None,
        doc="HF id, local diffusers folder or single .safetensors checkpoint",
        special={None: "the preset's"},
        flag="--source",
    )
    config_source: str | None = setting(
        None,
        doc="diffusers folder or HF id with the architecture of a single-file checkpoint",
        special={None: "the preset's"},
        flag="--config-source",
    )
    vae: VaeKind = setting(
        VaeKind.TINY, doc="tiny (TAESD) or the checkpoint's full VAE", flag="--vae"
    )
    vae_source: str | None = setting(
        None,
        doc="HF id or folder of the VAE to use instead of the preset's",
        special={None: "the preset's"},
        flag="--vae-source",
    )
    loras: tuple[LoraRef, ...] | None = setting(
        None,
        doc="LoRAs fused at load (HF id, folder or .safetensors); a flag adds to the preset's own",
        special={None: "the preset's own"},
        check=_loras,
        expected='a list of sources ("id:0.8" for a scale) or { source, scale } tables',
        flag="--lora",
        metavar="SOURCE[:SCALE]",
        repeat=True,
        from_flag=lora_from_text,
    )
    controlnets: tuple[ControlNetSpec, ...] = setting(
        (),
        doc="ControlNets to load besides those the default controlnets name (sessions pick by name)",
        check=_controlnet_specs,
        expected="a list of { source, name, family, union, control_type, config_source, "
        "guess_mode, seed, variant, local_files_only } tables, or sources",
    )
    ip_adapter: IPAdapterSpec | None = setting(
        None,
        doc="IP-Adapter for style images (SD 1.5, SDXL): h94/IP-Adapter, a folder, a file or "
        "random, with :plain or :plus",
        special={None: "none"},
        check=_ip_adapter_spec,
        expected="a { source, variant, weight_name, image_encoder, name, seed, "
        "local_files_only } table, or SOURCE[:VARIANT]",
        flag="--ip-adapter",
        metavar="SOURCE[:VARIANT]",
        from_flag=ip_adapter_from_text,
    )
    depth_source: str | None = setting(
        None,
        doc="Depth Anything V2 Small for the depth preprocessor: HF id, folder or random",
        special={None: "depth-anything/Depth-Anything-V2-Small-hf (random with random weights)"},
    )
    soft_edge_source: str | None = setting(
        None,
        doc="ControlNet's HED weights (ControlNetHED.pth) for the soft_edge preprocessor, or random",
        special={None: "not loaded (random with random weights)"},
    )
    feature_bank_frames: int = setting(
        0,
        doc="most past frames a session's feature bank may keep, 0: none (installs StreamV2V's feature bank on the UNet)",
        min=0,
        max=MAX_BANK_FRAMES,
        flag="--feature-bank-frames",
    )
    feature_bank_rows: int = setting(
        64,
        doc="UNet rows with a feature bank at once, all sessions together (each session takes its steps x its batch rows)",
        min=1,
        max=4096,
        flag="--feature-bank-rows",
    )
    feature_bank_tokens: BankTokens = setting(
        DEFAULT_BANK_TOKENS,
        doc="what a bank frame keeps on self-attentions of at least --feature-bank-reduce-from "
        "tokens: full; merged (half, StreamV2V's token merging); pooled (a quarter, 2x2 "
        "averages): fewer bank keys where they cost most",
        flag="--feature-bank-tokens",
    )
    feature_bank_reduce_from: int = setting(
        DEFAULT_REDUCE_FROM,
        doc="self-attentions of at least this many tokens keep bank frames as "
        "--feature-bank-tokens says (4096: the 64x64 layers at 512²)",
        min=1,
        max=1 << 20,
        flag="--feature-bank-reduce-from",
    )
    precision: Precision = setting(
        Precision.NATIVE,
        doc="native: every layer in --dtype; fp8: the UNet's and ControlNets' transformer "
        "linears as FP8 GEMMs (opt-in, unmeasured with real weights; CUDA compute capability "
        "8.9+, --dtype fp16 or bf16)",
        flag="--precision",
    )
    compile_batch: CompileBatch = setting(
        CompileBatch.PER_BUCKET,
        doc="per-bucket: the compile backend compiles one graph per batch bucket; shared: "
        "buckets above 1 share one graph with a symbolic batch size (a first start compiles "
        "2 graphs per network instead of one per bucket; its speed is not measured yet)",
        flag="--compile-batch",
    )
    seed: int = setting(0, doc="seed of random weights", min=0, below=2**63)
    variant: str | None = setting(
        None, doc='weights variant of a HF repo, e.g. "fp16"', special={None: "the default"}
    )
    local_files_only: bool | None = setting(
        None,
        doc="read only the HF cache, never download",
        special={None: "as $HF_HUB_OFFLINE says"},
    )

    def __post_init__(self) -> None:
        check_settings(self)
        if self.ip_adapter is not None:  # SD 2.1 has none: refused before anything loads
            published_adapter(PRESETS[self.preset].family, self.ip_adapter.variant, self.preset)

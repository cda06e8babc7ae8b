"""Options shared by the subcommands: which model, how to stream, and the TOML config file.

Precedence, lowest first: built-in defaults → the preset's defaults → ``--config file.toml`` →
command-line flags. The TOML file has up to three tables, named like the dataclasses they
fill::

    [model]                 # ModelSpec: preset, weights, source, vae, loras …
    preset = "sd-turbo"
    loras = [{ source = "my/lora", scale = 0.8 }]

    [stream]                # StreamConfig: width, height, frame_buffer_size, rcfg …
    rcfg = "self"

    [params]                # GenerationParams: prompt, negative_prompt, strength, steps, seed …
    prompt = "a watercolor painting"

Other tables (``[server]``, ``[runtime]``) belong to the commands that read them. Every flag
and table key is derived from a setting's declaration (:mod:`livediff.settings`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from livediff.exceptions import BackendError, ParameterError
from livediff.settings import build, preset_defaults, table_values
from livediff.settings.flags import add_flags, flag_values

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def add_model_options(parser: argparse.ArgumentParser) -> None:
    from livediff.models.spec import ModelSpec

    group = parser.add_argument_group("model")
    add_flags(group, ModelSpec)
    group.add_argument(
        "--no-preset-lora",
        action="store_true",
        help="do not fuse the preset's own LoRA (sd15-lcm's LCM-LoRA)",
    )
    group.add_argument(
        "--device", default=None, help="cuda, cuda:1, cpu … (default: cuda if available)"
    )
    group.add_argument(
        "--backend",
        default="auto",
        choices=("auto", "eager", "compile", "tensorrt"),
        help="eager PyTorch, or compile (torch.compile + CUDA graphs; the CUDA default); "
        "tensorrt needs pip install 'livediff[tensorrt]'",
    )
    group.add_argument(
        "--dtype",
        default=None,
        choices=("auto", "fp16", "bf16", "fp32"),
        help="default: fp16 on CUDA, fp32 on CPU",
    )
    group.add_argument(
        "--config", type=Path, help="TOML file with [model], [stream] and [params] tables"
    )


def add_stream_options(parser: argparse.ArgumentParser) -> None:
    from livediff.engine.config import GenerationParams, StreamConfig

    group = parser.add_argument_group("generation")
    add_flags(group, GenerationParams)
    add_flags(group, StreamConfig)


def add_runtime_options(parser: argparse.ArgumentParser) -> None:
    from livediff.engine.runtime_config import RuntimeConfig

    add_flags(parser.add_argument_group("runtime"), RuntimeConfig)


def add_lora_library_options(parser: argparse.ArgumentParser) -> None:
    """``--lora-library`` and its sizes (``[lora_library]``): per-session LoRAs."""
    from livediff.models.lora_library_config import LoraLibraryConfig

    add_flags(parser.add_argument_group("per-session LoRAs"), LoraLibraryConfig)


def add_style_image_option(parser: argparse.ArgumentParser) -> None:
    """``--style-image FILE``: the IP-Adapter style image the stream (or every session) starts with."""
    parser.add_argument(
        "--style-image",
        type=Path,
        metavar="FILE",
        help="a style image (PNG, JPEG, WebP …) for the IP-Adapter, used from the first frame "
        "(needs --ip-adapter; --ip-scale sets its weight; sessions may change it live)",
    )


def style_image_from_args(args: argparse.Namespace, spec: Any) -> bytes | None:
    """The bytes of ``--style-image``, read before the model loads (``None``: not given).

    Refused here, with the flag named: a missing or unreadable file, and a model without
    an IP-Adapter. Whether the bytes are an image is decided when they are encoded.
    """
    path = getattr(args, "style_image", None)
    if path is None:
        return None
    if spec.ip_adapter is None:
        raise ParameterError(
            "--style-image needs an IP-Adapter: add --ip-adapter SOURCE[:VARIANT] "
            "([model.ip_adapter])",
            field="ip_image",
        )
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ParameterError(
            f"--style-image {path}: cannot read it ({exc.strerror or exc})", field="ip_image"
        ) from exc


def lora_library_from_args(args: argparse.Namespace, config: dict[str, Any]) -> Any:
    """The ``LoraLibraryConfig`` of ``[lora_library]`` and the flags (``None``-library: off)."""
    from livediff.models.lora_library_config import LoraLibraryConfig

    return settings_from(LoraLibraryConfig, config, "lora_library", args)


def load_toml(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ParameterError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ParameterError(f"config file {path} is not valid TOML: {exc}") from None


def settings_from(cls: type, config: dict[str, Any], table: str, args: argparse.Namespace) -> Any:
    """``cls`` from its defaults, then TOML table ``[table]``, then the flags."""
    return build(cls, table_values(cls, config.get(table), table), flag_values(cls, args))


def model_spec_from_args(args: argparse.Namespace, config: dict[str, Any]) -> Any:
    from livediff.models.presets import get_preset
    from livediff.models.spec import ModelSpec

    values = table_values(ModelSpec, config.get("model"), "model")
    flags = flag_values(ModelSpec, args)
    if "loras" in flags or args.no_preset_lora:  # --lora adds to the preset's own LoRAs
        preset = flags.get("preset", values.get("preset", "sd-turbo"))
        base = () if args.no_preset_lora else get_preset(preset).loras
        flags["loras"] = tuple(base) + flags.get("loras", ())
    return build(ModelSpec, values, flags)


def stream_settings_from_args(
    args: argparse.Namespace, config: dict[str, Any], preset: Any
) -> tuple[Any, Any]:
    """The (StreamConfig, GenerationParams) pair for these flags, config file and preset."""
    from livediff.engine.config import GenerationParams, StreamConfig

    params = build(
        GenerationParams,
        preset_defaults(GenerationParams, preset),
        table_values(GenerationParams, config.get("params"), "params"),
        flag_values(GenerationParams, args),
    )
    return settings_from(StreamConfig, config, "stream", args), params


def load_for_backend(
    spec: Any,
    args: argparse.Namespace,
    controlnets: Sequence[Any] = (),
    lora_library: Any = None,
) -> tuple[Any, Any]:
    """Load the model for ``--device``/``--dtype``, with the ControlNets ``spec`` and the default
    ControlNet uses ``controlnets`` need, and make it ready for ``--backend``. With an enabled
    ``lora_library`` (``LoraLibraryConfig``) the UNet gets its per-session LoRA library first,
    and the compile recipe fuses its LoRA layers with q/k/v where their ranks fit one call
    (:func:`~livediff.models.backends.recipe_for`).

    Returns ``(bundle, backend)``; a backend that cannot start raises ``BackendError`` here,
    before anything else runs.
    """
    from livediff.models.backends import Backend, prepare_backend, resolve_backend
    from livediff.models.control_setup import attach_controlnets
    from livediff.models.loading import load_model

    bundle = load_model(spec, device=args.device, dtype=args.dtype)
    backend = resolve_backend(getattr(args, "backend", None), bundle.device)
    if backend is Backend.TENSORRT and (spec.controlnets or controlnets):
        raise BackendError(
            "the tensorrt backend runs no ControlNet: use --backend compile (or eager) "
            "with --controlnet"
        )
    bundle = attach_controlnets(bundle, spec, controlnets)
    if spec.ip_adapter is not None:
        if backend is Backend.TENSORRT:
            raise BackendError(
                "the tensorrt backend runs no IP-Adapter: use --backend compile with --ip-adapter"
            )
        from livediff.models.ip_adapter_loading import load_ip_adapter

        bundle = bundle.with_ip_adapter(load_ip_adapter(spec.ip_adapter, bundle))
    if spec.feature_bank_frames:
        if backend is Backend.TENSORRT:
            raise BackendError("the tensorrt backend runs no feature bank: use --backend compile")
        bundle = bundle.with_feature_bank(
            frames=spec.feature_bank_frames,
            rows=spec.feature_bank_rows,
            tokens=spec.feature_bank_tokens,
            reduce_from=spec.feature_bank_reduce_from,
        )
    if lora_library is not None and lora_library.enabled:
        if backend is Backend.TENSORRT:
            raise BackendError(
                "the tensorrt backend runs no per-session LoRAs: use --backend compile (or eager) "
                "with --lora-library, or fuse a LoRA with --lora"
            )
        from livediff.models.lora_setup import attach_lora_library

        bundle = attach_lora_library(bundle, lora_library)
    return prepare_backend(bundle, backend), backend


def refuse_client_images(params: Any, command: str) -> None:
    """A command with no client to send control images (``livediff run``, ``livediff camera``):
    a ControlNet use with the ``client`` preprocessor would never get an image, so it is
    refused before the model loads."""
    from livediff.models.control_uses import Preprocessor

    for use in params.controlnets:
        if use.preprocessor is Preprocessor.CLIENT:
            raise ParameterError(
                f"controlnet {use.controlnet!r}: the client preprocessor takes the images a "
                f"client sends to livediff serve, and {command} has none: use canny, depth, "
                "soft_edge, passthrough or previous_output",
                field="controlnets",
            )

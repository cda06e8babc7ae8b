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

Other tables (``[server]``, ``[runtime]``) belong to the commands that read them.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from livediff.exceptions import ParameterError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PRESET_NAMES = ("sd-turbo", "sdxl-turbo", "sd15-lcm", "tiny")


def add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model", dest="preset", choices=PRESET_NAMES, help="model preset (default: sd-turbo)"
    )
    group.add_argument(
        "--weights",
        choices=("pretrained", "random"),
        help="'random' builds the exact architecture with random weights, offline (smoke tests, benchmarks)",
    )
    group.add_argument(
        "--source",
        help="HF id, local diffusers folder or single .safetensors checkpoint (default: the preset's)",
    )
    group.add_argument(
        "--config-source",
        help="diffusers folder or HF id with the architecture of a single-file checkpoint",
    )
    group.add_argument(
        "--vae", choices=("tiny", "full"), help="tiny (TAESD, default) or the checkpoint's full VAE"
    )
    group.add_argument(
        "--vae-source", help="HF id or folder of the VAE to use instead of the preset's"
    )
    group.add_argument(
        "--lora",
        action="append",
        default=None,
        metavar="SOURCE[:SCALE]",
        help="fuse a LoRA (HF id, folder or .safetensors) at load; repeatable",
    )
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
    group = parser.add_argument_group("generation")
    group.add_argument("--prompt", help="text prompt; 'a:0.7|b:0.3' blends weighted prompts")
    group.add_argument("--negative-prompt", help="negative prompt (used by --rcfg full/initialize)")
    group.add_argument(
        "--blend", choices=("linear", "slerp"), help="how weighted prompts are blended"
    )
    group.add_argument(
        "--strength", type=float, help="how much of the input is replaced, in (0, 1]"
    )
    group.add_argument("--steps", type=int, help="denoising steps per frame (Stream Batch rows)")
    group.add_argument(
        "--t-index-list",
        help="explicit schedule indices, e.g. 32,45 (overrides --strength/--steps)",
    )
    group.add_argument(
        "--num-inference-steps",
        type=int,
        help="length of the LCM schedule the indices pick from (default 50)",
    )
    group.add_argument("--seed", type=int)
    group.add_argument("--guidance-scale", type=float)
    group.add_argument("--delta", type=float, help="RCFG residual-noise scale")
    group.add_argument("--rcfg", choices=("none", "full", "self", "initialize"))
    group.add_argument("--mode", choices=("img2img", "txt2img"))
    group.add_argument("--width", type=int)
    group.add_argument("--height", type=int)
    group.add_argument(
        "--fit", choices=("crop", "resize"), help="how inputs are fitted to the model resolution"
    )
    group.add_argument("--frame-buffer-size", type=int)
    group.add_argument(
        "--no-denoising-batch",
        action="store_true",
        help="sequential denoising (no Stream Batch delay)",
    )
    group.add_argument(
        "--no-add-noise", action="store_true", help="do not re-noise latents between steps"
    )
    group.add_argument(
        "--similarity-threshold", type=float, help="skip near-identical frames (e.g. 0.98)"
    )
    group.add_argument("--max-skip-frames", type=int)


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


def _table(config: dict[str, Any], name: str, allowed: set[str]) -> dict[str, Any]:
    table = config.get(name, {})
    if not isinstance(table, dict):
        raise ParameterError(f"[{name}] in the config file must be a table")
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ParameterError(
            f"unknown key(s) in [{name}]: {', '.join(unknown)}; known: {', '.join(sorted(allowed))}"
        )
    return dict(table)


def parse_lora(text: str) -> Any:
    from livediff.models.presets import LoraRef

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


def parse_prompt(text: str) -> str | list[tuple[str, float]]:
    """``"a"`` → ``"a"``; ``"a:0.7|b:0.3"`` → ``[("a", 0.7), ("b", 0.3)]``."""
    if "|" not in text:
        return text
    parts: list[tuple[str, float]] = []
    for piece in text.split("|"):
        body, _, weight = piece.rpartition(":")
        if body and _is_float(weight):
            parts.append((body.strip(), float(weight)))
        else:
            parts.append((piece.strip(), 1.0))
    return parts


def model_spec_from_args(args: argparse.Namespace, config: dict[str, Any]) -> Any:
    from livediff.models.loading import ModelSpec
    from livediff.models.presets import LoraRef

    values = _table(config, "model", {f.name for f in fields(ModelSpec)})
    if "loras" in values:
        values["loras"] = tuple(
            LoraRef(**item) if isinstance(item, dict) else parse_lora(str(item))
            for item in values["loras"]
        )
    for name in ("preset", "weights", "source", "config_source", "vae", "vae_source"):
        if getattr(args, name, None) is not None:
            values[name] = getattr(args, name)
    if args.lora is not None or args.no_preset_lora:
        from livediff.models.presets import get_preset

        base = () if args.no_preset_lora else get_preset(values.get("preset", "sd-turbo")).loras
        values["loras"] = tuple(base) + tuple(parse_lora(item) for item in (args.lora or []))
    return ModelSpec(**values)


def stream_settings_from_args(
    args: argparse.Namespace, config: dict[str, Any], preset: Any
) -> tuple[Any, Any]:
    """The (StreamConfig, GenerationParams) pair for these flags, config file and preset."""
    from livediff.engine.config import GenerationParams, StreamConfig

    stream_values = _table(config, "stream", {f.name for f in fields(StreamConfig)})
    param_values = _table(config, "params", {f.name for f in fields(GenerationParams)})
    param_values.setdefault("strength", preset.default_strength)
    param_values.setdefault("steps", preset.default_steps)
    for name in (
        "num_inference_steps",
        "frame_buffer_size",
        "rcfg",
        "mode",
        "width",
        "height",
        "fit",
    ):
        if getattr(args, name, None) is not None:
            stream_values[name] = getattr(args, name)
    if args.no_denoising_batch:
        stream_values["use_denoising_batch"] = False
    if args.no_add_noise:
        stream_values["do_add_noise"] = False
    for name in (
        "negative_prompt",
        "blend",
        "strength",
        "steps",
        "seed",
        "guidance_scale",
        "delta",
        "similarity_threshold",
        "max_skip_frames",
    ):
        if getattr(args, name, None) is not None:
            param_values[name] = getattr(args, name)
    if args.prompt is not None:
        param_values["prompt"] = parse_prompt(args.prompt)
    elif isinstance(param_values.get("prompt"), list):
        param_values["prompt"] = [tuple(item) for item in param_values["prompt"]]
    if args.t_index_list:
        try:
            param_values["t_index_list"] = tuple(int(v) for v in args.t_index_list.split(","))
        except ValueError:
            raise ParameterError(
                f"--t-index-list {args.t_index_list!r} must be comma-separated integers"
            ) from None
    elif param_values.get("t_index_list") is not None:
        param_values["t_index_list"] = tuple(param_values["t_index_list"])
    return StreamConfig(**stream_values), GenerationParams(**param_values)


def load_for_backend(spec: Any, args: argparse.Namespace) -> tuple[Any, Any]:
    """Load the model for ``--device``/``--dtype`` and make it ready for ``--backend``.

    Returns ``(bundle, backend)``; a backend that cannot start raises ``BackendError`` here,
    before anything else runs.
    """
    from livediff.models.backends import prepare_backend, resolve_backend
    from livediff.models.loading import load_model

    bundle = load_model(spec, device=args.device, dtype=args.dtype)
    backend = resolve_backend(getattr(args, "backend", None), bundle.device)
    return prepare_backend(bundle, backend), backend

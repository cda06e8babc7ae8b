"""Frozen, checked configuration for one stream, and the enums that name its modes.

Two dataclasses split what a running stream can change cheaply from what it cannot:

- :class:`StreamConfig` is structural: resolution, frame buffer size, RCFG mode, batching.
  Changing it means new buffers, so it is fixed for the life of a :class:`~livediff.engine.stream.Stream`.
- :class:`GenerationParams` is live: prompt, seed, strength / t_index_list, guidance, delta,
  similarity filter. ``Stream.update(...)`` swaps it between frames without re-preparing.

Every field is a setting declared once (:mod:`livediff.settings`): its type, range, default,
doc line and the surfaces that accept it (flag, ``[stream]``/``[params]`` table, ``/ws`` query,
control message). Both check every field in ``__post_init__`` and raise :class:`ParameterError`
with a message that names the field, the value and the accepted range.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from enum import Enum
from typing import Any

from livediff.exceptions import ParameterError
from livediff.models.blend_method import BlendMethod
from livediff.models.control_uses import ControlUse, control_uses
from livediff.models.feature_bank import MAX_BANK_FRAMES
from livediff.models.ip_adapter_spec import MAX_IP_SCALE
from livediff.models.lora_uses import LoraUse, lora_uses
from livediff.settings import (
    check_settings,
    check_text,
    enum_value,
    is_number,
    names,
    preset_defaults,
    refuse,
    setting,
    shown,
    shown_key,
)


class RCFGMode(str, Enum):
    """Residual classifier-free guidance (StreamDiffusion §3.3).

    - ``none``: no guidance; one UNet row per latent.
    - ``full``: classic CFG; a negative-prompt UNet row for every latent (2× rows).
    - ``self``: Self-Negative RCFG; the virtual residual noise towards the input latent
      replaces the negative prediction (no extra rows).
    - ``initialize``: Onetime-Negative RCFG; one negative row per new frame at the first step
      only, whose x0 estimate anchors the residual of all later steps.
    """

    NONE = "none"
    FULL = "full"
    SELF = "self"
    INITIALIZE = "initialize"


class GenerationMode(str, Enum):
    """``img2img`` transforms input frames; ``txt2img`` generates a continuous stream from noise."""

    IMG2IMG = "img2img"
    TXT2IMG = "txt2img"


class FitMode(str, Enum):
    """How an input frame of any size is fitted to the model resolution.

    - ``crop``: scale so the frame covers the target, then cut the centre (keeps aspect).
    - ``resize``: stretch to the target (keeps everything, distorts aspect).
    """

    CROP = "crop"
    RESIZE = "resize"


# Upper bounds keep one bad request from allocating unbounded memory or compute.
MAX_RESOLUTION = 2048
MAX_FRAME_BUFFER_SIZE = 8
MAX_INFERENCE_STEPS = 1000
MAX_STEPS = 50  # denoising steps per frame (UNet rows per latent)
MAX_GUIDANCE_SCALE = 30.0
MAX_DELTA = 10.0
MAX_PROMPTS = 8
MAX_PROMPT_CHARS = 2000


@dataclass(frozen=True)
class StreamConfig:
    """Structural settings of one stream; fixed for its lifetime."""

    width: int | None = setting(
        None,
        doc="output width in pixels",
        min=64,
        max=MAX_RESOLUTION,
        multiple_of=8,
        special={None: "the preset's"},
        flag="--width",
    )
    height: int | None = setting(
        None,
        doc="output height in pixels",
        min=64,
        max=MAX_RESOLUTION,
        multiple_of=8,
        special={None: "the preset's"},
        flag="--height",
    )
    num_inference_steps: int = setting(
        50,
        doc="length of the LCM schedule the indices pick from",
        min=1,
        max=MAX_INFERENCE_STEPS,
        flag="--num-inference-steps",
    )
    frame_buffer_size: int = setting(
        1,
        doc="input frames denoised together in one call",
        min=1,
        max=MAX_FRAME_BUFFER_SIZE,
        flag="--frame-buffer-size",
    )
    use_denoising_batch: bool = setting(
        True,
        doc="Stream Batch: all steps of a frame in one batched call (off: sequential, no delay)",
        flag="--no-denoising-batch",
    )
    do_add_noise: bool = setting(True, doc="re-noise latents between steps", flag="--no-add-noise")
    rcfg: RCFGMode = setting(
        RCFGMode.NONE, doc="residual classifier-free guidance (RCFGMode)", flag="--rcfg"
    )
    mode: GenerationMode = setting(
        GenerationMode.IMG2IMG,
        doc="transform input frames, or generate a stream from noise",
        flag="--mode",
    )
    fit: FitMode = setting(
        FitMode.CROP, doc="how inputs are fitted to the model resolution", flag="--fit"
    )

    def __post_init__(self) -> None:
        check_settings(self)

    def with_resolution(self, width: int, height: int) -> StreamConfig:
        return replace(self, width=width, height=height)


PromptLike = str | Sequence[tuple[str, float]]


def normalize_prompt(prompt: PromptLike, name: str = "prompt") -> tuple[tuple[str, float], ...]:
    """Turn ``"text"`` or ``[("a", 0.7), ("b", 0.3)]`` into a checked tuple of (text, weight)."""
    if isinstance(prompt, str):
        items: list[tuple[str, float]] = [(prompt, 1.0)]
    else:
        try:
            items = [(text, weight) for text, weight in prompt]
        except (TypeError, ValueError):
            raise ParameterError(
                f"{name} must be a string or a list of (text, weight) pairs", field=name
            ) from None
    if not 1 <= len(items) <= MAX_PROMPTS:
        refuse(f"len({name})", len(items), f"1 to {MAX_PROMPTS} prompts", field=name)
    for text, weight in items:
        check_text(text, f"{name} text")
        if len(text) > MAX_PROMPT_CHARS:
            refuse(
                f"len({name} text)", len(text), f"at most {MAX_PROMPT_CHARS} characters", field=name
            )
        if not (is_number(weight) and 0 <= weight <= 1e6):
            refuse(f"{name} weight", weight, "a finite number in [0, 1e6]", field=name)
    total = sum(weight for _, weight in items)
    if not total > 0:
        refuse(f"sum of {name} weights", total, "> 0", field=name)
    return tuple((text, float(weight)) for text, weight in items)


def prompt_from_text(text: str) -> str | list[tuple[str, float]]:
    """``"a"`` → ``"a"``; ``"a:0.7|b:0.3"`` → ``[("a", 0.7), ("b", 0.3)]`` (the flag's syntax)."""
    if "|" not in text:
        return text
    parts: list[tuple[str, float]] = []
    for piece in text.split("|"):
        body, _, weight = piece.rpartition(":")
        try:
            parts.append((body.strip(), float(weight)) if body else (piece.strip(), 1.0))
        except ValueError:
            parts.append((piece.strip(), 1.0))
    return parts


def image_key(value: Any, name: str) -> str:
    """A style image's key: the lower-case hex SHA-256 the server answered its upload with."""
    text = check_text(value, name).lower()
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise ParameterError(
            f"{name}={shown(value)} is not an uploaded image's key (64 hex digits, as the "
            "upload's answer gives it)",
            field=name,
        )
    return text


@dataclass(frozen=True)
class GenerationParams:
    """Live parameters of a stream; every field may change between two frames.

    ``t_index_list`` picks steps of the LCM schedule directly; when it is ``None`` it is
    derived from ``strength`` and ``steps`` (see :func:`livediff.engine.lcm_schedule.strength_to_t_index_list`).
    """

    prompt: tuple[tuple[str, float], ...] = setting(
        "",
        doc="text prompt; several weighted prompts blend (flag: 'a:0.7|b:0.3')",
        check=normalize_prompt,
        expected=f"a string, or 1 to {MAX_PROMPTS} [text, weight] pairs",
        live=True,
        flag="--prompt",
        from_flag=prompt_from_text,
    )
    negative_prompt: str = setting(
        "",
        doc="negative prompt (used by rcfg full and initialize)",
        max_length=MAX_PROMPT_CHARS,
        live=True,
        flag="--negative-prompt",
    )
    blend: BlendMethod = setting(
        BlendMethod.LINEAR, doc="how weighted prompts are blended", live=True, flag="--blend"
    )
    seed: int = setting(2, doc="noise seed", min=0, below=2**63, live=True, flag="--seed")
    steps: int = setting(
        1,
        doc="denoising steps per frame (Stream Batch rows)",
        min=1,
        max=MAX_STEPS,
        live=True,
        flag="--steps",
        preset_default="default_steps",
    )
    strength: float = setting(
        0.5,
        doc="how much of the input is replaced",
        above=0,
        max=1,
        live=True,
        flag="--strength",
        preset_default="default_strength",
    )
    t_index_list: tuple[int, ...] | None = setting(
        None,
        doc="explicit schedule indices, e.g. 32,45 (overrides strength and steps)",
        min=0,
        below=MAX_INFERENCE_STEPS,
        min_items=1,
        max_items=MAX_STEPS,
        increasing=True,
        special={None: "derived from strength and steps"},
        live=True,
        flag="--t-index-list",
    )
    guidance_scale: float = setting(
        1.0,
        doc="classifier-free guidance scale",
        min=0,
        max=MAX_GUIDANCE_SCALE,
        live=True,
        flag="--guidance-scale",
    )
    delta: float = setting(
        1.0, doc="RCFG residual-noise scale", min=0, max=MAX_DELTA, live=True, flag="--delta"
    )
    similarity_threshold: float | None = setting(
        None,
        doc="skip frames at least this similar to the last one processed (e.g. 0.98)",
        min=0,
        max=1,
        special={None: "no filter"},
        live=True,
        flag="--similarity-threshold",
    )
    max_skip_frames: int = setting(
        10,
        doc="skipped frames in a row at most, then one runs",
        min=0,
        max=10_000,
        live=True,
        flag="--max-skip-frames",
    )
    controlnets: tuple[ControlUse, ...] = setting(
        (),
        doc="the ControlNets this session uses: {controlnet, scale, preprocessor, params} each, up to 4; on the command line it also loads them",
        check=control_uses,
        expected="a list of {controlnet, scale, preprocessor, params} objects, or SOURCE[:SCALE[:PREPROCESSOR]] texts",
        live=True,
        flag="--controlnet",
        metavar="SOURCE[:SCALE[:PREPROCESSOR]]",
        repeat=True,
    )
    feature_bank: int = setting(
        0,
        doc="past frames each self-attention also attends to, 0: off (StreamV2V's feature bank; the server needs --feature-bank-frames)",
        min=0,
        max=MAX_BANK_FRAMES,
        live=True,
        flag="--feature-bank",
    )
    bank_interval: int = setting(
        4,
        doc="keep every n-th frame in the feature bank (StreamV2V's cache interval)",
        min=1,
        max=60,
        live=True,
        flag="--bank-interval",
    )
    feature_fusion: float = setting(
        0.8,
        doc="with a feature bank: blend this much of each matching past feature into the output (mid and first up blocks), 0: off",
        min=0,
        max=1,
        live=True,
        flag="--feature-fusion",
    )
    fusion_threshold: float = setting(
        0.98,
        doc="cosine similarity at which a past feature counts as a match for fusion",
        min=0,
        max=1,
        live=True,
        flag="--fusion-threshold",
    )
    latent_feedback: float = setting(
        0.0,
        doc="blend this much of the previous output latent into each new input latent (img2img), 0: off",
        min=0,
        below=1,
        live=True,
        flag="--latent-feedback",
    )
    scene_cut: float = setting(
        0.5,
        doc="consecutive input frames less similar than this are a scene cut: the feature bank and latent feedback start over (0: never)",
        min=0,
        max=1,
        live=True,
        flag="--scene-cut",
    )
    loras: tuple[LoraUse, ...] = setting(
        (),
        doc="the per-session LoRAs this session uses: {name, scale} each (scale in [-10, 10]), "
        "up to the server's slots per row (at most 8), by the names the server loaded them under",
        check=lora_uses,
        expected="a list of {name, scale} objects, or NAME[:SCALE] texts",
        live=True,
        flag="--session-lora",
        metavar="NAME[:SCALE]",
        repeat=True,
    )
    ip_image: str | None = setting(
        None,
        doc="the style image (IP-Adapter): the key an upload was answered with; null: none "
        "(the server needs --ip-adapter)",
        special={None: "none"},
        check=image_key,
        expected="the 64-hex-digit key of an uploaded image",
        live=True,
    )
    ip_scale: float = setting(
        1.0,
        doc="how strongly the style image steers the output, 0: not at all",
        min=0,
        max=MAX_IP_SCALE,
        live=True,
        flag="--ip-scale",
    )

    def __post_init__(self) -> None:
        check_settings(self)
        if self.t_index_list is not None:
            object.__setattr__(self, "steps", len(self.t_index_list))

    @classmethod
    def for_preset(cls, preset: Any, **values: Any) -> GenerationParams:
        """Parameters with ``preset``'s defaults (strength, steps) under ``values``."""
        return cls(**{**preset_defaults(cls, preset), **values})

    def updated(self, **changes: Any) -> GenerationParams:
        """Return a checked copy with ``changes`` applied; unknown keys raise :class:`ParameterError`."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ParameterError(
                f"unknown parameter(s): {', '.join(shown_key(k) for k in unknown[:5])}; "
                f"known: {', '.join(sorted(known))}",
                field=unknown[0],
            )
        if "strength" in changes and "t_index_list" not in changes:
            changes["t_index_list"] = None  # a new strength re-derives the steps
        if "steps" in changes and "t_index_list" not in changes:
            changes["t_index_list"] = None
        return replace(self, **changes)


LIVE_PARAMETER_NAMES: frozenset[str] = names(GenerationParams, "live")
__all__ = [
    "LIVE_PARAMETER_NAMES",
    "BlendMethod",
    "FitMode",
    "GenerationMode",
    "GenerationParams",
    "PromptLike",
    "RCFGMode",
    "StreamConfig",
    "check_text",
    "enum_value",
    "normalize_prompt",
    "prompt_from_text",
    "shown",
    "shown_key",
]

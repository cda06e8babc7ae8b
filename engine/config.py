"""Frozen, checked configuration for one stream, and the enums that name its modes.

Two dataclasses split what a running stream can change cheaply from what it cannot:

- :class:`StreamConfig` is structural: resolution, frame buffer size, RCFG mode, batching.
  Changing it means new buffers, so it is fixed for the life of a :class:`~livediff.engine.stream.Stream`.
- :class:`GenerationParams` is live: prompt, seed, strength / t_index_list, guidance, delta,
  similarity filter. ``Stream.update(...)`` swaps it between frames without re-preparing.

Both validate every field in ``__post_init__`` and raise :class:`ParameterError` with a
message that names the field, the value and the accepted range.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from enum import Enum
from typing import Any

from livediff.exceptions import ParameterError
from livediff.models.prompts import BlendMethod


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


def shown(value: Any) -> str:
    """``value`` for an error message: short, never a huge number or a Python object's repr."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**15:
        digits = len(str(abs(value))) if abs(value) < 10**4000 else "over 4000"
        return f"an integer of {digits} digits"
    if isinstance(value, (str, bytes)):
        return (
            ascii(value) if len(value) <= 60 else f"a {type(value).__name__} of length {len(value)}"
        )
    if isinstance(value, (list, tuple)):
        if len(value) > 8:
            return f"a list of {len(value)} items"
        return "[" + ", ".join(shown(item) for item in value) + "]"
    if isinstance(value, dict):
        return "an object" if value else "{}"
    if value is None or isinstance(value, (bool, int, float)):
        return ascii(value)
    return f"a {type(value).__name__}"


def shown_key(key: Any) -> str:
    """A parameter name for an error message: as it is when it looks like one, else :func:`shown`."""
    if isinstance(key, str) and key.isascii() and key.isidentifier() and len(key) <= 40:
        return key
    return shown(key)


def _check(
    condition: bool, name: str, value: Any, expected: str, *, field: str | None = None
) -> None:
    if not condition:
        raise ParameterError(
            f"{name}={shown(value)} is out of range: expected {expected}", field=field or name
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A finite int or float (an int of any size is finite: ``math.isfinite`` would overflow)."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))


def check_text(text: Any, name: str) -> str:
    """``text`` if it is a string that encodes as UTF-8 (no lone surrogates such as ``"\\ud800"``)."""
    if not isinstance(text, str):
        raise ParameterError(
            f"{name} must be a string, got {type(text).__name__}", field=name.split(" ")[0]
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ParameterError(
            f"{name} is not valid Unicode: it holds a lone surrogate ({text[exc.start]!a} "
            f"at position {exc.start})",
            field=name.split(" ")[0],
        ) from None
    return text


@dataclass(frozen=True)
class StreamConfig:
    """Structural settings of one stream; fixed for its lifetime.

    ``width``/``height`` of ``None`` take the model preset's native resolution.
    """

    width: int | None = None
    height: int | None = None
    num_inference_steps: int = 50
    frame_buffer_size: int = 1
    use_denoising_batch: bool = True
    do_add_noise: bool = True
    rcfg: RCFGMode = RCFGMode.NONE
    mode: GenerationMode = GenerationMode.IMG2IMG
    fit: FitMode = FitMode.CROP

    def __post_init__(self) -> None:
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None:
                _check(
                    _is_int(value) and 64 <= value <= MAX_RESOLUTION and value % 8 == 0,
                    name,
                    value,
                    f"a multiple of 8 in [64, {MAX_RESOLUTION}]",
                )
        _check(
            _is_int(self.num_inference_steps)
            and 1 <= self.num_inference_steps <= MAX_INFERENCE_STEPS,
            "num_inference_steps",
            self.num_inference_steps,
            f"an integer in [1, {MAX_INFERENCE_STEPS}]",
        )
        _check(
            _is_int(self.frame_buffer_size)
            and 1 <= self.frame_buffer_size <= MAX_FRAME_BUFFER_SIZE,
            "frame_buffer_size",
            self.frame_buffer_size,
            f"an integer in [1, {MAX_FRAME_BUFFER_SIZE}]",
        )
        object.__setattr__(self, "rcfg", enum_value(RCFGMode, self.rcfg, "rcfg"))
        object.__setattr__(self, "mode", enum_value(GenerationMode, self.mode, "mode"))
        object.__setattr__(self, "fit", enum_value(FitMode, self.fit, "fit"))

    def with_resolution(self, width: int, height: int) -> StreamConfig:
        return replace(self, width=width, height=height)


def enum_value(kind: type[Enum], value: Any, name: str) -> Any:
    try:
        return kind(value)
    except (ValueError, TypeError):
        allowed = ", ".join(str(member.value) for member in kind)
        raise ParameterError(
            f"{name}={shown(value)} is not one of: {allowed}", field=name
        ) from None


PromptLike = str | Sequence[tuple[str, float]]


def normalize_prompt(prompt: PromptLike) -> tuple[tuple[str, float], ...]:
    """Turn ``"text"`` or ``[("a", 0.7), ("b", 0.3)]`` into a checked tuple of (text, weight)."""
    if isinstance(prompt, str):
        items: list[tuple[str, float]] = [(prompt, 1.0)]
    else:
        try:
            items = [(text, weight) for text, weight in prompt]
        except (TypeError, ValueError):
            raise ParameterError(
                "prompt must be a string or a list of (text, weight) pairs", field="prompt"
            ) from None
    _check(
        1 <= len(items) <= MAX_PROMPTS,
        "len(prompt)",
        len(items),
        f"1 to {MAX_PROMPTS} prompts",
        field="prompt",
    )
    for text, weight in items:
        check_text(text, "prompt text")
        _check(
            len(text) <= MAX_PROMPT_CHARS,
            "len(prompt text)",
            len(text),
            f"at most {MAX_PROMPT_CHARS} characters",
            field="prompt",
        )
        _check(
            _is_number(weight) and 0 <= weight <= 1e6,
            "prompt weight",
            weight,
            "a finite number in [0, 1e6]",
            field="prompt",
        )
    total = sum(weight for _, weight in items)
    _check(total > 0, "sum of prompt weights", total, "> 0", field="prompt")
    return tuple((text, float(weight)) for text, weight in items)


@dataclass(frozen=True)
class GenerationParams:
    """Live parameters of a stream; every field may change between two frames.

    ``t_index_list`` picks steps of the LCM schedule directly; when it is ``None`` it is
    derived from ``strength`` and ``steps`` (see :func:`livediff.engine.schedule.strength_to_t_index_list`).
    """

    prompt: tuple[tuple[str, float], ...] = (("", 1.0),)
    negative_prompt: str = ""
    blend: BlendMethod = BlendMethod.LINEAR
    seed: int = 2
    steps: int = 1
    strength: float = 0.5
    t_index_list: tuple[int, ...] | None = None
    guidance_scale: float = 1.0
    delta: float = 1.0
    similarity_threshold: float | None = None
    max_skip_frames: int = 10

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompt", normalize_prompt(self.prompt))
        check_text(self.negative_prompt, "negative_prompt")
        _check(
            len(self.negative_prompt) <= MAX_PROMPT_CHARS,
            "len(negative_prompt)",
            len(self.negative_prompt),
            f"at most {MAX_PROMPT_CHARS} characters",
            field="negative_prompt",
        )
        object.__setattr__(self, "blend", enum_value(BlendMethod, self.blend, "blend"))
        _check(
            _is_int(self.seed) and 0 <= self.seed < 2**63,
            "seed",
            self.seed,
            "an integer in [0, 2**63)",
        )
        _check(
            _is_int(self.steps) and 1 <= self.steps <= MAX_STEPS,
            "steps",
            self.steps,
            f"an integer in [1, {MAX_STEPS}]",
        )
        _check(
            _is_number(self.strength) and 0 < self.strength <= 1,
            "strength",
            self.strength,
            "a number in (0, 1]",
        )
        if self.t_index_list is not None:
            if not isinstance(self.t_index_list, (list, tuple)):
                raise ParameterError(
                    f"t_index_list={shown(self.t_index_list)}: expected a list of integers",
                    field="t_index_list",
                )
            values = tuple(self.t_index_list)
            _check(
                1 <= len(values) <= MAX_STEPS
                and all(_is_int(v) and 0 <= v < MAX_INFERENCE_STEPS for v in values),
                "t_index_list",
                self.t_index_list,
                f"1 to {MAX_STEPS} integers in [0, {MAX_INFERENCE_STEPS})",
            )
            _check(
                all(a < b for a, b in itertools.pairwise(values)),
                "t_index_list",
                self.t_index_list,
                "strictly increasing indices (later steps are less noisy)",
            )
            object.__setattr__(self, "t_index_list", values)
            object.__setattr__(self, "steps", len(values))
        _check(
            _is_number(self.guidance_scale) and 0 <= self.guidance_scale <= MAX_GUIDANCE_SCALE,
            "guidance_scale",
            self.guidance_scale,
            f"a number in [0, {MAX_GUIDANCE_SCALE}]",
        )
        _check(
            _is_number(self.delta) and 0 <= self.delta <= MAX_DELTA,
            "delta",
            self.delta,
            f"a number in [0, {MAX_DELTA}]",
        )
        if self.similarity_threshold is not None:
            _check(
                _is_number(self.similarity_threshold) and 0 <= self.similarity_threshold <= 1,
                "similarity_threshold",
                self.similarity_threshold,
                "a number in [0, 1], or None to disable the filter",
            )
        _check(
            _is_int(self.max_skip_frames) and 0 <= self.max_skip_frames <= 10_000,
            "max_skip_frames",
            self.max_skip_frames,
            "an integer in [0, 10000]",
        )

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


LIVE_PARAMETER_NAMES: frozenset[str] = frozenset(f.name for f in fields(GenerationParams))
__all__ = [
    "LIVE_PARAMETER_NAMES",
    "BlendMethod",
    "FitMode",
    "GenerationMode",
    "GenerationParams",
    "PromptLike",
    "RCFGMode",
    "StreamConfig",
    "normalize_prompt",
]

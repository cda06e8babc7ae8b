"""What a session asks of ControlNets: :class:`ControlUse` (which net, how strongly, fed by which
preprocessor with which parameters), and the preprocessors' names and parameters.

Light on purpose (no torch): the settings declare ``GenerationParams.controlnets`` with these
types, and ``livediff --help`` must not load torch. The work itself is in
:mod:`livediff.models.control_images` (preprocessors) and :mod:`livediff.models.controlnet`.

A session's ``controlnets`` is a list of up to :data:`MAX_CONTROL_USES` uses; each names one of
the ControlNets the server loaded (by its name: ``--controlnet SOURCE`` loads a net named after
its source; ``[[model.controlnets]]`` tables may name it), with ``scale`` in [0, 2] (0: off),
``preprocessor`` (default: the one the ControlNet was trained on, from
:mod:`livediff.models.controlnet_catalog`, else ``canny``) and its ``params`` (canny:
``low``, ``high``, ``sigma``). In a control message::

    {"controlnets": [{"controlnet": "control_v11p_sd15_canny", "scale": 0.8,
                      "preprocessor": "canny", "params": {"low": 80, "high": 160}}]}

On the command line: ``--controlnet SOURCE[:SCALE[:PREPROCESSOR]]`` (repeatable).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any

from livediff.exceptions import ParameterError
from livediff.models.presets import Family

MAX_CANNY_SIGMA = 3.0  # kernels/canny.py's MAX_SIGMA: a 5×5 kernel truncates a wider Gaussian
MAX_CONTROL_USES = 4
MAX_CONTROL_SCALE = 2.0

RANDOM = "random"

# ControlNetUnionModel's control modes (xinsir/controlnet-union-sdxl-1.0; "promax" adds 6 and 7).
UNION_CONTROL_TYPES: dict[str, int] = {
    "openpose": 0,
    "depth": 1,
    "soft_edge": 2,  # HED, PiDiNet, scribble (thick lines)
    "canny": 3,  # canny, lineart, MLSD (thin lines)
    "normal": 4,
    "segment": 5,
    "tile": 6,
    "inpaint": 7,
}


@dataclass(frozen=True)
class ControlNetSpec:
    """What ControlNet to load, and under which name sessions refer to it.

    ``source`` is a Hugging Face id (read from the HF cache; downloaded unless offline), a
    diffusers folder (``config.json`` + weights), a single ``.safetensors`` / ``.ckpt`` file
    (diffusers or original layout; its architecture comes from ``config_source``, else the
    model's own family architecture), or ``"random"``: the exact architecture of the model
    family's ControlNets with seeded random weights (``union=True`` for ControlNetUnionModel).

    ``family`` is the family the net is meant for; ``None`` takes it from the net's config.
    ``control_type`` is the union mode (a name of :data:`UNION_CONTROL_TYPES` or its index),
    required for union nets and refused for others. ``guess_mode`` scales the residuals from
    0.1 (first block) to 1 (middle block), as diffusers' ``guess_mode`` does.
    """

    source: str
    name: str | None = None
    family: Family | None = None
    union: bool | None = None
    control_type: str | int | None = None
    config_source: str | None = None
    guess_mode: bool = False
    seed: int = 0
    variant: str | None = None
    local_files_only: bool | None = None

    def __post_init__(self) -> None:
        if not self.source:
            raise ParameterError(
                "a ControlNet needs a source: an HF id, a folder, a .safetensors file or 'random'",
                field="source",
            )
        if self.name is not None and not self.name.strip():
            raise ParameterError("a ControlNet's name must not be empty", field="name")
        if self.family is not None:
            try:
                object.__setattr__(self, "family", Family(self.family))
            except ValueError:
                allowed = ", ".join(f.value for f in Family)
                raise ParameterError(
                    f"family={self.family!r} is not one of: {allowed}", field="family"
                ) from None
        if self.control_type is not None:
            union_control_index(self.control_type)

    @property
    def label(self) -> str:
        """The name sessions use: ``name``, else the source."""
        return self.name or self.source

    @property
    def is_random(self) -> bool:
        return self.source == RANDOM


def union_control_index(control_type: str | int) -> int:
    """The index of a union control mode, given by name or index."""
    if isinstance(control_type, bool) or not isinstance(control_type, (str, int)):
        raise ParameterError(f"control_type={control_type!r} must be a name or an index")
    if isinstance(control_type, int):
        if control_type < 0:
            raise ParameterError(f"control_type={control_type} must be >= 0", field="control_type")
        return control_type
    try:
        return UNION_CONTROL_TYPES[control_type]
    except KeyError:
        names = ", ".join(UNION_CONTROL_TYPES)
        raise ParameterError(
            f"unknown union control_type {control_type!r}; choose one of: {names}",
            field="control_type",
        ) from None


class Preprocessor(str, Enum):
    """What turns a frame into a ControlNet's control image."""

    CANNY = "canny"
    DEPTH = "depth"
    SOFT_EDGE = "soft_edge"
    PASSTHROUGH = "passthrough"  # tile ControlNets
    PREVIOUS_OUTPUT = "previous_output"  # TemporalNet
    CLIENT = "client"  # an image the client sends (openpose, scribbles)


def parse_preprocessor(value: Preprocessor | str) -> Preprocessor:
    try:
        return Preprocessor(value)
    except ValueError:
        names = ", ".join(p.value for p in Preprocessor)
        raise ParameterError(
            f"unknown preprocessor {value!r}; choose one of: {names}", field="preprocessor"
        ) from None


@dataclass(frozen=True)
class CannyParams:
    """Canny's live parameters: thresholds on the 8-bit gradient magnitude, and the blur.

    ``low`` and ``high`` are in [0, 255] with ``low < high`` (OpenCV's meaning, L2 gradient):
    pixels above ``high`` start edges, pixels above ``low`` continue them. ``sigma`` is the
    5×5 Gaussian blur's, in [0, 3]; 0 turns the blur off. Defaults: ControlNet's annotator
    thresholds (100, 200) with a light blur against camera noise.
    """

    low: float = 100.0
    high: float = 200.0
    sigma: float = 1.0

    def __post_init__(self) -> None:
        for name, limit in (("low", 255.0), ("high", 255.0), ("sigma", MAX_CANNY_SIGMA)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ParameterError(
                    f"canny {name}={value!r} must be a number", field=f"canny_{name}"
                )
            if not 0.0 <= float(value) <= limit:
                raise ParameterError(
                    f"canny {name}={value} is out of range: expected [0, {limit:g}]",
                    field=f"canny_{name}",
                    limit=limit,
                )
        if not self.low < self.high:
            raise ParameterError(
                f"canny low={self.low} must be below high={self.high}", field="canny_low"
            )


PARAMS: dict[Preprocessor, type[CannyParams]] = {Preprocessor.CANNY: CannyParams}


def parse_params(kind: Preprocessor | str, values: Mapping[str, Any] | None) -> CannyParams | None:
    """A preprocessor's parameters from a mapping (a client message): unknown keys are errors."""
    kind = parse_preprocessor(kind)
    cls = PARAMS.get(kind)
    values = dict(values or {})
    if cls is None:
        if values:
            raise ParameterError(
                f"preprocessor {kind.value} takes no parameters (got {', '.join(values)})",
                field=next(iter(values)),
            )
        return None
    known = {f.name for f in fields(cls)}
    for key in values:
        if key not in known:
            raise ParameterError(
                f"unknown {kind.value} parameter {key!r}; it takes {', '.join(sorted(known))}",
                field=key,
            )
    return cls(**values)


@dataclass(frozen=True)
class ControlUse:
    """One ControlNet a session uses (see the module docstring)."""

    controlnet: str
    scale: float = 1.0
    preprocessor: Preprocessor | None = None  # None: the ControlNet's own (the engine resolves it)
    params: CannyParams | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.controlnet, str) or not self.controlnet.strip():
            raise ParameterError(
                "a ControlNet use needs the name of a loaded ControlNet", field="controlnets"
            )
        scale = self.scale
        if (
            isinstance(scale, bool)
            or not isinstance(scale, (int, float))
            or not (0.0 <= float(scale) <= MAX_CONTROL_SCALE)
        ):
            raise ParameterError(
                f"controlnet scale={scale!r} is out of range: expected a number in [0, {MAX_CONTROL_SCALE:g}]",
                field="controlnets",
                limit=MAX_CONTROL_SCALE,
            )
        object.__setattr__(self, "scale", float(scale))
        if self.preprocessor is not None:
            object.__setattr__(self, "preprocessor", parse_preprocessor(self.preprocessor))
        if self.params is not None and not isinstance(self.params, CannyParams):
            if not isinstance(self.params, Mapping):
                raise ParameterError("controlnet params must be an object", field="controlnets")
            kind = self.preprocessor or Preprocessor.CANNY
            object.__setattr__(self, "params", parse_params(kind, self.params))

    def as_json(self) -> dict[str, Any]:
        """The use as the protocol writes it."""
        values: dict[str, Any] = {"controlnet": self.controlnet, "scale": self.scale}
        if self.preprocessor is not None:
            values["preprocessor"] = self.preprocessor.value
        if self.params is not None:
            values["params"] = {f.name: getattr(self.params, f.name) for f in fields(self.params)}
        return values


def use_from_text(text: str) -> ControlUse:
    """``SOURCE``, ``SOURCE:SCALE`` or ``SOURCE:SCALE:PREPROCESSOR`` (``--controlnet``)."""
    parts = text.rsplit(":", 2)
    if len(parts) == 3 and _is_number(parts[1]) and not _is_number(parts[2]):
        return ControlUse(parts[0], float(parts[1]), parse_preprocessor(parts[2]))
    head, separator, last = text.rpartition(":")
    if separator and head and _is_number(last):
        return ControlUse(head, float(last))
    return ControlUse(text)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _use_of(item: Any, name: str) -> ControlUse:
    if isinstance(item, ControlUse):
        return item
    if isinstance(item, str):
        return use_from_text(item)
    if isinstance(item, Mapping):
        unknown = sorted(set(item) - {"controlnet", "scale", "preprocessor", "params"}, key=str)
        if unknown or "controlnet" not in item:
            raise ParameterError(
                f"{name}: each use is {{controlnet, scale, preprocessor, params}}"
                + (
                    f"; unknown: {', '.join(map(str, unknown))}"
                    if unknown
                    else "; controlnet missing"
                ),
                field=name,
            )
        return ControlUse(**item)
    raise ParameterError(
        f"{name}: a use is an object {{controlnet, scale, …}} or a name, not {type(item).__name__}",
        field=name,
    )


def control_uses(value: Any, name: str) -> tuple[ControlUse, ...]:
    """A session's ControlNet uses from Python, TOML or JSON: uses, tables/objects or strings."""
    if isinstance(value, str):  # a query string or a flag: comma-separated SOURCE[:SCALE[:PRE]]
        items: list[Any] = [part.strip() for part in value.split(",") if part.strip()]
    elif isinstance(value, (Mapping, ControlUse)):
        items = [value]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise ParameterError(
            f"{name}={value!r}: expected a list of {{controlnet, scale, preprocessor, params}} "
            "objects or SOURCE[:SCALE[:PREPROCESSOR]] texts",
            field=name,
        )
    if len(items) > MAX_CONTROL_USES:
        raise ParameterError(
            f"{name}: at most {MAX_CONTROL_USES} ControlNets per session, got {len(items)}",
            field=name,
            limit=MAX_CONTROL_USES,
        )
    uses = []
    for item in items:
        try:
            uses.append(_use_of(item, name))
        except ParameterError as exc:  # blame the setting the client sent, whatever part was wrong
            if exc.field == name:
                raise
            raise ParameterError(str(exc), field=name, limit=exc.limit) from None
    names = [use.controlnet for use in uses]
    if len(set(names)) < len(names):
        raise ParameterError(f"{name}: each ControlNet once per session", field=name)
    return tuple(uses)

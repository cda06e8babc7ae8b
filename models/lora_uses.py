"""What a session asks of per-session LoRAs: :class:`LoraUse` (a loaded LoRA's name and scale).

Light on purpose (no torch): the settings declare ``GenerationParams.loras`` with these types,
and ``livediff --help`` must not load torch. The work is in :mod:`livediff.models.lora_library`.

A session's ``loras`` is a list of up to :data:`MAX_LORA_USES` uses (a server may allow fewer:
``LoraCapacity.slots_per_row``), each naming a LoRA the server's library holds, with a
``scale`` in [-:data:`MAX_LORA_SCALE`, :data:`MAX_LORA_SCALE`] (0: off). In a control message::

    {"loras": [{"name": "ink", "scale": 0.8}, {"name": "pastel", "scale": 0.3}]}

In a query string or as text: ``loras=ink:0.8,pastel:0.3`` (a name alone: scale 1).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from livediff.exceptions import ParameterError

MAX_LORA_USES = 8
MAX_LORA_SCALE = 10.0
FIELD = "loras"


@dataclass(frozen=True)
class LoraUse:
    """One per-session LoRA: the name it was loaded under, and its scale."""

    name: str
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ParameterError("a LoRA use needs the name of a loaded LoRA", field=FIELD)
        scale = self.scale
        if (
            isinstance(scale, bool)
            or not isinstance(scale, (int, float))
            or not -MAX_LORA_SCALE <= float(scale) <= MAX_LORA_SCALE
        ):
            raise ParameterError(
                f"LoRA scale={scale!r} is out of range: expected a number in "
                f"[-{MAX_LORA_SCALE:g}, {MAX_LORA_SCALE:g}]",
                field=FIELD,
                limit=MAX_LORA_SCALE,
            )
        object.__setattr__(self, "scale", float(scale))

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "scale": self.scale}


def use_from_text(text: str) -> LoraUse:
    """``NAME`` or ``NAME:SCALE``."""
    head, separator, last = text.rpartition(":")
    if separator and head:
        try:
            scale = float(last)
        except ValueError:
            return LoraUse(text)
        return LoraUse(head, scale)
    return LoraUse(text)


def lora_uses(value: Any, name: str = FIELD) -> tuple[LoraUse, ...]:
    """A session's LoRA uses from Python, TOML, JSON or text; each LoRA once."""
    if isinstance(value, str):
        items: list[Any] = [part.strip() for part in value.split(",") if part.strip()]
    elif isinstance(value, (Mapping, LoraUse)):
        items = [value]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise ParameterError(
            f"{name}={value!r}: expected a list of {{name, scale}} objects or NAME[:SCALE] texts",
            field=name,
        )
    if len(items) > MAX_LORA_USES:
        raise ParameterError(
            f"{name}: at most {MAX_LORA_USES} LoRAs per session, got {len(items)}",
            field=name,
            limit=MAX_LORA_USES,
        )
    uses = tuple(_use_of(item, name) for item in items)
    names = [use.name for use in uses]
    if len(set(names)) < len(names):
        raise ParameterError(f"{name}: each LoRA once per session", field=name)
    return uses


def _use_of(item: Any, name: str) -> LoraUse:
    if isinstance(item, LoraUse):
        return item
    if isinstance(item, str):
        return use_from_text(item)
    if isinstance(item, Mapping):
        unknown = sorted(set(item) - {"name", "scale"}, key=str)
        if unknown or "name" not in item:
            extra = f"; unknown: {', '.join(map(str, unknown))}" if unknown else "; name missing"
            raise ParameterError(f"{name}: each use is {{name, scale}}{extra}", field=name)
        return LoraUse(**item)
    raise ParameterError(
        f"{name}: a use is an object {{name, scale}} or a name, not {type(item).__name__}",
        field=name,
    )

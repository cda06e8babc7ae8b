"""The OSC address space of livediff, derived from the live settings (the rules, no sockets).

Every control key of :class:`~livediff.engine.config.GenerationParams` (the settings declared
``live``, the same keys as websocket control messages) is an address twice::

    /livediff/strength 0.6            every open session, and the default of later ones
    /livediff/<session>/strength 0.6  one session (its id: the websocket's hello, /offer's answer)

Arguments follow the setting's type: ``i`` for integers, ``f`` for numbers (``i`` and ``d``
too), ``s`` for text and choices, ``N`` (nil) turns an optional setting off; a list takes one
argument per item (``/livediff/t_index_list 20 35``), and a prompt is one ``s`` or text/weight
pairs (``/livediff/prompt "a fox" 0.7 "a whale" 0.3``). OSC's 32-bit floats are read as the
shortest decimal that rounds to them (0.7 stays 0.7, not 0.699999988). Arguments are only
shaped here; their values are checked by the engine, exactly as a control message's are.
:func:`address_table` is README's table of them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from livediff.engine.config import GenerationParams
from livediff.exceptions import ParameterError
from livediff.settings import Declared, declared, describe
from livediff.streams.control_messages import session_params

PREFIX = "/livediff"
ERROR_ADDRESS = f"{PREFIX}/error"  # s s: field ("" when none), message
OK_ADDRESS = f"{PREFIX}/ok"  # s: the address that took effect
TAKEN_TAGS = frozenset("ifdhsTFN")  # numbers, text, booleans, nil; not blobs, MIDI, arrays …


@dataclass(frozen=True)
class OscTarget:
    """What one address names: a live setting, of one session or (``session is None``) of all."""

    name: str
    session: str | None


def controls() -> tuple[Declared, ...]:
    """The live settings OSC reaches, in declaration order (those control messages take)."""
    return tuple(d for d in declared(GenerationParams) if d.accepts("control"))


def parse_address(address: str) -> OscTarget:
    """``/livediff/<key>`` or ``/livediff/<session>/<key>``; anything else is a ParameterError."""
    parts = address.split("/")
    known = {d.name for d in controls()}
    if len(parts) in (3, 4) and parts[0] == "" and f"/{parts[1]}" == PREFIX and all(parts[2:]):
        name = parts[-1]
        if name in known:
            return OscTarget(name, parts[2] if len(parts) == 4 else None)
        raise ParameterError(
            f"unknown OSC address {address}: {name!r} is not a live setting; known: "
            + ", ".join(sorted(known)),
            field=name,
        )
    raise ParameterError(
        f"unknown OSC address {address}: expected {PREFIX}/<setting> or "
        f"{PREFIX}/<session>/<setting>"
    )


def session_part(address: str) -> str | None:
    """The session an address of the per-session shape names, valid or not (for the log)."""
    parts = address.split("/")
    return parts[2] or None if len(parts) == 4 and f"/{parts[1]}" == PREFIX else None


def changes(target: OscTarget, args: list[Any], tags: str) -> dict[str, Any]:
    """The control changes ``args`` (OSC type tags ``tags``) make: ``{name: value}``, shaped as
    a control message's JSON would be. ParameterError (``field`` = the setting) when the
    arguments cannot be this setting's shape.
    """
    decl = next(d for d in controls() if d.name == target.name)
    if len(tags) != len(args) or not set(tags) <= TAKEN_TAGS:
        odd = sorted(set(tags) - TAKEN_TAGS) or ["["]
        raise ParameterError(
            f"{target.name}: OSC type {odd[0]!r} is not taken; send {arguments(decl)}",
            field=target.name,
        )
    values = [_float32(v) if tag == "f" else v for v, tag in zip(args, tags, strict=True)]
    return session_params({target.name: _shaped(decl, values)})


def _shaped(decl: Declared, values: list[Any]) -> Any:
    if decl.optional and values == [None]:
        return None
    if decl.kind is not tuple:
        if len(values) != 1:
            raise ParameterError(
                f"{decl.name} takes one argument ({arguments(decl)}), got {len(values)}",
                field=decl.name,
            )
        return values[0]
    pair = _pair_arity(decl)
    if pair is None:
        return values
    if len(values) == 1 and isinstance(values[0], str):
        return values[0]  # one text: the whole prompt
    if not values or len(values) % pair:
        raise ParameterError(
            f"{decl.name} takes {arguments(decl)}, got {len(values)} argument(s)", field=decl.name
        )
    return [values[k : k + pair] for k in range(0, len(values), pair)]


def _pair_arity(decl: Declared) -> int | None:
    """How many arguments one item takes when a list's items are tuples (a prompt's pairs)."""
    inner = getattr(decl.item, "__args__", None)
    if getattr(decl.item, "__origin__", None) is tuple and inner and Ellipsis not in inner:
        return len(inner)
    return None


def _float32(value: float) -> float:
    """The shortest decimal that is the same 32-bit float (what the sender most likely typed)."""
    for digits in range(6, 10):
        short = float(f"{value:.{digits}g}")
        if struct.unpack("<f", struct.pack("<f", short))[0] == value:
            return short
    return value


def arguments(decl: Declared) -> str:
    """The OSC arguments a setting takes, in type tags."""
    if decl.kind is tuple:
        if _pair_arity(decl) is not None:
            tags = " ".join(_tag(t) for t in decl.item.__args__)
            text = f"s, or pairs {tags} {tags} …"
        else:
            text = f"{_tag(decl.item)} … (one per item)"
    else:
        text = _tag(decl.kind)
    return f"{text}, or N (off)" if decl.optional else text


def _tag(kind: Any) -> str:
    if kind is int:
        return "i"
    if kind is float:
        return "f"
    if kind is bool:
        return "T or F"
    return "s"  # text, a choice, or an item given as text (a ControlNet's SOURCE[:SCALE[:PRE]])


def address_table() -> str:
    """README's table of OSC addresses (``tests/streams/test_osc.py`` checks README holds it)."""
    lines = [
        "| address | arguments | accepted | what it does |",
        "|---|---|---|---|",
    ]
    for decl in controls():
        cells = [
            f"`{PREFIX}/{decl.name}`",
            f"`{arguments(decl)}`",
            describe(decl, none=False),
            decl.setting.doc,
        ]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines)

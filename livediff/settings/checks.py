"""Checking a value against its declaration, and the words every message uses.

:func:`check_settings` is what each settings dataclass calls in ``__post_init__``. A refused
value raises :class:`~livediff.exceptions.ParameterError` naming the setting (``field=``), the
value (short: never a huge number or an object's repr) and what is accepted, e.g.
``strength=3 is out of range: expected a number in (0, 1]``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from enum import Enum
from typing import Any, NoReturn

from livediff.exceptions import ParameterError
from livediff.settings.declaration import Declared, declared


def check_settings(instance: Any, *, prefix: str = "") -> None:
    """Check and normalise (lists → tuples, names → enums) every setting of a frozen dataclass.

    ``prefix`` starts each message (``"[server] "``), so it says where the setting lives.
    """
    for decl in declared(type(instance)):
        try:
            value = check_value(decl, getattr(instance, decl.name))
        except ParameterError as exc:
            if not prefix:
                raise
            raise ParameterError(prefix + str(exc), field=exc.field) from None
        object.__setattr__(instance, decl.name, value)


def check_value(decl: Declared, value: Any) -> Any:
    """``value`` checked against ``decl`` (normalised), or :class:`ParameterError`."""
    meta, name, kind = decl.setting, decl.name, decl.kind
    if value is None and decl.optional:
        return None
    if any(_same(value, v) for v, _ in meta.special if v is not None):
        return value
    if meta.check is not None:
        return meta.check(value, name)
    if decl.is_enum:
        return enum_value(kind, value, name)
    if kind is str:
        text = check_text(value, name)
        if meta.max_length is not None and len(text) > meta.max_length:
            refuse(f"len({name})", len(text), f"at most {meta.max_length} characters", field=name)
        if meta.choices and text not in meta.choices:
            raise ParameterError(
                f"{name}={shown(value)} is not one of: {', '.join(meta.choices)}", field=name
            )
        return text
    if decl.nested is not None:
        return _nested(decl.nested, value, name)
    if kind is tuple:
        items = as_tuple(value, name)
        if not _items_ok(decl, items):
            refuse(name, value, describe(decl))
        return items
    if not _scalar_ok(kind, meta, value):
        refuse(name, value, describe(decl))
    return value


def _same(value: Any, special: Any) -> bool:
    # True == 1 and False == 0 in Python; a bool is never a numeric setting's special value.
    return isinstance(value, bool) is isinstance(special, bool) and value == special


def _scalar_ok(kind: Any, meta: Any, value: Any) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int and not is_int(value):
        return False
    if kind is float and not is_number(value):
        return False
    if kind not in (int, float):
        raise TypeError(f"declare a check= for settings of type {kind!r}")
    return _in_range(meta, value)


def _in_range(meta: Any, value: Any) -> bool:
    return not (
        (meta.min is not None and value < meta.min)
        or (meta.max is not None and value > meta.max)
        or (meta.above is not None and value <= meta.above)
        or (meta.below is not None and value >= meta.below)
        or (meta.multiple_of is not None and value % meta.multiple_of)
    )


def _items_ok(decl: Declared, items: tuple[Any, ...]) -> bool:
    meta = decl.setting
    if len(items) < meta.min_items or (meta.max_items is not None and len(items) > meta.max_items):
        return False
    if decl.item is str:
        return all(isinstance(item, str) for item in items)
    if not all(_scalar_ok(decl.item, meta, item) for item in items):
        return False
    return not meta.increasing or all(a < b for a, b in itertools.pairwise(items))


def _nested(kind: type, value: Any, name: str) -> Any:
    if isinstance(value, kind):
        return value
    if isinstance(value, Mapping):
        from livediff.settings.sources import build, table_values

        return build(kind, table_values(kind, value, name))
    raise ParameterError(f"{name}={shown(value)}: expected a {kind.__name__}", field=name)


# ---------------------------------------------------------------------- words
def refuse(name: str, value: Any, expected: str, *, field: str | None = None) -> NoReturn:
    raise ParameterError(
        f"{name}={shown(value)} is out of range: expected {expected}", field=field or name
    )


def describe(decl: Declared, *, none: bool = True) -> str:
    """What ``decl`` accepts, in words: ``a number in (0, 1]``, ``0 (never) or seconds in …``.

    ``none=False`` leaves out what None means (a flag cannot say None).
    """
    meta = decl.setting
    text = meta.expected or _accepted(decl)
    specials = [f"{shown(v)} ({meaning})" for v, meaning in meta.special if v is not None]
    if specials:
        text = f"{' or '.join(specials)} or {text}"
    meanings = [meaning for v, meaning in meta.special if v is None]
    return f"{text}, or None ({meanings[0]})" if meanings and none else text


def _accepted(decl: Declared) -> str:
    meta, kind = decl.setting, decl.kind
    if decl.is_enum:
        return "one of: " + ", ".join(str(m.value) for m in kind)
    if kind is bool:
        return "true or false"
    if kind is str:
        if meta.choices:
            return "one of: " + ", ".join(meta.choices)
        return f"text of at most {meta.max_length} characters" if meta.max_length else "text"
    if decl.nested is not None:
        return f"a table of {decl.nested.__name__} settings"
    if kind is tuple:
        return _list_words(decl)
    return _number_words(kind, meta, plural=False)


def _list_words(decl: Declared) -> str:
    meta = decl.setting
    low, high = meta.min_items, meta.max_items
    count = (
        f"{low} to {high}"
        if high is not None
        else ("a list of" if low == 0 else "one or more" if low == 1 else f"{low} or more")
    )
    order = " strictly increasing" if meta.increasing else ""
    what = "strings" if decl.item is str else _number_words(decl.item, meta, plural=True)
    return f"{count}{order} {what}"


def _number_words(kind: Any, meta: Any, *, plural: bool) -> str:
    noun = {
        (int, False): "an integer",
        (int, True): "integers",
        (float, False): "a number",
        (float, True): "numbers",
    }[(kind, plural)]
    noun = {"s": "seconds", "ms": "milliseconds", "bytes": "a number of bytes"}.get(
        meta.unit or "", noun
    )
    if meta.multiple_of is not None:
        noun = f"a multiple of {meta.multiple_of}"
    low = meta.min if meta.min is not None else meta.above
    high = meta.max if meta.max is not None else meta.below
    if low is None and high is None:
        return noun
    if high is None:
        assert low is not None
        return (
            f"{noun}, {'above' if meta.above is not None else 'at least'} {bound(low, meta.unit)}"
        )
    opening = "(" if meta.above is not None else "["
    closing = ")" if meta.below is not None else "]"
    low_text = "-inf" if low is None else bound(low, meta.unit)
    return f"{noun} in {opening}{low_text}, {bound(high, meta.unit)}{closing}"


def bound(value: float, unit: str | None = None) -> str:
    """A bound or default as people write it: ``2**63``, ``4 MiB``, ``0.05``, ``30``."""
    if unit == "bytes" and is_int(value):
        for size, name in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
            if value >= size and value % size == 0:
                return f"{value // size} {name}"
        return f"{value} B"
    if isinstance(value, int) and value >= 1 << 20 and value & (value - 1) == 0:
        return f"2**{value.bit_length() - 1}"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def shown(value: Any) -> str:
    """``value`` for an error message: short, never a huge number or a Python object's repr."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**15:
        digits = len(str(abs(value))) if abs(value) < 10**4000 else "over 4000"
        return f"an integer of {digits} digits"
    if isinstance(value, Enum):
        return shown(value.value)
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


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
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


def enum_value(kind: type[Enum], value: Any, name: str) -> Any:
    try:
        return kind(value)
    except (ValueError, TypeError):
        allowed = ", ".join(str(member.value) for member in kind)
        raise ParameterError(
            f"{name}={shown(value)} is not one of: {allowed}", field=name
        ) from None


def as_tuple(value: Any, name: str) -> tuple[Any, ...]:
    """A list or tuple as a tuple; anything else (a string too) is refused."""
    if not isinstance(value, (list, tuple)):
        kind = "a string" if isinstance(value, str) else shown(value)
        raise ParameterError(f"{name} must be a list, not {kind}", field=name)
    return tuple(value)

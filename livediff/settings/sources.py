"""Where values come from: a TOML table, a URL query, a JSON message; and how layers combine.

Each function reads the declarations of a settings dataclass, so a new field is accepted by
every surface its declaration names and refused by the others. Values are only shaped here
(text → number, JSON array → tuple); ranges are checked when the dataclass is built.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from livediff.exceptions import ParameterError
from livediff.settings.checks import shown, shown_key
from livediff.settings.declaration import Declared, declared, names

NONE_WORDS = ("", "none", "null")  # a query string's way to say None


def table_values(cls: type, table: Any, name: str) -> dict[str, Any]:
    """The settings in TOML table ``[name]`` (``None``: absent); unknown keys are refused."""
    if table is None:
        return {}
    if not isinstance(table, Mapping):
        raise ParameterError(f"[{name}] in the config file must be a table", field=name)
    known = names(cls, "toml")
    unknown = sorted(set(table) - known, key=str)
    if unknown:
        raise ParameterError(
            f"unknown key(s) in [{name}]: {', '.join(shown_key(k) for k in unknown)}; "
            f"known: {', '.join(sorted(known))}",
            field=str(unknown[0]),
        )
    values = dict(table)
    for decl in declared(cls):
        if decl.nested is not None and decl.name in values:
            values[decl.name] = table_values(decl.nested, values[decl.name], f"{name}.{decl.name}")
    return values


def query_values(cls: type, query: Mapping[str, str]) -> dict[str, Any]:
    """Settings from URL query strings (``?seed=3&strength=0.5``), typed by their declarations."""
    _refuse_unknown(query, names(cls, "query"))
    by_name = {decl.name: decl for decl in declared(cls)}
    return {key: text_value(by_name[key], text) for key, text in query.items()}


def json_values(cls: type, values: Mapping[str, Any], surface: str = "control") -> dict[str, Any]:
    """Settings from a JSON object: names checked against ``surface``, arrays made tuples."""
    _refuse_unknown(values, names(cls, surface))
    by_name = {decl.name: decl for decl in declared(cls)}
    return {key: _from_json(by_name[key], value) for key, value in values.items()}


def build(cls: type, *layers: Mapping[str, Any]) -> Any:
    """``cls`` from layers of values, later ones winning; sub-tables merge key by key."""
    return cls(**merged(*layers))


def merged(*layers: Mapping[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, Mapping) and isinstance(result.get(key), Mapping):
                value = merged(result[key], value)
            result[key] = value
    return result


def text_value(decl: Declared, text: str) -> Any:
    """A query string's text as ``decl``'s type; a malformed one raises :class:`ParameterError`."""
    if decl.optional and text in NONE_WORDS:
        return None
    parse = text_parser(decl)
    if parse is None:
        return text
    try:
        return parse(text)
    except ValueError:
        raise ParameterError(
            f"{decl.name}={shown(text)} is not {_text_kind(decl)}", field=decl.name
        ) from None


def text_parser(decl: Declared) -> Callable[[str], Any] | None:
    """How text becomes ``decl``'s type (``None``: text stays text); raises ``ValueError``."""
    kind = decl.item if decl.kind is tuple else decl.kind
    parsers: dict[Any, Callable[[str], Any]] = {int: int, float: float, bool: _boolean}
    one = parsers.get(kind)
    if decl.kind is not tuple or decl.item is None:
        return one
    if one is None and decl.item is not str:
        return None
    return _comma_list(one or str)


def _text_kind(decl: Declared) -> str:
    if decl.kind is bool:
        return "true or false"
    return "a number" if decl.kind is not tuple else "a comma-separated list of numbers"


def _comma_list(parse: Callable[[str], Any]) -> Callable[[str], tuple[Any, ...]]:
    def comma_list(text: str) -> tuple[Any, ...]:
        return tuple(parse(item.strip()) for item in text.split(",") if item.strip())

    comma_list.__name__ = f"comma-separated {getattr(parse, '__name__', 'text')}"
    return comma_list


def _boolean(text: str) -> bool:
    words = {"true": True, "1": True, "yes": True, "on": True}
    words.update({"false": False, "0": False, "no": False, "off": False})
    if text.lower() not in words:
        raise ValueError(text)
    return words[text.lower()]


def _from_json(decl: Declared, value: Any) -> Any:
    # JSON has arrays where the settings have tuples, also inside (a prompt's [text, weight]).
    if decl.kind is not tuple or not isinstance(value, list):
        return value
    inner = getattr(decl.item, "__origin__", decl.item) is tuple
    return tuple(tuple(v) if inner and isinstance(v, list) else v for v in value)


def _refuse_unknown(values: Mapping[Any, Any], known: frozenset[str]) -> None:
    unknown = sorted(set(values) - known, key=str)
    if unknown:
        raise ParameterError(
            f"unknown parameter(s): {', '.join(shown_key(k) for k in unknown[:5])}; "
            f"known: {', '.join(sorted(known))}",
            field=str(unknown[0]) if isinstance(unknown[0], str) else None,
        )

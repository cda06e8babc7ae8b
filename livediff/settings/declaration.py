"""What a setting is: a dataclass field whose metadata holds a :class:`Setting`.

The field's annotation is the setting's type (``int``, ``float``, ``bool``, ``str``, an enum,
``tuple[int, ...]``, another settings dataclass, or any of these ``| None``); :func:`setting`
adds the rest: range, doc line, whether it may change live and which surfaces accept it.
:func:`declared` reads both back, for the validator and for every surface derived from them.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

METADATA_KEY = "livediff.setting"


@dataclass(frozen=True)
class Setting:
    """One setting's declaration, beside its type and default (see :func:`setting`)."""

    doc: str
    min: float | None = None  # bounds for numbers, and for the items of a tuple of numbers
    max: float | None = None
    above: float | None = None  # exclusive bounds
    below: float | None = None
    multiple_of: int | None = None
    choices: tuple[str, ...] = ()  # for str settings; an enum's come from the enum
    min_items: int = 0  # for tuple settings
    max_items: int | None = None
    increasing: bool = False  # tuple items strictly increasing
    max_length: int | None = None  # characters, for str settings
    unit: str | None = None  # "s", "ms" or "bytes": how values are written in messages and docs
    special: tuple[tuple[Any, str], ...] = ()  # values outside the range, with what they mean
    live: bool = False
    query: bool = False
    control: bool = False
    flag: str | None = None
    metavar: str | None = None
    repeat: bool = False  # the flag may be given several times, each adding an item
    from_flag: Callable[[str], Any] | None = None  # a flag's text → value, when the type can't say
    toml: bool = True
    preset_default: str | None = None  # ModelPreset attribute that overrides ``default``
    check: Callable[[Any, str], Any] | None = None  # (value, name) → checked value, for other types
    expected: str | None = None  # what ``check`` accepts, for messages and docs
    secret: bool = False


def setting(
    default: Any = dataclasses.MISSING,
    *,
    doc: str,
    default_factory: Any = dataclasses.MISSING,
    special: Mapping[Any, str] | None = None,
    live: bool = False,
    query: bool | None = None,
    control: bool | None = None,
    secret: bool = False,
    **declaration: Any,
) -> Any:
    """A dataclass field declared as a setting; ``query``/``control`` default to ``live``.

    Keywords are :class:`Setting`'s: ``min``/``max`` (inclusive), ``above``/``below``
    (exclusive), ``multiple_of``, ``choices``, ``min_items``/``max_items``, ``increasing``,
    ``max_length``, ``unit``, ``flag``, ``metavar``, ``repeat``, ``from_flag``, ``toml``,
    ``preset_default``, ``check``, ``expected``.
    """
    meta = Setting(
        doc=doc,
        special=tuple((special or {}).items()),
        live=live,
        query=live if query is None else query,
        control=live if control is None else control,
        secret=secret,
        **declaration,
    )
    return dataclasses.field(
        default=default,
        default_factory=default_factory,
        repr=not secret,
        metadata={METADATA_KEY: meta},
    )


@dataclass(frozen=True)
class Declared:
    """A setting as the surfaces see it: name, declaration, type and default."""

    name: str
    setting: Setting
    kind: Any  # int, float, bool, str, an Enum subclass, tuple, a settings dataclass, or other
    item: Any  # the item type of a tuple setting
    optional: bool  # None is accepted
    default: Any

    @property
    def nested(self) -> type | None:
        """The settings dataclass this setting holds (a sub-table), if it holds one."""
        return self.kind if is_settings_class(self.kind) else None

    @property
    def is_enum(self) -> bool:
        return isinstance(self.kind, type) and issubclass(self.kind, Enum)

    @property
    def dest(self) -> str:
        """The argparse attribute of its flag: the flag's name, so no two can collide."""
        assert self.setting.flag is not None
        return self.setting.flag.lstrip("-").replace("-", "_")

    def accepts(self, surface: str) -> bool:
        """Whether ``surface`` (flag, toml, query, control, live) may set it."""
        if surface == "flag":
            return self.setting.flag is not None
        return bool(getattr(self.setting, surface))


def is_settings_class(kind: Any) -> bool:
    return (
        isinstance(kind, type)
        and dataclasses.is_dataclass(kind)
        and any(METADATA_KEY in f.metadata for f in dataclasses.fields(kind))
    )


def declared(cls: type) -> tuple[Declared, ...]:
    """Every field of ``cls`` as a :class:`Declared`; a field without a declaration is a bug."""
    return _declared(typing.cast(Any, cls))  # typeshed's cache wants Hashable; a class is


@functools.cache  # a pure function of a class; classes don't change after definition
def _declared(cls: type) -> tuple[Declared, ...]:
    hints = typing.get_type_hints(cls)
    result = []
    for f in dataclasses.fields(cls):
        meta = f.metadata.get(METADATA_KEY)
        if meta is None:
            raise TypeError(f"{cls.__name__}.{f.name} is not declared with setting(...)")
        kind, item, optional = _kind(hints[f.name])
        default = f.default
        if default is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        result.append(Declared(f.name, meta, kind, item, optional, default))
    return tuple(result)


def names(cls: type, surface: str) -> frozenset[str]:
    """The settings of ``cls`` that ``surface`` may set."""
    return frozenset(d.name for d in declared(cls) if d.accepts(surface))


def find(cls: type, name: str) -> Declared:
    for decl in declared(cls):
        if decl.name == name:
            return decl
    raise KeyError(name)


def preset_defaults(cls: type, preset: Any) -> dict[str, Any]:
    """The defaults ``preset`` sets for ``cls`` (e.g. strength and steps from a model preset)."""
    return {
        d.name: getattr(preset, d.setting.preset_default)
        for d in declared(cls)
        if d.setting.preset_default is not None
    }


def _kind(hint: Any) -> tuple[Any, Any, bool]:
    """(type, tuple item type, optional) of an annotation."""
    optional = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(rest) < len(typing.get_args(hint))
        hint = rest[0] if len(rest) == 1 else hint
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        return tuple, (args[0] if len(args) == 2 and args[1] is Ellipsis else None), optional
    return hint, None, optional

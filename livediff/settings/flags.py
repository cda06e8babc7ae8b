"""Command-line flags derived from the declarations, and the values a command line gave.

Every flag defaults to ``None`` (not given), so the config file and the preset keep their say;
its type, choices and help come from its setting. A bool setting's flag flips its default
(``--no-add-noise`` for ``do_add_noise = True``, ``--latency-marker`` for ``False``).
"""

from __future__ import annotations

import argparse
from typing import Any

from livediff.exceptions import LivediffError
from livediff.settings.checks import describe
from livediff.settings.declaration import Declared, declared, find
from livediff.settings.docs import default_text
from livediff.settings.sources import text_parser


def add_flags(group: Any, cls: type) -> None:
    """Add a flag to ``group`` (a parser or argument group) for every flagged setting of ``cls``."""
    for decl in declared(cls):
        if decl.nested is not None:
            add_flags(group, decl.nested)
        elif decl.setting.flag is not None:
            group.add_argument(decl.setting.flag, **flag_options(decl))


def add_setting_flag(parser: Any, cls: type, name: str, *, flag: str) -> None:
    """One setting as a flag of another tool (a benchmark's ``--buckets``), default included."""
    decl = find(cls, name)
    options = flag_options(decl, dest=flag.lstrip("-").replace("-", "_"))
    options["default"] = decl.default
    parser.add_argument(flag, **options)


def flag_options(decl: Declared, *, dest: str | None = None) -> dict[str, Any]:
    """``add_argument`` keywords for ``decl``'s flag."""
    meta = decl.setting
    options: dict[str, Any] = {"dest": dest or decl.dest, "default": None}
    if decl.kind is bool:
        options.update(action="store_const", const=not decl.default)
        state = "off" if decl.default else "on"
        options["help"] = _escaped(f"{meta.doc}; this flag turns it {state}")
        return options
    if decl.is_enum:
        options["choices"] = [str(member.value) for member in decl.kind]
    elif meta.choices:
        options["choices"] = list(meta.choices)
    parse = meta.from_flag or (text_parser(decl) if not meta.repeat else _item_parser(decl))
    if parse is not None:
        options["type"] = _saying_why(parse)
    if meta.repeat:
        options["action"] = "append"
    if meta.metavar:
        options["metavar"] = meta.metavar
    # Choices show themselves; a repeated flag gives one item; free text needs no words.
    plain = "choices" in options or meta.repeat or (decl.kind is str and not meta.max_length)
    accepted = "" if plain else f": {describe(decl, none=False)}"
    repeat = "; repeatable" if meta.repeat else ""
    options["help"] = _escaped(f"{meta.doc}{accepted}{repeat} (default: {default_text(decl)})")
    return options


def flag_values(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The settings of ``cls`` given on the command line (flags left out are not in it)."""
    values: dict[str, Any] = {}
    for decl in declared(cls):
        if decl.nested is not None:
            nested = flag_values(decl.nested, args)
            if nested:
                values[decl.name] = nested
        elif decl.setting.flag is not None:
            value = getattr(args, decl.dest, None)
            if value is not None:
                values[decl.name] = tuple(value) if decl.setting.repeat else value
    return values


def _saying_why(parse: Any) -> Any:
    """``parse`` for argparse: livediff's own refusal is the message (argparse would print
    "invalid <function> value" for any ``ValueError``)."""

    def parse_flag(text: str) -> Any:
        try:
            return parse(text)
        except LivediffError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc

    parse_flag.__name__ = getattr(parse, "__name__", "value")  # argparse names plain ones
    return parse_flag


def _item_parser(decl: Declared) -> Any:
    return {int: int, float: float}.get(decl.item)


def _escaped(text: str) -> str:
    return text.replace("%", "%%")  # argparse formats help with %

"""Settings, each declared once: a dataclass field with its type, range, default and surfaces.

A settings dataclass declares each field with :func:`setting` and calls
:func:`check_settings` in ``__post_init__``::

    @dataclass(frozen=True)
    class GenerationParams:
        strength: float = setting(
            0.5, doc="how much of the input is replaced", above=0, max=1,
            live=True, flag="--strength", preset_default="default_strength",
        )

        def __post_init__(self) -> None:
            check_settings(self)

Everything else is derived from the declarations: command-line flags (:mod:`.flags`), TOML
tables, URL queries and JSON control messages (:mod:`.sources`), the messages of refused values
(:mod:`.checks`) and the README's settings reference (:mod:`.docs`). This package sits beside
:mod:`livediff.exceptions`, below every layer, and imports nothing heavy.
"""

from __future__ import annotations

from livediff.settings.checks import (
    as_tuple,
    check_settings,
    check_text,
    check_value,
    describe,
    enum_value,
    is_int,
    is_number,
    refuse,
    shown,
    shown_key,
)
from livediff.settings.declaration import (
    Declared,
    Setting,
    declared,
    find,
    names,
    preset_defaults,
    setting,
)
from livediff.settings.sources import build, json_values, merged, query_values, table_values

__all__ = [
    "Declared",
    "Setting",
    "as_tuple",
    "build",
    "check_settings",
    "check_text",
    "check_value",
    "declared",
    "describe",
    "enum_value",
    "find",
    "is_int",
    "is_number",
    "json_values",
    "merged",
    "names",
    "preset_defaults",
    "query_values",
    "refuse",
    "setting",
    "shown",
    "shown_key",
    "table_values",
]

"""The settings reference, written from the declarations: README's block and flags' defaults.

``python3 -m livediff.settings --write README.md`` rewrites the block between
:data:`BEGIN` and :data:`END`; a test checks the README holds what this module writes.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum
from pathlib import Path
from typing import Any

from livediff.settings.checks import bound, describe
from livediff.settings.declaration import Declared, declared

BEGIN = "<!-- settings: begin (python3 -m livediff.settings --write README.md) -->"
END = "<!-- settings: end -->"


def default_text(decl: Declared) -> str:
    """How ``decl``'s default reads in help and docs: ``0.5``, ``4 MiB``, ``the preset's``."""
    value = decl.default
    meanings = dict(decl.setting.special) if value is None else {}
    if decl.setting.preset_default is not None:
        return "the preset's"
    if decl.nested is not None:
        return "see its table"
    if value is None:
        return meanings.get(None, "none")
    return value_text(value, decl.setting.unit)


def value_text(value: Any, unit: str | None = None) -> str:
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value else '""'
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(value_text(v) for v in value) + "]"
    if isinstance(value, (int, float)):
        text = bound(value, unit)
        return f"{text} {unit}" if unit in ("s", "ms") else text
    return str(value)


def markdown(tables: Iterable[tuple[str, type, str]], presets: dict[str, Any] | None = None) -> str:
    """One table per config table: key, flag, default, accepted values, live or not, doc line."""
    sections = []
    for table, cls, title in tables:
        rows = [
            f"**`[{table}]`**: {title} (`{cls.__name__}`)",
            "",
            "| key | flag | default | accepted | live | what it does |",
            "|---|---|---|---|---|---|",
        ]
        rows += [_row(decl, presets) for decl in declared(cls) if decl.nested is None]
        sections.append("\n".join(rows))
    return "\n\n".join(sections) + "\n"


def _row(decl: Declared, presets: dict[str, Any] | None) -> str:
    meta = decl.setting
    flag = f"`{meta.flag}`" if meta.flag else ""
    key = f"`{decl.name}`" if meta.toml else f"{decl.name} (no key)"
    default = default_text(decl)
    if meta.preset_default is not None and presets:
        default = _per_preset(meta.preset_default, presets)
    cells = [key, flag, default, describe(decl, none=False), _live(meta), meta.doc]
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def _live(meta: Any) -> str:
    """``yes`` for a setting a session may change: a control key and a ``/ws`` query key."""
    if not meta.live:
        return "query" if meta.query else ""
    missing = [word for word, on in (("control", meta.control), ("query", meta.query)) if not on]
    return f"yes (not a {' or '.join(missing)} key)" if missing else "yes"


def _per_preset(attribute: str, presets: dict[str, Any]) -> str:
    by_value: dict[Any, list[str]] = {}
    for name, preset in presets.items():
        by_value.setdefault(getattr(preset, attribute), []).append(name)
    return "the preset's: " + "; ".join(
        f"{value_text(v)} ({', '.join(names)})" for v, names in by_value.items()
    )


def with_block(readme: str, block: str) -> str:
    """``readme`` with the text between the markers replaced by ``block``."""
    start, end = readme.find(BEGIN), readme.find(END)
    if start < 0 or end < start:
        raise ValueError(f"the README has no settings block ({BEGIN} … {END})")
    return readme[: start + len(BEGIN)] + "\n\n" + block + "\n" + readme[end:]


def block_of(readme: str) -> str:
    start, end = readme.find(BEGIN), readme.find(END)
    return readme[start + len(BEGIN) : end].strip("\n") + "\n" if 0 <= start < end else ""


def write_readme(path: Path, block: str) -> bool:
    """Rewrite ``path``'s block; returns whether it changed."""
    text = path.read_text(encoding="utf-8")
    updated = with_block(text, block)
    if updated != text:
        path.write_text(updated, encoding="utf-8")
    return updated != text

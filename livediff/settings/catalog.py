"""Which dataclasses are config tables, by table name (``[params]``, ``[runtime.degrade]`` …).

Imported on demand (docs, tests): the classes live in the layers and pull in their modules.
"""

from __future__ import annotations

import importlib
from typing import Any

from livediff.settings.declaration import declared

TABLES = (
    ("model", "livediff.models.spec", "ModelSpec", "which model to load"),
    ("stream", "livediff.engine.config", "StreamConfig", "a stream's structure, fixed per session"),
    ("params", "livediff.engine.config", "GenerationParams", "generation parameters"),
    ("server", "livediff.streams.server_config", "ServerConfig", "the server of livediff serve"),
    ("runtime", "livediff.engine.runtime_config", "RuntimeConfig", "the multi-session engine"),
    ("ray", "livediff.streams.ray_config", "RayConfig", "livediff serve --ray (Ray Serve)"),
    ("osc", "livediff.streams.osc_config", "OscConfig", "OSC control (livediff serve and camera)"),
    ("ndi", "livediff.streams.ndi_config", "NdiConfig", "NDI output (livediff camera and serve)"),
    (
        "lora_library",
        "livediff.models.lora_library_config",
        "LoraLibraryConfig",
        "per-session LoRAs (livediff serve, run and camera)",
    ),
)


def tables() -> list[tuple[str, type, str]]:
    """(table name, class, title) for every table, sub-tables after their parent."""
    result: list[tuple[str, type, str]] = []
    for name, module, attribute, title in TABLES:
        _add(result, name, getattr(importlib.import_module(module), attribute), title)
    return result


def _add(result: list[tuple[str, type, str]], name: str, cls: type, title: str) -> None:
    result.append((name, cls, title))
    for decl in declared(cls):
        if decl.nested is not None:
            _add(result, f"{name}.{decl.name}", decl.nested, decl.setting.doc)


def presets() -> dict[str, Any]:
    from livediff.models.presets import PRESETS

    return dict(PRESETS)


def reference() -> str:
    """The settings reference as the README holds it."""
    from livediff.settings.docs import markdown

    return markdown(tables(), presets())

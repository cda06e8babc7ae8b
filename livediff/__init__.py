"""livediff: real-time streaming video generation with few-step diffusion.

The public API, in one import::

    from livediff import ModelSpec, Stream, load_model

    bundle = load_model(ModelSpec("sd-turbo"))            # or ModelSpec("tiny", weights="random")
    stream = Stream(bundle, prompt="a watercolor painting", strength=0.5)
    for frame in frames:                                   # uint8 H×W×3 RGB, numpy or torch
        for out in stream.process(frame):
            show(out.numpy())

Heavy modules (torch, diffusers) load on first use of these names, so ``import livediff`` and
``livediff --help`` stay fast.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

__version__ = "0.1.0"

# In a source checkout the layers sit beside this package (engine/, models/ …) and an install
# maps them to livediff.engine, livediff.models …; when the checkout itself is on sys.path
# (python -m from the repo root, PYTHONPATH=repo), resolve them the same way.
_checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isfile(os.path.join(_checkout, "pyproject.toml")) and os.path.isdir(
    os.path.join(_checkout, "engine")
):
    __path__.append(_checkout)

_EXPORTS = {
    "ModelSpec": "livediff.models.spec",
    "load_model": "livediff.models.loading",
    "export_model": "livediff.models.export",
    "PRESETS": "livediff.models.presets",
    "LoraRef": "livediff.models.presets",
    "WeightsMode": "livediff.models.spec",
    "VaeKind": "livediff.models.spec",
    "Stream": "livediff.engine.stream",
    "StreamOutput": "livediff.engine.frames",
    "StreamConfig": "livediff.engine.config",
    "GenerationParams": "livediff.engine.config",
    "RCFGMode": "livediff.engine.config",
    "GenerationMode": "livediff.engine.config",
    "FitMode": "livediff.engine.config",
    "BlendMethod": "livediff.models.blend_method",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'livediff' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)

"""How several weighted prompts are combined (a setting's enum, so it stays light to import)."""

from __future__ import annotations

from enum import Enum


class BlendMethod(str, Enum):
    """How several weighted prompts are combined into one embedding."""

    LINEAR = "linear"
    SLERP = "slerp"

"""A network's configuration as cache keys hash it: the same text in every process.

Both cache keys (:mod:`livediff.models.compile_cache`, :mod:`livediff.models.trt_cache_key`)
hash a network's config. Its ``_``-keys are diffusers' bookkeeping — where the weights were
loaded from, and ``_use_default_values``, a list built from a set, in another order in every
process — so they are left out; sets elsewhere are written sorted.
"""

from __future__ import annotations

import json
from typing import Any


def public_config(module: Any) -> dict[str, Any]:
    """``module.config`` without its ``_``-keys (``{}`` for a module without a config)."""
    config = getattr(module, "config", None) or {}
    return {key: value for key, value in dict(config).items() if not str(key).startswith("_")}


def canonical_json(value: Any) -> str:
    """``value`` as sorted-key JSON; sets sorted, anything else JSON cannot write by its ``str``."""
    return json.dumps(value, sort_keys=True, default=_canonical)


def _canonical(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):  # iterated in hash order, which differs per process
        return sorted(str(item) for item in value)
    return str(value)

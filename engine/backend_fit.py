"""The engine fitted to a model backend (:mod:`livediff.models.backends`): which Stream runs a
single stream on it, and the degrade floor its engines impose.

The backends themselves (eager, compile, TensorRT: choosing, preparing, capturing) are
``models/``; what the engine builds on top of a prepared bundle is here, because ``models/``
must not import the engine.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from livediff.engine.captured_stream import CapturedStream
from livediff.engine.degrade import DegradePolicy
from livediff.engine.stream import Stream
from livediff.models.backends import Backend
from livediff.models.bundle import ModelBundle
from livediff.models.tensorrt_engine import TensorRTBundle

log = logging.getLogger(__name__)


def make_stream(bundle: ModelBundle, backend: Backend | str, *args: Any, **kwargs: Any) -> Stream:
    """A :class:`Stream` for ``backend``: whole-step CUDA graph when compiled on CUDA."""
    if Backend(backend) is Backend.COMPILE and bundle.device.type == "cuda":
        return CapturedStream(bundle, *args, **kwargs)
    return Stream(bundle, *args, **kwargs)


def fit_degrade_to_bundle(policy: DegradePolicy, bundle: ModelBundle) -> DegradePolicy:
    """``policy`` with its lowest resolution raised to what ``bundle`` can run, where it has a floor.

    TensorRT engines are built for a range of sides (384 px and up by default); degrading to half
    of 512 px would leave it, so the degraded side stops at the engine's smallest instead.
    """
    floor = bundle.smallest_side if isinstance(bundle, TensorRTBundle) else None
    if floor is None or policy.min_side >= floor:
        return policy
    log.info(
        "degrade: lowest resolution raised from %d to %d px, the smallest the %s engines take",
        policy.min_side,
        floor,
        Backend.TENSORRT.value,
    )
    return replace(policy, min_side=floor)

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
    """A :class:`Stream` for ``backend``: whole-step CUDA graph when compiled on CUDA, for a
    model whose step is only the Stream Batch buffers (see :func:`whole_step_blockers`)."""
    if Backend(backend) is Backend.COMPILE and bundle.device.type == "cuda":
        blockers = whole_step_blockers(bundle)
        if not blockers:
            return CapturedStream(bundle, *args, **kwargs)
        log.info(
            "the frame step is not one CUDA graph: this model has %s, whose per-frame inputs "
            "are set between the calls; the UNet and VAE calls still replay their graphs",
            " and ".join(blockers),
        )
    return Stream(bundle, *args, **kwargs)


def whole_step_blockers(bundle: ModelBundle) -> list[str]:
    """What keeps ``bundle``'s frame step out of one captured graph: per-session LoRAs or an
    IP-Adapter (inputs written per frame on the host). ControlNets and a feature bank are
    captured with the step (:mod:`livediff.engine.captured_control`, and the bank's per-frame
    choice copied into static inputs before each replay: :mod:`livediff.engine.captured_stream`)."""
    found = [
        ("per-session LoRAs", bundle.loras is not None),
        ("an IP-Adapter", bundle.ip_adapter is not None),
    ]
    return [name for name, present in found if present]


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

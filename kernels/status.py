"""What each kernel runs as on a device, for the engine to log at start-up, and every fallback.

``kernels_status()`` answers per op whether its Triton kernel runs and, if not, why (``impl``
and ``reason``). The Triton path also needs contiguous inputs of a supported dtype per call;
those per-call conditions are listed under ``guard`` so a log line names them. A call on CUDA
that missed them ran the reference: from then on the op carries ``fallback``, the first
reason and the number of such calls (:data:`livediff.kernels._dispatch.FALLBACKS`), and
:func:`describe` says ``"triton; reference on 3 calls (fallback: …)"`` for it.
"""

from __future__ import annotations

from typing import Any

import torch

from livediff.kernels import (  # noqa: F401  (registers the ops)
    fused_step,
    lora_rows,
    postprocess,
    preprocess,
    similarity,
)
from livediff.kernels._dispatch import (
    FALLBACKS,
    INT32_LIMIT,
    triton_interpreter_enabled,
    triton_unavailable_reason,
)

_FLOATS = "float16, bfloat16, float32"
_GUARDS = {
    "livediff::preprocess_rgb": f"uint8 [N,H,W,3] contiguous; output {_FLOATS}",
    "livediff::preprocess_i420": f"uint8 planes contiguous; output {_FLOATS}",
    "livediff::preprocess_nv12": f"uint8 planes contiguous; output {_FLOATS}",
    "livediff::postprocess_rgb": f"input {_FLOATS}, NCHW contiguous or channels-last",
    "livediff::postprocess_i420": f"input {_FLOATS}, NCHW contiguous or channels-last",
    "livediff::cosine_similarity": f"inputs {_FLOATS} or uint8, contiguous",
    "livediff::stream_batch_step": f"latents {_FLOATS}, every tensor contiguous",
    "livediff::lora_rows_add": f"x {_FLOATS}, rank <= 256, every tensor contiguous",
}


def kernels_status(device: torch.device | str | None = None) -> dict[str, Any]:
    """Per op: ``impl`` ("triton" or "reference"), ``reason`` when not Triton, ``guard``, and
    on CUDA ``fallback`` (``{"reason", "calls"}``) once a call ran the reference.

    ``device`` defaults to CUDA when available, else CPU.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    reason = None
    if device.type != "cuda":
        reason = f"device {device.type}: the Triton kernels run on CUDA only"
    elif not torch.cuda.is_available():
        reason = "CUDA is not available"
    else:
        reason = triton_unavailable_reason()
    version = None
    if triton_unavailable_reason() is None:
        import triton

        version = str(triton.__version__)
    fallbacks = FALLBACKS.snapshot() if device.type == "cuda" else {}
    ops = {}
    for name, guard in _GUARDS.items():
        entry: dict[str, Any] = {
            "impl": "reference" if reason else "triton",
            "guard": f"{guard}; < {INT32_LIMIT + 1} elements",
        }
        if reason:
            entry["reason"] = reason
        if name in fallbacks:
            entry["fallback"] = fallbacks[name]
        ops[name] = entry
    return {
        "device": str(device),
        "triton_version": version,
        "triton_interpreter": triton_interpreter_enabled(),
        "ops": ops,
    }


def describe(status: dict[str, Any]) -> dict[str, str]:
    """One phrase per op of a :func:`kernels_status` answer, for a log line."""
    phrases = {}
    for name, entry in status["ops"].items():
        phrase = entry["impl"]
        if "reason" in entry:
            phrase += f" ({entry['reason']})"
        fallback = entry.get("fallback")
        if fallback is not None and entry["impl"] == "triton":  # else "reason" says it already
            phrase += f"; reference on {fallback['calls']} calls (fallback: {fallback['reason']})"
        phrases[name] = phrase
    return phrases


def registered_ops() -> tuple[str, ...]:
    """The ``livediff::`` ops this package registers (the keys of ``kernels_status()["ops"]``)."""
    return tuple(_GUARDS)

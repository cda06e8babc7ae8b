"""A single stream's control images made inside its captured frame step (ControlNets in one graph).

:class:`~livediff.engine.captured_stream.CapturedStream` replays the whole frame step as one
CUDA graph. With ControlNets the control images are part of that step: the graph runs the
preprocessors on the frame it was handed (canny compiled by Inductor, the frame itself for
tile nets; depth and soft edge are not captured yet: :func:`not_captured`) and writes the Stream Batch's control buffer, where
the UNet call reads it. What may change between frames lives in static device buffers the
graph reads, refreshed before each replay by :meth:`CapturedControl.refresh`:

- canny thresholds and blur (one ``[F]`` buffer each per distinct parameter set: a new
  threshold is a ``fill_``, not a new graph);
- the images a client sent (one buffer per ``client`` slot, copied when a new one arrives;
  zero and at scale 0 until the first, as :class:`~livediff.engine.control_plan.ControlPlan`
  says);
- the previous output (TemporalNet), copied in before each replay, with a flag that makes the
  input frame stand in before the first output, as on the call-by-call path;
- the scales stay where they always were, in the Stream Batch's buffer.

What the graph's shape depends on is :func:`control_key`: which preprocessors feed which
slots. A session that changes that (another preprocessor, a net switched on) gets another
graph, captured once; scales, thresholds and images change inside the same one. The images
are those :func:`~livediff.engine.control_batch.control_images` makes for the session alone
(the tests compare them).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from livediff.engine.control_batch import distinct_uses
from livediff.engine.control_plan import ControlPlan
from livediff.kernels.canny import HYSTERESIS_ITERATIONS
from livediff.models.compiled_canny import CannyFn
from livediff.models.control_images import (
    PreprocessorNetworks,
    as_images,
    from_model_output,
    preprocess,
)
from livediff.models.control_uses import CannyParams, Preprocessor

ControlKey = tuple[tuple[str, tuple[int, ...]], ...]
# What the graph runs (checked on an H200 by tests/gpu/test_gpu_captured_controlnet.py); the
# depth and soft-edge networks have not been captured yet, so their streams go call by call.
CAPTURED = frozenset(
    (
        Preprocessor.CANNY,
        Preprocessor.PASSTHROUGH,
        Preprocessor.PREVIOUS_OUTPUT,
        Preprocessor.CLIENT,
    )
)


def not_captured(plan: ControlPlan | None) -> list[str]:
    """The plan's preprocessors that keep its frame step out of the graph (see ``CAPTURED``)."""
    if plan is None:
        return []
    return sorted({u.preprocessor.value for u in plan.uses if u.preprocessor not in CAPTURED})


def control_key(plan: ControlPlan | None) -> ControlKey:
    """What a captured step's shape depends on: each distinct preprocessor use (in the
    plan's order) and the slots it feeds; parameters, scales and images are not part of it."""
    if plan is None:
        return ()
    return tuple(
        (kind.value, tuple(slots)) for (kind, _), slots in distinct_uses(plan.uses).items()
    )


class CapturedControl:
    """The static inputs and the in-graph computation of one captured step's control images
    (see the module docstring). ``rows``: the frame group's frames."""

    def __init__(
        self,
        plan: ControlPlan,
        *,
        size: tuple[int, int],
        rows: int,
        device: torch.device,
        dtype: torch.dtype,
        networks: PreprocessorNetworks | None,
        canny: CannyFn,
    ) -> None:
        self.size, self.rows, self.dtype = size, rows, dtype
        self._networks, self._canny = networks, canny
        self._uses = list(distinct_uses(plan.uses).items())
        opts: dict[str, Any] = {"device": device}
        self.images = torch.zeros(rows, plan.slots, 3, *size, dtype=dtype, **opts)
        self._canny_params = {
            i: torch.zeros(3, rows, dtype=torch.float32, **opts)
            for i, ((kind, _), _) in enumerate(self._uses)
            if kind is Preprocessor.CANNY
        }
        self._client = {
            slot: torch.zeros(1, 3, *size, dtype=dtype, **opts)
            for (kind, _), slots in self._uses
            if kind is Preprocessor.CLIENT
            for slot in slots
        }
        self._client_from: dict[int, torch.Tensor | None] = dict.fromkeys(self._client)
        self._previous = torch.zeros(1, 3, *size, dtype=dtype, **opts)
        self._input_stands_in = torch.ones((), dtype=torch.bool, **opts)
        self._zeros = torch.zeros(rows, 3, *size, dtype=dtype, **opts)
        self._reads_previous = any(
            kind is Preprocessor.PREVIOUS_OUTPUT for (kind, _), _ in self._uses
        )
        self._params_from: ControlPlan | None = None
        self.refresh(plan, {}, None)

    def refresh(
        self,
        plan: ControlPlan,
        client: Mapping[int, torch.Tensor],
        previous: torch.Tensor | None,
    ) -> None:
        """Before a replay: the plan's parameters (its :func:`control_key` must be this one's),
        the client's images where they changed, the previous output (``[1, 3, h, w]`` in [0,
        1] or uint8 ``[1, H, W, 3]``; ``None`` before the first output)."""
        if plan is not self._params_from:  # plans are frozen: a new one is a live update
            for i, ((_, params), _) in enumerate(distinct_uses(plan.uses).items()):
                buffer = self._canny_params.get(i)
                if buffer is not None:
                    p = params or CannyParams()
                    for row, value in zip(buffer, (p.low, p.high, p.sigma), strict=True):
                        row.fill_(value)
            self._params_from = plan
        for slot, static in self._client.items():
            image = client.get(slot)
            if image is self._client_from[slot]:
                continue
            if image is None:
                static.zero_()
            elif tuple(image.shape[-2:]) == self.size:  # as control_batch fits a client image
                static.copy_(image)
            else:
                static.copy_(
                    preprocess(Preprocessor.PASSTHROUGH, image.to(static.device), self.size)
                )
            self._client_from[slot] = image
        if not self._reads_previous:
            return
        if previous is None:
            self._input_stands_in.fill_(True)
        else:
            fitted = preprocess(
                Preprocessor.PASSTHROUGH, previous.to(self._previous.device), self.size
            )
            self._previous.copy_(fitted)
            self._input_stands_in.fill_(False)

    def compute(self, pixels: torch.Tensor | None) -> torch.Tensor:
        """Inside the graph: the control images ``[rows, slots, 3, H, W]`` for the group's
        model inputs ``pixels`` (``[rows, 3, H, W]`` in [-1, 1]; ``None`` in txt2img)."""
        frames = None if pixels is None else from_model_output(pixels)
        for i, ((kind, _), slots) in enumerate(self._uses):
            if kind is Preprocessor.CANNY:
                assert frames is not None  # resolve_control refuses frame preprocessors in txt2img
                low, high, sigma = self._canny_params[i]
                images = as_images(frames, self.size, self.dtype)
                result = self._canny(images, low, high, sigma, HYSTERESIS_ITERATIONS)
            elif kind is Preprocessor.PREVIOUS_OUTPUT:
                stand_in = self._zeros if frames is None else frames
                previous = self._previous.expand(self.rows, -1, -1, -1)
                result = torch.where(self._input_stands_in, stand_in, previous)
            elif kind is Preprocessor.CLIENT:
                for slot in slots:
                    self.images[:, slot].copy_(self._client[slot].expand(self.rows, -1, -1, -1))
                continue
            else:
                assert frames is not None
                result = preprocess(kind, frames, self.size, networks=self._networks)
            for slot in slots:
                self.images[:, slot].copy_(result)
        return self.images

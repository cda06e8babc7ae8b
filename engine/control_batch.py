"""Control images for every session of a batch, each preprocessor run once over all of them.

A batch's sessions each ask for their frame group's control images (a
:class:`ControlRequest`: the session's resolved uses, its frames, its previous output, the
images its client sent). :func:`control_images` answers them together: every row that needs
canny goes through one canny call, each row with its own session's thresholds and blur (the
kernel takes them per row), every row that needs depth through one depth call, soft edges
likewise, and the frame itself (tile nets) is resized once for all. Within a session a
preprocessor with given parameters runs once per frame group, however many of its nets use
the result. The previous output (TemporalNet) and client images are the session's own
images, fitted and copied, with no network to batch. Every preprocessor works row by row, so
a session's images are those it would get alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from livediff.models.control_images import from_model_output, preprocess
from livediff.models.control_uses import CannyParams, Preprocessor


@dataclass(frozen=True)
class SlotUse:
    """One use, resolved: the slot of its net, its preprocessor, parameters and scale."""

    slot: int
    preprocessor: Preprocessor
    params: CannyParams | None
    scale: float


@dataclass(frozen=True)
class ControlRequest:
    """One session's frame group: what its control images ``[rows, slots, 3, *size]`` need.

    ``pixels`` are the group's model inputs ``[rows, 3, *size]`` in [-1, 1] (``None`` in
    txt2img), ``previous`` the session's previous output ``[1, 3, h, w]`` in [0, 1] (``None``
    before the first: the input frame stands in, or zeros in txt2img), ``client`` the images
    its client sent, by slot (``[1, 3, H, W]`` in [0, 1]; a slot without one stays zero).
    """

    slots: int
    uses: tuple[SlotUse, ...]
    size: tuple[int, int]
    pixels: torch.Tensor | None
    previous: torch.Tensor | None
    rows: int
    dtype: torch.dtype
    device: torch.device
    client: Mapping[int, torch.Tensor] = field(default_factory=dict)


# (request, its parameters, the slots fed) for one preprocessor at one size
_Part = tuple[int, CannyParams | None, list[int]]
BATCHED = (Preprocessor.CANNY, Preprocessor.DEPTH, Preprocessor.SOFT_EDGE, Preprocessor.PASSTHROUGH)


def control_images(
    requests: Sequence[ControlRequest], networks: object = None
) -> list[torch.Tensor]:
    """Each request's control images ``[rows, slots, 3, *size]`` (see the module docstring)."""
    outs = [
        torch.zeros(r.rows, r.slots, 3, *r.size, dtype=r.dtype, device=r.device) for r in requests
    ]
    frames = [None if r.pixels is None else from_model_output(r.pixels) for r in requests]
    jobs: dict[tuple[Preprocessor, tuple[int, int]], list[_Part]] = {}
    for i, request in enumerate(requests):
        for (kind, params), slots in distinct_uses(request.uses).items():
            if kind in BATCHED:
                jobs.setdefault((kind, request.size), []).append((i, params, slots))
            elif kind is Preprocessor.PREVIOUS_OUTPUT:
                _fill(outs[i], slots, _previous(request, frames[i]))
            else:  # CLIENT
                for slot in slots:
                    image = request.client.get(slot)
                    if image is not None:  # else zero, at scale 0 (ControlPlan.scales)
                        _fill(outs[i], [slot], _fitted(image, request.size, request.device))
    for (kind, size), parts in jobs.items():
        sources = []
        for i, _, _ in parts:
            source = frames[i]
            assert source is not None  # resolve_control refuses frame preprocessors in txt2img
            sources.append(source)
        row_params = (
            [params or CannyParams() for i, params, _ in parts for _ in range(requests[i].rows)]
            if kind is Preprocessor.CANNY
            else None
        )
        result = preprocess(kind, _packed(sources), size, row_params, networks=networks)  # type: ignore[arg-type]
        offset = 0
        for i, _, slots in parts:
            _fill(outs[i], slots, result.narrow(0, offset, requests[i].rows))
            offset += requests[i].rows
    return outs


def batched_controls(
    requests: Sequence[ControlRequest | None], networks: object = None
) -> list[torch.Tensor | None]:
    """:func:`control_images` for the sessions that have ControlNets (``None`` for the rest)."""
    asked = [r for r in requests if r is not None]
    answers = iter(control_images(asked, networks) if asked else [])
    return [None if r is None else next(answers) for r in requests]


def distinct_uses(
    uses: Sequence[SlotUse],
) -> dict[tuple[Preprocessor, CannyParams | None], list[int]]:
    """Each distinct (preprocessor, parameters) of a session and the slots it feeds."""
    distinct: dict[tuple[Preprocessor, CannyParams | None], list[int]] = {}
    for use in uses:
        distinct.setdefault((use.preprocessor, use.params), []).append(use.slot)
    return distinct


def _fill(out: torch.Tensor, slots: Sequence[int], images: torch.Tensor) -> None:
    for slot in slots:
        out[:, slot].copy_(images)  # [1, 3, H, W] images broadcast over the rows


def _packed(sources: Sequence[torch.Tensor]) -> torch.Tensor:
    """The sessions' frames one after another in one tensor (one copy each, no cat)."""
    if len(sources) == 1:
        return sources[0]
    total = sum(int(s.shape[0]) for s in sources)
    packed = sources[0].new_empty((total, *sources[0].shape[1:]))
    offset = 0
    for source in sources:
        packed.narrow(0, offset, source.shape[0]).copy_(source)
        offset += int(source.shape[0])
    return packed


def _previous(request: ControlRequest, frames: torch.Tensor | None) -> torch.Tensor:
    source = request.previous if request.previous is not None else frames
    if source is None:
        return torch.zeros(1, 3, *request.size, dtype=request.dtype, device=request.device)
    return preprocess(Preprocessor.PASSTHROUGH, source.to(request.device), request.size)


def _fitted(image: torch.Tensor, size: tuple[int, int], device: torch.device) -> torch.Tensor:
    """A client image kept at the session's full size, at the size the Stream runs (smaller
    while the engine is degraded: resized bilinearly, as frames are)."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return preprocess(Preprocessor.PASSTHROUGH, image.to(device), size)

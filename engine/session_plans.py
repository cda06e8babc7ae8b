"""Off the hot path: building Streams and preparing parameter changes, on the engine's control thread.

Everything that encodes prompts or allocates a Stream runs here, in one dedicated thread
(neither the event loop nor the GPU worker). A session's :class:`Plan` is touched only by this
thread, and jobs run one at a time in submission order, so updates land in the order they
were made. A job's result is a :data:`ControlItem` queued on the session; the worker applies
queued items at the next frame boundary, before it takes the next frame of that session.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from livediff.engine.config import GenerationParams, StreamConfig
from livediff.engine.degrade import DegradeLevel, DegradePolicy, degraded_params, degraded_size
from livediff.engine.stream import PreparedUpdate, Stream
from livediff.models.bundle import ModelBundle


@dataclass(frozen=True)
class ApplyUpdate:
    """Apply a prepared update to ``stream`` (the worker's current Stream of the session)."""

    stream: Stream
    update: PreparedUpdate


@dataclass(frozen=True)
class SwapStream:
    """Replace the session's Stream (a new resolution); frames in the old one are lost."""

    stream: Stream


@dataclass(frozen=True)
class SetControlImage:
    """Make ``image`` the control input of ControlNet ``slot`` in ``stream`` (a client image)."""

    stream: Stream
    slot: int
    image: torch.Tensor


ControlItem = ApplyUpdate | SwapStream | SetControlImage


@dataclass
class Plan:
    """Where a session is heading once every queued item is applied (control thread only)."""

    config: StreamConfig  # as requested, full resolution
    requested: GenerationParams
    level: DegradeLevel
    params: GenerationParams  # what ``stream`` will run after the queued items
    stream: Stream
    # The client's control images by ControlNet slot, given to every new Stream of the session.
    control_images: dict[int, torch.Tensor] = field(default_factory=dict)


def changed_fields(old: GenerationParams, new: GenerationParams) -> frozenset[str]:
    return frozenset(
        f.name for f in fields(GenerationParams) if getattr(old, f.name) != getattr(new, f.name)
    )


def build_plan(
    bundle: ModelBundle,
    config: StreamConfig,
    requested: GenerationParams,
    level: DegradeLevel,
    policy: DegradePolicy,
    session_id: str,
) -> Plan:
    """A new session's Stream, already degraded to ``level``."""
    params = degraded_params(requested, level, policy)
    stream = _stream(bundle, config, params, level, policy, session_id)
    return Plan(config, requested, level, params, stream)


def carry_control_images(old: Plan, new: Plan) -> None:
    """A rebuilt session keeps the control images its client sent (``new`` is not yet the
    worker's: its Stream is set here)."""
    new.control_images = old.control_images
    for slot, image in new.control_images.items():
        new.stream.set_client_image(slot, image)


def _stream(
    bundle: ModelBundle,
    config: StreamConfig,
    params: GenerationParams,
    level: DegradeLevel,
    policy: DegradePolicy,
    session_id: str,
) -> Stream:
    assert config.width is not None and config.height is not None
    width, height = degraded_size(config.width, config.height, level, policy)
    return Stream(bundle, config.with_resolution(width, height), params, session_id=session_id)


def replan(
    plan: Plan,
    requested: GenerationParams,
    level: DegradeLevel,
    policy: DegradePolicy,
    bundle: ModelBundle,
    session_id: str,
) -> ControlItem | None:
    """Move ``plan`` to new requested parameters and/or level; returns what the worker must apply."""
    params = degraded_params(requested, level, policy)
    assert plan.config.width is not None and plan.config.height is not None
    size = degraded_size(plan.config.width, plan.config.height, level, policy)
    item: ControlItem | None = None
    if size != (plan.stream.width, plan.stream.height):
        item = SwapStream(_stream(bundle, plan.config, params, level, policy, session_id))
        for slot, image in plan.control_images.items():  # not yet the worker's: set them here
            item.stream.set_client_image(slot, image)
        plan.stream = item.stream
    else:
        changed = changed_fields(plan.params, params)
        # prepare_params may raise ParameterError (a t_index_list beyond the schedule): plan unchanged.
        if changed:
            item = ApplyUpdate(plan.stream, plan.stream.prepare_params(params, changed))
    plan.requested, plan.level, plan.params = requested, level, params
    return item

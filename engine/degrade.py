"""Overload handling by rule: the degrade levels, their thresholds, and the controller.

Pressure
    Over each window of ``window_s`` seconds the worker counts the frames that competed for
    compute (generated outputs plus frames dropped for their deadline) and the *bad* ones among
    them (finished after their deadline, or dropped for it). ``pressure = bad / total`` (0 for an
    empty window, so an idle engine recovers).

Levels, in the order they are taken (and left in reverse)
    0. ``normal``
    1. ``fewer_steps``: every session runs at most ``steps`` denoising steps (default 1). An
       explicit ``t_index_list`` keeps its first (noisiest) index and is thinned evenly, so the
       strength a user picked is kept; otherwise the list is re-derived from ``strength``.
    2. ``lower_resolution``: as 1, and every session renders at ``resolution_scale`` of its size
       (rounded down to a multiple of 8, at least ``min_side``) in a new Stream. Outputs keep
       the session's size: frames are upscaled (bilinear) on the device before download, and
       :attr:`SessionOutput.render_size <livediff.engine.session.SessionOutput.render_size>` says
       what was generated. Frames in flight in the old Stream are lost (``dropped_reconfigure``).
    3. ``refuse_sessions``: as 2, and :meth:`Engine.open_session` raises ``CapacityError``.

Hysteresis
    A level is raised after ``degrade_after`` consecutive windows with
    ``pressure >= degrade_above`` and lowered after ``recover_after`` consecutive windows with
    ``pressure <= recover_below``. Windows in between reset both counts, and so does every
    change of level, so each level gets at least one full run of windows before the next move.
    An idle engine (no frame competed for compute for ``recover_after`` windows in a row) has
    nothing to protect and goes straight back to ``normal``. With the defaults (1 s windows,
    3 to recover) the engine is back to normal within 3 s of going idle, and within 9 s of its
    load falling while sessions keep streaming.

State and reason
    :attr:`DegradeController.reason` says why the engine is where it is ("overloaded: 80 % of
    frames late …" or "recovering: …"); ``/stats``, ``/healthz``, ``/metrics``
    (``livediff_degrade_level``, ``livediff_degrade_pressure``) and the page show it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import IntEnum

from livediff.engine.config import GenerationParams
from livediff.exceptions import ParameterError
from livediff.settings import check_settings, setting

log = logging.getLogger(__name__)


class DegradeLevel(IntEnum):
    """How far the engine has degraded; each level includes the ones below it."""

    NORMAL = 0
    FEWER_STEPS = 1
    LOWER_RESOLUTION = 2
    REFUSE_SESSIONS = 3

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class DegradePolicy:
    """Thresholds of the overload controller (see :mod:`livediff.engine.degrade`)."""

    enabled: bool = setting(
        True,
        doc="shed load under sustained overload (fewer steps, lower resolution, refusals)",
        flag="--no-degrade",
    )
    window_s: float = setting(1.0, doc="length of a pressure window", above=0, max=3600, unit="s")
    degrade_above: float = setting(
        0.25,
        doc="pressure (late or dropped share) at which a window counts as overloaded",
        min=0,
        max=1,
    )
    recover_below: float = setting(
        0.05, doc="pressure at or under which a window counts as calm", min=0, max=1
    )
    degrade_after: int = setting(
        3, doc="overloaded windows in a row before the next level", min=1, max=1000
    )
    recover_after: int = setting(
        3, doc="calm windows in a row before going back one level", min=1, max=1000
    )
    steps: int = setting(
        1, doc="denoising steps at most from level fewer_steps on", min=1, max=1000
    )
    resolution_scale: float = setting(
        0.5, doc="size factor from level lower_resolution on", min=0.1, max=1
    )
    min_side: int = setting(
        64, doc="smallest side a session is degraded to, in pixels", min=64, multiple_of=8
    )

    def __post_init__(self) -> None:
        check_settings(self, prefix="degrade.")
        if not self.recover_below < self.degrade_above:
            raise ParameterError(
                f"degrade thresholds recover_below={self.recover_below!r}, degrade_above={self.degrade_above!r}: "
                "expected 0 <= recover_below < degrade_above <= 1 (the gap is the hysteresis band)",
                field="recover_below",
            )


def degraded_params(
    requested: GenerationParams, level: DegradeLevel, policy: DegradePolicy
) -> GenerationParams:
    """The parameters a session actually runs with at ``level``."""
    if level < DegradeLevel.FEWER_STEPS or requested.steps <= policy.steps:
        return requested
    if requested.t_index_list is None:
        return requested.updated(steps=policy.steps)
    indices = requested.t_index_list
    keep = tuple(indices[(k * len(indices)) // policy.steps] for k in range(policy.steps))
    return requested.updated(t_index_list=keep)


def degraded_size(
    width: int, height: int, level: DegradeLevel, policy: DegradePolicy
) -> tuple[int, int]:
    """The (width, height) a session renders at ``level``."""
    if level < DegradeLevel.LOWER_RESOLUTION:
        return width, height

    def side(value: int) -> int:
        return min(value, max(policy.min_side, int(value * policy.resolution_scale) // 8 * 8))

    return side(width), side(height)


@dataclass(frozen=True)
class Transition:
    """One change of level, for metrics and logs."""

    at: float
    level: DegradeLevel
    pressure: float


class DegradeController:
    """The level state machine; fed by the worker thread only (not thread-safe by design).

    Readers on other threads may read :attr:`level` (one attribute read).
    """

    def __init__(self, policy: DegradePolicy, now: float) -> None:
        self.policy = policy
        self.level = DegradeLevel.NORMAL
        self.pressure = 0.0
        self.reason: str | None = None  # why the engine is at ``level`` (None at normal)
        self.history: list[Transition] = []
        self._window_start = now
        self._total = 0
        self._bad = 0
        self._over = 0
        self._under = 0
        self._idle = 0  # windows in a row in which no frame competed for compute

    def observe(self, total: int, bad: int) -> None:
        """Count frames that competed for compute, ``bad`` of them late or dropped for lateness."""
        self._total += total
        self._bad += bad

    def tick(self, now: float) -> DegradeLevel | None:
        """Close the window if it is over; returns the new level when it changes."""
        policy = self.policy
        if not policy.enabled or now - self._window_start < policy.window_s:
            return None
        self.pressure = self._bad / self._total if self._total else 0.0
        self._idle = 0 if self._total else self._idle + 1
        self._window_start, self._total, self._bad = now, 0, 0
        if self.pressure >= policy.degrade_above:
            self._over, self._under = self._over + 1, 0
        elif self.pressure <= policy.recover_below:
            self._over, self._under = 0, self._under + 1
        else:
            self._over = self._under = 0
        new = self.level
        if self._over >= policy.degrade_after and self.level < DegradeLevel.REFUSE_SESSIONS:
            new = DegradeLevel(self.level + 1)
        elif self._idle >= policy.recover_after and self.level > DegradeLevel.NORMAL:
            new = DegradeLevel.NORMAL  # nothing competes for compute: nothing to protect
        elif self._under >= policy.recover_after and self.level > DegradeLevel.NORMAL:
            new = DegradeLevel(self.level - 1)
        if new is self.level:
            return None
        log.warning(
            "[engine] degrade level %s -> %s (pressure %.2f over %.1f s windows)",
            self.level.label,
            new.label,
            self.pressure,
            policy.window_s,
        )
        raised = new > self.level
        self.level, self._over, self._under, self._idle = new, 0, 0, 0
        self.reason = None if new is DegradeLevel.NORMAL else self._explain(raised)
        self.history.append(Transition(now, new, self.pressure))
        del self.history[:-64]
        return new

    def _explain(self, raised: bool) -> str:
        policy = self.policy
        if raised:
            return (
                f"overloaded: {self.pressure:.0%} of frames late or dropped for their deadline "
                f"(at least {policy.degrade_above:.0%} for {policy.degrade_after} windows of "
                f"{policy.window_s:g} s)"
            )
        return (
            f"recovering: load fell to {self.pressure:.0%} late frames; one level back every "
            f"{policy.recover_after} windows of {policy.window_s:g} s under {policy.recover_below:.0%}"
        )

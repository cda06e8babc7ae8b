"""How the engine schedules, bounds and degrades: :class:`RuntimeConfig` (``[runtime]`` in TOML)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from livediff.engine.config import enum_value
from livediff.engine.degrade import DegradePolicy
from livediff.exceptions import ParameterError


class BatchOverlap(str, Enum):
    """Whether the worker prepares and launches the next batch while the current one runs.

    ``off`` (the default): launch, wait, answer, then gather the next batch; the device idles
    while the host answers one batch and prepares the next (10-15 % of the time at 16 busy
    sessions on an H200). ``auto``: overlap on CUDA devices, not on CPU (where every op is
    synchronous, so overlapping only delays answers). ``on``: also on CPU (same ordering;
    used by tests). Overlap answers more frames when the device is the bottleneck (+8-13 %
    at 16-32 overloaded sessions on an H200) but frames wait longer for the gather, so
    latency is higher (see bench/results/README.md): a throughput setting, not a latency one.
    """

    AUTO = "auto"
    ON = "on"
    OFF = "off"


def _positive_int(name: str, value: Any, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= high:
        raise ParameterError(
            f"{name}={value!r} is out of range: expected an integer in [1, {high}]"
        )


@dataclass(frozen=True)
class RuntimeConfig:
    """How the engine schedules, bounds and degrades. Checked in ``__post_init__``.

    - ``deadline_ms``: per-frame latency budget, arrival → output ready.
    - ``max_sessions``: open sessions at most; beyond it ``open_session`` raises ``CapacityError``.
    - ``max_sessions_per_device``: open sessions per device at most (``None``: no cap of its
      own); sessions go to the least-loaded device (:mod:`livediff.engine.placement`).
    - ``batch_buckets``: UNet (and VAE) batch sizes; rows are padded up to the next one, and the
      largest is the most rows one call takes.
    - ``inbox_size`` / ``outbox_size``: per-session bounds (latest input wins; oldest output goes).
    - ``max_consecutive_deadline_drops``: after this many deadline drops in a row a session's
      next frame runs even if late, so no stream freezes.
    - ``batch_time_smoothing``: weight of the newest batch time in the estimate used for drops.
    - ``latency_window``: samples kept per percentile window.
    - ``overlap``: gather and launch the next batch shortly before the running one ends, so
      the device does not wait for the host between batches (:class:`BatchOverlap`; off by
      default: it trades latency for throughput).
    - ``degrade``: the overload policy (:class:`~livediff.engine.degrade.DegradePolicy`).
    """

    deadline_ms: float = 100.0
    max_sessions: int = 32
    max_sessions_per_device: int | None = None
    batch_buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    inbox_size: int = 1
    outbox_size: int = 4
    max_consecutive_deadline_drops: int = 3
    batch_time_smoothing: float = 0.2
    latency_window: int = 1024
    overlap: BatchOverlap = BatchOverlap.OFF
    degrade: DegradePolicy = field(default_factory=DegradePolicy)

    def __post_init__(self) -> None:
        value = self.deadline_ms
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not 1 <= value <= 3_600_000
        ):
            raise ParameterError(
                f"deadline_ms={value!r} is out of range: expected a number in [1, 3600000]"
            )
        _positive_int("max_sessions", self.max_sessions, 4096)
        if self.max_sessions_per_device is not None:
            _positive_int("max_sessions_per_device", self.max_sessions_per_device, 4096)
        buckets = tuple(self.batch_buckets)
        if not buckets or any(
            not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in buckets
        ):
            raise ParameterError(
                f"batch_buckets={self.batch_buckets!r}: expected positive integers"
            )
        if any(a >= b for a, b in itertools.pairwise(buckets)) or buckets[-1] > 1024:
            raise ParameterError(
                f"batch_buckets={self.batch_buckets!r}: expected strictly increasing sizes up to 1024"
            )
        object.__setattr__(self, "batch_buckets", buckets)
        _positive_int("inbox_size", self.inbox_size, 1024)
        _positive_int("outbox_size", self.outbox_size, 1024)
        _positive_int(
            "max_consecutive_deadline_drops", self.max_consecutive_deadline_drops, 1_000_000
        )
        _positive_int("latency_window", self.latency_window, 1_000_000)
        if not 0 < self.batch_time_smoothing <= 1:
            raise ParameterError(
                f"batch_time_smoothing={self.batch_time_smoothing!r}: expected (0, 1]"
            )
        object.__setattr__(self, "overlap", enum_value(BatchOverlap, self.overlap, "overlap"))
        if not isinstance(self.degrade, DegradePolicy):
            raise ParameterError(f"degrade={self.degrade!r}: expected a DegradePolicy")

"""How the engine schedules, bounds and degrades: :class:`RuntimeConfig` (``[runtime]`` in TOML)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from livediff.engine.degrade import DegradePolicy
from livediff.exceptions import ParameterError
from livediff.settings import check_settings, setting


def _device_list(text: str) -> tuple[str, ...]:
    """``--devices cuda:0,cuda:1`` → ``("cuda:0", "cuda:1")``."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _device_names(value: Any, name: str) -> tuple[str, ...]:
    """Names of the shape a torch device has (``cpu``, ``cuda``, ``cuda:1``), or ``all`` alone;
    whether they exist is checked when the engine is built (:mod:`livediff.engine.devices`)."""
    names = (value,) if isinstance(value, str) else tuple(value)
    for device in names:
        kind, _, index = str(device).partition(":")
        if (
            not isinstance(device, str)
            or kind not in ("all", "cpu", "cuda", "mps", "xpu")
            or (index and not index.isdigit())
        ):
            raise ParameterError(
                f"{name}: {device!r} is not a device name (cpu, cuda, cuda:N) or all", field=name
            )
    if "all" in names and len(names) > 1:
        raise ParameterError(f"{name}: all stands alone, not in a list", field=name)
    return names


class ControlNetRows(str, Enum):
    """Whether sessions without a ControlNet share UNet calls with sessions that use one.

    ``shared`` (the default): every session of a model with ControlNets sends control inputs
    (zeros at scale 0 when it uses none), so any sessions share a call, and every row runs
    every loaded net. ``apart``: a session whose rows in flight use no net (every scale 0)
    runs in calls of its own kind, through the UNet alone, and pays nothing for the nets; the
    two kinds no longer fill one batch together. Both give every session the same frames.
    """

    SHARED = "shared"
    APART = "apart"


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


@dataclass(frozen=True)
class RuntimeConfig:
    """How the engine schedules, bounds and degrades (one setting per field; checked on creation).

    Sessions go to the least-loaded device (:mod:`livediff.engine.placement`); overload is
    handled by ``degrade`` (:class:`~livediff.engine.degrade.DegradePolicy`).
    """

    deadline_ms: float = setting(
        100.0,
        doc="per-frame latency budget, arrival to output ready",
        min=1,
        max=3_600_000,
        unit="ms",
        flag="--deadline-ms",
    )
    max_sessions: int = setting(
        32,
        doc="open sessions at most; beyond it new sessions are refused",
        min=1,
        max=4096,
        flag="--max-sessions",
    )
    max_sessions_per_device: int | None = setting(
        None,
        doc="open sessions per device at most",
        min=1,
        max=4096,
        special={None: "no cap of its own"},
        flag="--max-sessions-per-device",
    )
    batch_buckets: tuple[int, ...] = setting(
        (1, 2, 4, 8, 16, 32),
        doc="UNet (and VAE) batch sizes; rows are padded up to the next, the largest is the most one call takes",
        min=1,
        max=1024,
        min_items=1,
        increasing=True,
    )
    inbox_size: int = setting(
        1, doc="input frames queued per session (the latest wins)", min=1, max=1024
    )
    outbox_size: int = setting(
        4, doc="outputs queued per session (the oldest goes)", min=1, max=1024
    )
    max_consecutive_deadline_drops: int = setting(
        3,
        doc="deadline drops in a row after which a session's next frame runs even if late",
        min=1,
        max=1_000_000,
    )
    batch_time_smoothing: float = setting(
        0.2, doc="weight of the newest batch time in the estimate used for drops", above=0, max=1
    )
    latency_window: int = setting(
        1024, doc="samples kept per latency percentile window", min=1, max=1_000_000
    )
    overlap: BatchOverlap = setting(
        BatchOverlap.OFF,
        doc="prepare and launch the next batch while the current one runs (throughput, not latency)",
    )
    controlnet_rows: ControlNetRows = setting(
        ControlNetRows.SHARED,
        doc="shared: sessions with and without ControlNets share UNet calls (every row runs "
        "every net, at scale 0 when unused); apart: sessions that use none run in calls of "
        "their own, without the nets",
        flag="--controlnet-rows",
    )
    degrade: DegradePolicy = setting(
        default_factory=DegradePolicy, doc="the overload policy ([runtime.degrade])"
    )
    devices: tuple[str, ...] = setting(
        (),
        doc="devices to serve on, one worker each: all (every CUDA device) or a list such as cuda:0,cuda:1 (empty: the model's --device)",
        check=_device_names,
        expected="all, or a list of device names",
        flag="--devices",
        metavar="all|cuda:0,cuda:1,…",
        from_flag=_device_list,
    )

    def __post_init__(self) -> None:
        check_settings(self)

"""Which sessions run next, together: earliest deadline first, grouped, within a row budget.

Priority
    A session's priority is the deadline of the oldest frame that has been waiting since the
    session was last served. A frame that is replaced in the inbox (latest wins) hands its
    place in line to the newer frame, so a session whose frames keep being replaced still
    moves to the front: with equal budgets this is round-robin, and no session starves. Equal
    deadlines go to the session served fewest times.

Grouping rule (what may share one UNet call)
    Sessions share a call when their Streams have the same latent size (same resolution,
    hence also the same VAE encode/decode shapes) and both use Stream Batch
    (``use_denoising_batch=True``). Every UNet row carries its own timestep, prompt embedding
    and step coefficients, so step counts, strengths, seeds, prompts, RCFG modes and frame
    buffer sizes may all differ within a group (and ControlNet uses, unless the server keeps
    the sessions that use nets apart: ``RuntimeConfig.controlnet_rows``). A session with
    ``use_denoising_batch=False`` runs its steps as separate calls and is always a group of
    its own. The group of the
    earliest-deadline session runs; the other sessions of that group join in priority order
    while their rows fit in ``max_rows`` (the largest bucket). A session whose rows alone
    exceed ``max_rows`` runs alone, unpadded.

Deadline drops
    With ``estimate`` the smoothed wall time of a batch of this group and bucket, a frame is
    dropped before compute when ``now + estimate > deadline`` (it cannot be on time), unless
    it could not have been on time even when it arrived (``arrival + estimate > deadline``:
    dropping it would starve the session for nothing) or the session already dropped
    ``max_consecutive`` frames in a row (a stream never freezes). Both of those run late and
    count as ``late``, which is what drives the degrade controller.

Free rows
    A frame the deadline rule would drop runs anyway (late) when its rows fit in the padding
    of the bucket that the batch's other frames fill (:func:`late_riders`): the padded rows
    run regardless, so dropping it would save no device time and only leave a gap in its
    stream. Late frames take the free rows in priority order; a batch with no frame on time
    runs none of them (dropping them all saves the call).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")
# latent height, latent width, Stream Batch, own-group id, ControlNet rows apart and in use
GroupKey = tuple[int, int, bool, str, bool]


def group_key(
    latent_size: tuple[int, int],
    use_denoising_batch: bool,
    session_id: str,
    controlnets_apart: bool = False,
) -> GroupKey:
    """Sessions with equal keys may share a UNet call (see the module docstring).

    ``controlnets_apart``: the server keeps sessions that use ControlNets apart from those
    that do not (``RuntimeConfig.controlnet_rows = "apart"``) and this one's rows use a net.
    """
    return (
        latent_size[0],
        latent_size[1],
        use_denoising_batch,
        "" if use_denoising_batch else session_id,
        controlnets_apart,
    )


@dataclass(frozen=True)
class Candidate(Generic[T]):
    """A session with a frame ready."""

    item: T
    key: GroupKey
    priority: float
    rows: int
    served: int  # tie-break: the session served fewest times goes first
    order: int  # then the session opened first


def plan_batch(candidates: Sequence[Candidate[T]], max_rows: int) -> list[Candidate[T]]:
    """The sessions of the next call, earliest deadline first."""
    if not candidates:
        return []
    ranked = sorted(candidates, key=lambda c: (c.priority, c.served, c.order))
    head = ranked[0]
    chosen, rows = [head], head.rows
    if head.key[2]:
        for candidate in ranked[1:]:
            if candidate.key == head.key and rows + candidate.rows <= max_rows:
                chosen.append(candidate)
                rows += candidate.rows
    return chosen


def bucket_for(rows: int, buckets: Sequence[int]) -> int:
    """The smallest bucket holding ``rows``, or ``rows`` itself beyond the largest."""
    for bucket in buckets:
        if bucket >= rows:
            return bucket
    return rows


def should_drop(
    now: float,
    arrival: float,
    deadline: float,
    estimate: float,
    consecutive_drops: int,
    max_consecutive: int,
) -> bool:
    """The deadline-drop rule of the module docstring."""
    if now + estimate <= deadline:
        return False
    if arrival + estimate > deadline:
        return False
    return consecutive_drops < max_consecutive


def late_riders(on_time_rows: int, late_rows: Sequence[int], buckets: Sequence[int]) -> list[bool]:
    """Which late frames (rows each, in priority order) run in the padding of the bucket the
    ``on_time_rows`` fill (the free-rows rule of the module docstring)."""
    if on_time_rows <= 0:
        return [False] * len(late_rows)
    bucket = bucket_for(on_time_rows, buckets)  # beyond the largest bucket: no padding
    rows = on_time_rows
    riders = []
    for extra in late_rows:
        fits = rows + extra <= bucket
        rows += extra if fits else 0
        riders.append(fits)
    return riders


class BatchTimeEstimator:
    """Exponentially weighted mean of measured batch wall times, per (latent size, bucket).

    Unknown shapes borrow the nearest smaller known bucket of the same size, else 0
    (optimistic: nothing is dropped until something was measured). Worker thread only.
    """

    def __init__(self, smoothing: float) -> None:
        self.smoothing = smoothing
        self._means: dict[tuple[int, int, int], float] = {}

    def estimate(self, key: GroupKey, bucket: int) -> float:
        exact = self._means.get((key[0], key[1], bucket))
        if exact is not None:
            return exact
        smaller = [
            (b, m) for (h, w, b), m in self._means.items() if (h, w) == key[:2] and b < bucket
        ]
        return max(smaller)[1] if smaller else 0.0

    def record(self, key: GroupKey, bucket: int, seconds: float) -> None:
        slot = (key[0], key[1], bucket)
        old = self._means.get(slot)
        self._means[slot] = seconds if old is None else old + self.smoothing * (seconds - old)

    def snapshot(self) -> dict[str, float]:
        return {
            f"{w * 8}x{h * 8}@{b}": round(m * 1000.0, 3)
            for (h, w, b), m in sorted(self._means.items())
        }

"""The runtime's rules on their own: EDF batching, deadline drops, degrade levels, batch packing."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from livediff.engine.batch_packing import BatchPacker, resize_rgb
from livediff.engine.batch_planning import (
    BatchTimeEstimator,
    Candidate,
    bucket_for,
    group_key,
    late_riders,
    plan_batch,
    should_drop,
)
from livediff.engine.config import GenerationParams
from livediff.engine.degrade import (
    DegradeController,
    DegradeLevel,
    DegradePolicy,
    degraded_params,
    degraded_size,
)
from livediff.exceptions import ParameterError
from livediff.models.unet_batch import UNetBatch

A = group_key((8, 8), True, "a")
SMALL = group_key((4, 4), True, "b")


def test_group_keys() -> None:
    assert group_key((8, 8), True, "a") == group_key((8, 8), True, "b")  # Stream Batch, same size
    assert group_key((8, 8), True, "a") != group_key((4, 4), True, "a")  # other resolution
    assert group_key((8, 8), False, "a") != group_key((8, 8), False, "b")  # sequential: alone


def test_plan_takes_earliest_deadline_first_within_the_row_budget() -> None:
    candidates = [
        Candidate("late", A, 5.0, 2, 0, 0),
        Candidate("first", A, 1.0, 2, 0, 1),
        Candidate("other size", SMALL, 0.5, 1, 0, 2),
        Candidate("second", A, 2.0, 3, 0, 3),
        Candidate("fits", A, 3.0, 1, 0, 4),
    ]
    # "other size" is earliest: its group runs alone.
    assert [c.item for c in plan_batch(candidates, 8)] == ["other size"]
    rest = [c for c in candidates if c.item != "other size"]
    # 2 + 3 + 1 rows fit in 6; "late" (2 more rows) would not.
    assert [c.item for c in plan_batch(rest, 6)] == ["first", "second", "fits"]
    assert [c.item for c in plan_batch(rest, 100)] == ["first", "second", "fits", "late"]
    # A session larger than the budget still runs, alone.
    assert [c.item for c in plan_batch([Candidate("big", A, 1.0, 64, 0, 0), *rest], 32)] == ["big"]
    sequential = group_key((8, 8), False, "s")
    assert [c.item for c in plan_batch([Candidate("s", sequential, 0.0, 1, 0, 9), *rest], 32)] == [
        "s"
    ]
    assert plan_batch([], 8) == []


def test_replaced_frames_keep_their_place_in_line() -> None:
    """Every session gets a new frame each round but only three may run per round. A session's
    priority stays the deadline of its oldest frame waiting since it was last served (so a
    replaced frame keeps its place), and equal deadlines go to the least served."""
    sessions, per_round = 10, 3
    waiting_since: list[float | None] = [None] * sessions
    served = [0] * sessions
    for now in range(30):
        for k in range(sessions):
            if waiting_since[k] is None:  # a replacement would keep the older deadline
                waiting_since[k] = now + 1.0
        ready = [Candidate(k, A, waiting_since[k] or 0.0, 1, served[k], k) for k in range(sessions)]
        for chosen in plan_batch(ready, per_round):
            served[chosen.item] += 1
            waiting_since[chosen.item] = None
        assert max(served) - min(served) <= 1, served
    assert served == [9] * sessions  # 90 slots, 10 sessions


@pytest.mark.parametrize(
    ("now", "arrival", "estimate", "drops", "expected"),
    [
        (0.00, 0.0, 0.05, 0, False),  # on time
        (0.08, 0.0, 0.05, 0, True),  # became late while waiting
        (0.08, 0.0, 0.05, 3, False),  # three dropped in a row: this one runs
        (0.08, 0.0, 0.20, 0, False),  # could never be on time: dropping it gains nothing
    ],
)
def test_deadline_drop_rule(
    now: float, arrival: float, estimate: float, drops: int, expected: bool
) -> None:
    assert should_drop(now, arrival, arrival + 0.1, estimate, drops, 3) is expected


@pytest.mark.parametrize(
    ("on_time", "late", "buckets", "expected"),
    [
        (3, [1, 1], (1, 2, 4, 8), [True, False]),  # bucket 4 for 3 rows: one free row
        (2, [2, 1, 1], (1, 2, 4, 8), [False, False, False]),  # bucket 2 is full
        (5, [2, 4, 1], (1, 2, 4, 8), [True, False, True]),  # bucket 8: 3 free rows, in order
        (0, [1, 1], (1, 2, 4, 8), [False, False]),  # none on time: dropping saves the call
        (9, [1], (1, 2, 4, 8), [False]),  # beyond the largest bucket nothing is padded
        (1, [1], (16,), [True]),  # one bucket of 16: every late frame up to 16 rows rides
    ],
)
def test_late_frames_ride_only_in_free_rows(
    on_time: int, late: list[int], buckets: tuple[int, ...], expected: list[bool]
) -> None:
    assert late_riders(on_time, late, buckets) == expected


def test_batch_time_estimate() -> None:
    estimator = BatchTimeEstimator(smoothing=0.5)
    assert estimator.estimate(A, 4) == 0.0  # nothing measured: optimistic
    estimator.record(A, 2, 0.010)
    assert estimator.estimate(A, 4) == pytest.approx(0.010)  # borrows the nearest smaller bucket
    estimator.record(A, 4, 0.020)
    estimator.record(A, 4, 0.040)
    assert estimator.estimate(A, 4) == pytest.approx(0.030)
    assert estimator.estimate(SMALL, 4) == 0.0
    assert bucket_for(3, (1, 2, 4, 8)) == 4 and bucket_for(9, (1, 2, 4, 8)) == 9


def test_degrade_controller_hysteresis() -> None:
    policy = DegradePolicy(
        window_s=1.0, degrade_above=0.5, recover_below=0.1, degrade_after=2, recover_after=3
    )
    controller = DegradeController(policy, now=0.0)
    levels = []
    # pressure per one-second window: two bad windows per step up, three good ones per step down,
    # and windows in the band between the thresholds change nothing.
    for t, (total, bad) in enumerate(
        [
            *[(10, 9), (10, 9), (10, 3), (10, 9), (10, 9), (10, 9), (10, 9), (10, 9), (10, 9)],
            *[(10, 9), (10, 0), (10, 0), (0, 0), (10, 3), (10, 0), (10, 0), (10, 0)],
        ],
        start=1,
    ):
        controller.observe(total, bad)
        assert controller.tick(t - 0.5) is None  # the window is not over yet
        change = controller.tick(float(t))
        if change is not None:
            levels.append((t, change))
    assert levels == [
        (2, DegradeLevel.FEWER_STEPS),
        (5, DegradeLevel.LOWER_RESOLUTION),
        (7, DegradeLevel.REFUSE_SESSIONS),
        (13, DegradeLevel.LOWER_RESOLUTION),
        (17, DegradeLevel.FEWER_STEPS),
    ]
    assert [t.level for t in controller.history] == [level for _, level in levels]
    disabled = DegradeController(replace_policy(enabled=False), now=0.0)
    disabled.observe(10, 10)
    assert [disabled.tick(float(t)) for t in range(1, 10)] == [None] * 9


def replace_policy(**changes: object) -> DegradePolicy:
    from dataclasses import replace

    return replace(DegradePolicy(), **changes)  # type: ignore[arg-type]


def test_degraded_parameters_and_sizes() -> None:
    policy = DegradePolicy(steps=1, resolution_scale=0.5, min_side=64)
    four = GenerationParams(steps=4, strength=1.0)
    assert degraded_params(four, DegradeLevel.NORMAL, policy) is four
    assert degraded_params(four, DegradeLevel.FEWER_STEPS, policy).steps == 1
    explicit = GenerationParams(t_index_list=(10, 20, 30, 40))
    assert degraded_params(explicit, DegradeLevel.FEWER_STEPS, policy).t_index_list == (10,)
    two = DegradePolicy(steps=2)
    assert degraded_params(explicit, DegradeLevel.FEWER_STEPS, two).t_index_list == (10, 30)
    assert degraded_size(512, 384, DegradeLevel.FEWER_STEPS, policy) == (512, 384)
    assert degraded_size(512, 384, DegradeLevel.LOWER_RESOLUTION, policy) == (256, 192)
    assert degraded_size(100, 64, DegradeLevel.REFUSE_SESSIONS, policy) == (64, 64)


@pytest.mark.parametrize(
    "changes",
    [{"window_s": 0}, {"recover_below": 0.5, "degrade_above": 0.4}, {"steps": 0}, {"min_side": 60}],
)
def test_degrade_policy_is_checked(changes: dict[str, object]) -> None:
    with pytest.raises(ParameterError):
        replace_policy(**changes)


def test_batcher_pads_to_buckets_and_splits_rows() -> None:
    seen: list[UNetBatch] = []

    def predict_noise(batch: UNetBatch) -> torch.Tensor:
        seen.append(batch)
        return batch.latents * 2 + batch.timesteps[:, None, None, None]

    model = SimpleNamespace(
        device=torch.device("cpu"), predict_noise=predict_noise, input_buffers=lambda *_: None
    )
    batcher = BatchPacker(model, (1, 2, 4, 8))  # type: ignore[arg-type]
    parts = [
        UNetBatch(
            torch.full((n, 4, 2, 2), float(n)), torch.full((n,), 10 * n), torch.zeros(n, 77, 32)
        )
        for n in (1, 2)
    ]
    eps, call = batcher.predict(parts)
    assert (call.rows, call.padded_rows, call.sessions) == (3, 4, 2)
    padded = seen[0]
    assert padded.rows == 4
    assert torch.equal(padded.latents[3], padded.latents[0])  # padding copies a real row
    assert torch.equal(eps[0], torch.full((1, 4, 2, 2), 2.0 + 10))
    assert torch.equal(eps[1], torch.full((2, 4, 2, 2), 4.0 + 20))
    batcher.predict(parts)
    assert seen[1].latents.data_ptr() == padded.latents.data_ptr()  # one buffer, written in place


def test_resize_rgb() -> None:
    small = torch.full((2, 4, 4, 3), 77, dtype=torch.uint8)
    big = resize_rgb(small, (8, 6))
    assert tuple(big.shape) == (2, 8, 6, 3) and bool((big == 77).all())
    assert resize_rgb(small, (4, 4)) is small

"""The LCM schedule, the strength mapping and the precomputed coefficients."""

from __future__ import annotations

import pytest
import torch
from diffusers import LCMScheduler

from livediff.engine.lcm_schedule import LCMSchedule, lcm_timesteps, strength_to_t_index_list
from livediff.exceptions import ParameterError
from livediff.models.presets import SCHEDULER_CONFIG


def test_schedule_matches_diffusers_lcm_scheduler() -> None:
    scheduler = LCMScheduler.from_config(SCHEDULER_CONFIG)
    scheduler.set_timesteps(50)
    assert lcm_timesteps(50) == [int(t) for t in scheduler.timesteps]
    assert lcm_timesteps(50)[:3] == [999, 979, 959]
    assert lcm_timesteps(50)[-1] == 19


@pytest.mark.parametrize(
    ("strength", "steps", "expected"),
    [
        (1.0, 4, (0, 12, 25, 37)),  # the classic 4-step LCM schedule: 999, 759, 499, 259
        (1.0, 1, (0,)),
        (0.5, 1, (24,)),
        (0.4, 2, (29, 39)),
        (0.02, 3, (47, 48, 49)),  # clamped so three distinct steps still fit
    ],
)
def test_strength_mapping(strength: float, steps: int, expected: tuple[int, ...]) -> None:
    assert strength_to_t_index_list(strength, steps, 50) == expected


def test_strength_mapping_is_monotonic_in_strength() -> None:
    firsts = [strength_to_t_index_list(s / 100, 2, 50)[0] for s in range(1, 101)]
    assert firsts == sorted(firsts, reverse=True)
    assert lcm_timesteps(50)[strength_to_t_index_list(1.0, 4)[1]] == 759


@pytest.mark.parametrize("strength", [0.0, -0.1, 1.01, float("nan")])
def test_strength_out_of_range(strength: float) -> None:
    with pytest.raises(ParameterError, match="strength"):
        strength_to_t_index_list(strength, 1, 50)


def test_coefficients_are_precomputed_from_alphas() -> None:
    schedule = LCMSchedule(SCHEDULER_CONFIG, 50)
    coefficients = schedule.coefficients((10, 30))
    scheduler = LCMScheduler.from_config(SCHEDULER_CONFIG)
    t = [799, 399]
    assert coefficients.timesteps.tolist() == t
    alpha_bar = scheduler.alphas_cumprod[t].to(torch.float64)
    torch.testing.assert_close(coefficients.alpha_sqrt, alpha_bar.sqrt())
    torch.testing.assert_close(coefficients.beta_sqrt, (1 - alpha_bar).sqrt())
    for k, timestep in enumerate(t):
        c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(timestep)
        assert coefficients.c_skip[k].item() == pytest.approx(float(c_skip))
        assert coefficients.c_out[k].item() == pytest.approx(float(c_out))


@pytest.mark.parametrize("indices", [(50,), (3, 3), (5, 2), (-1,), ()])
def test_bad_t_index_list(indices: tuple[int, ...]) -> None:
    with pytest.raises(ParameterError, match="t_index_list"):
        LCMSchedule(SCHEDULER_CONFIG, 50).resolve(indices, 1.0, 1)

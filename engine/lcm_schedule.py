"""The LCM schedule, the strength → ``t_index_list`` mapping, and precomputed step coefficients.

Schedule
    With ``T`` training timesteps (1000 for every preset) and ``N = num_inference_steps``
    (default 50), step index ``i`` has timestep ``(N - i) * (T // N) - 1``. For ``N = 50`` that is
    ``[999, 979, …, 19]``: index 0 is pure noise, the last index is the least noisy. This is the
    schedule ``diffusers.LCMScheduler.set_timesteps(50)`` produces.

``t_index_list``
    The denoising steps actually run, as indices into that schedule, strictly increasing.
    ``len(t_index_list)`` is the number of UNet rows each frame needs.

Strength
    ``strength`` in (0, 1] is how much of the input is replaced. With ``n`` steps::

        first = round((N - 1) * (1 - strength))        # strength 1 → index 0 (t=999, pure noise)
        first = min(first, N - n)                      # leave room for n distinct steps
        t_index_list[k] = first + floor(k * (N - first) / n)   for k in 0..n-1

    So ``strength=1, n=4, N=50`` gives ``[0, 12, 25, 37]`` → timesteps ``[999, 759, 499, 259]``,
    the classic 4-step LCM schedule, and ``strength=0.5, n=1`` gives ``[24]`` → ``t=519``.
    Lower strength keeps more of the input; very low strengths are clamped so the ``n``
    steps stay distinct (``min`` above), which the clamped value documents rather than hides.

Coefficients
    For every selected step: ``sqrt(alpha_bar)``, ``sqrt(1 - alpha_bar)`` and the LCM boundary
    scalings ``c_skip``, ``c_out`` from ``diffusers.LCMScheduler``, computed once in float64.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import LCMScheduler

from livediff.exceptions import ParameterError


def lcm_timesteps(num_inference_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """The LCM schedule of ``num_inference_steps`` timesteps, noisiest first."""
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise ParameterError(
            f"num_inference_steps={num_inference_steps} is out of range: expected 1 to {num_train_timesteps}"
        )
    stride = num_train_timesteps // num_inference_steps
    return [(num_inference_steps - i) * stride - 1 for i in range(num_inference_steps)]


def strength_to_t_index_list(
    strength: float, steps: int, num_inference_steps: int = 50
) -> tuple[int, ...]:
    """Map ``strength`` in (0, 1] and a step count onto schedule indices (see module docstring)."""
    if not 0 < strength <= 1:
        raise ParameterError(f"strength={strength!r} is out of range: expected a number in (0, 1]")
    if not 1 <= steps <= num_inference_steps:
        raise ParameterError(
            f"steps={steps} is out of range: expected 1 to num_inference_steps={num_inference_steps}"
        )
    first = round((num_inference_steps - 1) * (1.0 - strength))
    first = min(first, num_inference_steps - steps)
    span = num_inference_steps - first
    return tuple(first + (k * span) // steps for k in range(steps))


@dataclass(frozen=True)
class StepCoefficients:
    """Per-step constants for a ``t_index_list``; each tensor has one entry per step (float64, CPU)."""

    t_index_list: tuple[int, ...]
    timesteps: torch.Tensor
    alpha_sqrt: torch.Tensor
    beta_sqrt: torch.Tensor
    c_skip: torch.Tensor
    c_out: torch.Tensor

    @property
    def steps(self) -> int:
        return len(self.t_index_list)


class LCMSchedule:
    """Precomputes step coefficients from a model's scheduler config (betas and timestep scaling)."""

    def __init__(
        self, scheduler_config: dict[str, Any] | Any, num_inference_steps: int = 50
    ) -> None:
        self._scheduler = LCMScheduler.from_config(scheduler_config)
        self.num_train_timesteps = int(self._scheduler.config.num_train_timesteps)
        self.num_inference_steps = num_inference_steps
        self.timesteps = lcm_timesteps(num_inference_steps, self.num_train_timesteps)
        self._alphas_cumprod = self._scheduler.alphas_cumprod.to(torch.float64)

    def resolve(
        self, t_index_list: Sequence[int] | None, strength: float, steps: int
    ) -> tuple[int, ...]:
        """``t_index_list`` if given (checked against the schedule), else the strength mapping."""
        if t_index_list is None:
            return strength_to_t_index_list(strength, steps, self.num_inference_steps)
        indices = tuple(int(i) for i in t_index_list)
        if not indices or max(indices) >= self.num_inference_steps or min(indices) < 0:
            raise ParameterError(
                f"t_index_list={list(indices)} is out of range: expected indices in "
                f"[0, {self.num_inference_steps - 1}] for num_inference_steps={self.num_inference_steps}",
                field="t_index_list",
            )
        if any(a >= b for a, b in itertools.pairwise(indices)):
            raise ParameterError(
                f"t_index_list={list(indices)} must be strictly increasing", field="t_index_list"
            )
        return indices

    def coefficients(self, t_index_list: Sequence[int]) -> StepCoefficients:
        indices = self.resolve(t_index_list, 1.0, 1)
        timesteps = [self.timesteps[i] for i in indices]
        alpha_bar = self._alphas_cumprod[timesteps]
        scalings = [
            self._scheduler.get_scalings_for_boundary_condition_discrete(t) for t in timesteps
        ]
        return StepCoefficients(
            t_index_list=indices,
            timesteps=torch.tensor(timesteps, dtype=torch.long),
            alpha_sqrt=alpha_bar.sqrt(),
            beta_sqrt=(1.0 - alpha_bar).sqrt(),
            c_skip=torch.tensor([float(s[0]) for s in scalings], dtype=torch.float64),
            c_out=torch.tensor([float(s[1]) for s in scalings], dtype=torch.float64),
        )

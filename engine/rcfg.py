"""The denoising equations: the LCM step and residual classifier-free guidance (RCFG).

Notation follows StreamDiffusion (arXiv 2312.12491, §3.3) with ``a = sqrt(alpha_bar_t)`` and
``b = sqrt(1 - alpha_bar_t)`` of the step's timestep.

LCM step (consistency boundary condition)::

    x0_hat = c_out * (x_t - b * eps) / a + c_skip * x_t

Classifier-free guidance (``full``)::

    eps_cfg = eps_uncond + g * (eps_cond - eps_uncond)

RCFG (``self`` and ``initialize``) replaces ``eps_uncond`` by ``delta`` times a *virtual
residual noise* that points from ``x_t`` back to a reference latent ``x_ref``::

    eps_res = (x_t - a * x_ref) / b                         # eq. (7) / (10)
    eps_cfg = delta * eps_res + g * (eps_cond - delta * eps_res)

- Self-Negative: ``x_ref`` is the encoded input latent ``x0`` of the frame.
- Onetime-Negative: ``x_ref = (x_t0 - b0 * eps_uncond_t0) / a0`` from a single negative-prompt
  prediction at the frame's first step.

The stock noise is ``eps_res`` kept per row. When a row moves from step ``k`` to ``k + 1``
its reference latent does not change, so the stock-noise update is exact::

    x_ref        = (x_t[k] - b_k * stock[k]) / a_k
    stock[k + 1] = (x_t[k + 1] - a_{k+1} * x_ref) / b_{k+1}

(StreamDiffusion 0.1.1 approximates this update with ``c_skip ≈ 0, c_out ≈ 1``.)
"""

from __future__ import annotations

import torch

from livediff.engine.config import RCFGMode
from livediff.exceptions import ParameterError


def lcm_denoise(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    alpha_sqrt: torch.Tensor,
    beta_sqrt: torch.Tensor,
    c_skip: torch.Tensor,
    c_out: torch.Tensor,
) -> torch.Tensor:
    """Consistency-model estimate of the clean latent from ``x_t`` and the predicted noise."""
    return c_out * (x_t - beta_sqrt * eps) / alpha_sqrt + c_skip * x_t


def guided_noise(
    mode: RCFGMode,
    eps_cond: torch.Tensor,
    eps_uncond: torch.Tensor | None,
    stock_noise: torch.Tensor | None,
    guidance_scale: float | torch.Tensor,
    delta: float | torch.Tensor,
) -> torch.Tensor:
    """The noise prediction that goes into the LCM step, for each RCFG mode."""
    if mode is RCFGMode.NONE:
        return eps_cond
    if mode is RCFGMode.FULL:
        if eps_uncond is None:
            raise ParameterError(
                "full CFG needs the negative-prompt prediction", field="eps_uncond"
            )
        negative = eps_uncond
    else:
        if stock_noise is None:
            raise ParameterError(f"RCFG {mode.value} needs the stock noise", field="stock_noise")
        negative = delta * stock_noise
    return negative + guidance_scale * (eps_cond - negative)


def residual_noise(
    x_t: torch.Tensor, x_ref: torch.Tensor, alpha_sqrt: torch.Tensor, beta_sqrt: torch.Tensor
) -> torch.Tensor:
    """Virtual residual noise that takes ``x_ref`` to ``x_t`` at this step (eq. 7)."""
    return (x_t - alpha_sqrt * x_ref) / beta_sqrt


def reference_latent(
    x_t: torch.Tensor, stock_noise: torch.Tensor, alpha_sqrt: torch.Tensor, beta_sqrt: torch.Tensor
) -> torch.Tensor:
    """Inverse of :func:`residual_noise`: the reference latent a row's stock noise points to."""
    return (x_t - beta_sqrt * stock_noise) / alpha_sqrt


def renoise(
    x0: torch.Tensor, noise: torch.Tensor | None, alpha_sqrt: torch.Tensor, beta_sqrt: torch.Tensor
) -> torch.Tensor:
    """Forward diffusion of a clean latent to the next step's noise level (``do_add_noise``)."""
    if noise is None:
        return alpha_sqrt * x0
    return alpha_sqrt * x0 + beta_sqrt * noise

"""One Stream Batch step after the UNet, in one pass: RCFG, the LCM step, the shift with re-noise
and the exact stock-noise update. This is ``StreamBatch.finish`` + ``StreamBatch._shift``.

Layout (``F = frame_buffer_size``, ``n`` steps, ``R = n * F`` latent rows; block ``k`` is rows
``k*F … (k+1)*F``, the frames at step ``k``; every tensor is ``[rows, 4, h, w]``):

==================  =======================  ==================================================
argument            shape                    role
==================  =======================  ==================================================
``x_t``             ``[R, …]``               latents at their step; rows ``F:`` are rewritten
``eps``             ``[U + R, …]``           UNet output, the ``U`` negative rows first:
                                             ``U = R`` (full), ``F`` (initialize), 0 otherwise
``stock``           ``[R, …]`` or ``None``   stock noise (self / initialize only); rows ``F:``
                                             are rewritten, and rows ``:F`` too for initialize
``noise``           ``[R, …]`` or ``None``   per-row noise for the re-noise (rows ``F:`` used);
                                             ``None`` when ``do_add_noise`` is off
``coefficients``    ``[4, R]`` (or           per-row ``sqrt(alpha_bar)``, ``sqrt(1-alpha_bar)``,
                    ``[4, R, 1, 1, 1]``)     ``c_skip``, ``c_out`` (StreamBatch's ``_row_coeffs``)
``guidance_scale``  0-d                      ``g``
``delta``           0-d                      RCFG ``delta``
``out``             ``[F, …]``               receives ``x0_hat`` of the last block
==================  =======================  ==================================================

Math per row ``r`` at step ``k`` (restated from :mod:`livediff.engine.rcfg`, which kernels may
not import; ``a, b, c_skip, c_out`` are the row's coefficients)::

    negative = eps_uncond[r]                      (full)
             = delta * stock[r]                   (self, initialize; initialize first sets
                                                   stock[:F] = eps_uncond[:F])
    guided   = eps_cond[r]                        (none)
             = negative + g * (eps_cond[r] - negative)
    x0_hat   = c_out * (x_t[r] - b * guided) / a + c_skip * x_t[r]          # lcm_denoise
    out      = x0_hat[last block]
    x_t[r + F]   = a' * x0_hat + b' * noise[r + F]    (a', b' of row r + F)  # renoise
    x_ref        = (x_t[r] - b * stock[r]) / a                                # reference_latent
    stock[r + F] = (x_t[r + F] - a' * x_ref) / b'                             # residual_noise

Everything is computed in float32 and stored in the tensors' dtype once; the stock update
uses ``x_t[r + F]`` as stored, so ``reference_latent`` of the new row gives back ``x_ref``.
The Triton kernel walks each column from the last block to the first, so it updates ``x_t``
and ``stock`` in place without a temporary copy.

Op: ``torch.ops.livediff.stream_batch_step`` (mutates ``x_t``, ``stock``, ``out``; returns
nothing). Call it through :func:`fused_step`.
"""

from __future__ import annotations

import torch

from livediff.exceptions import KernelInputError
from livediff.kernels._dispatch import (
    float_dtype_problem,
    implementation,
    run_triton,
    triton_refusal,
)

RCFG_MODES = ("none", "full", "self", "initialize")


def fused_step(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    stock: torch.Tensor | None,
    noise: torch.Tensor | None,
    coefficients: torch.Tensor,
    guidance_scale: torch.Tensor,
    delta: torch.Tensor,
    *,
    rcfg: str,
    frame_buffer_size: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run one step in place (see the module docstring); returns ``out`` (allocated if ``None``).

    ``rcfg`` is ``"none" | "full" | "self" | "initialize"`` (an ``RCFGMode`` works: its value is used).
    Every tensor must be on one device; ``out`` must not overlap ``x_t`` or ``stock``. The
    Triton kernel runs when all are CUDA and contiguous (``x_t`` a leading-dim slice of a
    contiguous buffer is fine) with ``x_t`` in float16, bfloat16 or float32.
    """
    mode = str(getattr(rcfg, "value", rcfg))
    if out is None:
        out = x_t.new_empty((frame_buffer_size, *x_t.shape[1:]))
    rows = x_t.shape[0]
    if coefficients.numel() == 4 * rows:  # StreamBatch keeps [4, R, 1, 1, 1]
        coefficients = coefficients.reshape(4, rows)
    implementation(
        torch.ops.livediff.stream_batch_step,
        _stream_batch_step_cuda,
        _stream_batch_step_reference,
        x_t.device,
    )(
        x_t,
        eps,
        stock,
        noise,
        coefficients,
        guidance_scale,
        delta,
        out,
        mode,
        frame_buffer_size,
    )
    return out


def uncond_rows(mode: str, rows: int, frame_buffer_size: int) -> int:
    return {"full": rows, "initialize": frame_buffer_size}.get(mode, 0)


def check_step_args(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    stock: torch.Tensor | None,
    noise: torch.Tensor | None,
    coefficients: torch.Tensor,
    out: torch.Tensor,
    mode: str,
    frame_buffer_size: int,
) -> None:
    if mode not in RCFG_MODES:
        raise KernelInputError(f"rcfg={mode!r} is not one of {RCFG_MODES}", field="rcfg")
    rows, f = x_t.shape[0], frame_buffer_size
    if x_t.ndim < 2 or f < 1 or rows % f:
        raise KernelInputError(
            f"x_t has {rows} rows: expected a whole number of blocks of {f}", field="x_t"
        )
    row_shape = tuple(x_t.shape[1:])
    expected_eps = uncond_rows(mode, rows, f) + rows
    if tuple(eps.shape) != (expected_eps, *row_shape):
        raise KernelInputError(
            f"eps is {tuple(eps.shape)}: expected {(expected_eps, *row_shape)} for rcfg={mode}",
            field="eps",
        )
    if (stock is None) != (mode in ("none", "full")):
        raise KernelInputError(
            f"rcfg={mode} {'takes no' if stock is not None else 'needs the'} stock noise",
            field="stock",
        )
    for name, tensor in (("stock", stock), ("noise", noise)):
        if tensor is not None and tensor.shape != x_t.shape:
            raise KernelInputError(
                f"{name} is {tuple(tensor.shape)}: expected {tuple(x_t.shape)}", field=name
            )
    if tuple(coefficients.shape) != (4, rows):
        raise KernelInputError(
            f"coefficients are {tuple(coefficients.shape)}: expected (4, {rows})",
            field="coefficients",
        )
    if tuple(out.shape) != (f, *row_shape):
        raise KernelInputError(
            f"out is {tuple(out.shape)}: expected {(f, *row_shape)}", field="out"
        )
    for name, tensor in (("eps", eps), ("stock", stock), ("noise", noise), ("out", out)):
        if tensor is not None and tensor.dtype != x_t.dtype:
            raise KernelInputError(
                f"{name} is {tensor.dtype}: expected x_t's dtype {x_t.dtype}", field=name
            )


def reference(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    stock: torch.Tensor | None,
    noise: torch.Tensor | None,
    coefficients: torch.Tensor,
    guidance_scale: torch.Tensor,
    delta: torch.Tensor,
    out: torch.Tensor,
    mode: str,
    f: int,
) -> None:
    """The math of the module docstring in float32 (engine/rcfg.py's equations)."""
    rows = x_t.shape[0]
    view = (rows,) + (1,) * (x_t.ndim - 1)
    alpha, beta, c_skip, c_out = (c.to(torch.float32).reshape(view) for c in coefficients)
    g, d = guidance_scale.to(torch.float32), delta.to(torch.float32)
    x = x_t.to(torch.float32)
    u = uncond_rows(mode, rows, f)
    eps_cond = eps[u:].to(torch.float32)
    stock_f = None
    if stock is not None:
        stock_f = stock.to(torch.float32, copy=True)
        if mode == "initialize":
            stock_f[:f] = eps[:f].to(torch.float32)  # stored as-is: already in the dtype
    if mode == "none":
        guided = eps_cond
    else:
        negative = eps[:u].to(torch.float32) if stock_f is None else d * stock_f
        guided = negative + g * (eps_cond - negative)
    x0_hat = c_out * (x - beta * guided) / alpha + c_skip * x  # guided_noise + lcm_denoise
    new_x = alpha[f:] * x0_hat[:-f]  # renoise
    if noise is not None:
        new_x = new_x + beta[f:] * noise[f:].to(torch.float32)
    new_x = new_x.to(x_t.dtype)
    new_stock = None
    if stock_f is not None:
        x_ref = (x[:-f] - beta[:-f] * stock_f[:-f]) / alpha[:-f]  # reference_latent
        new_stock = (new_x.to(torch.float32) - alpha[f:] * x_ref) / beta[f:]  # residual_noise
    # Every read is done: now write in place.
    out.copy_(x0_hat[-f:])
    x_t[f:].copy_(new_x)
    if stock is not None and stock_f is not None and new_stock is not None:
        if mode == "initialize":
            stock[:f].copy_(eps[:f])
        stock[f:].copy_(new_stock)


def _triton_runs(x_t: torch.Tensor, **tensors: torch.Tensor | None) -> bool:
    reason = triton_refusal(float_dtype_problem("x_t", x_t.dtype), x_t=x_t, **tensors)
    return run_triton("livediff::stream_batch_step", reason, x_t.device)


def _stream_batch_step_reference(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    stock: torch.Tensor | None,
    noise: torch.Tensor | None,
    coefficients: torch.Tensor,
    guidance_scale: torch.Tensor,
    delta: torch.Tensor,
    out: torch.Tensor,
    rcfg: str,
    frame_buffer_size: int,
) -> None:
    """Reference implementation (every device)."""
    check_step_args(x_t, eps, stock, noise, coefficients, out, rcfg, frame_buffer_size)
    reference(
        x_t, eps, stock, noise, coefficients, guidance_scale, delta, out, rcfg, frame_buffer_size
    )


stream_batch_step = torch.library.custom_op(
    "livediff::stream_batch_step", mutates_args=("x_t", "stock", "out")
)(_stream_batch_step_reference)


@stream_batch_step.register_kernel("cuda")
def _stream_batch_step_cuda(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    stock: torch.Tensor | None,
    noise: torch.Tensor | None,
    coefficients: torch.Tensor,
    guidance_scale: torch.Tensor,
    delta: torch.Tensor,
    out: torch.Tensor,
    rcfg: str,
    frame_buffer_size: int,
) -> None:
    check_step_args(x_t, eps, stock, noise, coefficients, out, rcfg, frame_buffer_size)
    if not _triton_runs(
        x_t,
        eps=eps,
        stock=stock,
        noise=noise,
        coefficients=coefficients,
        guidance_scale=guidance_scale,
        delta=delta,
        out=out,
    ):
        reference(
            x_t,
            eps,
            stock,
            noise,
            coefficients,
            guidance_scale,
            delta,
            out,
            rcfg,
            frame_buffer_size,
        )
        return
    from livediff.kernels import _triton_fused_step

    _triton_fused_step.step(
        x_t, eps, stock, noise, coefficients, guidance_scale, delta, out, rcfg, frame_buffer_size
    )


@stream_batch_step.register_fake
def _stream_batch_step_fake(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    stock: torch.Tensor | None,
    noise: torch.Tensor | None,
    coefficients: torch.Tensor,
    guidance_scale: torch.Tensor,
    delta: torch.Tensor,
    out: torch.Tensor,
    rcfg: str,
    frame_buffer_size: int,
) -> None:
    check_step_args(x_t, eps, stock, noise, coefficients, out, rcfg, frame_buffer_size)

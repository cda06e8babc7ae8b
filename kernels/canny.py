"""Canny edge detection on a batch of images, with per-row thresholds: the canny ControlNets' input.

Input: RGB images ``[N, 3, H, W]`` (float, [0, 1]) or uint8 frames ``[N, H, W, 3]``
(:func:`canny_rgb`); per row a low and a high threshold and a blur sigma, as tensors, so that
they change live and rows with different values share one call without a recompile. Output:
``[N, 3, H, W]`` in the input's float dtype, 1 on edges and 0 elsewhere (white edges on black,
the three channels equal), which is what the canny ControlNets were trained on.

The algorithm, step by step (everything is computed in float32, in whole-tensor ops):

1. Grey levels: the channels as 8-bit levels, then ``0.299 R + 0.587 G + 0.114 B`` in
   OpenCV's 15-bit fixed point, rounded: bit for bit OpenCV 5's ``cvtColor(RGB2GRAY)``.
2. Gaussian blur, 5×5, separable, taps ``exp(-x² / 2σ²)`` normalised and quantised to
   1/256ths, in fixed point, rounded to 8-bit levels: bit for bit OpenCV's ``GaussianBlur``
   of an 8-bit image. ``sigma = 0`` leaves the image as it is. Borders replicate the edge
   pixel (OpenCV's ``BORDER_REPLICATE``; its default border is reflect-101).
3. Sobel 3×3 gradients ``dx``, ``dy`` (borders replicated, as ``cv2.Canny`` does).
4. Magnitude ``dx² + dy²`` (the L2 norm, compared squared: OpenCV's ``L2gradient=True``).
5. Direction quantised to 4 orientations with OpenCV's fixed-point tangents
   (``tan 22.5° ≈ 13573 / 2¹⁵``): horizontal, vertical, or one of the two diagonals by the
   signs of ``dx`` and ``dy``.
6. Non-maximum suppression along that direction, with OpenCV's tie rule (strictly greater
   than the neighbour before, at least the one after; strictly both on diagonals); outside
   the image the magnitude is 0.
7. Double threshold: a candidate has magnitude ``> low²``, a strong edge ``> high²``.
8. Hysteresis: the candidates 8-connected to a strong edge are edges. OpenCV follows every
   chain with a stack; here the connected components are found in a fixed number of rounds
   of label hooking and pointer jumping (:func:`hysteresis`), so the op has no
   data-dependent loop. The rounds needed grow with the log of a chain's length; a chain
   too long for ``iterations`` rounds loses its far end (never gains a false edge). The
   default, :data:`HYSTERESIS_ITERATIONS`, joins the longest chain a 1024² image can hold (a
   spiral of 525 312 pixels); the test pictures need about 6.

On 8-bit input every step above is exact integer arithmetic in float32, and the edge map
equals OpenCV's ``cvtColor`` → ``GaussianBlur`` → ``Canny(L2gradient=True)`` once the
hysteresis has converged (the tests check it pixel for pixel). Integer thresholds compare
as OpenCV's do; a fractional one is compared unrounded (OpenCV floors its square).

Op (``torch.ops.livediff.canny``): one ``torch.library`` custom op whose implementation, on
every device, is the plain-PyTorch code below (its ops run on the GPU as they are; there is
no separate Triton kernel, so nothing falls back). Thresholds must satisfy
``0 <= low < high <= 255`` and ``0 <= sigma <= MAX_SIGMA``; callers validate user input
(:mod:`livediff.models.control_images`), this op only checks shapes and dtypes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from livediff.exceptions import KernelInputError
from livediff.kernels._dispatch import FLOAT_DTYPES

HYSTERESIS_ITERATIONS = 12  # joins a 525k-pixel spiral (1024²); natural images need ~6
MAX_SIGMA = 3.0  # a 5×5 kernel truncates a wider Gaussian
_TG22 = 13573.0  # round(tan(22.5°) · 2¹⁵), OpenCV's constant
_SHIFT = 32768.0  # 2¹⁵
_LUMA = (9798.0, 19235.0, 3735.0)  # 0.299, 0.587, 0.114 in 15-bit fixed point (OpenCV 5's)
_LUMA_ONE, _LUMA_HALF = 32768.0, 16384.0
_TAP_ONE = 256.0  # the blur's taps are in 1/256ths
_MIN_SIGMA = 1e-3  # below this the off-centre taps underflow to exactly 0: no blur


# ---------------------------------------------------------------------------- public API
def canny(
    images: torch.Tensor,
    low: torch.Tensor,
    high: torch.Tensor,
    sigma: torch.Tensor,
    *,
    iterations: int = HYSTERESIS_ITERATIONS,
) -> torch.Tensor:
    """``[N, 3, H, W]`` float in [0, 1] → edges ``[N, 3, H, W]`` (0 or 1) in the same dtype.

    ``low``, ``high``, ``sigma``: ``[N]`` float tensors on the images' device, one per row.
    """
    return torch.ops.livediff.canny(images, low, high, sigma, iterations)


def canny_rgb(
    frames: torch.Tensor,
    low: torch.Tensor,
    high: torch.Tensor,
    sigma: torch.Tensor,
    *,
    iterations: int = HYSTERESIS_ITERATIONS,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """uint8 RGB frames ``[N, H, W, 3]`` → edges ``[N, 3, H, W]`` in ``dtype``."""
    if frames.ndim != 4 or frames.shape[3] != 3 or frames.dtype != torch.uint8:
        raise KernelInputError(
            f"expected uint8 RGB frames [N, H, W, 3], got {frames.dtype} {tuple(frames.shape)}",
            field="frames",
        )
    images = frames.permute(0, 3, 1, 2).to(dtype) / 255
    return canny(images, low, high, sigma, iterations=iterations)


# ---------------------------------------------------------------------------- checks
def _check(
    images: torch.Tensor,
    low: torch.Tensor,
    high: torch.Tensor,
    sigma: torch.Tensor,
    iterations: int,
) -> None:
    if images.ndim != 4 or images.shape[1] != 3 or images.dtype not in FLOAT_DTYPES:
        raise KernelInputError(
            f"expected float RGB images [N, 3, H, W], got {images.dtype} {tuple(images.shape)}",
            field="images",
        )
    rows = images.shape[0]
    for name, value in (("low", low), ("high", high), ("sigma", sigma)):
        if value.shape != (rows,) or not value.is_floating_point():
            raise KernelInputError(
                f"{name} must be a float tensor [{rows}] (one per image), got "
                f"{value.dtype} {tuple(value.shape)}",
                field=name,
            )
        if value.device != images.device:
            raise KernelInputError(
                f"{name} is on {value.device}, the images on {images.device}", field=name
            )
    if iterations < 0:
        raise KernelInputError(f"iterations={iterations} must be >= 0", field="iterations")


# ---------------------------------------------------------------------------- reference
def _per_row(values: torch.Tensor) -> torch.Tensor:
    return values.to(torch.float32).view(-1, 1, 1, 1)


def grey_levels(images: torch.Tensor) -> torch.Tensor:
    """``[N, 3, H, W]`` in [0, 1] → ``[N, 1, H, W]`` float32 8-bit grey levels.

    The channels are rounded to 8 bits first, then weighted with OpenCV's fixed-point
    coefficients and rounded the way its ``RGB2GRAY`` rounds (every step exact in float32).
    """
    rgb = (images.to(torch.float32) * 255).clamp(0, 255).round()
    red, green, blue = rgb.unbind(1)
    weighted = _LUMA[0] * red + _LUMA[1] * green + _LUMA[2] * blue
    return torch.floor((weighted + _LUMA_HALF) / _LUMA_ONE).unsqueeze(1)


def gaussian_taps(sigma: torch.Tensor) -> torch.Tensor:
    """``[N]`` sigmas → ``[N, 5]`` taps in 1/256ths that sum to 256 (``[0, 0, 256, 0, 0]`` at 0).

    The Gaussian ``exp(-x² / 2σ²)``, normalised, quantised to 8 fractional bits with error
    diffusion from the outside in, the centre tap taking the remainder: OpenCV's bit-exact
    kernel for 8-bit images.
    """
    offsets = torch.arange(-2, 3, device=sigma.device, dtype=torch.float64)
    spread = sigma.to(torch.float64).clamp_min(_MIN_SIGMA)[:, None]
    taps = torch.exp(-(offsets * offsets) / (2 * spread * spread))
    taps = taps / taps.sum(dim=1, keepdim=True) * _TAP_ONE
    outer, error = [], torch.zeros_like(spread[:, 0])
    for i in range(2):
        wanted = taps[:, i] + error
        outer.append(torch.round(wanted))
        error = wanted - outer[-1]
    centre = _TAP_ONE - 2 * (outer[0] + outer[1])
    return torch.stack([outer[0], outer[1], centre, outer[1], outer[0]], dim=1).to(torch.float32)


def blur(grey: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable 5×5 Gaussian per row on 8-bit levels, replicated borders, rounded to levels.

    Fixed-point arithmetic as OpenCV does it for 8-bit images (every sum is an integer below
    2²⁴, so exact in float32): bit for bit ``cv2.GaussianBlur(grey, (5, 5), sigma,
    borderType=BORDER_REPLICATE)``.
    """
    rows, _, height, width = grey.shape
    taps = gaussian_taps(sigma)
    across = F.pad(grey, (2, 2, 0, 0), mode="replicate").view(1, rows, height, width + 4)
    across = F.conv2d(across, taps.view(rows, 1, 1, 5), groups=rows)
    down = F.pad(across, (0, 0, 2, 2), mode="replicate")
    down = F.conv2d(down, taps.view(rows, 1, 5, 1), groups=rows)
    scale = _TAP_ONE * _TAP_ONE
    return torch.floor((down.view(rows, 1, height, width) + scale / 2) / scale)


def sobel(grey: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """3×3 Sobel ``dx`` (rightwards) and ``dy`` (downwards), replicated borders."""
    p = F.pad(grey, (1, 1, 1, 1), mode="replicate")
    left = p[..., :-2, :-2] + 2 * p[..., 1:-1, :-2] + p[..., 2:, :-2]
    right = p[..., :-2, 2:] + 2 * p[..., 1:-1, 2:] + p[..., 2:, 2:]
    top = p[..., :-2, :-2] + 2 * p[..., :-2, 1:-1] + p[..., :-2, 2:]
    bottom = p[..., 2:, :-2] + 2 * p[..., 2:, 1:-1] + p[..., 2:, 2:]
    return right - left, bottom - top


def suppress_non_maxima(dx: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared magnitude, and where it is a maximum along the quantised gradient direction."""
    magnitude = dx * dx + dy * dy
    ax, ay = dx.abs(), dy.abs()
    # OpenCV's fixed-point tests, rearranged so every product is exact in float32
    horizontal = ay * _SHIFT < ax * _TG22
    vertical = (ay - 2 * ax) * _SHIFT > ax * _TG22
    m = magnitude
    p = F.pad(m, (1, 1, 1, 1))  # zero outside the image
    keep_h = (m > p[..., 1:-1, :-2]) & (m >= p[..., 1:-1, 2:])
    keep_v = (m > p[..., :-2, 1:-1]) & (m >= p[..., 2:, 1:-1])
    same_sign = (dx < 0) == (dy < 0)
    keep_main = (m > p[..., :-2, :-2]) & (m > p[..., 2:, 2:])  # ↖ ↘
    keep_anti = (m > p[..., :-2, 2:]) & (m > p[..., 2:, :-2])  # ↗ ↙
    keep_d = torch.where(same_sign, keep_main, keep_anti)
    return magnitude, torch.where(horizontal, keep_h, torch.where(vertical, keep_v, keep_d))


def _neighbour_pairs(height: int, width: int, device: torch.device) -> torch.Tensor:
    """``[2, P]`` flat indices of every pair of 8-connected pixels (each pair once)."""
    index = torch.arange(height * width, device=device).view(height, width)
    firsts, seconds = [], []
    for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
        x0, x1 = max(0, -dx), width - max(0, dx)
        firsts.append(index[: height - dy, x0:x1].reshape(-1))
        seconds.append(index[dy:, x0 + dx : x1 + dx].reshape(-1))
    return torch.stack([torch.cat(firsts), torch.cat(seconds)])


def hysteresis(strong: torch.Tensor, candidate: torch.Tensor, iterations: int) -> torch.Tensor:
    """The ``candidate`` pixels (bool ``[N, 1, H, W]``) 8-connected to a ``strong`` one.

    Connected components by label hooking and pointer jumping (Shiloach–Vishkin style), in
    ``iterations`` rounds: each pixel holds a label, the index of a pixel of its component
    no larger than its own. A round hooks, for every pair of neighbouring candidates, the
    larger of their two labels onto the smaller one, then halves every label chain twice
    (``label = label[label]``). Components merge along their trees, so a chain of length
    ``L`` needs about ``log L`` rounds, not ``L``. Last, each pixel's label collects the
    strong flags of the pixels that point to it, and every pixel reads its label's flag.
    Unfinished rounds only ever miss edges: a label is always a pixel of the same component.
    """
    rows, _, height, width = strong.shape
    pixels = height * width
    pairs = _neighbour_pairs(height, width, strong.device)
    first, second = (p.expand(rows, -1) for p in pairs)
    flat_candidate = candidate.reshape(rows, pixels)
    linked = flat_candidate.gather(1, first) & flat_candidate.gather(1, second)
    labels = torch.arange(pixels, device=strong.device).expand(rows, -1).clone()
    for _ in range(iterations):
        a, b = labels.gather(1, first), labels.gather(1, second)
        # A linked pair hooks its larger label onto the smaller; an unlinked one rewrites its
        # first pixel's own label (a no-op), so the writes spread over the image instead of
        # piling onto one slot (atomics on one address serialise on a GPU).
        target = torch.where(linked, torch.maximum(a, b), first)
        value = torch.where(linked, torch.minimum(a, b), a)
        labels = labels.scatter_reduce(1, target, value, reduce="amin")
        for _ in range(2):
            labels = labels.gather(1, labels)
    strong_flags = strong.reshape(rows, pixels).to(torch.float32)
    flags = strong_flags.scatter_reduce(1, labels, strong_flags, reduce="amax")
    reached = flags.gather(1, labels).view(rows, 1, height, width) > 0
    return reached & candidate


def reference_canny(
    images: torch.Tensor,
    low: torch.Tensor,
    high: torch.Tensor,
    sigma: torch.Tensor,
    iterations: int,
) -> torch.Tensor:
    grey = blur(grey_levels(images), sigma)
    dx, dy = sobel(grey)
    magnitude, maxima = suppress_non_maxima(dx, dy)
    low2, high2 = _per_row(low) ** 2, _per_row(high) ** 2
    candidate = maxima & (magnitude > low2)
    strong = candidate & (magnitude > high2)
    edges = hysteresis(strong, candidate, iterations)
    return edges.to(images.dtype).expand(-1, 3, -1, -1).contiguous()


# ---------------------------------------------------------------------------- the op
@torch.library.custom_op("livediff::canny", mutates_args=())
def canny_op(
    images: torch.Tensor,
    low: torch.Tensor,
    high: torch.Tensor,
    sigma: torch.Tensor,
    iterations: int,
) -> torch.Tensor:
    """Every device: the plain-PyTorch implementation above."""
    _check(images, low, high, sigma, iterations)
    return reference_canny(images, low, high, sigma, iterations)


@canny_op.register_fake
def _canny_fake(
    images: torch.Tensor,
    low: torch.Tensor,
    high: torch.Tensor,
    sigma: torch.Tensor,
    iterations: int,
) -> torch.Tensor:
    _check(images, low, high, sigma, iterations)
    return torch.empty_like(images, memory_format=torch.contiguous_format)

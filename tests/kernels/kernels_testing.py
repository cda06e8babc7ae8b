"""Independent naive computations and input builders shared by the kernel tests.

Nothing here calls livediff's kernels: these are the yardsticks (numpy, float64, explicit
formulas) that the references and the Triton kernels are checked against.
"""

from __future__ import annotations

import numpy as np
import torch

RCFG_MODES = ("none", "full", "self", "initialize")

# BT.601 limited range, written out independently of livediff.kernels.yuv.
_KR, _KB = 0.299, 0.114
_KG = 1 - _KR - _KB


def naive_bilinear(
    images: np.ndarray, crop: tuple[int, int, int, int], height: int, width: int
) -> np.ndarray:
    """``[N, C, H, W]`` float64 → ``[N, C, height, width]``: align_corners=False, no antialias."""
    top, left, crop_h, crop_w = crop
    region = images[:, :, top : top + crop_h, left : left + crop_w]

    def axis(out_size: int, in_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        centre = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
        centre = np.maximum(centre, 0.0)
        low = np.minimum(np.floor(centre).astype(np.int64), in_size - 1)
        high = np.minimum(low + 1, in_size - 1)
        return low, high, centre - low

    y0, y1, wy = axis(height, crop_h)
    x0, x1, wx = axis(width, crop_w)
    wy, wx = wy[:, None], wx[None, :]
    top_row = region[:, :, y0][:, :, :, x0] * (1 - wx) + region[:, :, y0][:, :, :, x1] * wx
    bottom_row = region[:, :, y1][:, :, :, x0] * (1 - wx) + region[:, :, y1][:, :, :, x1] * wx
    return top_row * (1 - wy) + bottom_row * wy


def naive_yuv420_to_rgb(y: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Planes ``[H, W]``, ``[ch, cw]`` x2 → ``[H, W, 3]`` float64 in [0, 255], per-pixel loop."""
    height, width = y.shape
    out = np.zeros((height, width, 3))
    for row in range(height):
        for col in range(width):
            luma = (float(y[row, col]) - 16) * 255 / 219
            cb = (float(u[row // 2, col // 2]) - 128) * 255 / 224
            cr = (float(v[row // 2, col // 2]) - 128) * 255 / 224
            red = luma + 2 * (1 - _KR) * cr
            green = luma - (2 * _KB * (1 - _KB) * cb + 2 * _KR * (1 - _KR) * cr) / _KG
            blue = luma + 2 * (1 - _KB) * cb
            out[row, col] = np.clip([red, green, blue], 0, 255)
    return out


def naive_rgb_to_yuv(rgb: np.ndarray) -> np.ndarray:
    """``[..., 3]`` float64 RGB in [0, 255] → unrounded limited-range Y, U, V (``[..., 3]``)."""
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    luma = _KR * red + _KG * green + _KB * blue
    y = 16 + luma * 219 / 255
    u = 128 + (blue - luma) / (2 * (1 - _KB)) * 224 / 255
    v = 128 + (red - luma) / (2 * (1 - _KR)) * 224 / 255
    return np.stack([y, u, v], axis=-1)


def naive_i420(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One ``[H, W, 3]`` uint8 frame → float64 Y, U, V planes (unrounded), chroma filtered as
    FFmpeg does: mean of the horizontal pair, vertical taps (1, 3, 3, 1) / 8, edges clamped."""
    height, width, _ = rgb.shape
    yuv = naive_rgb_to_yuv(rgb.astype(np.float64))
    ch, cw = (height + 1) // 2, (width + 1) // 2
    u = np.zeros((ch, cw))
    v = np.zeros((ch, cw))
    for j in range(ch):
        for i in range(cw):
            total = np.zeros(3)
            for offset, weight in zip(range(-1, 3), (1, 3, 3, 1), strict=True):
                row = min(max(2 * j + offset, 0), height - 1)
                for col in (2 * i, min(2 * i + 1, width - 1)):
                    total += weight * yuv[row, col]
            u[j, i], v[j, i] = total[1] / 16, total[2] / 16
    return yuv[..., 0], u, v


def fused_inputs(
    mode: str,
    frame_buffer_size: int,
    steps: int,
    *,
    with_noise: bool,
    latent: tuple[int, int] = (6, 5),
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int = 0,
) -> dict[str, torch.Tensor | None]:
    """Random state of one Stream Batch step, with coefficients shaped like a real schedule."""
    gen = torch.Generator().manual_seed(seed)
    rows = steps * frame_buffer_size
    uncond = {"full": rows, "initialize": frame_buffer_size}.get(mode, 0)
    shape = (rows, 4, *latent)

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen).to(device=device, dtype=dtype)

    alpha_bar = torch.linspace(0.05, 0.95, steps, dtype=torch.float64)  # noisiest step first
    c_skip = torch.rand(steps, generator=gen, dtype=torch.float64) * 0.05
    c_out = 1.0 - torch.rand(steps, generator=gen, dtype=torch.float64) * 0.05
    per_step = torch.stack([alpha_bar.sqrt(), (1 - alpha_bar).sqrt(), c_skip, c_out])
    coefficients = per_step.repeat_interleave(frame_buffer_size, dim=1)
    return {
        "x_t": randn(*shape),
        "eps": randn(uncond + rows, *shape[1:]),
        "stock": randn(*shape) if mode in ("self", "initialize") else None,
        "noise": randn(*shape) if with_noise else None,
        "coefficients": coefficients.to(device=device, dtype=dtype),
        "guidance_scale": torch.tensor(1.6, dtype=dtype, device=device),
        "delta": torch.tensor(0.7, dtype=dtype, device=device),
    }


def naive_lora_rows(
    out: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    indices: torch.Tensor,
    scales: torch.Tensor,
) -> torch.Tensor:
    """``out[r] + Σ scale·(x[r]·A)·B`` in float64, one row and slot at a time."""
    total = out.to(torch.float64).clone()
    for row in range(x.shape[0]):
        for slot in range(indices.shape[1]):
            index, scale = int(indices[row, slot]), float(scales[row, slot])
            if not 0 <= index < a.shape[0] or scale == 0:
                continue
            down = x[row].to(torch.float64) @ a[index].to(torch.float64)
            total[row] += scale * down @ b[index].to(torch.float64)
    return total


def lora_rows_inputs(
    rank: int,
    *,
    tokens: int = 13,
    width: int = 40,
    features: int = 72,
    loras: int = 3,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Six rows: none, one LoRA, two, the same LoRA twice, an index out of range, scale 0.

    Each packed LoRA uses only part of the padded rank (the rest is zero, as the store pads),
    and weights are scaled so ``x·A·B`` is of the order of ``x``.
    """
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(loras, width, rank, generator=gen) / width**0.5
    b = torch.randn(loras, rank, features, generator=gen) / rank**0.5
    for lora in range(loras):  # ranks rank, rank - 1, … padded with zeros
        used = max(1, rank - lora)
        a[lora, :, used:] = 0
        b[lora, used:] = 0
    indices = torch.tensor(
        [[-1, -1], [0, -1], [1, 2], [2, 2], [loras, 0], [1, -1]], dtype=torch.int32
    )
    scales = torch.tensor([[0.0, 0.0], [0.8, 0.0], [1.0, -0.5], [0.3, 0.7], [1.0, 1.0], [0.0, 0]])
    rows = indices.shape[0]

    def on(t: torch.Tensor, kind: torch.dtype) -> torch.Tensor:
        return t.to(device=device, dtype=kind)

    return {
        "out": on(torch.randn(rows, tokens, features, generator=gen), dtype),
        "x": on(torch.randn(rows, tokens, width, generator=gen), dtype),
        "a": on(a, dtype),
        "b": on(b, dtype),
        "indices": indices.to(device),
        "scales": on(scales, torch.float32),
    }

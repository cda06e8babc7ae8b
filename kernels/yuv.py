"""YUV 4:2:0 ↔ RGB, BT.601 limited range: the reference conversions and their constants.

Decoders (libvpx, libx264, dav1d) hand out BT.601 "TV" range by default, and FFmpeg's
``yuv420p`` ↔ ``rgb24`` conversion assumes the same when a frame carries no colour tags.

Matrix (``Kr = 0.299``, ``Kb = 0.114``; ``Y`` in [16, 235], ``U``/``V`` in [16, 240])::

    R = 255/219 (Y - 16)                      + 1.596027 (V - 128)
    G = 255/219 (Y - 16) - 0.391762 (U - 128) - 0.812968 (V - 128)
    B = 255/219 (Y - 16) + 2.017232 (U - 128)

Layouts (``ch = ceil(H / 2)``, ``cw = ceil(W / 2)``, as FFmpeg sizes odd frames):

- I420: planes ``y [N, H, W]``, ``u [N, ch, cw]``, ``v [N, ch, cw]`` (uint8).
- NV12: planes ``y [N, H, W]`` and ``uv [N, ch, cw, 2]`` (U, V interleaved).
- Packed I420 (what the postprocess returns for encoders): ``[N, H*W + 2*ch*cw]`` uint8,
  Y then U then V, i.e. FFmpeg's contiguous ``yuv420p`` buffer; for even sizes
  ``packed.view(N, H * 3 // 2, W)`` is what ``av.VideoFrame.from_ndarray(…, "yuv420p")`` takes.

YUV → RGB (input side) upsamples chroma by replication: every chroma sample covers its 2×2
luma block, which is what FFmpeg's unscaled ``yuv420p → rgb24`` converter (PyAV's
``to_ndarray(format="rgb24")``) does. The result is kept as float in [0, 255], not rounded:
it feeds the resize straight away. FFmpeg's fast converter works in fixed point and
truncates, so it reads up to ~3 levels below this exact matrix (mean about −0.7).

RGB → YUV (output side) works in 16-bit fixed point on the uint8 RGB frame, so every
implementation gives the same bytes. Chroma is centre-sited and filtered as FFmpeg's
``rgb24 → yuv420p`` (swscale, PyAV's ``reformat``) does it: the mean of each horizontal pair,
then a 4-tap vertical tent ``(1, 3, 3, 1) / 8`` over rows ``2j-1 … 2j+2``; edges replicate.
Against PyAV this gives Y within 1 level and U/V within 1 (random and smooth frames alike).
H.264's default "left" siting differs by a quarter chroma pixel, which no viewer shows.
"""

from __future__ import annotations

import torch

from livediff.exceptions import KernelInputError

KR, KB = 0.299, 0.114
KG = 1.0 - KR - KB

# YUV -> RGB, float (multiply the offset-free Y, U, V).
Y_SCALE = 255.0 / 219.0
R_FROM_V = 255.0 / 224.0 * 2.0 * (1.0 - KR)
G_FROM_U = 255.0 / 224.0 * 2.0 * KB * (1.0 - KB) / KG
G_FROM_V = 255.0 / 224.0 * 2.0 * KR * (1.0 - KR) / KG
B_FROM_U = 255.0 / 224.0 * 2.0 * (1.0 - KB)

# RGB -> YUV, fixed point: round(coefficient * 2**16); each chroma row sums to 0 so grey stays
# at 128, and the Y row sums to 56284 so white maps to 235.
FIXED_SHIFT = 16
Y_FROM_RGB = (16829, 33039, 6416)
U_FROM_RGB = (-9714, -19070, 28784)
V_FROM_RGB = (28784, -24103, -4681)
CHROMA_WEIGHT_BITS = 4  # the 2 x (1, 3, 3, 1) chroma filter weights add up to 2**4


def chroma_size(height: int, width: int) -> tuple[int, int]:
    return (height + 1) // 2, (width + 1) // 2


def i420_packed_length(height: int, width: int) -> int:
    ch, cw = chroma_size(height, width)
    return height * width + 2 * ch * cw


def split_i420(
    packed: torch.Tensor, height: int, width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views ``(y [N, H, W], u [N, ch, cw], v [N, ch, cw])`` of a packed ``[N, L]`` I420 buffer."""
    ch, cw = chroma_size(height, width)
    n = packed.shape[0]
    luma, chroma = height * width, ch * cw
    y = packed[:, :luma].view(n, height, width)
    u = packed[:, luma : luma + chroma].view(n, ch, cw)
    v = packed[:, luma + chroma :].view(n, ch, cw)
    return y, u, v


def check_i420_planes(y: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> None:
    if y.ndim != 3 or u.ndim != 3 or v.ndim != 3:
        raise KernelInputError(
            f"I420 planes must be [N, H, W], [N, ch, cw] x2, got {tuple(y.shape)}, {tuple(u.shape)}, {tuple(v.shape)}"
        )
    _check_chroma(y, u.shape[:3], "u")
    _check_chroma(y, v.shape[:3], "v")
    if u.dtype != torch.uint8 or v.dtype != torch.uint8:
        raise KernelInputError(f"I420 planes must be uint8, got {y.dtype}, {u.dtype}, {v.dtype}")


def check_nv12_planes(y: torch.Tensor, uv: torch.Tensor) -> None:
    if y.ndim != 3 or uv.ndim != 4 or uv.shape[3] != 2:
        raise KernelInputError(
            f"NV12 planes must be [N, H, W] and [N, ch, cw, 2], got {tuple(y.shape)}, {tuple(uv.shape)}"
        )
    _check_chroma(y, uv.shape[:3], "uv")
    if uv.dtype != torch.uint8:
        raise KernelInputError(f"NV12 planes must be uint8, got {y.dtype}, {uv.dtype}")


def _check_chroma(y: torch.Tensor, shape: torch.Size, name: str) -> None:
    if y.dtype != torch.uint8:
        raise KernelInputError(f"the Y plane must be uint8, got {y.dtype}")
    n, height, width = y.shape
    expected = (n, *chroma_size(height, width))
    if tuple(shape) != expected:
        raise KernelInputError(
            f"the {name} plane is {tuple(shape)}: expected {expected} for a {width}×{height} Y plane"
        )


def _yuv_to_rgb(y: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Full-resolution ``y``, ``u``, ``v`` (float) → ``[N, 3, H, W]`` float32 RGB in [0, 255]."""
    luma = (y - 16.0) * Y_SCALE
    cb, cr = u - 128.0, v - 128.0
    red = luma + R_FROM_V * cr
    green = luma - G_FROM_U * cb - G_FROM_V * cr
    blue = luma + B_FROM_U * cb
    return torch.stack([red, green, blue], dim=1).clamp(0.0, 255.0)


def _upsample_chroma(plane: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Each chroma sample to its 2×2 luma block, cut to the luma size (odd edges)."""
    return plane.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)[:, :height, :width]


def i420_to_rgb_float(y: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """I420 planes → ``[N, 3, H, W]`` float32 RGB in [0, 255] (unrounded)."""
    check_i420_planes(y, u, v)
    height, width = y.shape[1:]
    full_u = _upsample_chroma(u.to(torch.float32), height, width)
    full_v = _upsample_chroma(v.to(torch.float32), height, width)
    return _yuv_to_rgb(y.to(torch.float32), full_u, full_v)


def nv12_to_rgb_float(y: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """NV12 planes → ``[N, 3, H, W]`` float32 RGB in [0, 255] (unrounded)."""
    check_nv12_planes(y, uv)
    height, width = y.shape[1:]
    full_u = _upsample_chroma(uv[..., 0].to(torch.float32), height, width)
    full_v = _upsample_chroma(uv[..., 1].to(torch.float32), height, width)
    return _yuv_to_rgb(y.to(torch.float32), full_u, full_v)


def rgb_to_i420(rgb: torch.Tensor) -> torch.Tensor:
    """``[N, H, W, 3]`` uint8 RGB → packed I420 ``[N, H*W + 2*ch*cw]`` uint8 (reference)."""
    if rgb.ndim != 4 or rgb.shape[3] != 3 or rgb.dtype != torch.uint8:
        raise KernelInputError(
            f"expected uint8 RGB frames [N, H, W, 3], got {rgb.dtype} {tuple(rgb.shape)}"
        )
    n, height, width, _ = rgb.shape
    ch, cw = chroma_size(height, width)
    pixels = rgb.to(torch.int32)
    luma = _fixed_dot(pixels, Y_FROM_RGB)
    y = ((luma + (1 << (FIXED_SHIFT - 1))) >> FIXED_SHIFT) + 16
    # Chroma: horizontal pair sum, then vertical (1, 3, 3, 1) taps, edges clamped. The weights
    # add up to 16, so one shift by FIXED_SHIFT + 4 divides and rounds half up.
    device = rgb.device
    even = torch.arange(cw, device=device) * 2
    pairs = pixels[:, :, even] + pixels[:, :, (even + 1).clamp(max=width - 1)]
    top = torch.arange(ch, device=device) * 2 - 1
    taps = [(top + offset).clamp(0, height - 1) for offset in range(4)]
    sums = pairs[:, taps[0]] + 3 * pairs[:, taps[1]] + 3 * pairs[:, taps[2]] + pairs[:, taps[3]]
    shift = FIXED_SHIFT + CHROMA_WEIGHT_BITS
    u = ((_fixed_dot(sums, U_FROM_RGB) + (1 << (shift - 1))) >> shift) + 128
    v = ((_fixed_dot(sums, V_FROM_RGB) + (1 << (shift - 1))) >> shift) + 128
    planes = [p.clamp(0, 255).to(torch.uint8).reshape(n, -1) for p in (y, u, v)]
    return torch.cat(planes, dim=1)


def _fixed_dot(pixels: torch.Tensor, row: tuple[int, int, int]) -> torch.Tensor:
    return pixels[..., 0] * row[0] + pixels[..., 1] * row[1] + pixels[..., 2] * row[2]

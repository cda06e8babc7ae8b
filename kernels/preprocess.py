"""uint8 RGB frames → model input: crop, bilinear resize, NCHW, scaled to [-1, 1].

Resampling is bilinear with ``align_corners=False`` and no antialiasing: output pixel centres
map to ``(i + 0.5) * in / out - 0.5`` in the crop, clamped at the edges. That is what
``torch.nn.functional.interpolate(mode="bilinear")`` does, and what a one-pass GPU kernel
can do cheaply.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Crop = tuple[int, int, int, int]  # top, left, height, width in source pixels


def rgb_to_model_input(
    frames: torch.Tensor, height: int, width: int, crop: Crop, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``[N, H, W, 3]`` uint8 → ``[N, 3, height, width]`` in [-1, 1] (reference implementation)."""
    top, left, crop_h, crop_w = crop
    region = frames[:, top : top + crop_h, left : left + crop_w, :]
    images = region.permute(0, 3, 1, 2).to(torch.float32)
    if (crop_h, crop_w) != (height, width):
        images = F.interpolate(images, size=(height, width), mode="bilinear", align_corners=False)
    return (images / 127.5 - 1.0).to(dtype).contiguous()

"""Model output → uint8 RGB frames."""

from __future__ import annotations

import torch


def model_output_to_rgb(images: torch.Tensor) -> torch.Tensor:
    """``[N, 3, H, W]`` in [-1, 1] (any float dtype) → ``[N, H, W, 3]`` uint8, rounded, clamped."""
    scaled = (images.to(torch.float32) + 1.0) * 127.5
    return scaled.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()

"""Shared by the client control image tests: a recording model and drawn control images."""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from livediff.models.bundle import ModelBundle
from livediff.models.unet_batch import UNetBatch


@dataclass
class Recording(ModelBundle):
    """The model, keeping the control inputs of every UNet call."""

    calls: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def predict_noise(self, batch: UNetBatch) -> torch.Tensor:
        assert batch.control_images is not None and batch.control_scales is not None
        self.calls.append((batch.control_images.clone(), batch.control_scales.clone()))
        return super().predict_noise(batch)


def drawn(seed: int, width: int = 100, height: int = 80) -> np.ndarray:
    """A "skeleton": a few white strokes on black."""
    rng = np.random.default_rng(seed)
    image = np.zeros((height, width, 3), np.uint8)
    for _ in range(6):
        top, left = rng.integers(0, height - 8), rng.integers(0, width - 30)
        image[top : top + 4, left : left + 30] = 255
    return image


def png(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


def fitted_reference(image: np.ndarray, size: int) -> torch.Tensor:
    """The documented fit, written out: centre crop to the model's aspect, bilinear, [0, 1]."""
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    region = torch.from_numpy(image[top : top + side, left : left + side]).permute(2, 0, 1)
    region = region[None].to(torch.float32)
    return F.interpolate(region, size=(size, size), mode="bilinear", align_corners=False)[0] / 255

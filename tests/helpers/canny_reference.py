"""OpenCV's Canny, the independent reference for livediff's canny op, and test pictures for it.

Import only after ``pytest.importorskip("cv2")``: OpenCV is in the dev extra.
"""

from __future__ import annotations

import cv2
import numpy as np


def scene(seed: int, height: int, width: int) -> np.ndarray:
    """A uint8 RGB picture: a lit gradient, discs and boxes of random colours, sensor noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    image = (xx / width * 120)[..., None] * rng.uniform(0.3, 1, 3)
    for _ in range(14):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        r = rng.uniform(0.04, 0.3) * min(height, width) + 3
        if rng.random() < 0.5:
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        else:
            mask = (abs(yy - cy) < r * rng.uniform(0.3, 1)) & (abs(xx - cx) < r)
        image[mask] = image[mask] * 0.3 + rng.uniform(0, 255, 3) * 0.7
    image += rng.normal(0, 6, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def opencv_canny(frame: np.ndarray, low: float, high: float, sigma: float) -> np.ndarray:
    """``cvtColor(RGB2GRAY)`` → ``GaussianBlur(5×5, sigma, BORDER_REPLICATE)`` → ``Canny(L2)``."""
    grey = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
    if sigma > 0:
        grey = cv2.GaussianBlur(grey, (5, 5), sigma, borderType=cv2.BORDER_REPLICATE)
    return np.asarray(cv2.Canny(grey, low, high, L2gradient=True) > 0)

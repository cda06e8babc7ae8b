"""CPU tests of the frame-similarity reference against numpy float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from livediff.kernels.similarity import frame_similarity


def _signal(x: torch.Tensor) -> np.ndarray:
    values = x.double().numpy().ravel()
    return values / 127.5 - 1.0 if x.dtype == torch.uint8 else values


def _naive(a: torch.Tensor, b: torch.Tensor) -> float:
    fa, fb = _signal(a), _signal(b)
    return float(np.dot(fa, fb) / max(np.linalg.norm(fa) * np.linalg.norm(fb), 1e-6))


@pytest.mark.parametrize("shape", [(64, 64, 3), (1, 3, 37, 53), (7,)])
@pytest.mark.parametrize(
    ("dtype_a", "dtype_b"),
    [
        (torch.float32, torch.float32),
        (torch.float16, torch.float16),
        (torch.uint8, torch.uint8),
        (torch.uint8, torch.float32),
    ],
)
def test_matches_numpy(shape: tuple[int, ...], dtype_a: torch.dtype, dtype_b: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    base = torch.rand(shape, generator=gen)
    other = (base + 0.2 * torch.rand(shape, generator=gen)).clamp(0, 1)

    def cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return (x * 255).round().to(torch.uint8) if dtype == torch.uint8 else (x * 2 - 1).to(dtype)

    a, b = cast(base, dtype_a), cast(other, dtype_b)
    result = frame_similarity(a, b)
    assert result.dtype == torch.float32 and result.shape == () and result.device == a.device
    assert abs(float(result) - _naive(a, b)) < 1e-5  # float32 sums of <= 12k terms


def test_uint8_is_scaled_to_signed_range() -> None:
    """Mid-grey frames are 0 after scaling: the similarity of opposite levels is -1."""
    dark = torch.full((8, 8, 3), 0, dtype=torch.uint8)
    bright = torch.full((8, 8, 3), 255, dtype=torch.uint8)
    assert float(frame_similarity(dark, bright)) == pytest.approx(-1.0, abs=1e-6)
    assert float(frame_similarity(bright, bright)) == pytest.approx(1.0, abs=1e-6)


def test_zero_frame_gives_zero_not_nan() -> None:
    zero = torch.zeros(4, 4, 3)
    assert float(frame_similarity(zero, torch.rand(4, 4, 3))) == 0.0


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="same shape"):
        frame_similarity(torch.zeros(3, 4), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="float or uint8"):
        frame_similarity(torch.zeros(3, dtype=torch.int64), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="no elements"):
        frame_similarity(torch.zeros(0), torch.zeros(0))

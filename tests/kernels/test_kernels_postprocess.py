"""CPU tests of the postprocess references against numpy and PyAV's rgb24 → yuv420p."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kernels_testing import naive_i420

from livediff.kernels import yuv
from livediff.kernels.postprocess import model_output_to_i420, model_output_to_rgb

SIZES = [(8, 8), (5, 7), (1, 1), (2, 9), (33, 47)]


def _images(
    n: int, height: int, width: int, dtype: torch.dtype = torch.float32, seed: int = 0
) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, height, width, generator=gen) * 2.4 - 1.2).to(
        dtype
    )  # some out of range


@pytest.mark.parametrize(("height", "width"), SIZES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_rgb_matches_numpy(height: int, width: int, dtype: torch.dtype) -> None:
    images = _images(2, height, width, dtype)
    result = model_output_to_rgb(images)
    scaled = (images.float().numpy() + np.float32(1)) * np.float32(127.5)
    expected = (
        np.clip(np.round(scaled), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    )  # np.round: half to even
    assert result.dtype == torch.uint8 and result.shape == (2, height, width, 3)
    assert np.array_equal(result.numpy(), expected)


def test_rgb_rounds_ties_to_even_and_clamps() -> None:
    levels = torch.tensor([0.5, 1.5, 2.5, 253.5, -3.0, 300.0])  # (x + 1) * 127.5 targets
    images = (levels / 127.5 - 1.0).view(1, 1, 1, -1).expand(1, 3, 1, -1).contiguous()
    scaled = (images[0, 0, 0] + 1.0) * 127.5  # the float32 values the op rounds
    expected = torch.tensor([round(float(v)) for v in scaled]).clamp(
        0, 255
    )  # Python round: half to even
    assert torch.equal(model_output_to_rgb(images)[0, 0, :, 0].long(), expected)
    assert expected[:4].tolist() != [1, 2, 3, 254]  # ties really were rounded to even somewhere


@pytest.mark.parametrize(("height", "width"), SIZES)
def test_i420_matches_float_formula(height: int, width: int) -> None:
    """Fixed point vs the float64 formula: every sample within 0.5 + 1/2**16-ish of exact, so the
    rounded byte is within 1, and equal for the vast majority."""
    images = _images(2, height, width)
    rgb = model_output_to_rgb(images)
    packed = model_output_to_i420(images)
    assert (
        packed.shape == (2, yuv.i420_packed_length(height, width)) and packed.dtype == torch.uint8
    )
    for i in range(2):
        y_exact, u_exact, v_exact = naive_i420(rgb[i].numpy())
        y, u, v = (p[i].numpy().astype(np.float64) for p in yuv.split_i420(packed, height, width))
        for ours, exact in ((y, y_exact), (u, u_exact), (v, v_exact)):
            assert np.abs(ours - exact).max() <= 0.5 + 1e-3
    # And it is exactly the encoding of the RGB frame model_output_to_rgb gives.
    assert torch.equal(packed, yuv.rgb_to_i420(rgb))


def test_i420_anchors() -> None:
    """Black, white and grey map to (16, 128, 128), (235, 128, 128), (126, 128, 128)."""
    for level, luma in ((-1.0, 16), (1.0, 235), (0.0, 126)):
        packed = model_output_to_i420(torch.full((1, 3, 4, 6), level))
        y, u, v = yuv.split_i420(packed, 4, 6)
        assert (y == luma).all() and (u == 128).all() and (v == 128).all()


def _pyav_i420(rgb: np.ndarray) -> np.ndarray:
    av = pytest.importorskip("av")
    frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
    return frame.to_ndarray().reshape(-1)


@pytest.mark.parametrize("content", ["noise", "gradient"])
def test_i420_matches_pyav_within_one_level(content: str) -> None:
    height, width = 48, 64
    if content == "noise":
        rgb = torch.randint(
            0,
            256,
            (height, width, 3),
            dtype=torch.uint8,
            generator=torch.Generator().manual_seed(5),
        )
    else:
        rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        rgb = torch.stack([rows * 5, cols * 4, (rows + cols) % 64 * 4], dim=-1).to(torch.uint8)
    ours = yuv.rgb_to_i420(rgb[None])[0].numpy().astype(np.int64)
    theirs = _pyav_i420(rgb.numpy()).astype(np.int64)
    assert np.abs(ours - theirs).max() <= 1
    assert np.mean(ours == theirs) > 0.9


def test_split_i420_views_the_packed_buffer() -> None:
    packed = torch.arange(2 * yuv.i420_packed_length(5, 7)).reshape(2, -1)
    y, u, v = yuv.split_i420(packed, 5, 7)
    assert y.shape == (2, 5, 7) and u.shape == (2, 3, 4) and v.shape == (2, 3, 4)
    assert y.data_ptr() == packed.data_ptr()
    assert int(u[1, 0, 0]) == packed.shape[1] + 35 and int(v[0, 2, 3]) == 35 + 12 + 11


def test_i420_round_trip_is_close() -> None:
    """RGB → I420 → RGB of a smooth frame loses at most a few levels (chroma subsampling)."""
    rows, cols = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    rgb = torch.stack([rows * 4 + 30, cols * 4 + 20, 200 - rows * 2 - cols * 2], dim=-1).to(
        torch.uint8
    )
    y, u, v = yuv.split_i420(yuv.rgb_to_i420(rgb[None]), 32, 32)
    back = yuv.i420_to_rgb_float(y, u, v)[0].permute(1, 2, 0)
    assert (back - rgb.float()).abs().max() <= 6.0


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="float images"):
        model_output_to_rgb(torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match="float images"):
        model_output_to_i420(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))

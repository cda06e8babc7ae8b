"""CPU tests of the preprocess references against naive numpy and PyAV conversions."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from kernels_testing import naive_bilinear, naive_yuv420_to_rgb

from livediff.kernels import yuv
from livediff.kernels.preprocess import i420_to_model_input, nv12_to_model_input, rgb_to_model_input

# (frame H, W), crop (top, left, height, width), output (height, width)
RESIZE_CASES = [
    ((37, 53), (0, 0, 37, 53), (16, 24)),  # downscale, odd sizes
    ((37, 53), (3, 5, 30, 41), (64, 80)),  # crop + upscale
    ((37, 53), (3, 5, 30, 41), (30, 41)),  # crop only: copied, not resampled
    ((37, 53), (7, 2, 9, 13), (5, 7)),  # odd crop, odd output
    ((9, 11), (4, 6, 1, 1), (3, 5)),  # a single source pixel
    ((108, 192), (0, 42, 108, 108), (64, 64)),  # 1080p-shaped centre crop, scaled down
]


def _rgb(n: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(
        0,
        256,
        (n, height, width, 3),
        dtype=torch.uint8,
        generator=torch.Generator().manual_seed(seed),
    )


@pytest.mark.parametrize(("size", "crop", "out"), RESIZE_CASES)
def test_rgb_matches_naive_bilinear(
    size: tuple[int, int], crop: tuple[int, int, int, int], out: tuple[int, int]
) -> None:
    frames = _rgb(2, *size)
    result = rgb_to_model_input(frames, out[0], out[1], crop, torch.float32)
    expected = naive_bilinear(frames.permute(0, 3, 1, 2).double().numpy(), crop, *out) / 127.5 - 1.0
    assert result.shape == (2, 3, *out) and result.dtype == torch.float32 and result.is_contiguous()
    # fp32 source coordinates are off by ~1e-6 px; times a gradient of up to 255 levels/px that
    # is ~3e-4 levels, ~3e-6 after scaling. 1e-5 is 0.0013 levels, far below any real error.
    np.testing.assert_allclose(result.numpy(), expected, rtol=0, atol=1e-5)


def test_rgb_without_resize_is_exact_pixels() -> None:
    frames = _rgb(1, 20, 30)
    result = rgb_to_model_input(frames, 10, 12, (5, 7, 10, 12), torch.float32)
    expected = frames[:, 5:15, 7:19].permute(0, 3, 1, 2).float() / 127.5 - 1.0
    assert torch.equal(result, expected)
    assert result.min() >= -1.0 and result.max() <= 1.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_output_dtype_is_the_rounded_float32_result(dtype: torch.dtype) -> None:
    frames = _rgb(2, 31, 17)
    result = rgb_to_model_input(frames, 8, 8, (0, 0, 31, 17), dtype)
    assert result.dtype == dtype
    exact = torch.from_numpy(
        naive_bilinear(frames.permute(0, 3, 1, 2).double().numpy(), (0, 0, 31, 17), 8, 8)
    )
    # One rounding to the dtype on top of the float32 result (1e-5, see above).
    atol = max(torch.finfo(dtype).eps, 1e-5)
    torch.testing.assert_close(result.double(), exact / 127.5 - 1.0, rtol=0, atol=atol)


def test_rgb_strided_input_gives_the_same_result() -> None:
    frames = _rgb(2, 40, 40)
    strided = frames[:, ::2, ::2]  # a view the Triton guard would refuse
    result = rgb_to_model_input(strided, 10, 10, (0, 0, 20, 20), torch.float32)
    assert torch.equal(
        result, rgb_to_model_input(strided.contiguous(), 10, 10, (0, 0, 20, 20), torch.float32)
    )


@pytest.mark.parametrize(
    ("crop", "out", "message"),
    [
        ((0, 0, 50, 10), (8, 8), "does not fit"),
        ((-1, 0, 10, 10), (8, 8), "does not fit"),
        ((0, 0, 0, 10), (8, 8), "does not fit"),
        ((0, 0, 10, 10), (0, 8), "at least 1×1"),
    ],
)
def test_bad_crop_or_size_is_refused(
    crop: tuple[int, int, int, int], out: tuple[int, int], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        rgb_to_model_input(_rgb(1, 20, 20), out[0], out[1], crop, torch.float32)


def test_non_uint8_or_non_rgb_is_refused() -> None:
    with pytest.raises(ValueError, match="uint8 RGB"):
        rgb_to_model_input(torch.zeros(1, 8, 8, 3), 4, 4, (0, 0, 8, 8))
    with pytest.raises(ValueError, match="uint8 RGB"):
        rgb_to_model_input(torch.zeros(1, 8, 8, 4, dtype=torch.uint8), 4, 4, (0, 0, 8, 8))


# ---------------------------------------------------------------------------- YUV input
def _planes(
    n: int, height: int, width: int, seed: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ch, cw = (height + 1) // 2, (width + 1) // 2
    y = torch.randint(0, 256, (n, height, width), dtype=torch.uint8, generator=gen)
    u = torch.randint(0, 256, (n, ch, cw), dtype=torch.uint8, generator=gen)
    v = torch.randint(0, 256, (n, ch, cw), dtype=torch.uint8, generator=gen)
    return y, u, v


@pytest.mark.parametrize(("height", "width"), [(6, 8), (7, 5), (1, 1), (3, 10)])
def test_yuv_to_rgb_matches_per_pixel_formula(height: int, width: int) -> None:
    y, u, v = _planes(2, height, width)
    result = yuv.i420_to_rgb_float(y, u, v)
    for i in range(2):
        expected = naive_yuv420_to_rgb(y[i].numpy(), u[i].numpy(), v[i].numpy())
        np.testing.assert_allclose(result[i].permute(1, 2, 0).numpy(), expected, rtol=0, atol=1e-3)


def test_limited_range_anchors() -> None:
    """Black (16), white (235) and grey (128, 128, 128) land on 0, 255 and 130.4."""
    y = torch.tensor([[[16, 235, 128]]], dtype=torch.uint8)
    u = torch.full((1, 1, 2), 128, dtype=torch.uint8)
    rgb = yuv.i420_to_rgb_float(y, u, u.clone())[0]
    torch.testing.assert_close(rgb[:, 0, 0], torch.zeros(3))
    torch.testing.assert_close(rgb[:, 0, 1], torch.full((3,), 255.0))
    torch.testing.assert_close(rgb[:, 0, 2], torch.full((3,), 112 * 255 / 219))


@pytest.mark.parametrize(("size", "crop", "out"), RESIZE_CASES)
def test_i420_and_nv12_are_the_rgb_path_on_converted_pixels(
    size: tuple[int, int], crop: tuple[int, int, int, int], out: tuple[int, int]
) -> None:
    y, u, v = _planes(2, *size)
    result = i420_to_model_input(y, u, v, out[0], out[1], crop, torch.float32)
    rgb = np.stack(
        [naive_yuv420_to_rgb(y[i].numpy(), u[i].numpy(), v[i].numpy()) for i in range(2)]
    )
    expected = naive_bilinear(rgb.transpose(0, 3, 1, 2), crop, *out) / 127.5 - 1.0
    np.testing.assert_allclose(result.numpy(), expected, rtol=0, atol=1e-5)
    uv = torch.stack([u, v], dim=-1)
    assert torch.equal(nv12_to_model_input(y, uv, out[0], out[1], crop, torch.float32), result)


def _pyav_frame(fmt: str, y: np.ndarray, chroma: list[np.ndarray]) -> Any:
    av = pytest.importorskip("av")
    height, width = y.shape
    frame = av.VideoFrame(width, height, fmt)
    for plane, data in zip(frame.planes, [y, *chroma], strict=True):
        rows = data.reshape(data.shape[0], -1)
        padded = np.zeros((rows.shape[0], plane.line_size), dtype=np.uint8)
        padded[:, : rows.shape[1]] = rows
        plane.update(padded.tobytes())
    return frame


@pytest.mark.parametrize(("height", "width"), [(48, 64), (36, 20)])
def test_i420_matches_pyav_rgb24(height: int, width: int) -> None:
    """FFmpeg's fixed-point converter truncates: it reads up to ~3 levels low, ~0.7 on average."""
    y, u, v = _planes(1, height, width, seed=3)
    ours = yuv.i420_to_rgb_float(y, u, v)
    theirs = _pyav_frame("yuv420p", y[0].numpy(), [u[0].numpy(), v[0].numpy()]).to_ndarray(
        format="rgb24"
    )
    difference = ours[0].permute(1, 2, 0).double().numpy() - theirs.astype(np.float64)
    assert np.abs(difference).max() <= 3.0
    assert 0.0 <= difference.mean() <= 1.5  # biased one way: FFmpeg rounds down
    # The whole preprocess then stays within 3 levels of resizing PyAV's frame.
    ours_input = i420_to_model_input(y, u, v, 24, 24, (0, 0, height, width))
    theirs_input = rgb_to_model_input(torch.from_numpy(theirs)[None], 24, 24, (0, 0, height, width))
    assert (ours_input - theirs_input).abs().max() <= 3 / 127.5 + 1e-6


def test_nv12_plane_order_matches_pyav() -> None:
    """FFmpeg reads NV12's interleaved plane as U, V: its yuv420p copy has our u and v planes.

    (PyAV's nv12 → rgb24 runs swscale's generic path, which interpolates chroma, so the
    comparison is made on the planes; NV12 and I420 give identical output, tested above.)
    """
    y, u, v = _planes(1, 36, 20, seed=4)
    uv = torch.stack([u, v], dim=-1)
    planes = (
        _pyav_frame("nv12", y[0].numpy(), [uv[0].numpy()]).reformat(format="yuv420p").to_ndarray()
    )
    assert np.array_equal(
        planes.reshape(-1), torch.cat([y.reshape(-1), u.reshape(-1), v.reshape(-1)]).numpy()
    )


def test_bad_planes_are_refused() -> None:
    y, u, v = _planes(1, 8, 8)
    with pytest.raises(ValueError, match="u plane"):
        i420_to_model_input(y, u[:, :3], v, 4, 4, (0, 0, 8, 8))
    with pytest.raises(ValueError, match="NV12"):
        nv12_to_model_input(y, u, 4, 4, (0, 0, 8, 8))
    with pytest.raises(ValueError, match="uint8"):
        i420_to_model_input(y.float(), u, v, 4, 4, (0, 0, 8, 8))

"""The server's canny (:class:`~livediff.models.compiled_canny.PaddedCanny`): rows padded up to
the batch buckets give each row what the canny op gives it, and the padded function is only
ever called at a bucket's row count (one compiled entry per bucket, made by ``warm_up``).

Here the function is the op's own PyTorch code, uncompiled (a CPU compile needs a C++
toolchain and minutes); the compiled version on CUDA is in tests/gpu/test_gpu_compiled_canny.py.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from livediff.exceptions import UsageError
from livediff.kernels.canny import canny, reference_canny
from livediff.models.compiled_canny import PaddedCanny, row_major_strides
from livediff.models.control_images import PreprocessorNetworks, preprocess
from livediff.models.control_uses import CannyParams, Preprocessor


def scene(rows: int, size: int = 32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(rows)
    images = torch.rand(rows, 3, size, size, generator=gen) * 0.2
    for r in range(rows):
        images[r, :, 4 + r : 20 + r, 6:26] += 0.7  # a box per row, each in its own place
    return images


def thresholds(rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    low = torch.linspace(0.05, 0.3, rows)
    return low, low * 2 + 0.05, torch.linspace(0.6, 1.4, rows)


class Counting:
    """The op's code, recording the row count of every call."""

    def __init__(self) -> None:
        self.rows: list[int] = []

    def __call__(self, images: torch.Tensor, *args: Any) -> torch.Tensor:
        self.rows.append(int(images.shape[0]))
        # what a static compile's guards see: row-major strides, whatever the caller passed
        # (is_contiguous() is not enough: it ignores the stride of a size-1 dimension)
        for tensor in (images, *args[:3]):
            assert tensor.stride() == row_major_strides(tensor.shape)
        return reference_canny(images, *args)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7, 9])
def test_each_row_gets_the_ops_edges_at_bucket_row_counts(rows: int) -> None:
    fn = Counting()
    padded = PaddedCanny((1, 4, 2), fn=fn)
    images = scene(rows)
    low, high, sigma = torch.stack(thresholds(rows), dim=1).unbind(1)  # strided, as _canny_rows
    assert low.stride() == (3,)  # also at one row, where is_contiguous() says True
    got = padded(images, low, high, sigma)
    assert torch.equal(got, canny(images, low, high, sigma))
    assert set(fn.rows) <= {1, 2, 4}
    assert sum(fn.rows) >= rows and got.shape[0] == rows
    if rows > 4:  # more than the largest bucket: chunks of it
        assert fn.rows[0] == 4


def test_warm_up_calls_every_bucket_once() -> None:
    fn = Counting()
    PaddedCanny((8, 1, 4), fn=fn).warm_up((16, 16), device=torch.device("cpu"), dtype=torch.float32)
    assert fn.rows == [1, 4, 8]


def test_preprocess_takes_the_networks_canny_when_there_is_one() -> None:
    fn = Counting()
    networks = PreprocessorNetworks(canny=PaddedCanny((4,), fn=fn))
    frames = (scene(3) * 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    params = [CannyParams(30, 80, 1.0), CannyParams(60, 150, 0.8), CannyParams(10, 40, 1.2)]
    got = preprocess(Preprocessor.CANNY, frames, (32, 32), params, networks=networks)
    want = preprocess(Preprocessor.CANNY, frames, (32, 32), params)
    assert fn.rows == [4]
    assert torch.equal(got, want) and want.amax() == 1


def test_bucket_sizes_must_be_positive() -> None:
    with pytest.raises(UsageError, match="positive"):
        PaddedCanny((0, 4), fn=reference_canny)
    with pytest.raises(UsageError):
        PaddedCanny((), fn=reference_canny)

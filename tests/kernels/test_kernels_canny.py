"""Canny edges against OpenCV, pixel for pixel, and the op's own contract.

OpenCV (``pip install opencv-python-headless``, in the dev extra) is the independent
reference: ``cvtColor(RGB2GRAY)`` → ``GaussianBlur(5×5, sigma, BORDER_REPLICATE)`` →
``Canny(low, high, L2gradient=True)``. livediff's op must give the same edge map on every
test image. A hand-written flood fill checks the hysteresis on shapes made to be hard for it.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest
import torch

from livediff.exceptions import KernelInputError
from livediff.kernels.canny import HYSTERESIS_ITERATIONS, canny, canny_rgb, hysteresis

cv2 = pytest.importorskip("cv2")
from helpers.canny_reference import opencv_canny, scene  # noqa: E402  (after the cv2 skip)


def _rows(value: float, n: int) -> torch.Tensor:
    return torch.full((n,), float(value))


@pytest.mark.parametrize(
    ("low", "high", "sigma"),
    [
        (100, 200, 0.0),
        (50, 150, 0.0),
        (30, 90, 0.0),
        (100, 200, 1.4),
        (50, 150, 1.0),
        (20, 60, 2.5),
    ],
)
@pytest.mark.parametrize("size", [(256, 320), (512, 512), (37, 53)])
def test_equals_opencv(low: float, high: float, sigma: float, size: tuple[int, int]) -> None:
    frames = np.stack([scene(seed, *size) for seed in range(3)])
    ours = canny_rgb(torch.from_numpy(frames), _rows(low, 3), _rows(high, 3), _rows(sigma, 3))
    for i, frame in enumerate(frames):
        expected = opencv_canny(frame, low, high, sigma)
        got = ours[i, 0].numpy() > 0.5
        assert expected.sum() > max(10, 0.002 * expected.size)  # a picture with edges in it
        mismatched = int((got != expected).sum())
        assert mismatched == 0, f"{mismatched} of {expected.size} pixels differ from OpenCV"


def test_per_row_parameters_equal_separate_calls() -> None:
    frames = torch.from_numpy(np.stack([scene(seed, 96, 128) for seed in range(4)]))
    low, high = torch.tensor([20.0, 60.0, 100.0, 150.0]), torch.tensor([80.0, 120.0, 200.0, 250.0])
    sigma = torch.tensor([0.0, 0.8, 1.4, 3.0])
    together = canny_rgb(frames, low, high, sigma)
    for i in range(4):
        alone = canny_rgb(frames[i : i + 1], low[i : i + 1], high[i : i + 1], sigma[i : i + 1])
        assert torch.equal(together[i : i + 1], alone)
    assert len({together[i].sum().item() for i in range(4)}) == 4  # the rows really differ


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_shape_range_and_dtype(dtype: torch.dtype) -> None:
    frames = torch.from_numpy(np.stack([scene(seed, 40, 56) for seed in range(2)]))
    images = (frames.permute(0, 3, 1, 2).to(torch.float32) / 255).to(dtype)
    edges = canny(images, _rows(50, 2), _rows(150, 2), _rows(1.0, 2))
    assert edges.shape == (2, 3, 40, 56) and edges.dtype == dtype and edges.is_contiguous()
    assert set(edges.unique().tolist()) == {0.0, 1.0}  # white edges on black
    assert torch.equal(edges[:, 0], edges[:, 1]) and torch.equal(edges[:, 0], edges[:, 2])
    # a float image made from 8-bit frames gives the 8-bit answer
    assert torch.equal(edges.float(), canny_rgb(frames, _rows(50, 2), _rows(150, 2), _rows(1.0, 2)))


def flood_fill_hysteresis(strong: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """The textbook hysteresis: breadth-first search from every strong pixel through candidates."""
    height, width = strong.shape
    seen = strong & candidate
    queue = deque(zip(*np.nonzero(seen), strict=True))
    while queue:
        y, x = queue.popleft()
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                ny, nx = y + dy, x + dx
                if 0 <= ny < height and 0 <= nx < width and candidate[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
    return seen


def spiral(size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """A one-pixel-wide square spiral, laps two pixels apart, and its inner end: one chain
    of about ``size² / 2`` pixels, the longest a ``size``² image holds."""
    grid = np.zeros((size, size), bool)
    y, x = 0, 0
    grid[y, x] = True
    steps = [(0, 1), (1, 0), (0, -1), (-1, 0)]
    lengths = [size - 1, size - 1, size - 1]
    while lengths[-1] > 0:
        lengths += [lengths[-1] - 2] * 2
    for turn, length in enumerate(lengths):
        dy, dx = steps[turn % 4]
        for _ in range(max(length, 0)):
            y, x = y + dy, x + dx
            grid[y, x] = True
    return grid, (y, x)


def test_hysteresis_against_a_flood_fill() -> None:
    rng = np.random.default_rng(3)
    candidate = rng.random((3, 64, 80)) < 0.55  # near the percolation threshold: big, twisty
    strong = candidate & (rng.random((3, 64, 80)) < 0.002)
    got = hysteresis(torch.from_numpy(strong)[:, None], torch.from_numpy(candidate)[:, None], 12)[
        :, 0
    ].numpy()
    for i in range(3):
        expected = flood_fill_hysteresis(strong[i], candidate[i])
        assert expected.sum() > 100
        assert np.array_equal(got[i], expected)


def test_hysteresis_rounds_only_ever_miss_edges() -> None:
    """A 512² spiral (one chain of 131 584 pixels, the longest a 512² image holds) lit at its
    inner end: no number of rounds invents an edge, and the default reaches its outer end."""
    chain, inner_end = spiral(512)
    strong = np.zeros_like(chain)
    strong[inner_end] = True
    expected = flood_fill_hysteresis(strong, chain)
    assert expected.sum() == chain.sum() == 131_584
    found = {}
    for rounds in (0, 4, 8, HYSTERESIS_ITERATIONS):
        got = hysteresis(
            torch.from_numpy(strong)[None, None], torch.from_numpy(chain)[None, None], rounds
        )
        reached = got[0, 0].numpy()
        assert not (reached & ~expected).any()
        found[rounds] = int(reached.sum())
    assert found[0] == 1 and found[8] < expected.sum()  # too few rounds cut the chain
    assert found[HYSTERESIS_ITERATIONS] == expected.sum()


def test_bad_inputs_are_refused() -> None:
    images = torch.rand(2, 3, 8, 8)
    with pytest.raises(KernelInputError, match="float RGB images") as info:
        canny(images[:, :1], _rows(1, 2), _rows(2, 2), _rows(0, 2))
    assert info.value.field == "images"
    with pytest.raises(KernelInputError, match=r"one per image") as info:
        canny(images, _rows(1, 3), _rows(2, 2), _rows(0, 2))
    assert info.value.field == "low"
    with pytest.raises(KernelInputError, match="uint8 RGB frames"):
        canny_rgb(images, _rows(1, 2), _rows(2, 2), _rows(0, 2))


def test_opcheck_and_compile_without_graph_break() -> None:
    images = torch.rand(2, 3, 12, 16, generator=torch.Generator().manual_seed(0))
    args = (images, _rows(20, 2), torch.tensor([60.0, 90.0]), _rows(1.0, 2), 4)
    torch.library.opcheck(torch.ops.livediff.canny.default, args)
    compiled = torch.compile(
        lambda im, lo, hi, s: canny(im, lo, hi, s, iterations=4), fullgraph=True, backend="eager"
    )
    assert torch.equal(compiled(*args[:4]), canny(*args[:4], iterations=4))
    # new threshold values are tensors: no recompile
    torch._dynamo.config.error_on_recompile = True
    try:
        compiled(images, _rows(5, 2), _rows(40, 2), _rows(0.5, 2))
    finally:
        torch._dynamo.config.error_on_recompile = False

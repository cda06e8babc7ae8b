"""Canny compiled by Inductor, for the server's batches: the rows padded to fixed counts.

The canny op (:mod:`livediff.kernels.canny`) is plain PyTorch: eagerly, its blur, Sobel,
non-maximum suppression and hysteresis are a few dozen small kernels (5.5 ms for one 512²
frame on an H200, ``bench --suite controlnet``). Compiled with ``fullgraph=True,
dynamic=False`` it is a handful of fused kernels, bit for bit the op (``bench --suite
controlnet --micro`` checks it; the tests compare it with the op on the CPU). A static
compile has one entry per row count, and a server's batches have any count up to its largest
bucket: :class:`PaddedCanny` pads the rows up to the next of the batch buckets (zero images,
the first row's thresholds), so there is one compiled entry per bucket, made by
:meth:`PaddedCanny.warm_up` before sessions start (a compile in the hot path would stall
every session for seconds), and never a recompile.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from livediff.exceptions import UsageError
from livediff.kernels.canny import HYSTERESIS_ITERATIONS, reference_canny

CannyFn = Callable[..., torch.Tensor]


def compiled_canny() -> CannyFn:
    """The canny op's PyTorch code compiled by Inductor (fixed shapes), bit for bit the op;
    inside a captured step it replays in about half the op's time; dynamo keeps one compiled
    entry per shape."""
    return torch.compile(reference_canny, fullgraph=True, dynamic=False)


def row_major_strides(shape: Sequence[int]) -> tuple[int, ...]:
    """The strides of a C-contiguous tensor of ``shape`` (size-1 dimensions included)."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(int(size), 1)
    return tuple(reversed(strides))


def dense(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` with exactly row-major strides. ``contiguous()`` is not enough: it keeps the
    stride of a size-1 dimension (a [1] view of a [1, 3] tensor keeps stride 3), and dynamo
    guards on that stride (the recompile a GPU test caught at one row)."""
    if tensor.stride() == row_major_strides(tensor.shape):
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


class PaddedCanny:
    """``canny(images, low, high, sigma)`` over row counts padded up to one of ``sizes``."""

    def __init__(self, sizes: Sequence[int], fn: CannyFn | None = None) -> None:
        if not sizes or min(sizes) < 1:
            raise UsageError(f"canny row counts {list(sizes)}: expected positive counts")
        self.sizes = tuple(sorted(set(sizes)))
        self._fn = fn if fn is not None else compiled_canny()

    def padded_rows(self, rows: int) -> int:
        """The row count a call of ``rows`` rows runs at (the largest for a longer chunk)."""
        return next((s for s in self.sizes if s >= rows), self.sizes[-1])

    def __call__(
        self, images: torch.Tensor, low: torch.Tensor, high: torch.Tensor, sigma: torch.Tensor
    ) -> torch.Tensor:
        rows = int(images.shape[0])
        largest = self.sizes[-1]
        if rows > largest:  # more rows than any bucket: chunks of the largest
            return torch.cat(
                [
                    self(
                        images[i : i + largest],
                        low[i : i + largest],
                        high[i : i + largest],
                        sigma[i : i + largest],
                    )
                    for i in range(0, rows, largest)
                ]
            )
        padded = self.padded_rows(rows)
        # row-major strides, always: a static compile guards on strides, and the per-row values
        # often come as strided views of one [rows, 3] tensor (a 9.5 s recompile on an H200)
        low, high, sigma = (dense(v) for v in (low, high, sigma))
        if padded == rows:
            return self._fn(dense(images), low, high, sigma, HYSTERESIS_ITERATIONS)
        extra = padded - rows
        images = torch.cat([images, images.new_zeros((extra, *images.shape[1:]))])
        low, high, sigma = (torch.cat([v, v[:1].expand(extra)]) for v in (low, high, sigma))
        return self._fn(images, low, high, sigma, HYSTERESIS_ITERATIONS)[:rows]

    def warm_up(self, size: tuple[int, int], *, device: torch.device, dtype: torch.dtype) -> None:
        """Compile the entry of every row count (before sessions start)."""
        for rows in self.sizes:
            images = torch.zeros(rows, 3, *size, device=device, dtype=dtype)
            ones = torch.ones(rows, device=device)
            self(images, ones * 0.1, ones * 0.2, ones)

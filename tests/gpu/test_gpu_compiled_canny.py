"""The server's compiled canny on CUDA: bit for bit the op at every row count, with no compile
after :meth:`PaddedCanny.warm_up` (dynamo's error-on-recompile), also for per-row values
that come as strided views (the first H200 run recompiled on them: a 9.5 s stall)."""

from __future__ import annotations

import pytest
import torch

from livediff.kernels.canny import canny
from livediff.models.compiled_canny import PaddedCanny

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_compiled_padded_canny_is_the_op_without_recompiles() -> None:
    gen = torch.Generator(device="cuda").manual_seed(1)
    padded = PaddedCanny((1, 4))
    padded.warm_up((128, 128), device=torch.device("cuda"), dtype=torch.float16)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for rows in (1, 2, 3, 4, 6):
            images = torch.rand(rows, 3, 128, 128, device="cuda", generator=gen).half()
            images[:, :, 30:90, 40:100] += 0.5
            low = torch.linspace(0.05, 0.2, rows, device="cuda")
            values = torch.stack([low, low * 2 + 0.05, torch.ones(rows, device="cuda")], dim=1)
            low, high, sigma = values.unbind(1)  # strided views, as the engine passes them
            got = padded(images.clamp(0, 1), low, high, sigma)
            assert torch.equal(got, canny(images.clamp(0, 1), low, high, sigma))

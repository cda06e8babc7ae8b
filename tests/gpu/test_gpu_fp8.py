"""FP8 on CUDA (compute capability 8.9+): ``torch._scaled_mm`` against the dequantized GEMM in
float64, and the fp8 recipe's UNet compiled, captured as a CUDA graph, without recompiles."""

from __future__ import annotations

import math

import pytest
import torch

from livediff.models.backends import Backend, prepare_backend, runtime_bundle
from livediff.models.bundle import ModelBundle
from livediff.models.fp8 import (
    Fp8Compute,
    Fp8Linear,
    check_fp8_support,
    fp8_report,
    quantize_rows,
    quantize_weight,
)
from livediff.models.loading import ModelSpec, load_model
from livediff.models.spec import Precision
from livediff.models.unet_batch import UNetBatch

FP8_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not FP8_GPU, reason="needs a CUDA GPU of compute capability 8.9+"),
]
DTYPES = [torch.float16, torch.bfloat16]


def rel_l2(value: torch.Tensor, reference: torch.Tensor) -> float:
    value, reference = value.double().cpu(), reference.double().cpu()
    return float((value - reference).norm() / reference.norm())


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize(
    ("rows", "k", "n"),
    [(2, 1280, 1280), (77, 1024, 320), (4096, 320, 960), (1024, 640, 5120), (256, 5120, 1280)],
)
def test_scaled_mm_equals_the_dequantized_gemm(
    dtype: torch.dtype, bias: bool, rows: int, k: int, n: int
) -> None:
    gen = torch.Generator(device="cuda").manual_seed(rows + k + n)
    linear = torch.nn.Linear(k, n, bias=bias, device="cuda", dtype=dtype).requires_grad_(False)
    x = torch.randn(rows, k, device="cuda", dtype=dtype, generator=gen)
    out = Fp8Linear.from_linear(linear, Fp8Compute.SCALED_MM)(x)
    assert out.dtype == dtype and out.shape == (rows, n)
    q_x, s_x = quantize_rows(x)
    q_w, s_w = quantize_weight(linear.weight)
    # the GPU's quantization rounds each value to a neighbouring e4m3 value: within half a
    # step (2^-4 relative for normals, 2^-10 · scale below 2^-6 · scale). Not bit for bit the
    # CPU's: on the H200 some elements differed (the first GPU run of this test).
    scaled = x.double() / s_x.double()
    error = (q_x.double() - scaled).abs()
    bound = torch.maximum(scaled.abs() * 2.0**-4, torch.full_like(scaled, 2.0**-10))
    assert bool((error <= bound * (1 + 1e-6)).all())
    exact = (q_x.double() * s_x.double()) @ (q_w.double() * s_w.double().reshape(-1, 1)).t()
    if bias:
        exact = exact + linear.bias.double()
    # float32 accumulation, then one rounding to the output dtype: about eps / 4 in relative
    # L2 (a wrong scale, layout or bias would be O(1)); element by element within a few eps.
    eps = torch.finfo(dtype).eps
    assert rel_l2(out, exact) < eps
    scale = float(exact.abs().mean())
    torch.testing.assert_close(out.double(), exact, rtol=4 * eps, atol=4 * eps * scale)
    assert rel_l2(out, linear(x)) < math.sqrt(2) * 2**-4  # two e4m3 roundings at most


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_the_start_up_probe_passes(dtype: torch.dtype) -> None:
    check_fp8_support(torch.device("cuda", torch.cuda.current_device()), dtype)


def _batch(seed: int, device: str, dtype: torch.dtype) -> UNetBatch:
    gen = torch.Generator().manual_seed(seed)
    return UNetBatch(
        latents=torch.randn(2, 4, 16, 16, generator=gen).to(device, dtype),
        timesteps=torch.tensor([999, 499], device=device),
        embeds=torch.randn(2, 77, 32, generator=gen).to(device, dtype),
    )


def _cpu(dtype: torch.dtype) -> ModelBundle:
    return load_model(ModelSpec(preset="tiny", weights="random"), device="cpu", dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_the_compiled_fp8_unet_is_captured_and_does_not_recompile(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LIVEDIFF_COMPILE_CACHE", "off")
    torch._dynamo.reset()
    spec = ModelSpec(preset="tiny", weights="random", precision=Precision.FP8)
    bundle = prepare_backend(load_model(spec, device="cuda", dtype=dtype), Backend.COMPILE)
    report = fp8_report(bundle.unet)
    # Every transformer linear the UNet calls: 40 in the tiny UNet's 4 blocks, less the
    # recipe's fusion in each block (q/k/v → to_qkv: 3 → 1; cross-attention k/v → to_kv: 2 → 1).
    blocks = sum(1 for name, _ in bundle.unet.named_modules() if name.endswith(".attn1"))
    assert blocks == 4
    assert report.layers_fp8 == 40 - 3 * blocks and not report.kept_widths
    assert len(report.unused) == 5 * blocks  # attn1's q, k, v and attn2's k, v, left unread
    assert bundle.precision is Precision.FP8
    with torch.inference_mode():
        first = bundle.predict_noise(_batch(0, "cuda", dtype)).clone()  # compiles
        with torch._dynamo.config.patch(error_on_recompile=True):
            for seed in (1, 2):
                bundle.predict_noise(_batch(seed, "cuda", dtype))
    graphed = runtime_bundle(bundle, Backend.COMPILE, latent_size=(16, 16), buckets=(2,))
    with torch.inference_mode(), torch._dynamo.config.patch(error_on_recompile=True):
        replayed = graphed.predict_noise(_batch(0, "cuda", dtype)).clone()
    # The same kernels replayed (cuBLASLt may choose another algorithm under capture: then
    # the sums differ by float32 rounding, not by stale scales or inputs, which would be O(1)).
    assert rel_l2(replayed, first) < 1e-2
    # Drift from fp32 (CPU, same weights): within the CPU tests' bound, 16 × bf16's drift.
    with torch.inference_mode():
        reference = _cpu(torch.float32).predict_noise(_batch(0, "cpu", torch.float32))
        bf16 = _cpu(torch.bfloat16).predict_noise(_batch(0, "cpu", torch.bfloat16))
    assert 1e-3 < rel_l2(first, reference) < 16 * rel_l2(bf16, reference)
    torch._dynamo.reset()

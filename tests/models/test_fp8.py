"""FP8 linears (``--precision fp8``) against their definitions, in fp32 on the CPU.

The oracles are written out here, independently of :mod:`livediff.models.fp8`: the e4m3fn
format from its bit layout (every finite value, rounding to nearest with ties to even), the
scales as amax / 448, and the GEMM as dequantized operands multiplied in float64. A UNet's
drift is bounded by bf16's on the same network: e4m3 keeps 3 mantissa bits where bf16 keeps 7,
so one fp8 rounding errs 2⁴ = 16 times a bf16 one, and fp8 rounds only the converted GEMMs'
two operands while bf16 rounds every op: fp8's drift must stay below 16 × bf16's. It must also
be far above float32's reordering noise (~1e-6), or the conversion did nothing. (Measured:
about 5 × bf16's on the linear-projection UNet, about 1 × on the tiny preset, whose
convolutions fp8 leaves alone and bf16 does not.)

``torch._scaled_mm`` runs on the CPU in recent torch (2.13 here): where it does, the module's
``scaled_mm`` path is tested too, and the recipe's own order (SDPA, fused QKV, fp8, the
IP-Adapter's processors back) runs with the device check lifted; elsewhere those tests skip.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from helpers.lora_testing import (
    TARGETS,
    fused_copy,
    random_lora,
    save_peft,
    tiny_unet,
    unet_inputs,
    unet_only_bundle,
)
from livediff.cli import build_parser
from livediff.cli_options import model_spec_from_args
from livediff.exceptions import BackendError, ParameterError
from livediff.models import fp8, recipe
from livediff.models.backends import Backend, prepare_backend, recipe_for
from livediff.models.bundle import ModelBundle
from livediff.models.compile_cache import artifact_key
from livediff.models.controlnet import ControlNetSpec
from livediff.models.controlnet_loading import load_controlnet
from livediff.models.fp8 import Fp8Compute, Fp8Linear, install_fp8, quantize_rows, quantize_weight
from livediff.models.image_prompts import ImagePromptEncoder, row_inputs
from livediff.models.ip_adapter_loading import load_ip_adapter
from livediff.models.ip_adapter_spec import IPAdapterSpec
from livediff.models.loading import ModelSpec, load_model
from livediff.models.lora_layers import LoraRowsLinear
from livediff.models.lora_library import LoraLibrary
from livediff.models.lora_store import LoraCapacity
from livediff.models.recipe import Recipe, apply_recipe
from livediff.models.spec import Precision
from livediff.models.unet_batch import UNetBatch

FUSED = ("attn1.to_qkv", "attn2.to_kv", "attn2.to_q")
MANTISSA_RATIO = 16.0  # 2 ** (7 - 3): one bf16 rounding against one e4m3 rounding
ROUNDED = 1e-3  # a drift this large is rounding, not float32's reordering (~1e-6)


# ---------------------------------------------------------------- e4m3fn, written out
def e4m3_grid() -> tuple[torch.Tensor, torch.Tensor]:
    """Every finite e4m3fn value, ascending (float64), and whether its mantissa is even.

    1 sign bit, 4 exponent bits (bias 7), 3 mantissa bits; exponent 0 is subnormal
    (2⁻⁶ · m/8); S.1111.111 is NaN and there are no infinities, so the largest is 448.
    """
    values: dict[float, bool] = {}
    for exponent in range(16):
        for mantissa in range(8):
            if exponent == 15 and mantissa == 7:
                continue
            if exponent == 0:
                value = 2.0**-6 * mantissa / 8
            else:
                value = 2.0 ** (exponent - 7) * (1 + mantissa / 8)
            values[value] = values[-value] = mantissa % 2 == 0
    ordered = sorted(values)
    return torch.tensor(ordered, dtype=torch.float64), torch.tensor([values[v] for v in ordered])


def round_e4m3(values: torch.Tensor) -> torch.Tensor:
    """``values`` (within ±448) rounded to the nearest e4m3fn value, ties to the even one."""
    grid, even = e4m3_grid()
    flat = values.double().flatten()
    upper = torch.searchsorted(grid, flat).clamp(1, len(grid) - 1)
    lower = upper - 1
    below, above = grid[lower], grid[upper]
    take_upper = (above - flat) < (flat - below)
    tie = (above - flat) == (flat - below)
    take_upper |= tie & even[upper]
    return torch.where(take_upper, above, below).view_as(values)


def quantize_written_out(values: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q as float64, scale): scale = amax / 448 per slice along ``dim`` (float32, floored at
    1e-12), q = round_e4m3(clamp(values / scale, ±448))."""
    amax = values.abs().amax(dim=dim, keepdim=True).float()
    scale = amax.clamp(min=1e-12) / 448.0
    return round_e4m3((values.float() / scale).clamp(-448.0, 448.0)), scale


def linear_written_out(linear: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """What an FP8 linear must compute, in float64: (q_x · s_x) @ (q_w · s_w)ᵀ + bias."""
    rows = x.reshape(-1, linear.in_features)
    q_x, s_x = quantize_written_out(rows, dim=1)
    q_w, s_w = quantize_written_out(linear.weight.detach(), dim=1)
    out = (q_x * s_x.double()) @ (q_w * s_w.double()).t()
    if linear.bias is not None:
        out = out + linear.bias.detach().double()
    return out.reshape(*x.shape[:-1], linear.out_features)


def scaled_mm_on_cpu() -> bool:
    a = torch.ones(16, 16).to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16))
    except (RuntimeError, NotImplementedError):
        return False
    return True


CPU_SCALED_MM = scaled_mm_on_cpu()
needs_cpu_scaled_mm = pytest.mark.skipif(
    not CPU_SCALED_MM, reason=f"torch {torch.__version__} has no torch._scaled_mm on the CPU"
)
COMPUTES = [
    Fp8Compute.REFERENCE,
    pytest.param(Fp8Compute.SCALED_MM, marks=needs_cpu_scaled_mm),
]


def rel_l2(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.double() - reference.double()).norm() / reference.double().norm())


# ---------------------------------------------------------------- quantization
def _activations() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(6, 64, generator=gen)
    rows[1] = 0.0  # an all-zero row: a tiny scale, zeros
    rows[2, 5] = 300.0  # an outlier: the rest of its row falls into subnormals
    rows[3] *= 1e-6  # tiny values: the scale follows them
    rows[4] = -rows[4].abs()
    return rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rows_quantize_to_the_nearest_e4m3_value_with_amax_scales(dtype: torch.dtype) -> None:
    rows = _activations().to(dtype)
    q, scale = quantize_rows(rows)
    expected_q, expected_scale = quantize_written_out(rows, dim=1)
    assert q.dtype == torch.float8_e4m3fn and q.shape == rows.shape
    assert scale.dtype == torch.float32 and scale.shape == (6, 1) and scale.is_contiguous()
    assert torch.equal(scale, expected_scale)
    assert torch.equal(q.double(), expected_q)
    assert torch.equal(q[1].double(), torch.zeros(64, dtype=torch.float64))
    # Each row's largest value lands on ±448 exactly; nothing is NaN or beyond.
    assert torch.equal(
        q.double().abs().amax(dim=1)[[0, 2, 3, 4, 5]], torch.full((5,), 448.0, dtype=torch.float64)
    )
    # The round trip errs by at most half a step: 2⁻⁴ relative for normal values
    # (3 mantissa bits), half the subnormal step 2⁻⁹ below 2⁻⁶.
    exact = rows.double() / scale.double()
    error = (q.double() - exact).abs()
    bound = torch.where(exact.abs() >= 2**-6, exact.abs() * 2**-4, torch.full_like(exact, 2**-10))
    assert (error <= bound * (1 + 1e-6)).all()


def test_a_weight_gets_one_scale_per_output_channel() -> None:
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(48, 32, generator=gen) * torch.logspace(-3, 1, 48)[:, None]
    q, scale = quantize_weight(weight)
    expected_q, expected_scale = quantize_written_out(weight, dim=1)
    assert scale.shape == (1, 48) and scale.is_contiguous()  # torch._scaled_mm's scale_b
    assert torch.equal(scale, expected_scale.reshape(1, 48))
    assert torch.equal(q.double(), expected_q)
    # a channel 10⁴ times smaller keeps its precision: it has its own scale
    assert rel_l2(q[0].double() * scale[0, 0], weight[0]) < 2**-4


# ---------------------------------------------------------------- the layer
@pytest.mark.parametrize("compute", COMPUTES)
@pytest.mark.parametrize("shape", [(5, 64), (2, 7, 64), (2, 3, 4, 64)], ids=["2d", "3d", "4d"])
@pytest.mark.parametrize("bias", [True, False])
def test_the_layer_equals_its_dequantized_gemm(
    compute: Fp8Compute, shape: tuple[int, ...], bias: bool
) -> None:
    torch.manual_seed(2)
    linear = torch.nn.Linear(64, 48, bias=bias)
    x = torch.randn(*shape)
    layer = Fp8Linear.from_linear(linear, compute)
    out = layer(x)
    assert out.shape == (*shape[:-1], 48) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), linear_written_out(linear, x), rtol=1e-5, atol=1e-5)
    assert layer.weight_fp8.dtype == torch.float8_e4m3fn and not list(layer.parameters())


@pytest.mark.parametrize("compute", COMPUTES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_get_their_dtype_out(compute: Fp8Compute, dtype: torch.dtype) -> None:
    torch.manual_seed(3)
    linear = torch.nn.Linear(64, 32).to(dtype)
    x = torch.randn(3, 9, 64).to(dtype)
    out = Fp8Linear.from_linear(linear, compute)(x)
    assert out.dtype == dtype
    expected = linear_written_out(linear, x)
    resolution = torch.finfo(dtype).eps  # one rounding of the output
    torch.testing.assert_close(out.double(), expected, rtol=resolution, atol=resolution)


def test_the_layer_errs_within_what_two_e4m3_roundings_allow() -> None:
    """Against the full-precision linear: each operand's rounding errs by at most 2⁻⁴ of a
    normal value, so the product by at most √2 · 2⁻⁴ ≈ 0.088 in relative L2; a layer that
    rounds at all errs by more than bf16 would (2⁻⁸)."""
    torch.manual_seed(4)
    linear = torch.nn.Linear(320, 640)
    x = torch.randn(4, 77, 320)
    linear.requires_grad_(False)
    error = rel_l2(Fp8Linear.from_linear(linear, Fp8Compute.REFERENCE)(x), linear(x))
    assert 2**-8 < error < math.sqrt(2) * 2**-4


# ---------------------------------------------------------------- on a UNet
def expected_split(
    unet: torch.nn.Module, targets: tuple[str, ...], unused: tuple[str, ...]
) -> tuple[set[str], set[str], set[str]]:
    """(converted, kept, unused) linears by this test's own rule: names ending in ``unused``
    are left alone; a transformer target of widths that are multiples of 16 is converted;
    every other linear is kept."""
    converted, kept, idle = set(), set(), set()
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear):
            fits = module.in_features % 16 == 0 and module.out_features % 16 == 0
            target = any(name.endswith(t) for t in targets)
            if any(name.endswith(u) for u in unused):
                idle.add(name)
            else:
                (converted if target and fits else kept).add(name)
    return converted, kept, idle


@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused-qkv"])
def test_install_converts_the_transformer_linears_that_fit(fused: bool) -> None:
    unet = tiny_unet(seed=0)  # cross-attention width 24: attn2's key/value projections can't
    # Fused, diffusers keeps the separate projections beside to_qkv / to_kv; nothing calls them.
    unused: tuple[str, ...] = ()
    if fused:
        unet.fuse_qkv_projections()
        unused = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn2.to_k", "attn2.to_v")
    converted, kept, idle = expected_split(unet, TARGETS + FUSED, unused)
    assert bool(idle) == fused
    before = {name: m.weight.numel() for name, m in unet.named_modules() if name in converted}
    report = install_fp8(unet, compute=Fp8Compute.REFERENCE)
    assert set(report.converted) == converted and report.layers_fp8 == len(converted) > 20
    assert set(report.kept_widths) | set(report.kept_other) == kept
    widths = ("attn2.to_kv",) if fused else ("attn2.to_k", "attn2.to_v")
    assert all(name.endswith(widths) for name in report.kept_widths)
    assert report.kept_widths and report.layers_kept == len(kept)
    assert any(name.endswith("time_emb_proj") for name in report.kept_other)
    assert fused == any(name.endswith("to_qkv") for name in report.converted)
    modules = dict(unet.named_modules())
    assert all(isinstance(modules[name], Fp8Linear) for name in converted)
    assert all(type(modules[name]) is torch.nn.Linear for name in kept | idle)
    assert set(report.unused) == idle
    assert report.bytes_before == 4 * sum(before.values())  # fp32 weights
    assert report.bytes_after == sum(
        n + 4 * modules[name].out_features for name, n in before.items()
    )
    assert install_fp8(unet, compute=Fp8Compute.REFERENCE) == report  # a second call: no change
    assert next(unet.parameters()).dtype == torch.float32 and unet.dtype == torch.float32


def three_ways(run: Callable[[torch.dtype, bool], torch.Tensor]) -> tuple[float, float]:
    """(bf16's drift, fp8's drift) from fp32 of ``run(dtype, fp8)``."""
    reference = run(torch.float32, False)
    return rel_l2(run(torch.bfloat16, False), reference), rel_l2(
        run(torch.float32, True), reference
    )


def assert_drift_bounded(bf16: float, fp8_drift: float) -> None:
    assert ROUNDED < fp8_drift < MANTISSA_RATIO * bf16, (bf16, fp8_drift)


@pytest.mark.parametrize("compute", COMPUTES)
def test_a_unets_drift_stays_within_the_bf16_bound(compute: Fp8Compute) -> None:
    inputs = unet_inputs(3, seed=1)

    @torch.no_grad()
    def run(dtype: torch.dtype, use_fp8: bool) -> torch.Tensor:
        unet = tiny_unet(seed=0).to(dtype)
        if use_fp8:
            install_fp8(unet, compute=compute)
        cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        return unet(**cast, return_dict=False)[0]

    assert_drift_bounded(*three_ways(run))


def test_it_traces_whole_and_does_not_recompile() -> None:
    """Dynamo with AOTAutograd (fake tensors, functionalization; no Inductor: seconds on a
    CPU) takes the FP8 UNet as one graph, and a second call with new values reuses it."""
    compute = Fp8Compute.SCALED_MM if CPU_SCALED_MM else Fp8Compute.REFERENCE
    unet = tiny_unet(seed=0)
    install_fp8(unet, compute=compute)
    first, second = unet_inputs(2, seed=1), unet_inputs(2, seed=2)
    torch._dynamo.reset()
    compiled = torch.compile(unet, fullgraph=True, dynamic=False, backend="aot_eager")
    with torch.no_grad():
        eager = unet(**second, return_dict=False)[0]
        compiled(**first, return_dict=False)
        with torch._dynamo.config.patch(error_on_recompile=True):
            again = compiled(**second, return_dict=False)[0]
    torch.testing.assert_close(again, eager, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


# ---------------------------------------------------------------- with LoRAs, bank, IP-Adapter


@pytest.fixture
def recipe_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The recipe's fp8 step on the CPU: its device check lifted (``torch._scaled_mm`` runs)."""
    if not CPU_SCALED_MM:
        pytest.skip(f"torch {torch.__version__} has no torch._scaled_mm on the CPU")
    monkeypatch.setattr(recipe, "check_fp8_support", lambda device, dtype: None)


@pytest.mark.usefixtures("recipe_on_cpu")
def test_per_session_loras_add_their_update_to_the_fp8_base(tmp_path: Path) -> None:
    """The eager backend's recipe converts the LoRA layers' bases; a LoRA loaded afterwards
    adds its update in the model's dtype, unquantized: each layer gives base(x) + scale·x·Aᵀ·Bᵀ,
    and the UNet drifts from the LoRA fused in fp32 no more than the bf16 bound allows."""
    layers = random_lora(tiny_unet(seed=0), 8, seed=1)
    path = save_peft(layers, tmp_path / "a.safetensors", alpha=4.0)  # file scale 4 / 8
    inputs = unet_inputs(2, seed=3)
    uses = [[("A", 0.8)], [("A", 0.8)]]

    def library_of(dtype: torch.dtype, use_fp8: bool) -> LoraLibrary:
        unet = tiny_unet(seed=0).to(dtype)
        library = LoraLibrary.attach(unet, LoraCapacity(max_rank=8))
        bundle = unet_only_bundle(unet, dtype).with_loras(library)
        bundle.precision = Precision.FP8 if use_fp8 else Precision.NATIVE
        prepare_backend(bundle, Backend.EAGER)
        library.load("A", str(path))
        return library

    library = library_of(torch.float32, True)
    wrapped = [m for m in library.unet.modules() if isinstance(m, LoraRowsLinear)]
    assert sum(isinstance(m.base, Fp8Linear) for m in wrapped) > 20
    name, layer = next(
        (n, m) for n, m in library.unet.named_modules()
        if isinstance(m, LoraRowsLinear) and isinstance(m.base, Fp8Linear)
    )  # fmt: skip
    down, up = layers[name]
    x = torch.randn(2, 5, layer.in_features)
    with torch.no_grad(), library.rows(*library.row_inputs([[("A", 0.8)], []])):
        out = layer(x)
    update = 0.8 * 0.5 * (x[0] @ down.t() @ up.t())
    torch.testing.assert_close(out[0], layer.base(x[0]) + update, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1], layer.base(x[1]), rtol=1e-5, atol=1e-5)

    @torch.no_grad()
    def run(dtype: torch.dtype, use_fp8: bool) -> torch.Tensor:
        if dtype is torch.float32 and not use_fp8:  # the oracle: the LoRA fused into fp32
            return fused_copy(tiny_unet(seed=0), [(layers, 0.8 * 0.5)])(
                **inputs, return_dict=False
            )[0]
        lib = library if use_fp8 else library_of(dtype, use_fp8)
        cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        with lib.rows(*lib.row_inputs(uses)):
            return lib.unet(**cast, return_dict=False)[0]

    assert_drift_bounded(*three_ways(run))


def _bank_batch(dtype: torch.dtype, seed: int) -> UNetBatch:
    gen = torch.Generator().manual_seed(seed)
    return UNetBatch(
        latents=torch.randn(2, 4, 16, 16, generator=gen).to(dtype),
        timesteps=torch.tensor([300, 500]),
        embeds=torch.randn(2, 77, 32, generator=gen).to(dtype),
        bank_slots=torch.tensor([1, 2]),
        bank_frames=torch.tensor([[1.0, 0.0], [1.0, 1.0]]).to(dtype),
        bank_write=torch.tensor([3, 4]),
        bank_fusion=torch.tensor([[0.5, 0.9], [0.0, 0.9]]).to(dtype),
    )


@pytest.mark.usefixtures("recipe_on_cpu")
def test_the_feature_bank_reads_and_writes_through_fused_fp8_projections() -> None:
    """The recipe's order (SDPA, fused QKV, the bank's processors back, fp8): the banked
    self-attentions call the FP8 ``to_qkv``; three calls (the bank filling) drift within the
    bound, frame after frame."""

    @torch.no_grad()
    def run(dtype: torch.dtype, use_fp8: bool) -> torch.Tensor:
        spec = ModelSpec(preset="tiny", weights="random")
        bundle = load_model(spec, device="cpu", dtype=dtype).with_feature_bank(frames=2, rows=4)
        precision = Precision.FP8 if use_fp8 else Precision.NATIVE
        apply_recipe(bundle, Recipe(channels_last=False, compile=False, precision=precision))
        if use_fp8:
            report = fp8.fp8_report(bundle.unet)
            assert any(name.endswith("attn1.to_qkv") for name in report.converted)
        return torch.stack([bundle.predict_noise(_bank_batch(dtype, seed)) for seed in range(3)])

    assert_drift_bounded(*three_ways(run))


def _png(seed: int) -> bytes:
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (40, 56, 3), generator=gen, dtype=torch.uint8).numpy()
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


@pytest.mark.usefixtures("recipe_on_cpu")
def test_the_ip_adapter_keeps_its_own_projections_and_a_plain_row_stays_plain() -> None:
    image = _png(5)
    gen = torch.Generator().manual_seed(6)
    latents, embeds = (
        torch.randn(2, 4, 16, 16, generator=gen),
        torch.randn(2, 77, 32, generator=gen),
    )

    def ready(dtype: torch.dtype, precision: Precision) -> tuple[ModelBundle, Any]:
        bundle = load_model(ModelSpec(preset="tiny", weights="random"), device="cpu", dtype=dtype)
        adapter = load_ip_adapter(IPAdapterSpec("random", variant="plain", seed=1), bundle)
        bundle = bundle.with_ip_adapter(adapter)
        apply_recipe(bundle, Recipe(channels_last=False, compile=False, precision=precision))
        return bundle, adapter

    @torch.no_grad()
    def run(dtype: torch.dtype, use_fp8: bool) -> torch.Tensor:
        bundle, adapter = ready(dtype, Precision.FP8 if use_fp8 else Precision.NATIVE)
        prompt = ImagePromptEncoder(adapter).encode_bytes(image)
        tokens, scales = row_inputs([prompt, None], [0.8, 0.0], adapter)
        batch = UNetBatch(
            latents=latents.to(dtype),
            timesteps=torch.tensor([700, 300]),
            embeds=embeds.to(dtype),
            ip_tokens=tokens.to(dtype),
            ip_scales=scales.to(dtype),
        )
        out = bundle.predict_noise(batch)
        if use_fp8:
            report = fp8.fp8_report(bundle.unet)
            assert any("to_k_ip" in name for name in report.kept_other)  # the adapter's own
            plain = bundle.predict_noise(
                UNetBatch(latents=latents, timesteps=batch.timesteps, embeds=embeds)
            )
            assert torch.equal(out[1], plain[1])  # scale 0: exactly the fp8 UNet without it
        return out[:1]  # the row with the image

    assert_drift_bounded(*three_ways(run))


@pytest.mark.usefixtures("recipe_on_cpu")
def test_controlnets_get_fp8_too_and_their_residuals_stay_within_the_bound() -> None:
    gen = torch.Generator().manual_seed(7)
    latents, embeds = (
        torch.randn(2, 4, 16, 16, generator=gen),
        torch.randn(2, 77, 32, generator=gen),
    )
    control = torch.rand(2, 1, 3, 128, 128, generator=gen) * 2 - 1

    @torch.no_grad()
    def run(dtype: torch.dtype, use_fp8: bool) -> torch.Tensor:
        bundle = load_model(ModelSpec(preset="tiny", weights="random"), device="cpu", dtype=dtype)
        net = load_controlnet(ControlNetSpec("random", name="edges", seed=1), bundle)
        bundle = bundle.with_controlnets([net])
        precision = Precision.FP8 if use_fp8 else Precision.NATIVE
        apply_recipe(bundle, Recipe(channels_last=False, compile=False, precision=precision))
        if use_fp8:
            assert fp8.fp8_report(net.net).layers_fp8 > 0  # the ControlNet's own blocks
        batch = UNetBatch(
            latents=latents.to(dtype),
            timesteps=torch.tensor([900, 400]),
            embeds=embeds.to(dtype),
            control_images=control.to(dtype),
            control_scales=torch.tensor([[1.0], [0.6]]).to(dtype),
        )
        return bundle.predict_noise(batch)

    assert_drift_bounded(*three_ways(run))


# ---------------------------------------------------------------- the recipe and its refusals
def test_the_recipe_names_fp8_and_so_does_the_compile_key(tiny_bundle: ModelBundle) -> None:
    assert Recipe().label == "sdpa+qkv+cl+compile:default+cudnn-bench"  # as before fp8 existed
    assert Recipe(precision="fp8").label == "sdpa+qkv+fp8+cl+compile:default+cudnn-bench"
    with pytest.raises(ParameterError, match="precision='fp4'"):
        Recipe(precision="fp4")  # type: ignore[arg-type]
    common = {"buckets": (1,), "latent_size": (16, 16)}
    native = artifact_key(tiny_bundle, recipe=Recipe().label, **common)
    assert (
        artifact_key(tiny_bundle, recipe=Recipe(precision=Precision.FP8).label, **common) != native
    )
    asked = dataclasses.replace(tiny_bundle, precision=Precision.FP8)
    assert recipe_for(asked).precision is Precision.FP8 and "fp8" in recipe_for(asked).label
    assert recipe_for(tiny_bundle).label == Recipe().label


def test_fp8_is_refused_off_cuda_before_anything_changes(tiny_bundle: ModelBundle) -> None:
    bundle = dataclasses.replace(tiny_bundle, unet=copy.deepcopy(tiny_bundle.unet))
    for backend in (Backend.EAGER, Backend.COMPILE):
        with pytest.raises(BackendError, match=r"compute capability 8\.9.*on cpu"):
            prepare_backend(bundle, backend, Recipe(compile=False, precision=Precision.FP8))
    with pytest.raises(BackendError, match=r"tensorrt backend.*--precision fp8"):
        prepare_backend(dataclasses.replace(bundle, precision=Precision.FP8), Backend.TENSORRT)
    assert not any(isinstance(m, Fp8Linear) for m in bundle.unet.modules())
    assert bundle.precision is Precision.NATIVE
    with pytest.raises(BackendError, match=r"8\.9.*on cpu"):  # at load, before the weights
        load_model(ModelSpec(preset="tiny", weights="random", precision="fp8"), device="cpu")


def test_old_gpus_and_fp32_models_are_refused_naming_them(monkeypatch: pytest.MonkeyPatch) -> None:
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(
        BackendError, match=r"cuda:0 is NVIDIA A100-SXM4-80GB, compute capability 8\.0"
    ):
        fp8.check_fp8_device(gpu, torch.float16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    fp8.check_fp8_device(gpu, torch.bfloat16)
    fp8.check_fp8_device(gpu, torch.float16)
    with pytest.raises(
        ParameterError, match="this model is float32: use --dtype fp16 or bf16"
    ) as caught:
        fp8.check_fp8_device(gpu, torch.float32)
    assert caught.value.field == "precision"


@needs_cpu_scaled_mm
def test_the_start_up_probe_turns_a_gemm_this_torch_lacks_into_a_clear_refusal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fp8, "check_fp8_device", lambda device, dtype: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA L4")
    fp8.check_fp8_support(torch.device("cpu"), torch.bfloat16)  # the probe GEMM runs

    def refuse(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise RuntimeError("Only bf16 high precision output types are supported")

    monkeypatch.setattr(torch, "_scaled_mm", refuse)
    with pytest.raises(
        BackendError, match=r"float16 output on NVIDIA L4 \(Only bf16.*--dtype bf16"
    ):
        fp8.check_fp8_support(torch.device("cpu"), torch.float16)


# ---------------------------------------------------------------- the setting's surfaces
@pytest.mark.parametrize(
    "argv",
    [
        ["run", "in.mp4", "out.mp4"],
        ["serve"],
        ["camera", "--input", "in"],
        ["compile"],
    ],
    ids=["run", "serve", "camera", "compile"],
)
def test_every_command_that_runs_a_model_takes_the_flag(argv: list[str]) -> None:
    parser = build_parser()
    assert model_spec_from_args(parser.parse_args(argv), {}).precision is Precision.NATIVE
    args = parser.parse_args([*argv, "--precision", "fp8"])
    assert model_spec_from_args(args, {}).precision is Precision.FP8
    toml = {"model": {"precision": "fp8"}}
    assert model_spec_from_args(parser.parse_args(argv), toml).precision is Precision.FP8
    with pytest.raises(SystemExit):
        parser.parse_args([*argv, "--precision", "fp4"])


def test_the_single_benchmark_takes_it_too() -> None:
    from livediff.bench import single

    assert single.parse_args(["--precision", "fp8"]).precision is Precision.FP8
    assert single.parse_args([]).precision is Precision.NATIVE


def test_the_gemm_gets_row_major_activations_whatever_their_layout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """CUDA's row-wise ``_scaled_mm`` refuses a column-major first operand ("self must be
    row_major"), which a [M, K] view of a permuted activation is (proj_in's on an H200);
    the CPU's takes it, so the layout the layer hands over is checked here."""
    seen: list[tuple[int, ...]] = []

    def scaled_mm(a: torch.Tensor, b: torch.Tensor, **kwargs: object) -> torch.Tensor:
        seen.append(a.stride())
        return torch.zeros(a.shape[0], b.shape[1], dtype=torch.bfloat16)

    monkeypatch.setattr(torch, "_scaled_mm", scaled_mm)
    layer = Fp8Linear.from_linear(torch.nn.Linear(32, 48).to(torch.bfloat16), Fp8Compute.SCALED_MM)
    layer(torch.randn(32, 64, dtype=torch.bfloat16).t())  # column-major [64, 32]
    assert seen == [(32, 1)]

"""The ``profile`` suite on CPU with the tiny model: categories, FLOPs, records and the plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from livediff.bench import kernel_profile
from livediff.bench.records import REQUIRED_KEYS


@pytest.mark.parametrize(
    ("name", "category"),
    [
        # Kernel names as the profiler reports them on an H100/H200 with PyTorch 2.x.
        ("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>", "attention"),
        ("fmha_cutlassF_f16_aligned_64x64_rf_sm80", "attention"),
        ("sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc", "convolution"),
        ("cudnn::engines_precompiled::conv2d_nhwc_kernel", "convolution"),
        ("sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64", "gemm"),
        ("nvjet_hsh_128x256_64x4_2x1_v_bz_coopB_TNN", "gemm"),
        ("triton_tem_fused_mm_0", "gemm"),
        ("triton_red_fused_native_group_norm_3", "triton"),
        ("triton_poi_fused_add_silu_7", "triton"),
        ("Memcpy HtoD (Pinned -> Device)", "copy"),
        ("aten::mkldnn_convolution", "convolution"),
        ("aten::addmm", "gemm"),
        ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
        ("void at::native::vectorized_elementwise_kernel<4>", "other"),
    ],
)
def test_kernel_names_are_categorised(name: str, category: str) -> None:
    assert kernel_profile.categorize(name) == category


@pytest.mark.slow
def test_profile_smoke_on_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plot = tmp_path / "profile.png"
    argv = ["--model", "tiny", "--weights", "random", "--batch", "1,2", "--iters", "3"]
    argv += ["--profile-iters", "2", "--plot", str(plot), "--out", str(tmp_path / "p.jsonl")]
    assert kernel_profile.main(argv) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert [r["batch"] for r in records] == [1, 2]
    assert records == [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    for r in records:
        assert all(key in r for key in REQUIRED_KEYS), set(REQUIRED_KEYS) - set(r)
        assert (r["suite"], r["model"], r["device"]) == ("profile", "tiny", "cpu")
        assert set(r["networks"]) == {"encode", "unet", "decode"}
        for name, network in r["networks"].items():
            categories = network["kernel_ms_by_category"]
            assert set(categories) == set(kernel_profile.CATEGORIES)
            assert network["kernel_ms"] == pytest.approx(sum(categories.values()), abs=1e-3)
            assert categories["convolution"] > 0, name  # every network here is convolutional
            assert network["gflop_per_frame"] > 0 and network["tflops"] > 0
            assert network["top_kernels"] and all(
                k["category"] == kernel_profile.categorize(k["name"])
                for k in network["top_kernels"]
            )
        assert r["networks"]["unet"]["kernel_ms_by_category"]["attention"] > 0
    # FLOPs per frame are counted once (batch 1, eager), not per batch size.
    unet_gflop = {r["networks"]["unet"]["gflop_per_frame"] for r in records}
    assert len(unet_gflop) == 1
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = tmp_path / "again.png"
    assert kernel_profile.main(["--replot", str(tmp_path / "p.jsonl"), "--plot", str(again)]) == 0
    assert again.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_profile_with_a_feature_bank_profiles_the_banked_unet(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--feature-bank 2``: every UNet row attends to two held bank frames, so the UNet's
    FLOPs per frame grow (its self-attentions see three frames' keys), the VAE's do not."""
    base = ["--model", "tiny", "--weights", "random", "--batch", "2", "--iters", "2"]
    base += ["--profile-iters", "1"]
    records = {}
    for bank in (0, 2):
        assert kernel_profile.main([*base, "--feature-bank", str(bank)]) == 0
        lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
        records[bank] = json.loads(lines[-1])
    assert (records[0]["feature_bank"], records[2]["feature_bank"]) == (0, 2)
    flops = {bank: r["networks"]["unet"]["gflop_per_frame"] for bank, r in records.items()}
    assert flops[2] > flops[0]
    vae = {bank: r["networks"]["decode"]["gflop_per_frame"] for bank, r in records.items()}
    assert vae[2] == vae[0]

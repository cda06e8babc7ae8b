"""The ``fp8`` suite on CPU (tiny model, eager, fp8 emulated): a record per precision, fp16
first as the reference, drift and layer counts filled in; no timing asserts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from livediff.bench import fp8 as suite
from livediff.bench.records import REQUIRED_KEYS
from livediff.cli import main
from livediff.models.architectures import build_random
from livediff.models.presets import get_preset


def tiny_linears() -> tuple[int, int]:
    """(transformer linears, other linears) of the tiny preset's UNet, counted by name here:
    all its transformer linears are 32 or a multiple of 32 wide, so every one converts."""
    unet = build_random(get_preset("tiny"), tiny_vae=False).unet
    linears = [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear)]
    transformer = [n for n in linears if ".transformer_blocks." in n]  # proj_in/out: 1×1 convs
    return len(transformer), len(linears) - len(transformer)


def test_fp8_suite_records_each_precision_against_fp16(tmp_path: Path) -> None:
    out = tmp_path / "fp8.jsonl"
    argv = ["--model", "tiny", "--size", "64", "--frames", "2", "--iterations", "2"]
    argv += ["--warmup", "1", "--precisions", "fp8,bf16", "--out", str(out)]
    assert main(["bench", "--suite", "fp8", *argv]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["precision"] for r in records] == ["fp16", "fp8", "bf16"]  # the reference first
    converted, other = tiny_linears()
    for r in records:
        assert all(key in r for key in REQUIRED_KEYS), set(REQUIRED_KEYS) - set(r)
        assert (r["suite"], r["model"], r["width"], r["backend"]) == ("fp8", "tiny", 64, "eager")
        assert r["ms_median"] > 0 and r["ms_p99"] >= r["ms_median"] and r["unet_calls"] == 2
        assert r["frame_ms_median"] > 0 and r["input_frames"] == 2 and r["compile_s"] is None
        fp8 = r["precision"] == "fp8"
        assert r["emulated"] is fp8 and r["dtype"] == (
            "bfloat16" if r["precision"] == "bf16" else "float16"
        )
        assert (r["layers_fp8"], r["layers_kept"]) == (
            (converted, other) if fp8 else (0, converted + other)
        )
        assert (r["fp8_weight_mib"] > 0) is fp8
    reference, emulated, bf16 = records
    assert reference["unet_rel_l2"] == 0.0 and reference["psnr_db"] is None
    for r in (emulated, bf16):
        assert 1e-4 < r["unet_rel_l2"] < 0.5 and r["psnr_db"] > 20  # close, and not the same
    assert "fp8" in emulated["recipe"]


def test_each_unet_batch_gets_its_record(tmp_path: Path) -> None:
    """``--unet-batches 1,3``: per precision, the UNet timed at 1 and at 3 rows, the same case."""
    out = tmp_path / "fp8.jsonl"
    argv = ["--model", "tiny", "--size", "64", "--frames", "1", "--iterations", "2"]
    argv += ["--warmup", "0", "--precisions", "fp8", "--unet-batches", "1,3", "--out", str(out)]
    assert main(["bench", "--suite", "fp8", *argv]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["precision"], r["unet_batch"]) for r in records] == [
        ("fp16", 1),
        ("fp16", 3),
        ("fp8", 1),
        ("fp8", 3),
    ]
    for r in records:
        assert r["ms_per_row"] == round(r["ms_median"] / r["unet_batch"], 4) > 0
    assert records[0]["unet_rel_l2"] == records[1]["unet_rel_l2"] == 0.0  # drift: per case
    assert records[2]["unet_rel_l2"] == records[3]["unet_rel_l2"] > 0


def test_unet_batches_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        suite.parse_args(["--unet-batches", "1,0"])
    assert "--unet-batches" in capsys.readouterr().err


def test_unknown_precisions_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        suite.parse_args(["--precisions", "fp16,fp4"])
    assert "expected some of fp16, bf16, fp8, fp8-bf16" in capsys.readouterr().err

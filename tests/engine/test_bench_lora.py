"""The ``lora`` suite on CPU (tiny model): records of every system and case, the runtime load
measured, and a plot; no timing asserts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from livediff.bench import lora
from livediff.bench.records import REQUIRED_KEYS
from livediff.cli import main


def test_lora_suite_records_every_system_and_the_runtime_load(tmp_path: Path) -> None:
    out, plot = tmp_path / "lora.jsonl", tmp_path / "lora.png"
    argv = ["--model", "tiny", "--size", "64", "--sessions", "1,2", "--loras", "0,2"]
    argv += ["--ranks", "4,8", "--seconds", "0.8", "--warmup", "0.3", "--fps", "20"]
    assert main(["bench", "--suite", "lora", *argv, "--out", str(out), "--plot", str(plot)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    cases = [(r["system"], r["rank"], r["sessions"], r["loras"], r["case"]) for r in records]
    assert cases == [
        ("none", 0, 1, 0, "steady"),
        ("none", 0, 2, 0, "steady"),
        ("fused", 4, 1, 1, "steady"),
        ("fused", 4, 2, 1, "steady"),
        ("per-session", 4, 1, 0, "steady"),
        ("per-session", 4, 2, 0, "steady"),
        ("per-session", 4, 2, 2, "steady"),  # 2 distinct LoRAs need 2 sessions
        ("per-session", 4, 2, 2, "load"),
        ("per-session", 8, 2, 2, "steady"),  # 0 LoRAs cost the same at every rank: once
    ]
    for r in records:
        assert all(key in r for key in REQUIRED_KEYS), set(REQUIRED_KEYS) - set(r)
        assert r["suite"] == "lora" and r["width"] == 64 and r["backend"] == "eager"
        assert 0.0 <= r["drop_rate"] <= 1.0
        assert set(r["drops_by_reason"]) == {"inbox", "deadline", "outbox", "reconfigure"}
        assert r["late"] >= 0
        assert r["batches"] > 0 and r["ms_median"] > 0 and r["ms_p99"] >= r["ms_median"]
        assert 1 <= r["batch_frames_p50"] <= r["sessions"]
        assert r["latency_ms_p99"] > 0 and r["gpu_mem_peak_mb"] is None  # CPU: no device peak
        assert (r["slots_per_row"] == 2) == (r["system"] == "per-session")
        assert r["buckets"] == ([2] if r["rank"] == 8 else [1, 2])  # the rows its cases batch
        if r["case"] == "steady":
            assert r["load_ms"] is None and r["stall_ms"] is None and r["gap_ms_max"] is None
    load = records[7]
    assert load["load_ms"] > 0 and load["input_fps"] == 15.0 and load["frame_interval_ms"] == 66.67
    assert load["stall_ms"] > 0 and load["gap_ms_max"] >= load["gap_ms_median"] > 0
    assert plot.stat().st_size > 0
    again = tmp_path / "again.png"
    assert lora.main(["--replot", str(out), "--plot", str(again)]) == 0
    assert again.stat().st_size > 0


def test_the_random_files_are_loras_the_library_reads(tmp_path: Path) -> None:
    from livediff.models.loading import ModelSpec, load_model
    from livediff.models.lora_files import target_layers
    from livediff.models.lora_library import LoraLibrary
    from livediff.models.lora_store import LoraCapacity

    bundle = load_model(ModelSpec(preset="tiny", weights="random"), device="cpu", dtype="fp32")
    layers = len(target_layers(bundle.unet))
    path = lora.write_lora(bundle.unet, tmp_path / "a.safetensors", rank=4, seed=0)
    library = LoraLibrary.attach(bundle.unet, LoraCapacity(max_loras=1, max_rank=4))
    loaded = library.load("a", str(path))
    assert loaded.rank == 4 and loaded.layers == layers > 0


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--systems", "none,bogus", "expected some of none, fused, per-session"),
        ("--ranks", "0,16", "rank is at least 1"),
        ("--sessions", "x", "comma-separated list of integers"),
    ],
)
def test_bad_options_are_refused(
    flag: str, value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        lora.parse_args([flag, value])
    assert message in capsys.readouterr().err


def test_the_default_plan_is_what_the_issue_asks_for() -> None:
    cases = lora.plan(lora.parse_args([]))
    assert [(c.system, c.rank, c.sessions, c.loras, c.load) for c in cases] == [
        ("none", 0, 1, 0, False),
        ("none", 0, 16, 0, False),
        ("fused", 16, 1, 1, False),
        ("fused", 16, 16, 1, False),
        ("per-session", 16, 1, 0, False),
        ("per-session", 16, 1, 1, False),
        ("per-session", 16, 16, 0, False),
        ("per-session", 16, 16, 1, False),
        ("per-session", 16, 16, 4, False),
        ("per-session", 16, 16, 4, True),  # a LoRA loaded while 16 sessions use 4
        ("per-session", 64, 16, 1, False),
        ("per-session", 64, 16, 4, False),
    ]


def test_the_random_files_cover_sd15_conv_projections(tmp_path: Path) -> None:
    """On a UNet with SD 1.5's 1×1 convolution proj_in / proj_out the random file holds them
    too (4-d weights), and the library reads every layer."""
    import torch

    from helpers.lora_testing import tiny_unet
    from livediff.models.lora_files import target_layers
    from livediff.models.lora_library import LoraLibrary
    from livediff.models.lora_store import LoraCapacity

    unet = tiny_unet(use_linear_projection=False)
    layers = target_layers(unet)
    assert any(isinstance(layer, torch.nn.Conv2d) for layer in layers.values())
    path = lora.write_lora(unet, tmp_path / "a.safetensors", rank=4, seed=0)
    library = LoraLibrary.attach(unet, LoraCapacity(max_loras=1, max_rank=4))
    assert library.load("a", str(path)).layers == len(layers)

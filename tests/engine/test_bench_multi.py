"""The ``multi`` benchmark's CPU smoke run: it runs, prints complete JSON lines and draws its plot."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from livediff.bench import multi
from livediff.bench.records import REQUIRED_KEYS

MULTI_KEYS = (
    *REQUIRED_KEYS,
    "latency_ms_p50",
    "latency_ms_p99",
    "drop_rate",
    "gpu_mem_peak_mb",
)


@pytest.mark.slow
def test_multi_smoke_on_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plot = tmp_path / "multi.png"
    argv = ["--model", "tiny", "--weights", "random", "--sessions", "1,2", "--seconds", "2"]
    systems = ["--systems", "livediff,livediff-overlap,independent"]
    assert multi.main([*argv, *systems, "--plot", str(plot)]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert [(r["system"], r["sessions"], r["overlap"]) for r in records] == [
        ("livediff", 1, "off"),
        ("livediff-overlap", 1, "off"),  # auto: overlap is for CUDA devices
        ("independent", 1, None),
        ("livediff", 2, "off"),
        ("livediff-overlap", 2, "off"),
        ("independent", 2, None),
    ]
    for r in records:
        assert all(key in r for key in MULTI_KEYS), set(MULTI_KEYS) - set(r)
        assert (r["suite"], r["model"], r["weights"], r["steps"]) == ("multi", "tiny", "random", 1)
        assert r["fps"] > 0 and 0 <= r["drop_rate"] <= 1
        assert r["latency_ms_p50"] <= r["latency_ms_p99"]
        assert r["device"] == "cpu" and r["gpu_mem_peak_mb"] is None
        assert r["session_state_mb"] is None  # measured on CUDA only
        if r["system"] == "independent":
            assert r["warmup_s"] > 0  # each thread warmed its stream before the clock started
            assert r["batch_stage_ms_p50"] is None and r["batch_rows_p50"] is None
            assert r["drops_by_reason"] is None and r["late"] is None
        else:
            assert r["warmup_s"] is None
            stages = r["batch_stage_ms_p50"]
            assert set(stages) == {"encode", "unet", "decode"}
            assert all(stages[s] > 0 for s in stages), stages
            assert 1 <= r["batch_rows_p50"] <= r["sessions"]
            drops = r["drops_by_reason"]
            assert set(drops) == {"inbox", "deadline", "outbox", "reconfigure"}, drops
            assert all(isinstance(n, int) and n >= 0 for n in drops.values()), drops
            assert isinstance(r["late"], int) and r["late"] >= 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_static_scene_with_the_similarity_filter_skips_and_records_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        *("--model", "tiny", "--weights", "random", "--sessions", "2", "--seconds", "2"),
        *("--systems", "livediff", "--frame-size", "64", "--scene", "static"),
        *("--similarity-threshold", "off,0.98", "--plot", str(tmp_path / "m.png")),
    ]
    assert multi.main(argv) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert [r["similarity_threshold"] for r in records] == [None, 0.98]
    unfiltered, filtered = records
    for r in records:
        assert r["scene"] == "static" and r["sessions"] == 2
        assert r["gpu_busy_ms_per_s"] >= 0 and r["gpu_ms_per_output"] is not None
    # A still picture with ±2 levels of noise is far above 0.98 similar: most frames are
    # answered with the previous output (at most max_skip_frames = 10 in a row are skipped).
    assert unfiltered["skip_rate"] == 0
    assert filtered["skip_rate"] > 0.5


@pytest.mark.slow
def test_sessions_with_feature_banks_record_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        *("--model", "tiny", "--weights", "random", "--sessions", "2", "--seconds", "1"),
        *("--systems", "livediff,independent", "--frame-size", "64", "--feature-bank", "2"),
        *("--latent-feedback", "0.2", "--plot", str(tmp_path / "m.png")),
        *("--feature-bank-tokens", "merged", "--feature-bank-reduce-from", "16"),
    ]
    assert multi.main(argv) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert [r["system"] for r in records] == ["livediff", "independent"]
    for r in records:
        assert (r["feature_bank"], r["feature_fusion"], r["latent_feedback"]) == (2, 0.8, 0.2)
        assert (r["feature_bank_tokens"], r["feature_bank_reduce_from"]) == ("merged", 16)
        assert r["fps"] > 0


def test_similarity_thresholds_parse_and_are_checked() -> None:
    assert multi.parse_thresholds("off,0.98, 0.5") == [None, 0.98, 0.5]
    with pytest.raises(argparse.ArgumentTypeError, match="not in"):
        multi.parse_thresholds("1.5")


def test_a_static_scene_is_one_picture_with_bounded_noise() -> None:
    frames = multi.source_frames(32, 4, seed=0, scene=multi.Scene.STATIC, noise=2)
    spread = np.stack(frames).astype(int)
    assert (spread.max(axis=0) - spread.min(axis=0)).max() <= 4
    assert not all(np.array_equal(frames[0], f) for f in frames[1:])  # it is noisy, not frozen
    moving = multi.source_frames(32, 2, seed=0)
    assert not np.array_equal(moving[0], moving[1])


def test_a_plot_line_runs_by_session_count_and_keeps_the_last_of_a_repeat() -> None:
    def rec(
        system: str,
        sessions: int,
        fps: float,
        threshold: float | None = None,
        overlap: str | None = "off",
    ) -> dict:
        return {
            "system": system,
            "sessions": sessions,
            "fps": fps,
            "similarity_threshold": threshold,
            "overlap": overlap,
        }

    records = [
        rec("livediff", 16, 288.0),
        rec("livediff", 32, 282.0),
        rec("independent", 16, 100.0),
        rec("livediff", 16, 307.0),
        rec("livediff", 1, 30.0),
        rec("livediff", 16, 480.0, 0.98),
        rec("livediff-overlap", 16, 325.0, overlap="on"),
        rec("livediff-serial", 8, 240.0),  # the name files from commit 5709da6 use
        rec("livediff", 8, 239.0, overlap="on"),  # ... where "livediff" overlapped
    ]
    line = multi.curve(records, "livediff", None)
    assert [(r["sessions"], r["fps"]) for r in line] == [
        (1, 30.0),
        (8, 240.0),
        (16, 307.0),
        (32, 282.0),
    ]
    assert [r["fps"] for r in multi.curve(records, "livediff", 0.98)] == [480.0]
    overlapped = multi.curve(records, "livediff, overlap", None)
    assert [(r["sessions"], r["fps"]) for r in overlapped] == [(8, 239.0), (16, 325.0)]
    assert multi.curve(records, "independent", 0.98) == []


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # expected
def test_an_independent_stream_that_fails_in_warm_up_ends_the_run_with_a_reason(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # 0×0 frames have no pixels: every independent stream raises in its warm-up, and the main
    # thread stops waiting for them at once instead of after --independent-warmup-s.
    argv = ["--model", "tiny", "--weights", "random", "--systems", "independent"]
    argv += ["--sessions", "2", "--seconds", "1", "--frame-size", "0", "--plot", ""]
    with pytest.raises(SystemExit, match=r"did not get warm .* or one of them failed"):
        multi.main(argv)
    assert capsys.readouterr().out == ""  # no record for a run that did not happen

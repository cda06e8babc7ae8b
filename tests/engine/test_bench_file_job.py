"""The ``file`` suite on CPU (tiny model): a record per batch, every frame written; no timing asserts."""

from __future__ import annotations

import json
from pathlib import Path

import av
import pytest

from livediff.bench import file_job
from livediff.bench.records import REQUIRED_KEYS
from livediff.cli import main
from livediff.exceptions import UsageError


def test_file_suite_records_each_batch_and_writes_every_frame(tmp_path: Path) -> None:
    out = tmp_path / "file.jsonl"
    argv = ["--model", "tiny", "--seconds", "1", "--fps", "10", "--resolution", "160x90"]
    argv += ["--batch", "1,4,auto", "--warmup", "0.3", "--steps", "2"]
    assert main(["bench", "--suite", "file", *argv, "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["batch"], r["batch_asked"]) for r in records] == [(1, 1), (4, 4), (4, "auto")]
    for r in records:
        assert all(key in r for key in REQUIRED_KEYS), set(REQUIRED_KEYS) - set(r)
        assert r["suite"] == "file" and r["system"] == "livediff" and r["backend"] == "eager"
        assert r["input"] == "160x90 h264 1 s" and r["input_frames"] == 10
        assert r["frames"] == r["output_frames"] == r["input_frames"]
        assert (r["width"], r["height"], r["steps"]) == (128, 128, 2)
        assert r["fps"] > 0 and r["seconds"] > 0 and r["setup_s"] > 0
        assert r["fps"] == pytest.approx(r["frames"] / r["seconds"], rel=0.01)
        assert min(r["decode_s"], r["model_s"], r["encode_s"]) >= 0 and r["gpu_s"] is None
        assert r["ms_p99"] >= r["ms_median"] >= 0
    assert records[1]["buckets"] == [4, 8]  # 4 frames per VAE call, 4 × 2 rows per UNet call


def test_the_synthetic_clip_pans_and_carries_a_tone(tmp_path: Path) -> None:
    path = tmp_path / "clip.mp4"
    assert file_job.write_clip(path, 64, 48, seconds=0.5, fps=8) == 4
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert container.streams.audio[0].codec_context.name == "aac"
    assert len(frames) == 4 and frames[0].shape == (48, 64, 3)
    assert abs(frames[0].astype(int) - frames[1].astype(int)).mean() > 1  # it moves


def test_sizes_and_batches_are_parsed_or_refused() -> None:
    assert file_job.parse_resolution("1080p") == (1920, 1080)
    assert file_job.parse_resolution("640x360") == (640, 360)
    assert file_job.batch_list("1, 8,auto") == [1, 8, None]
    with pytest.raises(UsageError, match="WIDTHxHEIGHT"):
        file_job.parse_resolution("big")
    with pytest.raises(UsageError, match="even sides"):
        file_job.parse_resolution("161x90")
    with pytest.raises(UsageError, match="not a number"):
        file_job.batch_list("1,x")

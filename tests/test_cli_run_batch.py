"""``livediff run --batch``: N streams over a file, batched, end to end through real PyAV files.

The tiny preset with random weights, float32 on the CPU. Outputs are compared through .y4m
files (raw yuv420p, no lossy codec in between) within a grey level: oneDNN picks other kernels
for a batch of 8 than for 1. Timestamps and audio are checked through .mp4 files.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import torch
from test_cli_run import TINY, _frames, _Sink, _Source, audio_codecs, video_frames, write_clip

from livediff.cli import main


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", seconds=1.4, fps=15)  # 21


def y4m_frames(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [f.to_ndarray() for f in container.decode(video=0)]  # yuv420p planes, raw


def run(clip: Path, output: Path, *extra: str) -> str:
    return str(main(["run", str(clip), str(output), *TINY, "--prompt", "a watercolor", *extra]))


@pytest.mark.parametrize("steps", ["1", "2"])
def test_a_batched_run_writes_what_one_stream_writes(
    clip: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], steps: str
) -> None:
    runs = {}
    for batch in ("1", "8", "auto"):
        output = tmp_path / f"out-{batch}.y4m"
        assert run(clip, output, "--steps", steps, "--seed", "5", "--batch", batch) == "0"
        runs[batch] = y4m_frames(output)
        speed = capsys.readouterr().out.splitlines()[-1]
        assert speed.startswith("speed: ") and "frames/s end to end" in speed
        expected = {"1": "1", "8": "8", "auto": "8" if steps == "1" else "4"}[batch]
        assert f"batch {expected} (" in speed
    one = runs["1"]
    assert len(one) == 21
    for batch in ("8", "auto"):
        assert len(runs[batch]) == 21
        for i, (a, b) in enumerate(zip(runs[batch], one, strict=True)):
            difference = np.abs(a.astype(np.int16) - b.astype(np.int16))
            assert difference.max() <= 1, (batch, i, difference.max())


def test_a_batched_run_keeps_every_frame_its_timestamp_and_the_audio(
    clip: Path, tmp_path: Path
) -> None:
    output = tmp_path / "out.mp4"
    # 21 frames over 4 streams at 3 steps: a partial last round, streams draining unevenly.
    assert run(clip, output, "--batch", "4", "--steps", "3") == "0"
    inputs, input_times = video_frames(clip)
    outputs, output_times = video_frames(output)
    assert len(outputs) == len(inputs) == 21
    assert output_times == input_times
    assert all(a < b for a, b in itertools.pairwise(output_times))
    assert all(frame.shape == (128, 128, 3) for frame in outputs)
    assert audio_codecs(output) == ["aac"]


@pytest.mark.parametrize(
    ("flags", "setting"),
    [
        (["--similarity-threshold", "0.9"], "similarity_threshold"),
        (["--feature-bank", "2"], "feature_bank"),
        (["--latent-feedback", "0.3"], "latent_feedback"),
        (["--controlnet", "lllyasviel/sd-controlnet-canny:1:previous_output"], "controlnets"),
        (["--mode", "txt2img"], "mode"),
        (["--no-denoising-batch"], "use_denoising_batch"),
    ],
)
def test_a_batch_with_state_carried_between_frames_is_refused(
    clip: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], setting: str
) -> None:
    output = tmp_path / "out.mp4"
    assert run(clip, output, "--batch", "2", *flags) == "2"
    stderr = capsys.readouterr().err
    assert stderr.startswith(f"livediff run: error: --batch 2 with {setting}: ")
    assert "--batch 1 (or auto)" in stderr and stderr.count("\n") == 1
    assert not output.exists()


def test_auto_runs_one_stream_with_the_similarity_filter_and_says_why(
    clip: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "out.mp4"
    assert run(clip, output, "--similarity-threshold", "0.99") == "0"
    assert len(video_frames(output)[0]) == 21
    speed = capsys.readouterr().out.splitlines()[-1]
    assert "batch 1 (auto: not batched, because of similarity_threshold: " in speed


@pytest.mark.parametrize(("value", "message"), [("0", "out of range"), ("33", "out of range")])
def test_a_batch_out_of_range_is_refused(
    clip: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str, message: str
) -> None:
    assert run(clip, tmp_path / "out.mp4", "--batch", value) == "2"
    assert message in capsys.readouterr().err


def test_a_batch_that_is_no_number_is_a_usage_error(
    clip: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        run(clip, tmp_path / "out.mp4", "--batch", "many")
    assert exited.value.code == 2
    assert "--batch: expected auto or a number, got 'many'" in capsys.readouterr().err


class _EchoStream:
    """Answers each frame with a grey image at once (the Stream calls transform() makes)."""

    def __init__(self) -> None:
        from types import SimpleNamespace

        self.bundle = SimpleNamespace(device=torch.device("cpu"))

    def process(self, image: Any, *, tag: Any = None) -> list[Any]:
        from livediff.engine.frames import StreamOutput

        return [StreamOutput(torch.full((8, 8, 3), 9, dtype=torch.uint8), 0, tag=tag)]

    def flush(self) -> list[Any]:
        return []


def test_the_progress_bar_counts_frames_written_and_shows_their_rate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tqdm import tqdm

    import livediff.cmd_run as cmd_run

    shown = io.StringIO()

    def bar(*args: Any, **kwargs: Any) -> tqdm:
        return tqdm(*args, **{**kwargs, "disable": False, "file": shown, "mininterval": 0})

    monkeypatch.setattr(cmd_run, "tqdm", bar)
    sink = _Sink()
    stats = cmd_run.transform(_Source(_frames(12)), _EchoStream(), sink)  # type: ignore[arg-type]
    assert stats.frames == len(sink.written) == 12
    assert stats.seconds > 0 and stats.fps == pytest.approx(12 / stats.seconds)
    assert stats.gpu_s is None and stats.decode_s >= 0 and stats.encode_s >= 0
    text = shown.getvalue()
    assert "12/12" in text and "frame/s" in text

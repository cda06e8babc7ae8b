"""``livediff run``, ``sample`` and ``export`` end to end, through ``livediff.cli.main``.

Inputs are real files PyAV writes here (a moving pattern and a 440 Hz tone); the model is the
tiny preset with random weights, or a folder ``export`` saved.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import av
import numpy as np
import pytest
import torch

from livediff.cli import main
from livediff.cmd_sample import read_frame_counter
from livediff.exceptions import MediaError

TINY = ["--model", "tiny", "--weights", "random"]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    # The tiny model gains nothing from intra-op threads; on a busy 2-core runner they fight.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def write_clip(
    path: Path, *, seconds: float = 2.0, fps: int = 15, audio_codec: str | None = "aac"
) -> Path:
    """160x90 frames of a scrolling colour pattern, and a 440 Hz tone."""
    width, height = 160, 90
    frames = round(seconds * fps)
    columns = np.arange(width)[None, :, None]
    rows = np.arange(height)[:, None, None]
    with av.open(str(path), "w") as container:
        # PyAV types a stream by its codec name only when that is a literal.
        video: Any = container.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        audio: Any = container.add_stream(audio_codec, rate=48000) if audio_codec else None
        if audio is not None:
            audio.layout = "mono"
        for i in range(frames):
            image = ((columns * 3 + rows * np.array([0, 2, 1]) + 9 * i) % 256).astype(np.uint8)
            frame = av.VideoFrame.from_ndarray(
                np.ascontiguousarray(np.broadcast_to(image, (height, width, 3))), format="rgb24"
            )
            frame.pts, frame.time_base = i, Fraction(1, fps)
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
        if audio is not None:
            t = np.arange(48000 * frames // fps) / 48000
            samples = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]
            tone = av.AudioFrame.from_ndarray(samples, format="flt", layout="mono")
            tone.sample_rate, tone.pts = 48000, 0
            container.mux(audio.encode(tone))
            container.mux(audio.encode(None))
    return path


def video_frames(path: Path) -> tuple[list[np.ndarray], list[Fraction]]:
    """Decoded RGB frames and their presentation times in seconds."""
    with av.open(str(path)) as container:
        decoded: list[Any] = list(container.decode(video=0))
    return [f.to_ndarray(format="rgb24") for f in decoded], [f.pts * f.time_base for f in decoded]


def audio_codecs(path: Path) -> list[str]:
    with av.open(str(path)) as container:
        return [stream.codec_context.name for stream in container.streams.audio]


def plain_fit(image: np.ndarray, size: int = 128) -> np.ndarray:
    """What a model that did nothing would output: the centre square, resized (--fit crop)."""
    height, width = image.shape[:2]
    left = (width - height) // 2
    square = torch.from_numpy(image[:, left : left + height]).permute(2, 0, 1)[None].float()
    resized = torch.nn.functional.interpolate(
        square, size=(size, size), mode="bilinear", align_corners=False
    )
    return resized[0].permute(1, 2, 0).numpy()


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_clip(tmp_path_factory.mktemp("clip") / "clip.mp4")


def assert_transformed(clip: Path, output: Path) -> None:
    """Same frame count and timestamps as the input, at 128x128, and changed by the model."""
    inputs, input_times = video_frames(clip)
    outputs, output_times = video_frames(output)
    assert len(outputs) == len(inputs) == 30
    assert all(frame.shape == (128, 128, 3) for frame in outputs)
    assert output_times == input_times
    assert all(a < b for a, b in itertools.pairwise(output_times))
    differences = [
        np.abs(out.astype(np.float32) - plain_fit(inp)).mean()
        for out, inp in zip(outputs, inputs, strict=True)
    ]
    assert min(differences) > 10, "the output looks like a plain resize of the input"


# ---------------------------------------------------------------- run
def test_run_transforms_every_frame_at_the_input_timestamps(
    clip: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "out.mp4"
    # Two steps: Stream Batch answers each frame one frame late; the output must not show it.
    code = main(
        [
            "run",
            str(clip),
            str(output),
            *TINY,
            "--prompt",
            "a watercolor",
            "--steps",
            "2",
            "--seed",
            "3",
        ]
    )
    assert code == 0
    assert_transformed(clip, output)
    assert audio_codecs(output) == ["aac"]
    stdout = capsys.readouterr().out
    assert "30 frames, 128x128" in stdout
    assert "audio: copied (aac)" in stdout


def test_run_loads_an_exported_folder_and_drops_audio_on_request(
    clip: Path, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "out.mp4"
    code = main(
        [
            "run",
            str(clip),
            str(output),
            "--model",
            "tiny",
            "--source",
            str(tiny_model_dir),
            "--prompt",
            "an oil painting",
            "--audio",
            "drop",
        ]
    )
    assert code == 0
    assert_transformed(clip, output)
    assert audio_codecs(output) == []
    assert "audio: dropped" in capsys.readouterr().out


def test_run_reencodes_audio_the_output_container_cannot_hold(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = write_clip(tmp_path / "in.mp4", seconds=1, fps=6)
    output = tmp_path / "out.webm"
    assert main(["run", str(source), str(output), *TINY, "--prompt", "x"]) == 0
    frames, times = video_frames(output)
    assert len(frames) == 6 and frames[0].shape == (128, 128, 3)
    assert [float(t) for t in times] == pytest.approx([i / 6 for i in range(6)], abs=1e-3)
    assert audio_codecs(output) == ["opus"]
    assert "audio: re-encoded to libopus (.webm files cannot hold aac)" in capsys.readouterr().out


def test_run_reports_an_input_without_audio(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = write_clip(tmp_path / "in.mp4", seconds=1, fps=6, audio_codec=None)
    output = tmp_path / "out.mkv"
    assert main(["run", str(source), str(output), *TINY, "--prompt", "x"]) == 0
    assert len(video_frames(output)[0]) == 6
    assert audio_codecs(output) == []
    assert "audio: none in input" in capsys.readouterr().out


def test_run_to_y4m_warns_that_the_audio_is_dropped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    source = write_clip(tmp_path / "in.mp4", seconds=1, fps=6)
    output = tmp_path / "out.y4m"
    with caplog.at_level(logging.WARNING):
        assert main(["run", str(source), str(output), *TINY, "--prompt", "x"]) == 0
    assert "the input has aac audio, but .y4m files hold no audio" in caplog.text
    frames, _ = video_frames(output)
    assert len(frames) == 6 and frames[0].shape == (128, 128, 3)
    assert "audio: dropped (.y4m files hold no audio)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing input", "input file not found"),
        ("text file named .mp4", "not a media file PyAV can open"),
        ("audio-only input", "has no video stream"),
        ("unknown output extension", "'.avi' is not a known output format"),
        ("output folder missing", "does not exist"),
        ("output is the input", "same file as INPUT"),
        ("copy impossible", "--audio copy: .webm files cannot hold aac audio"),
    ],
)
def test_run_user_mistakes_exit_2_with_one_line(
    case: str, message: str, clip: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, output, extra = clip, tmp_path / "out.mp4", []
    if case == "missing input":
        source = tmp_path / "nope.mp4"
    elif case == "text file named .mp4":
        source = tmp_path / "notes.mp4"
        source.write_text("not a video\n" * 50)
    elif case == "audio-only input":
        source = tmp_path / "tone.m4a"
        with av.open(str(source), "w") as container:
            stream: Any = container.add_stream("aac", rate=48000)
            silence = av.AudioFrame.from_ndarray(
                np.zeros((1, 4800), np.float32), format="flt", layout="mono"
            )
            silence.sample_rate, silence.pts = 48000, 0
            container.mux(stream.encode(silence))
            container.mux(stream.encode(None))
    elif case == "unknown output extension":
        output = tmp_path / "out.avi"
    elif case == "output folder missing":
        output = tmp_path / "no" / "such" / "out.mp4"
    elif case == "output is the input":
        output = clip
    elif case == "copy impossible":
        output, extra = tmp_path / "out.webm", ["--audio", "copy"]
    code = main(["run", str(source), str(output), *TINY, "--prompt", "x", *extra])
    stderr = capsys.readouterr().err
    assert code == 2
    assert stderr.startswith("livediff run: error: ") and message in stderr
    assert stderr.count("\n") == 1 and "Traceback" not in stderr


# ---------------------------------------------------------------- sample
def test_sample_writes_moving_numbered_frames_and_a_tone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "clip.mp4"
    assert (
        main(
            [
                "sample",
                str(output),
                "--seconds",
                "1",
                "--fps",
                "10",
                "--width",
                "96",
                "--height",
                "64",
            ]
        )
        == 0
    )
    frames, times = video_frames(output)
    assert len(frames) == 10 and frames[0].shape == (64, 96, 3)
    assert times == [Fraction(i, 10) for i in range(10)]
    assert [read_frame_counter(frame) for frame in frames] == list(range(10))
    assert np.abs(frames[3].astype(int) - frames[6].astype(int)).mean() > 5, (
        "the shapes do not move"
    )
    with av.open(str(output)) as container:
        stream = container.streams.audio[0]
        assert stream.codec_context.name == "aac"
        left = np.concatenate([f.to_ndarray()[0] for f in container.decode(stream)])
    assert len(left) / 48000 == pytest.approx(1.0, abs=0.05)
    peak = np.fft.rfftfreq(len(left), 1 / 48000)[int(np.argmax(np.abs(np.fft.rfft(left))))]
    assert peak == pytest.approx(440, abs=3)  # the tone; the 1 kHz beeps are shorter
    assert "wrote" in capsys.readouterr().out


def test_sample_without_audio_and_with_bad_sizes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "clip.webm"
    assert (
        main(
            [
                "sample",
                str(output),
                "--seconds",
                "0.5",
                "--fps",
                "8",
                "--width",
                "64",
                "--height",
                "48",
                "--no-audio",
            ]
        )
        == 0
    )
    assert len(video_frames(output)[0]) == 4
    assert audio_codecs(output) == []
    assert main(["sample", str(tmp_path / "odd.mp4"), "--width", "95"]) == 2
    assert "--width 95 is out of range" in capsys.readouterr().err


# ---------------------------------------------------------------- export
def test_export_writes_a_folder_that_source_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from livediff.models.loading import ModelSpec, load_model

    folder = tmp_path / "tiny-model"
    assert main(["export", str(folder), *TINY]) == 0
    assert capsys.readouterr().out.strip() == str(folder)
    assert (folder / "model_index.json").is_file() and (
        folder / "vae_tiny" / "config.json"
    ).is_file()
    bundle = load_model(ModelSpec(preset="tiny", source=str(folder)), device="cpu", dtype="fp32")
    assert bundle.source == str(folder)
    assert main(["export", str(folder), *TINY]) == 2
    assert "not empty" in capsys.readouterr().err


class _EchoStream:
    """The Stream calls transform() makes, answering each frame with a grey image at once."""

    def __init__(self) -> None:
        self.bundle = SimpleNamespace(device=torch.device("cpu"))
        self.seen = 0

    def process(self, image: Any, *, tag: Any = None) -> list[Any]:
        from livediff.engine.frames import StreamOutput

        self.seen += 1
        return [StreamOutput(torch.full((8, 8, 3), 9, dtype=torch.uint8), self.seen - 1, tag=tag)]

    def flush(self) -> list[Any]:
        return []


class _Source:
    def __init__(self, items: list[Any], fail_after: int | None = None) -> None:
        self.items, self.fail_after = items, fail_after
        self.video = SimpleNamespace(expected_frames=len(items))
        self.path = Path("clip.mp4")

    def __iter__(self) -> Any:
        for i, item in enumerate(self.items):
            if self.fail_after is not None and i == self.fail_after:
                raise MediaError("clip.mp4: decoding failed after 3 video frames")
            yield item


class _Sink:
    def __init__(self, fail_at: int | None = None) -> None:
        self.written: list[Any] = []
        self.fail_at = fail_at

    def write(self, item: Any) -> None:
        if self.fail_at is not None and len(self.written) == self.fail_at:
            raise MediaError("out.mp4: the disk is full")
        self.written.append(item)


def _frames(n: int) -> list[Any]:
    from livediff.streams.media import MediaTime, VideoFrame

    return [
        VideoFrame(np.zeros((8, 8, 3), np.uint8), MediaTime(i, Fraction(1, 30)), i)
        for i in range(n)
    ]


def test_run_overlaps_decode_model_and_encode_and_keeps_the_order() -> None:
    from livediff.cmd_run import transform

    sink = _Sink()
    transform(_Source(_frames(40)), _EchoStream(), sink)  # type: ignore[arg-type]
    assert [item.time.pts for item in sink.written] == list(range(40))
    assert all(item.image.shape == (8, 8, 3) for item in sink.written)


@pytest.mark.parametrize(("source_fails", "sink_fails"), [(3, None), (None, 5)])
def test_run_ends_with_the_error_of_the_decoder_or_encoder_thread(
    source_fails: int | None, sink_fails: int | None
) -> None:
    from livediff.cmd_run import transform

    expected = "decoding failed" if source_fails is not None else "the disk is full"
    with pytest.raises(MediaError, match=expected):
        transform(_Source(_frames(200), source_fails), _EchoStream(), _Sink(sink_fails))  # type: ignore[arg-type]
    assert not [t for t in threading.enumerate() if t.name.startswith("livediff-")]

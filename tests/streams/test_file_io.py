"""FileSource and FileSink on real files that PyAV writes inside each test (no model involved)."""

from __future__ import annotations

import itertools
import logging
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest

from livediff.exceptions import MediaError
from livediff.streams.file_sink import (
    AudioAction,
    AudioMode,
    FileSink,
    output_format_for,
    plan_audio,
)
from livediff.streams.file_source import FileSource
from livediff.streams.media import AudioPacket, MediaTime, VideoFrame

TONE_HZ = 440.0


def write_clip(
    path: Path,
    *,
    frames: int = 12,
    fps: int = 15,
    size: tuple[int, int] = (64, 48),
    video_codec: str | None = "libx264",
    audio_codec: str | None = "aac",
    audio_rate: int = 48000,
) -> Path:
    """A real media file: frame i is a flat grey of level 10·i + 20, with a 440 Hz sine tone."""
    width, height = size
    with av.open(str(path), "w") as container:
        video: Any = None  # PyAV types a stream by its codec name only when that is a literal
        if video_codec:
            video = container.add_stream(video_codec, rate=fps)
            video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        audio: Any = container.add_stream(audio_codec, rate=audio_rate) if audio_codec else None
        if audio is not None:
            audio.layout = "mono"
        if video is not None:
            for i in range(frames):
                picture = av.VideoFrame.from_ndarray(
                    np.full((height, width, 3), 10 * i + 20, np.uint8), format="rgb24"
                )
                picture.pts, picture.time_base = i, Fraction(1, fps)
                container.mux(video.encode(picture))
            container.mux(video.encode(None))
        if audio is not None:
            total = audio_rate * frames // fps
            t = np.arange(total) / audio_rate
            samples = (0.3 * np.sin(2 * np.pi * TONE_HZ * t)).astype(np.float32)[None]
            tone = av.AudioFrame.from_ndarray(samples, format="flt", layout="mono")
            tone.sample_rate, tone.pts = audio_rate, 0
            container.mux(audio.encode(tone))
            container.mux(audio.encode(None))
    return path


def decoded_audio(path: Path) -> tuple[np.ndarray, int]:
    """All audio of ``path`` as mono float samples, and the sample rate."""
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        chunks = [
            frame.to_ndarray().astype(np.float64).reshape(-1, frame.samples).mean(axis=0)
            for frame in container.decode(stream)
        ]
        return np.concatenate(chunks), int(stream.codec_context.sample_rate)


def dominant_frequency(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[int(np.argmax(spectrum))])


def read_video(path: Path) -> list[VideoFrame]:
    with FileSource(path, read_audio=False) as source:
        return [item for item in source if isinstance(item, VideoFrame)]


# ---------------------------------------------------------------- source
def test_source_yields_decoded_frames_with_file_timestamps_and_audio_packets(
    tmp_path: Path,
) -> None:
    path = write_clip(tmp_path / "in.mp4", frames=12, fps=15)
    with FileSource(path) as source:
        items = list(source)
        assert (source.video.width, source.video.height) == (64, 48)
        assert source.video.frame_rate == 15
        assert source.video.frame_count == 12
        assert source.audio is not None and source.audio.codec == "aac"
    frames = [item for item in items if isinstance(item, VideoFrame)]
    packets = [item for item in items if isinstance(item, AudioPacket)]
    assert [f.index for f in frames] == list(range(12))
    assert all(f.image.shape == (48, 64, 3) and f.image.dtype == np.uint8 for f in frames)
    assert [f.time.pts * f.time.time_base for f in frames] == [Fraction(i, 15) for i in range(12)]
    assert [round(float(f.image.mean())) for f in frames] == pytest.approx(
        [10 * i + 20 for i in range(12)], abs=3
    )
    assert len(packets) >= 10 and all(p.packet.size > 0 for p in packets)


def test_source_can_skip_audio_yet_still_describes_it(tmp_path: Path) -> None:
    path = write_clip(tmp_path / "in.mp4")
    with FileSource(path, read_audio=False) as source:
        items = list(source)
        assert source.audio is not None and source.audio.sample_rate == 48000
    assert items and all(isinstance(item, VideoFrame) for item in items)


def test_source_is_read_once_and_closes_twice(tmp_path: Path) -> None:
    source = FileSource(write_clip(tmp_path / "in.mkv"))
    assert len(list(source)) > 0
    with pytest.raises(RuntimeError, match="read once"):
        iter(source)
    source.close()
    source.close()


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.mp4", None, "input file not found"),
        ("notes.mp4", b"this is a text file, not a video\n" * 20, "not a media file"),
        ("folder.mp4", "dir", "is a folder"),
        ("tone.m4a", "audio-only", "has no video stream"),
    ],
)
def test_source_refuses_bad_inputs_with_a_clear_media_error(
    tmp_path: Path, name: str, content: bytes | str | None, message: str
) -> None:
    path = tmp_path / name
    if content == "dir":
        path.mkdir()
    elif content == "audio-only":
        write_clip(path, video_codec=None)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    with pytest.raises(MediaError, match=message):
        FileSource(path)


# ---------------------------------------------------------------- sink: video
@pytest.mark.parametrize(
    ("extension", "codec", "exact_times"),
    [
        (".mp4", "h264", True),
        (".mov", "h264", True),
        (".mkv", "h264", False),
        (".webm", "vp8", False),
        (".y4m", "rawvideo", False),
    ],
)
def test_sink_writes_each_format_with_its_frames_and_timestamps(
    tmp_path: Path, extension: str, codec: str, exact_times: bool
) -> None:
    time_base = Fraction(1, 15360)  # an mp4-style tick; 1024 ticks per frame is 15 fps
    path = tmp_path / f"out{extension}"
    levels = [30 + 15 * i for i in range(12)]
    with FileSink(path, width=64, height=48, frame_rate=Fraction(15), time_base=time_base) as sink:
        for i, level in enumerate(levels):
            sink.write(
                VideoFrame(np.full((48, 64, 3), level, np.uint8), MediaTime(1024 * i, time_base), i)
            )
    assert sink.frames_written == 12
    with FileSource(path) as source:
        assert source.video.codec == codec
        assert source.video.frame_rate == 15
        # Counted (mp4, mov) or estimated from the duration (the others keep no count).
        assert source.video.expected_frames == 12
        assert source.audio is None
    frames = read_video(path)
    assert len(frames) == 12
    assert all(f.image.shape == (48, 64, 3) for f in frames)
    assert [float(f.image.mean()) for f in frames] == pytest.approx(levels, abs=3)
    times = [f.time.pts * f.time.time_base for f in frames]
    expected = [Fraction(i, 15) for i in range(12)]
    if exact_times:
        assert times == expected
    else:  # mkv/webm store milliseconds; y4m stores only the rate
        assert [float(t) for t in times] == pytest.approx([float(t) for t in expected], abs=1e-3)


def test_unknown_output_extension_is_a_media_error_that_lists_the_known_ones() -> None:
    with pytest.raises(MediaError, match=r"'\.avi' is not a known output format.*\.mp4"):
        output_format_for("out.avi")
    with pytest.raises(MediaError, match="no extension"):
        output_format_for("out")


@pytest.mark.parametrize(
    ("relative", "size", "message"),
    [
        ("missing/out.mp4", (64, 48), "No such file"),
        (".", (64, 48), "is a folder"),
        ("odd.mp4", (63, 48), "odd side"),
    ],
)
def test_sink_refuses_outputs_it_cannot_write(
    tmp_path: Path, relative: str, size: tuple[int, int], message: str
) -> None:
    target = tmp_path / relative if relative != "." else tmp_path
    output_format = output_format_for("x.mp4")
    with pytest.raises(MediaError, match=message):
        FileSink(
            target,
            width=size[0],
            height=size[1],
            frame_rate=Fraction(15),
            output_format=output_format,
        )


def test_sink_finishes_a_playable_file_when_the_writer_fails_and_closes_idempotently(
    tmp_path: Path,
) -> None:
    path = tmp_path / "partial.mp4"
    time_base = Fraction(1, 15)
    with (
        pytest.raises(RuntimeError, match="interrupted"),
        FileSink(path, width=64, height=48, frame_rate=Fraction(15)) as sink,
    ):
        for i in range(5):
            sink.write(VideoFrame(np.zeros((48, 64, 3), np.uint8), MediaTime(i, time_base), i))
        raise RuntimeError("interrupted")
    assert len(read_video(path)) == 5
    sink.close()  # a second close is a no-op
    with pytest.raises(MediaError, match="closed"):
        sink.write(VideoFrame(np.zeros((48, 64, 3), np.uint8), MediaTime(5, time_base), 5))


def test_sink_refuses_a_frame_of_the_wrong_size_and_moves_a_repeated_pts_later(
    tmp_path: Path,
) -> None:
    path = tmp_path / "out.mp4"
    time_base = Fraction(1, 15)
    with FileSink(path, width=64, height=48, frame_rate=Fraction(15)) as sink:
        with pytest.raises(MediaError, match="does not fit"):
            sink.write(VideoFrame(np.zeros((64, 64, 3), np.uint8), MediaTime(0, time_base), 0))
        for index, pts in enumerate((0, 1, 1, 2)):  # a broken input repeats a timestamp
            sink.write(
                VideoFrame(np.zeros((48, 64, 3), np.uint8), MediaTime(pts, time_base), index)
            )
    times = [f.time.seconds for f in read_video(path)]
    assert len(times) == 4
    assert all(a < b for a, b in itertools.pairwise(times))


# ---------------------------------------------------------------- audio plans
@pytest.mark.parametrize(
    ("input_name", "audio_codec", "output", "mode", "action", "summary"),
    [
        ("in.mp4", "aac", ".mp4", AudioMode.AUTO, AudioAction.COPY, "copied (aac)"),
        ("in.mp4", "aac", ".mkv", AudioMode.COPY, AudioAction.COPY, "copied (aac)"),
        ("in.mp4", "aac", ".webm", AudioMode.AUTO, AudioAction.ENCODE, "re-encoded to libopus"),
        ("in.webm", "libopus", ".webm", AudioMode.AUTO, AudioAction.COPY, "copied (opus)"),
        # FFmpeg's codec table says .mov takes FLAC; its muxer refuses. The plan must follow the muxer.
        ("in.mkv", "flac", ".mov", AudioMode.AUTO, AudioAction.ENCODE, "re-encoded to aac"),
        ("in.mkv", "pcm_s16le", ".mp4", AudioMode.DROP, AudioAction.NONE, "dropped"),
        ("in.mp4", "aac", ".y4m", AudioMode.AUTO, AudioAction.NONE, "hold no audio"),
    ],
)
def test_plan_audio_copies_when_the_container_accepts_the_codec(
    tmp_path: Path,
    input_name: str,
    audio_codec: str,
    output: str,
    mode: AudioMode,
    action: AudioAction,
    summary: str,
) -> None:
    video_codec = "libvpx" if input_name.endswith(".webm") else "libx264"
    path = write_clip(
        tmp_path / input_name, frames=2, video_codec=video_codec, audio_codec=audio_codec
    )
    with FileSource(path) as source:
        plan = plan_audio(output_format_for(f"out{output}"), source.audio_stream, mode)
    assert plan.action is action
    assert summary in plan.summary


def test_plan_audio_reports_no_audio_in_input(tmp_path: Path) -> None:
    with FileSource(write_clip(tmp_path / "in.mp4", audio_codec=None)) as source:
        plan = plan_audio(output_format_for("out.mp4"), source.audio_stream, AudioMode.COPY)
    assert plan.action is AudioAction.NONE and plan.summary == "none in input"


def test_plan_audio_copy_refuses_what_the_container_cannot_hold(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with FileSource(write_clip(tmp_path / "in.mp4")) as source:
        with pytest.raises(
            MediaError, match=r"\.webm files cannot hold aac audio; use --audio auto"
        ):
            plan_audio(output_format_for("out.webm"), source.audio_stream, AudioMode.COPY)
        with pytest.raises(MediaError, match=r"\.y4m files hold no audio; use --audio drop"):
            plan_audio(output_format_for("out.y4m"), source.audio_stream, AudioMode.COPY)
        with caplog.at_level(logging.WARNING):
            plan_audio(output_format_for("out.y4m"), source.audio_stream, AudioMode.AUTO)
    assert "hold no audio" in caplog.text


# ---------------------------------------------------------------- audio through the sink
def transcode(source_path: Path, output_path: Path, mode: AudioMode) -> str:
    """Copy ``source_path`` into ``output_path`` through FileSource → FileSink; returns the audio summary."""
    with FileSource(source_path) as source:
        plan = plan_audio(output_format_for(output_path), source.audio_stream, mode)
        with FileSink(
            output_path,
            width=source.video.width,
            height=source.video.height,
            frame_rate=source.video.frame_rate or Fraction(15),
            time_base=source.video.time_base,
            audio=plan,
        ) as sink:
            for item in source:
                sink.write(item)
    return plan.summary


def test_audio_copy_keeps_every_packet_byte_for_byte(tmp_path: Path) -> None:
    source_path = write_clip(tmp_path / "in.mp4", frames=15)
    assert transcode(source_path, tmp_path / "out.mkv", AudioMode.AUTO) == "copied (aac)"

    def packets(path: Path) -> list[bytes]:
        with av.open(str(path)) as container:
            return [bytes(p) for p in container.demux(container.streams.audio[0]) if p.size]

    assert packets(tmp_path / "out.mkv") == packets(source_path)


def test_audio_reencode_keeps_the_tone_and_its_length(tmp_path: Path) -> None:
    source_path = write_clip(tmp_path / "in.mp4", frames=15, audio_rate=44100)
    summary = transcode(source_path, tmp_path / "out.webm", AudioMode.AUTO)
    assert summary.startswith("re-encoded to libopus")
    with av.open(str(tmp_path / "out.webm")) as container:
        assert container.streams.audio[0].codec_context.name == "opus"
    original, original_rate = decoded_audio(source_path)
    encoded, rate = decoded_audio(tmp_path / "out.webm")
    assert rate == 48000  # Opus has no 44.1 kHz: the plan resamples
    assert len(encoded) / rate == pytest.approx(len(original) / original_rate, abs=0.03)
    assert dominant_frequency(encoded, rate) == pytest.approx(TONE_HZ, abs=3)


def test_source_hands_out_yuv420p_planes_untouched_when_asked(tmp_path: Path) -> None:
    from livediff.engine.frames import YuvFrame

    clip = write_clip(tmp_path / "in.mp4", frames=4, size=(64, 48), audio_codec=None)
    with av.open(str(clip)) as container:
        decoded = [f.to_ndarray() for f in container.decode(video=0)]  # yuv420p, [H*3/2, W]
    with FileSource(clip, yuv=True) as source:
        frames = [item for item in source if isinstance(item, VideoFrame)]
    assert len(frames) == 4
    for frame, planes in zip(frames, decoded, strict=True):
        assert isinstance(frame.image, YuvFrame) and frame.image.shape == (48, 64)
        packed = np.concatenate([p.numpy().ravel() for p in frame.image.planes()])
        assert np.array_equal(packed, planes.ravel())  # the decoder's bytes, not a conversion


def test_sink_writes_packed_i420_frames_as_they_are(tmp_path: Path) -> None:
    width, height = 64, 48
    out = tmp_path / "out.y4m"
    packed = [np.full(width * height * 3 // 2, 30 + 20 * i, np.uint8) for i in range(3)]
    sink = FileSink(
        out,
        width=width,
        height=height,
        frame_rate=Fraction(15),
        time_base=Fraction(1, 15),
        audio=plan_audio(output_format_for(out), None, AudioMode.DROP),
        output_format=output_format_for(out),
    )
    with sink:
        for i, image in enumerate(packed):
            sink.write(VideoFrame(image, MediaTime(i, Fraction(1, 15)), i))
    with av.open(str(out)) as container:
        written = [f.to_ndarray().ravel() for f in container.decode(video=0)]
    assert all(np.array_equal(a, b) for a, b in zip(written, packed, strict=True))

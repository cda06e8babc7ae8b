"""``livediff bench --suite file``: ``livediff run``'s file job end to end, file in → file out.

    python -m livediff.bench.file_job --model sd-turbo --backend compile --batch 1,8 \\
        --seconds 60 --out bench/results/file-h200.jsonl

The input is made here with PyAV: a synthetic clip (a smooth random scene panning four pixels a
frame, and a 440 Hz AAC tone), H.264 at ``--resolution`` and ``--fps``: 1920x1080, 30 fps,
60 s by default on CUDA, 640x360 for 2 s on CPU. ``--input FILE`` uses a file instead. For
each ``--batch`` value the suite builds the job ``livediff run`` builds
(:func:`~livediff.engine.interleaved.file_job`: one stream, or N streams batched), warms it up
on a short clip of the same size (compiling and capturing happen there, reported as
``setup_s``), then runs :func:`~livediff.cmd_run.transform` over the input into an .mp4 at the
model size (512² for sd-turbo) and checks that it holds as many frames as the input.

One record per batch: ``fps`` is frames written per second of wall time, end to end (decode,
model and encode overlapping, as ``livediff run`` runs them); ``seconds`` that wall time;
``decode_s``, ``model_s``, ``encode_s`` and ``gpu_s`` each thread's busy time
(:class:`~livediff.cmd_run.TransformStats`); ``ms_median``/``ms_p99`` the interval between
consecutive frames written (batches arrive in bursts: the p99 is about a batch's wait).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch

from livediff.bench.records import (
    emit,
    environment,
    gpu_memory_peak_mb,
    percentile,
    record_sinks,
    reset_memory,
)
from livediff.exceptions import UsageError
from livediff.streams.file_sink import FileSink
from livediff.streams.media import VideoFrame

AUDIO_RATE = 48000
PAN = 4  # pixels per frame


def parse_resolution(text: str) -> tuple[int, int]:
    """``1920x1080`` or ``1080p`` (16:9) → (width, height), both even."""
    text = text.strip().lower()
    try:
        if text.endswith("p"):
            height = int(text[:-1])
            width = round(height * 16 / 9 / 2) * 2
        else:
            w, h = text.split("x")
            width, height = int(w), int(h)
    except ValueError:
        raise UsageError(f"--resolution {text!r}: expected WIDTHxHEIGHT or 1080p") from None
    if width < 16 or height < 16 or width % 2 or height % 2:
        raise UsageError(f"--resolution {text}: expected even sides of 16 pixels or more")
    return width, height


def batch_list(text: str) -> list[int | None]:
    """``1,8,auto`` → ``[1, 8, None]`` (``None``: auto)."""
    values: list[int | None] = []
    for part in (p.strip().lower() for p in text.split(",") if p.strip()):
        if part == "auto":
            values.append(None)
            continue
        try:
            values.append(int(part))
        except ValueError:
            raise UsageError(f"--batch: {part!r} is not a number or auto") from None
    return values


def write_clip(
    path: Path, width: int, height: int, *, seconds: float, fps: int, audio: bool = True
) -> int:
    """The synthetic H.264 clip of the module docstring; returns its frame count."""
    frames = max(1, round(seconds * fps))
    rng = np.random.default_rng(0)
    cell = 16  # a smooth scene: random cells, upscaled, twice the width to pan over
    coarse = rng.integers(40, 216, (height // cell + 1, 2 * width // cell + 1), dtype=np.uint8)
    luma = np.kron(coarse, np.ones((cell, cell), np.uint8))[:height, : 2 * width]
    chroma = np.kron(coarse, np.ones((cell // 2, cell // 2), np.uint8))[: height // 2, :width]
    with av.open(str(path), "w") as container:
        video: Any = container.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.options = {"preset": "veryfast", "crf": "23"}
        tone: Any = container.add_stream("aac", rate=AUDIO_RATE) if audio else None
        if tone is not None:
            tone.layout = "mono"
        for i in range(frames):
            x = PAN * i % width  # the textures repeat after ``width`` pixels
            u = chroma[:, x // 2 : x // 2 + width // 2]
            planes = (luma[:, x : x + width], u, 255 - u)  # yuv420p: Y, then U, then V
            picture = np.concatenate([plane.ravel() for plane in planes]).reshape(-1, width)
            frame = av.VideoFrame.from_ndarray(picture, format="yuv420p")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
        if tone is not None:
            _write_tone(container, tone, frames / fps)
    return frames


def _write_tone(container: Any, stream: Any, seconds: float) -> None:
    total, chunk = round(seconds * AUDIO_RATE), AUDIO_RATE
    for start in range(0, total, chunk):
        t = np.arange(start, min(start + chunk, total)) / AUDIO_RATE
        samples = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]
        frame = av.AudioFrame.from_ndarray(samples, format="flt", layout="mono")
        frame.sample_rate, frame.pts = AUDIO_RATE, start
        container.mux(stream.encode(frame))
    container.mux(stream.encode(None))


class _TimedSink(FileSink):
    """A FileSink that notes when each video frame was written (for the intervals)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.times: list[float] = []

    def write(self, item: Any) -> None:
        super().write(item)
        if isinstance(item, VideoFrame):
            self.times.append(time.perf_counter())


def run_job(job: Any, clip: Path, output: Path, cuda: bool) -> tuple[Any, _TimedSink]:
    """``livediff run``'s file job over ``clip`` into ``output`` with ``job`` (a built model side)."""
    from livediff.cmd_run import queue_depth, transform
    from livediff.streams.file_sink import AudioMode, output_format_for, plan_audio
    from livediff.streams.file_source import FileSource

    streams = len(getattr(job, "streams", (job,)))
    with FileSource(clip, yuv=True, pinned=cuda) as source:
        output_format = output_format_for(output)
        sink = _TimedSink(
            output,
            width=job.width,
            height=job.height,
            frame_rate=source.video.frame_rate or Fraction(30),
            time_base=source.video.time_base,
            audio=plan_audio(output_format, source.audio_stream, AudioMode.AUTO),
            output_format=output_format,
        )
        with sink:
            stats = transform(source, job, sink, depth=queue_depth(streams))
    return stats, sink


def count_frames(path: Path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.demux(video=0) if _.size)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="livediff bench --suite file", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--model", default="sd-turbo", help="preset (default: sd-turbo)")
    parser.add_argument("--weights", default="random", choices=("random", "pretrained"))
    parser.add_argument("--source", default=None, help="HF id, folder or file of real weights")
    parser.add_argument("--backend", default="auto", choices=("auto", "eager", "compile"))
    parser.add_argument("--device", default=None, help="default: cuda if available")
    parser.add_argument("--dtype", default=None, help="default: fp16 on CUDA, fp32 on CPU")
    parser.add_argument("--batch", type=batch_list, default="1,8", help="N,… or auto (1,8)")
    parser.add_argument("--seconds", type=float, default=None, help="clip length (60; CPU: 2)")
    parser.add_argument("--fps", type=int, default=30, help="clip frame rate (default: 30)")
    parser.add_argument(
        "--resolution", type=parse_resolution, default=None, help="clip size (1080p; CPU: 360p)"
    )
    parser.add_argument("--no-audio", action="store_true", help="a clip without its tone")
    parser.add_argument("--input", type=Path, default=None, help="a file instead of the clip")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up clip seconds (1)")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--size", type=int, default=None, help="output side (the model's)")
    parser.add_argument("--prompt", default="a watercolor painting of a city")
    parser.add_argument("--out", type=Path, default=None, help="append the records here too")
    args = parser.parse_args(argv)
    if args.warmup <= 0:
        parser.error("--warmup must be above 0 (the first frames compile and capture)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    from livediff.cli_options import load_for_backend
    from livediff.engine.config import GenerationParams, StreamConfig
    from livediff.engine.interleaved import file_job
    from livediff.models.loading import ModelSpec

    args = parse_args(argv)
    cuda = torch.cuda.is_available() and (args.device or "cuda").startswith("cuda")
    seconds = args.seconds if args.seconds is not None else (60.0 if cuda else 2.0)
    width, height = args.resolution or ((1920, 1080) if cuda else (640, 360))
    spec = ModelSpec(preset=args.model, weights=args.weights, source=args.source)
    bundle, backend = load_for_backend(spec, args)
    config = StreamConfig(width=args.size, height=args.size)
    params = GenerationParams.for_preset(bundle.preset).updated(
        prompt=args.prompt, steps=args.steps
    )
    with tempfile.TemporaryDirectory(prefix="livediff-file-bench-") as folder:
        work = Path(folder)
        warm = work / "warmup.mp4"
        write_clip(warm, width, height, seconds=args.warmup, fps=args.fps, audio=False)
        clip = args.input or work / "input.mp4"
        if args.input is None:
            write_clip(clip, width, height, seconds=seconds, fps=args.fps, audio=not args.no_audio)
        inputs = count_frames(clip)
        with av.open(str(clip)) as container:
            stream = container.streams.video[0]
            rate = float(stream.average_rate or args.fps)
            info = stream.codec_context
            described = f"{info.width}x{info.height} {info.name} {inputs / rate:g} s"
        base = {
            "system": "livediff",
            "suite": "file",
            "model": args.model,
            "weights": args.weights,
            "steps": args.steps,
            "mode": "img2img",
            "rcfg": config.rcfg.value,
            "sessions": 1,
            "backend": backend.value,
            "dtype": str(bundle.dtype).removeprefix("torch."),
            "input": described if args.input is None else f"{args.input.name} ({described})",
            "input_frames": inputs,
        }
        with record_sinks(args.out) as sinks:
            for asked in args.batch:
                reset_memory(bundle.device)
                start = time.perf_counter()
                job, choice = file_job(
                    bundle, backend, config, params, asked, session_id="bench", show_progress=False
                )
                run_job(job, warm, work / "warmup-out.mp4", cuda)
                setup_s = time.perf_counter() - start
                output = work / f"out-{choice.streams}.mp4"
                stats, sink = run_job(job, clip, output, cuda)
                intervals = np.diff(np.asarray(sink.times)) * 1000.0
                record = {
                    **base,
                    "width": job.width,
                    "height": job.height,
                    "batch": choice.streams,
                    "batch_asked": "auto" if asked is None else asked,
                    "batch_reason": choice.reason,
                    "buckets": list(choice.buckets),
                    "frames": stats.frames,
                    "output_frames": count_frames(output),
                    "fps": round(stats.fps, 2),
                    "seconds": round(stats.seconds, 3),
                    "ms_median": round(percentile(list(intervals), 50), 3),
                    "ms_p99": round(percentile(list(intervals), 99), 3),
                    "decode_s": round(stats.decode_s, 3),
                    "model_s": round(stats.model_s, 3),
                    "encode_s": round(stats.encode_s, 3),
                    "gpu_s": None if stats.gpu_s is None else round(stats.gpu_s, 3),
                    "setup_s": round(setup_s, 3),
                    "gpu_mem_peak_mb": gpu_memory_peak_mb(bundle.device),
                    **environment(bundle.device),
                }
                emit(record, sinks)
                del job
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Single-stream benchmarks: the ``single`` and ``stages`` suites of ``livediff bench``.

``single``: frames per second of one stream, uint8 frame in → uint8 frame out, both on the
device, one sync per frame (as the peers were measured). Warm-up (compile, autotune, graph
capture) is timed separately and shown with a progress bar.

``stages``: milliseconds per stage (upload, pre, encode, unet, decode, post, download) with
device events, on the same networks, not graphed (a graph hides stage boundaries); then the
host work of each transport around them, old path and new, with its host copies per frame
(:mod:`livediff.bench.host_path`; records with ``side: "host"``).

Run ``python -m livediff.bench.single --help``.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from livediff.bench.plots import draw_or_explain, replot
from livediff.bench.records import emit, environment, gpu_memory_peak_mb, record_sinks, summarize
from livediff.engine.backend_fit import make_stream
from livediff.engine.config import GenerationMode, RCFGMode, StreamConfig
from livediff.engine.frames import fit_crop
from livediff.kernels.postprocess import model_output_to_rgb
from livediff.kernels.preprocess import rgb_to_model_input
from livediff.models.backends import Backend, prepare_backend
from livediff.models.bundle import ModelBundle
from livediff.models.graphed import GraphedBundle
from livediff.models.loading import ModelSpec, load_model
from livediff.models.recipe import Recipe
from livediff.models.spec import Precision
from livediff.settings.flags import add_setting_flag


@dataclass(frozen=True)
class Case:
    steps: int = 1
    rcfg: RCFGMode = RCFGMode.NONE
    mode: GenerationMode = GenerationMode.IMG2IMG
    size: int = 512


QUICK = (
    Case(1),
    Case(2, RCFGMode.SELF),
    Case(1, mode=GenerationMode.TXT2IMG),
)
FULL = tuple(
    Case(steps, rcfg, mode, size)
    for size in (512, 768)
    for mode in GenerationMode
    for steps in (1, 2, 4)
    for rcfg in RCFGMode
    if not (mode is GenerationMode.TXT2IMG and rcfg is not RCFGMode.NONE)
)


def _frames(size: int, count: int, device: torch.device) -> list[torch.Tensor]:
    generator = torch.Generator(device="cpu").manual_seed(0)
    return [
        torch.randint(0, 256, (size, size, 3), generator=generator, dtype=torch.uint8).to(device)
        for _ in range(count)
    ]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_single(
    bundle: ModelBundle, backend: Backend, case: Case, frames: int, warmup: int
) -> dict[str, Any]:
    device = bundle.device
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    config = StreamConfig(width=case.size, height=case.size, rcfg=case.rcfg, mode=case.mode)
    stream = make_stream(
        bundle,
        backend,
        config,
        prompt="a photo of a cat",
        steps=case.steps,
        strength=0.5,
        guidance_scale=1.2,
    )
    inputs = _frames(case.size, 8, device)
    txt2img = case.mode is GenerationMode.TXT2IMG
    started = time.perf_counter()
    label = f"{bundle.preset.name} {backend.value} {case.mode.value} {case.steps}-step rcfg={case.rcfg.value} {case.size}px"
    for i in tqdm(range(warmup), desc=f"warm-up {label}", leave=False):
        stream.process(None if txt2img else inputs[i % len(inputs)])
    _sync(device)
    warmup_s = time.perf_counter() - started
    times = []
    for i in range(frames):
        t0 = time.perf_counter()
        stream.process(None if txt2img else inputs[i % len(inputs)])
        _sync(device)
        times.append((time.perf_counter() - t0) * 1000.0)
    record = {
        "system": "livediff",
        "suite": "single",
        "backend": backend.value,
        "model": bundle.preset.name,
        "weights": bundle.weights.value,
        "width": case.size,
        "height": case.size,
        "steps": case.steps,
        "mode": case.mode.value,
        "rcfg": case.rcfg.value,
        "sessions": 1,
        **summarize(times),
        "warmup_s": round(warmup_s, 2),
        "gpu_mem_peak_mb": gpu_memory_peak_mb(device),
        "dtype": str(bundle.dtype).removeprefix("torch."),
        "precision": bundle.precision.value,
        **environment(device),
    }
    del stream
    return record


class _Events:
    """Device (or host) timestamps between stages."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, Any]] = []

    def mark(self, name: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((name, event))
        else:
            self.marks.append((name, time.perf_counter()))

    def durations(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
        out = {}
        for (_, start), (name, end) in itertools.pairwise(self.marks):
            out[name] = start.elapsed_time(end) if self.cuda else (end - start) * 1000.0
        return out


def run_stages(
    bundle: ModelBundle, backend: Backend, case: Case, frames: int, warmup: int
) -> dict[str, Any]:
    device = bundle.device
    config = StreamConfig(width=case.size, height=case.size, rcfg=case.rcfg)
    from livediff.engine.stream import Stream

    stream = Stream(bundle, config, prompt="a photo of a cat", steps=case.steps, strength=0.5)
    if (
        backend is Backend.COMPILE
    ):  # time graph replays: unGraphed compiled code is launch-bound at batch 1
        graphed = GraphedBundle.wrap(bundle)
        graphed.setup_graphs(
            unet_buckets=(stream.batch.unet_rows,),
            frame_buckets=(1,),
            latent_size=stream.latent_size,
        )
        graphed.warm_up()
        bundle = graphed
    host_frames = [
        f.cpu().pin_memory() if device.type == "cuda" else f.cpu()
        for f in _frames(case.size, 8, torch.device("cpu"))
    ]
    crop = fit_crop(case.size, case.size, case.size, case.size, config.fit)
    per_stage: dict[str, list[float]] = {}
    for i in range(warmup + frames):
        ev = _Events(device)
        ev.mark("start")
        frame = host_frames[i % len(host_frames)].to(device, non_blocking=True).unsqueeze(0)
        ev.mark("upload")
        pixels = rgb_to_model_input(frame, case.size, case.size, crop, bundle.dtype)
        ev.mark("pre")
        x0 = bundle.encode(pixels)
        ev.mark("encode")
        eps = bundle.predict_noise(stream.batch.begin(x0))
        x0_hat = stream.batch.finish(eps)
        ev.mark("unet")
        images = bundle.decode(x0_hat)
        ev.mark("decode")
        rgb = model_output_to_rgb(images)
        ev.mark("post")
        rgb.cpu()
        ev.mark("download")
        if i >= warmup:
            for name, ms in ev.durations().items():
                per_stage.setdefault(name, []).append(ms)
    stages = {name: summarize(values)["ms_median"] for name, values in per_stage.items()}
    total = [sum(values) for values in zip(*per_stage.values(), strict=True)]
    return {
        "system": "livediff",
        "suite": "stages",
        "backend": backend.value,
        "model": bundle.preset.name,
        "weights": bundle.weights.value,
        "width": case.size,
        "height": case.size,
        "steps": case.steps,
        "mode": case.mode.value,
        "rcfg": case.rcfg.value,
        "sessions": 1,
        **summarize(total),
        "stages_ms_median": stages,
        "gpu_mem_peak_mb": gpu_memory_peak_mb(device),
        **environment(device),
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="livediff bench --suite single|stages", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--suite", choices=("single", "stages"), default="single")
    parser.add_argument("--model", default="sd-turbo")
    parser.add_argument("--weights", default="random")
    parser.add_argument(
        "--backend",
        action="append",
        choices=[b.value for b in Backend],
        help="repeatable; default: compile on CUDA, eager on CPU",
    )
    parser.add_argument("--matrix", choices=("quick", "full", "headline"), default="quick")
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--out", type=Path, help="append JSON lines to this file as well as stdout")
    parser.add_argument("--fuse-qkv", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--coordinate-descent", action="store_true")
    parser.add_argument("--freezing", action="store_true")
    parser.add_argument(
        "--sdpa-backend", default="auto", choices=("auto", "flash", "cudnn", "efficient")
    )
    parser.add_argument(
        "--compile-mode", default="default", choices=("default", "max-autotune-no-cudagraphs")
    )
    parser.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=True)
    add_setting_flag(parser, ModelSpec, "precision", flag="--precision")
    parser.add_argument("--plot", type=Path, help="PNG of fps and latency (stages: ms per stage)")
    parser.add_argument("--replot", type=Path, help="only draw --plot from these JSON lines")
    args = parser.parse_args(argv)
    args.precision = Precision(args.precision)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot:
        return replot(args.replot, args.plot)
    cases = {"quick": QUICK, "full": FULL, "headline": (Case(1),)}[args.matrix]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backends = [
        Backend(b) for b in (args.backend or [("compile" if device.type == "cuda" else "eager")])
    ]
    records: list[dict[str, Any]] = []
    with record_sinks(args.out) as outputs:
        for backend in backends:
            spec = ModelSpec(preset=args.model, weights=args.weights, precision=args.precision)
            bundle = load_model(spec, device=device, dtype=args.dtype)
            recipe = Recipe(
                fuse_qkv=args.fuse_qkv,
                channels_last=args.channels_last,
                coordinate_descent_tuning=args.coordinate_descent,
                freezing=args.freezing,
                cudnn_benchmark=args.cudnn_benchmark,
                sdpa_backend=args.sdpa_backend,
                compile_mode=args.compile_mode,
                precision=args.precision,
            )
            bundle = prepare_backend(bundle, backend, recipe)
            runner = run_single if args.suite == "single" else run_stages
            for case in cases:
                if args.suite == "stages" and case.mode is GenerationMode.TXT2IMG:
                    continue
                record = runner(bundle, backend, case, args.frames, args.warmup)
                if backend is Backend.COMPILE and args.suite == "single":
                    record["recipe"] = recipe.label
                emit(record, outputs)
                records.append(record)
            if args.suite == "stages":  # the host work around those stages, once per run
                for record in host_records(bundle, args.frames, args.warmup):
                    emit(record, outputs)
                    records.append(record)
            del bundle
    draw_or_explain(records, args.plot)
    return 0


def host_records(bundle: ModelBundle, frames: int, warmup: int) -> list[dict[str, Any]]:
    """:mod:`livediff.bench.host_path`'s records, with the fields every record carries."""
    from livediff.bench.host_path import OUTPUT_SIZE, run_host_stages

    common = {
        "system": "livediff",
        "model": bundle.preset.name,
        "weights": bundle.weights.value,
        "height": OUTPUT_SIZE[0],
        "width": OUTPUT_SIZE[1],
        "steps": 1,
        "mode": "img2img",
        "rcfg": "none",
        "sessions": 1,
    }
    return [{**common, **record} for record in run_host_stages(frames, warmup)]


if __name__ == "__main__":
    raise SystemExit(main())

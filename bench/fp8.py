"""``livediff bench --suite fp8``: what ``--precision fp8`` does to the UNet's time, and how far
its output drifts from fp16's.

    livediff bench --suite fp8 --out bench/results/fp8-h200.jsonl

Per ``--precisions`` case — ``fp16`` and ``bf16`` (every layer in that dtype), ``fp8`` (the
transformer linears as FP8 GEMMs in an fp16 model) and ``fp8-bf16`` (the same in a bf16
model); fp16 always runs first, as the reference — the sd-turbo architecture with random
weights (one seed for all), 512², 1 step img2img, is loaded in that dtype and made ready as the
multi-session runtime makes it (:func:`~livediff.models.backends.runtime_bundle`: the compile
recipe with that precision, and CUDA graphs of the UNet, VAE encode and VAE decode at batch
1 and each of ``--unet-batches``). One JSON line per case and UNet batch adds:

- ``unet_batch`` and ``ms_median``/``ms_p99``: one UNet graph replay of that many rows (the last
  seeded frame's row repeated: FP8's GEMMs pay off at large M, which many sessions' rows give),
  device time by CUDA events, over ``--iterations`` calls after ``--warmup``; ``ms_per_row``;
  ``frame_ms_median``/``frame_ms_p99`` (and ``fps``):
  a whole frame (preprocess, encode, UNet, scheduler step, decode), one sync per frame;
- drift against fp16 on a fixed, seeded set of ``--frames`` frames: ``unet_rel_l2`` =
  ‖ε − ε_fp16‖ / ‖ε_fp16‖ over the set, the UNet run on fp16's own UNet inputs (cast), so only
  the UNet differs; ``psnr_db``: the decoded frames of the precision's whole path against
  fp16's, pixels in [0, 1] (fp16's own record: 0 and ``null``);
- ``layers_fp8``/``layers_kept`` (:class:`~livediff.models.fp8.Fp8Report`), ``fp8_weight_mib``
  (their FP8 weights and scales), ``compile_s`` (compile + capture), ``recipe``, ``emulated``.

Random weights say how the arithmetic differs, not how pictures look: trained weights have
other value ranges (the outliers per-row scales are for), which is why fp8 stays opt-in.
On CPU (CI: ``--model tiny --size 64``) everything runs eager and fp8's GEMMs run the float32
reference (:attr:`~livediff.models.fp8.Fp8Compute.REFERENCE`): ``emulated: true``, and the
times are not worth reading.
"""

from __future__ import annotations

import argparse
import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from livediff.bench.records import (
    choice_list,
    emit,
    environment,
    gpu_memory_peak_mb,
    record_sinks,
    reset_memory,
    summarize,
)
from livediff.engine.config import StreamConfig
from livediff.engine.frames import FitMode, fit_crop
from livediff.engine.stream import Stream
from livediff.kernels.preprocess import rgb_to_model_input
from livediff.models.backends import Backend, default_backend, prepare_backend, runtime_bundle
from livediff.models.bundle import ModelBundle
from livediff.models.fp8 import Fp8Compute, fp8_report, install_fp8
from livediff.models.loading import ModelSpec, load_model
from livediff.models.presets import get_preset
from livediff.models.recipe import Recipe
from livediff.models.spec import Precision
from livediff.models.unet_batch import UNetBatch

PROMPT = "a photo of a cat"


@dataclass(frozen=True)
class Case:
    name: str
    dtype: torch.dtype
    precision: Precision


CASES = {
    case.name: case
    for case in (
        Case("fp16", torch.float16, Precision.NATIVE),
        Case("bf16", torch.bfloat16, Precision.NATIVE),
        Case("fp8", torch.float16, Precision.FP8),
        Case("fp8-bf16", torch.bfloat16, Precision.FP8),
    )
}
REFERENCE = "fp16"


@dataclass(frozen=True)
class Outputs:
    """One case's answers on the frame set, on the host (graph outputs are overwritten)."""

    batches: list[UNetBatch]  # the UNet inputs of the case's own path
    eps: list[torch.Tensor]  # the UNet output on the reference's inputs
    images: list[torch.Tensor]  # the decoded frames of the case's own path


@dataclass(frozen=True)
class Ready:
    bundle: ModelBundle  # what runs: graphed on CUDA with the compile backend
    plain: ModelBundle  # the bundle the stream is built on
    compile_s: float | None
    emulated: bool
    recipe: str


def seeded_frames(size: int, count: int, device: torch.device) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    shape = (1, size, size, 3)
    return [
        torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8).to(device)
        for _ in range(count)
    ]


def make_ready(args: argparse.Namespace, case: Case, device: torch.device) -> Ready:
    spec = ModelSpec(preset=args.model, weights=args.weights, seed=args.seed)
    bundle = load_model(spec, device=device, dtype=case.dtype)
    fp8 = case.precision is Precision.FP8
    emulated = fp8 and device.type != "cuda"
    recipe = Recipe(precision=Precision.NATIVE if emulated else case.precision)
    bundle = prepare_backend(bundle, args.backend, recipe)
    if emulated:  # the recipe refuses fp8 off CUDA: the same layers, the float32 GEMM
        install_fp8(bundle.unet, compute=Fp8Compute.REFERENCE)
        bundle.precision = Precision.FP8
    latent = (args.size // bundle.vae_scale_factor,) * 2
    buckets = tuple(sorted({1, *args.unet_batches}))
    ready = runtime_bundle(
        bundle,
        args.backend,
        latent_size=latent,
        buckets=buckets,
        show_progress=False,
        recipe=recipe,
    )
    report = getattr(ready, "compile_report", None)
    label = recipe.label if args.backend is Backend.COMPILE else "eager"
    seconds = round(report.seconds, 1) if report is not None else None
    return Ready(ready, bundle, seconds, emulated, label + ("+fp8-emulated" if emulated else ""))


def _host(tensor: torch.Tensor) -> torch.Tensor:
    """A host copy: floating tensors in float32, others (timesteps) as they are."""
    dtype = torch.float32 if tensor.is_floating_point() else tensor.dtype
    return tensor.detach().to("cpu", dtype, copy=True)


def _on(batch: UNetBatch, bundle: ModelBundle) -> UNetBatch:
    """``batch`` on ``bundle``'s device, its floating tensors in ``bundle``'s dtype."""
    return batch.map_rows(
        lambda t: t.to(bundle.device, bundle.dtype if t.is_floating_point() else t.dtype)
    )


class FramePath:
    """One frame through the case's whole path: preprocess, encode, UNet, step, decode."""

    def __init__(self, ready: Ready, size: int) -> None:
        self.bundle = ready.bundle
        config = StreamConfig(width=size, height=size)
        self.stream = Stream(ready.plain, config, prompt=PROMPT, steps=1, strength=0.5)
        self.size = size
        self.crop = fit_crop(size, size, size, size, FitMode.CROP)

    def __call__(
        self, frame: torch.Tensor, *, keep: bool = False
    ) -> tuple[torch.Tensor, tuple[UNetBatch, torch.Tensor] | None]:
        """The decoded frame, and with ``keep`` the UNet's inputs and output (host copies)."""
        pixels = rgb_to_model_input(frame, self.size, self.size, self.crop, self.bundle.dtype)
        batch = self.stream.batch.begin(self.bundle.encode(pixels))
        eps = self.bundle.predict_noise(batch)
        kept = (batch.map_rows(_host), _host(eps)) if keep else None
        return self.bundle.decode(self.stream.batch.finish(eps)), kept


def answers(
    ready: Ready, run: FramePath, frames: list[torch.Tensor], reference: Outputs | None
) -> Outputs:
    batches, eps, images = [], [], []
    with torch.inference_mode():
        for index, frame in enumerate(frames):
            image, kept = run(frame, keep=True)
            assert kept is not None
            images.append(_host(image))
            batches.append(kept[0])
            if reference is None:  # the reference: its own inputs are the inputs
                eps.append(kept[1])
            else:
                given = _on(reference.batches[index], ready.bundle)
                eps.append(_host(ready.bundle.predict_noise(given)))
    return Outputs(batches, eps, images)


def rel_l2(values: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    error = sum(
        float((v - r).double().pow(2).sum()) for v, r in zip(values, reference, strict=True)
    )
    norm = sum(float(r.double().pow(2).sum()) for r in reference)
    return math.sqrt(error / norm)


def psnr_db(images: list[torch.Tensor], reference: list[torch.Tensor]) -> float | None:
    """PSNR of decoded frames in [-1, 1], read as pixels in [0, 1]; ``None``: identical."""

    def pixels(x: torch.Tensor) -> torch.Tensor:
        return (x.double().clamp(-1, 1) + 1) / 2

    squared = [(pixels(a) - pixels(b)).pow(2) for a, b in zip(images, reference, strict=True)]
    mse = float(torch.cat([s.flatten() for s in squared]).mean())
    return None if mse == 0 else round(10 * math.log10(1 / mse), 3)


def timed(
    call: Callable[[], Any], device: torch.device, iterations: int, warmup: int
) -> list[float]:
    """Milliseconds per call: device time by CUDA events on CUDA, wall time elsewhere."""
    with torch.inference_mode():
        for _ in range(warmup):
            call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times = []
        for _ in range(iterations):
            if device.type == "cuda":
                start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                start.record()
                call()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                began = time.perf_counter()
                call()
                times.append((time.perf_counter() - began) * 1000.0)
    return times


def static_batch(bundle: ModelBundle, batch: UNetBatch) -> UNetBatch:
    """``batch`` written into the UNet graph's own input buffers (a replay copies nothing)."""
    named = dict(batch.tensors())
    buffers = bundle.input_buffers("unet", batch.rows, named)
    if buffers is None:
        return batch
    for name, tensor in named.items():
        buffers[name].copy_(tensor)
    return UNetBatch(**buffers)


def frame_times(
    run: FramePath, frames: list[torch.Tensor], args: argparse.Namespace
) -> list[float]:
    device = run.bundle.device
    times = []
    with torch.inference_mode():
        for i in range(args.warmup + args.iterations):
            began = time.perf_counter()
            run(frames[i % len(frames)])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= args.warmup:
                times.append((time.perf_counter() - began) * 1000.0)
    return times


def repeated(batch: UNetBatch, rows: int) -> UNetBatch:
    """``batch`` (one row) as ``rows`` copies of that row."""
    return batch.map_rows(lambda t: t.repeat(rows, *[1] * (t.dim() - 1)))


def measure(
    args: argparse.Namespace, case: Case, device: torch.device, reference: Outputs | None
) -> tuple[list[dict[str, Any]], Outputs]:
    reset_memory(device)
    ready = make_ready(args, case, device)
    run = FramePath(ready, args.size)
    frames = seeded_frames(args.size, args.frames, device)
    outputs = answers(ready, run, frames, reference)
    frame = summarize(frame_times(run, frames, args))
    last = _on(outputs.batches[-1], ready.bundle)
    unets = {}
    for rows in args.unet_batches:
        call = functools.partial(
            ready.bundle.predict_noise, static_batch(ready.bundle, repeated(last, rows))
        )
        unets[rows] = summarize(timed(call, device, args.iterations, args.warmup))
    report = fp8_report(ready.bundle.unet)
    base = reference or outputs
    record = {
        "system": "livediff",
        "suite": "fp8",
        "model": args.model,
        "weights": args.weights,
        "width": args.size,
        "height": args.size,
        "steps": 1,
        "mode": "img2img",
        "rcfg": "none",
        "sessions": 1,
        "precision": case.name,
        "dtype": str(case.dtype).removeprefix("torch."),
        "emulated": ready.emulated,
        "fps": frame["fps"],
        "frame_ms_median": frame["ms_median"],
        "frame_ms_p99": frame["ms_p99"],
        "input_frames": len(frames),
        "unet_rel_l2": round(rel_l2(outputs.eps, base.eps), 6),
        "psnr_db": psnr_db(outputs.images, base.images),
        "layers_fp8": report.layers_fp8,
        "layers_kept": report.layers_kept,
        "fp8_weight_mib": round(report.bytes_after / 2**20, 2),
        "compile_s": ready.compile_s,
        "backend": args.backend.value,
        "recipe": ready.recipe,
        "gpu_mem_peak_mb": gpu_memory_peak_mb(device),
        **environment(device),
    }
    records = [
        {
            **record,
            "unet_batch": rows,
            "ms_median": unet["ms_median"],
            "ms_p99": unet["ms_p99"],
            "ms_per_row": round(unet["ms_median"] / rows, 4),
            "unet_calls": unet["frames"],
        }
        for rows, unet in unets.items()
    ]
    return records, outputs


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="livediff bench --suite fp8",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default="sd-turbo")
    parser.add_argument("--weights", default="random", choices=("random", "pretrained"))
    parser.add_argument("--seed", type=int, default=0, help="seed of random weights")
    parser.add_argument(
        "--precisions",
        type=choice_list(list(CASES)),
        default=["fp16", "bf16", "fp8"],
        help=", ".join(CASES),
    )
    parser.add_argument(
        "--backend", choices=("eager", "compile"), default=None, help="default: compile on CUDA"
    )
    parser.add_argument("--device", default=None)
    parser.add_argument("--size", type=int, default=None, help="default: the preset's")
    parser.add_argument("--frames", type=int, default=8, help="the seeded input set")
    parser.add_argument(
        "--unet-batches",
        type=lambda text: [int(n) for n in text.split(",") if n],
        default=[1],
        help="UNet rows per timed call, e.g. 1,8,16 (each is a compiled bucket)",
    )
    parser.add_argument("--iterations", type=int, default=100, help="timed calls per case")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.frames < 1 or args.iterations < 1 or args.warmup < 0:
        parser.error("--frames and --iterations: at least 1; --warmup: at least 0")
    if not args.unet_batches or min(args.unet_batches) < 1:
        parser.error("--unet-batches: one or more row counts, each at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.backend = Backend(args.backend) if args.backend else default_backend(device)
    args.size = args.size or get_preset(args.model).width
    names = [REFERENCE, *(n for n in args.precisions if n != REFERENCE)]
    reference: Outputs | None = None
    with record_sinks(args.out) as sinks:
        for name in names:
            records, outputs = measure(args, CASES[name], device, reference)
            reference = reference or outputs
            for record in records:
                emit(record, sinks)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

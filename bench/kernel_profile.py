"""The ``profile`` suite: where the networks' device time goes, kernel by kernel.

    python -m livediff.bench.kernel_profile --batch 1,16 --out bench/results/profile.jsonl
    livediff bench --suite profile --model tiny --weights random --batch 1,2   # CPU smoke
    livediff bench --suite profile --batch 1,8 --feature-bank 2   # where a bank's time goes

For each batch size the three networks of a frame step — VAE encode, UNet, VAE decode — run
on the chosen backend (compiled on CUDA by default) with the same input shapes the runtime
uses (sd-turbo: 512² frames, 64² latents, 77 prompt tokens). Each network is

1. timed: device events around each call (``--iters`` calls after ``--warmup``), giving
   ``ms_median``/``ms_p99`` per call; the calls are not CUDA-graphed, so at small batches
   launch gaps show here and not in the kernel sums;
2. profiled: ``torch.profiler`` over ``--profile-iters`` calls; every device kernel is put in
   a category (:func:`categorize`) and its time summed — ``kernel_ms`` per call by category,
   and the ``--top`` slowest kernels by name;
3. counted: its floating-point operations per frame (``torch.utils.flop_counter`` on the eager
   network before compilation), so ``tflops`` = those FLOPs ÷ kernel time shows how far each
   network is from the device's peak (about 790 TFLOP/s dense fp16/bf16 on an H100/H200 here).

Categories: ``attention`` (flash / memory-efficient / cuDNN SDPA kernels), ``convolution``
(cuDNN implicit-GEMM convolutions), ``gemm`` (cuBLAS/CUTLASS matrix products: linear layers and
1×1 convolutions compiled as matrix products), ``triton`` (Inductor's generated kernels: group
and layer norms, activations, residual adds, fused with each other), ``copy`` (memcpy/memset,
layout copies), ``other``. On CPU (no device kernels) the profiler's operator self times are
categorised the same way by operator name.

One JSON line per batch size (:mod:`livediff.bench.records` schema, ``suite: "profile"``):
``batch``, ``fps`` (frames per second through the three networks, from the medians),
``ms_median``/``ms_p99`` per frame, and ``networks`` = {encode, unet, decode} each with
``ms_median``, ``ms_p99``, ``kernel_ms``, ``kernel_ms_by_category``, ``gflop_per_frame``,
``tflops`` and ``top_kernels``. ``--plot`` draws per-frame kernel time by category
(``--replot results.jsonl`` redraws it from saved records).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.utils.flop_counter import FlopCounterMode

from livediff.bench.plots import draw_or_explain, replot, save_figure
from livediff.bench.records import (
    emit,
    environment,
    gpu_memory_peak_mb,
    int_list,
    record_sinks,
    summarize,
)
from livediff.engine.config import StreamConfig
from livediff.engine.stream import Stream
from livediff.models.backends import Backend, prepare_backend
from livediff.models.bank_tokens import BankTokens
from livediff.models.bundle import ModelBundle
from livediff.models.loading import ModelSpec, load_model
from livediff.models.unet_batch import UNetBatch
from livediff.settings.flags import add_setting_flag

NETWORKS = ("encode", "unet", "decode")
CATEGORIES = ("attention", "convolution", "gemm", "triton", "copy", "other")
_KEYWORDS = (
    ("attention", ("flash", "fmha", "attention", "sdpa", "scaled_dot_product")),
    ("convolution", ("conv", "fprop", "implicit_gemm", "dgrad", "wgrad")),
    ("gemm", ("gemm", "nvjet", "cutlass", "cublas", "triton_tem", "aten::mm", "aten::addmm")),
    ("gemm", ("aten::bmm", "aten::baddbmm")),
    ("triton", ("triton",)),
    ("copy", ("memcpy", "memset", "copy")),
)


def categorize(name: str) -> str:
    """The category of a device kernel (or, on CPU, of an operator) by its name."""
    lowered = name.lower()
    for category, words in _KEYWORDS:
        if any(word in lowered for word in words):
            return category
    return "other"


def network_calls(bundle: ModelBundle, batch: int) -> dict[str, Callable[[], torch.Tensor]]:
    """The three networks as calls on ``batch`` rows of the runtime's input shapes."""
    config = StreamConfig(width=bundle.preset.width, height=bundle.preset.height)
    assert config.width is not None and config.height is not None
    stream = Stream(bundle, config, prompt="a photo of a cat", steps=1, strength=0.5)
    device, dtype = bundle.device, bundle.dtype
    generator = torch.Generator(device="cpu").manual_seed(0)
    pixels = torch.rand(batch, 3, config.height, config.width, generator=generator) * 2 - 1
    pixels = pixels.to(device=device, dtype=dtype)
    latents = torch.randn(batch, 4, *stream.latent_size, generator=generator)
    latents = latents.to(device=device, dtype=dtype)
    one = stream.batch.begin(latents[:1])

    def rows(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[:1].expand(batch, *t.shape[1:]).contiguous()

    unet_batch = UNetBatch(
        latents,
        one.timesteps[:1].expand(batch).contiguous(),
        rows(one.embeds),  # type: ignore[arg-type]
        rows(one.text_embeds),
        rows(one.time_ids),
    )
    if bundle.feature_bank is not None:  # every row banks: its own slot, every frame held
        unet_batch = replace(
            unet_batch, **full_bank_rows(bundle.feature_bank.frames, batch, latents)
        )
        bundle.make_bank_pools(unet_batch)  # before a compiled call (see ModelBundle)
    return {
        "encode": lambda: bundle.encode(pixels),
        "unet": lambda: bundle.predict_noise(unet_batch),
        "decode": lambda: bundle.decode(latents),
    }


def full_bank_rows(frames: int, batch: int, like: torch.Tensor) -> dict[str, Any]:
    """Feature bank inputs of ``batch`` rows in steady state: row r reads slot r + 1 with all
    ``frames`` frames held, keeps this call's features in its frame 0, fusion 0.8 at 0.9.
    As the engine sends a call whose rows all hold every frame (``engine/feature_banks.py``):
    without ``bank_frames``, so the attention runs unmasked (a mask of ones would profile the
    masked kernels and the mask's expansion, which a stream in steady state never runs)."""
    device = like.device
    slots = torch.arange(1, batch + 1, device=device)
    return {
        "bank_slots": slots,
        "bank_frames": None,
        "bank_write": slots * frames,
        "bank_fusion": torch.tensor([0.8, 0.9], device=device, dtype=like.dtype).repeat(batch, 1),
    }


def count_gflop(calls: dict[str, Callable[[], torch.Tensor]], batch: int) -> dict[str, float]:
    """FLOPs per frame of each (eager) network, in GFLOP."""
    out = {}
    for name, call in calls.items():
        counter = FlopCounterMode(display=False)
        with counter, torch.inference_mode():
            call()
        out[name] = counter.get_total_flops() / batch / 1e9
    return out


def _time_calls(call: Callable[[], torch.Tensor], iters: int, cuda: bool) -> list[float]:
    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            times.append(float(start.elapsed_time(end)))
        else:
            began = time.perf_counter()
            call()
            times.append((time.perf_counter() - began) * 1000.0)
    return times


def kernel_times(
    call: Callable[[], torch.Tensor], iters: int, cuda: bool
) -> list[tuple[str, float, int]]:
    """(name, ms per call, calls per call) of every device kernel (CPU: operator self time)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        for _ in range(iters):
            call()
        if cuda:
            torch.cuda.synchronize()
    rows = []
    for event in prof.key_averages():
        if cuda and event.device_type != DeviceType.CUDA:
            continue
        if cuda:
            micros = getattr(event, "self_device_time_total", None)
            if micros is None:  # older PyTorch
                micros = event.self_cuda_time_total
        else:
            micros = event.self_cpu_time_total
        if micros > 0:
            rows.append((event.key, micros / 1000.0 / iters, round(event.count / iters)))
    return sorted(rows, key=lambda row: -row[1])


def profile_network(
    call: Callable[[], torch.Tensor], args: argparse.Namespace, cuda: bool, gflop: float, batch: int
) -> dict[str, Any]:
    with torch.inference_mode():
        _time_calls(call, args.warmup, cuda)
        timed = summarize(_time_calls(call, args.iters, cuda))
        kernels = kernel_times(call, args.profile_iters, cuda)
    by_category = dict.fromkeys(CATEGORIES, 0.0)
    for name, ms, _ in kernels:
        by_category[categorize(name)] += ms
    kernel_ms = sum(by_category.values())
    return {
        "ms_median": timed["ms_median"],
        "ms_p99": timed["ms_p99"],
        "kernel_ms": round(kernel_ms, 4),
        "kernel_ms_by_category": {k: round(v, 4) for k, v in by_category.items()},
        "gflop_per_frame": round(gflop, 2),
        "tflops": float(f"{gflop * batch / kernel_ms:.4g}") if kernel_ms else None,
        "top_kernels": [
            {"name": name[:160], "category": categorize(name), "ms": round(ms, 4), "calls": count}
            for name, ms, count in kernels[: args.top]
        ],
    }


def run_batch(
    bundle: ModelBundle, batch: int, gflop: dict[str, float], args: argparse.Namespace
) -> dict[str, Any]:
    cuda = bundle.device.type == "cuda"
    calls = network_calls(bundle, batch)
    networks = {
        name: profile_network(calls[name], args, cuda, gflop[name], batch) for name in NETWORKS
    }
    ms_median = sum(n["ms_median"] for n in networks.values()) / batch
    ms_p99 = sum(n["ms_p99"] for n in networks.values()) / batch
    return {
        "system": "livediff",
        "suite": "profile",
        "model": bundle.preset.name,
        "weights": bundle.weights.value,
        "width": bundle.preset.width,
        "height": bundle.preset.height,
        "steps": 1,
        "mode": "img2img",
        "rcfg": "none",
        "sessions": 1,
        "batch": batch,
        "feature_bank": args.feature_bank,
        "feature_bank_tokens": BankTokens(args.feature_bank_tokens).value
        if args.feature_bank
        else None,
        "feature_bank_reduce_from": args.feature_bank_reduce_from if args.feature_bank else None,
        "fps": round(1000.0 / ms_median, 1),
        "ms_median": round(ms_median, 4),
        "ms_p99": round(ms_p99, 4),
        "kernel_ms_per_frame": round(sum(n["kernel_ms"] for n in networks.values()) / batch, 4),
        "networks": networks,
        "backend": args.backend,
        "dtype": str(bundle.dtype).removeprefix("torch."),
        "gpu_mem_peak_mb": gpu_memory_peak_mb(bundle.device),
        **environment(bundle.device),
    }


def plot(records: Sequence[dict[str, Any]], path: Path) -> None:
    """Stacked bars: kernel ms per frame by category, one bar per (batch, network)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, stacks = [], {c: [] for c in CATEGORIES}  # type: ignore[var-annotated]
    for record in records:
        for name in NETWORKS:
            network = record["networks"][name]
            labels.append(f"{name}\nbatch {record['batch']}")
            for category in CATEGORIES:
                stacks[category].append(
                    network["kernel_ms_by_category"][category] / record["batch"]
                )
    figure, axes = plt.subplots(figsize=(max(6, len(labels) * 1.1), 4))
    bottom = [0.0] * len(labels)
    for category in CATEGORIES:
        axes.bar(labels, stacks[category], bottom=bottom, label=category)
        bottom = [b + v for b, v in zip(bottom, stacks[category], strict=True)]
    first = records[0]
    axes.set(ylabel="kernel ms per frame", title=f"{first['model']} {first['device']}")
    axes.legend(fontsize="small")
    save_figure(plt, figure, path)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="livediff bench --suite profile", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--model", default="sd-turbo")
    parser.add_argument("--weights", default="random")
    parser.add_argument("--batch", type=int_list, default=[1, 16], help="comma-separated rows")
    parser.add_argument("--backend", choices=[b.value for b in Backend], default=None)
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls first")
    parser.add_argument("--iters", type=int, default=30, help="timed calls per network")
    parser.add_argument("--profile-iters", type=int, default=5, help="profiled calls")
    parser.add_argument("--top", type=int, default=12, help="slowest kernels listed")
    parser.add_argument(
        "--feature-bank",
        type=int,
        default=0,
        help="frames of a feature bank every UNet row attends to (0: none; StreamV2V's bank, "
        "all frames held, fusion on)",
    )
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, help="default: fp16 on CUDA, fp32 on CPU")
    for setting in ("feature_bank_tokens", "feature_bank_reduce_from"):  # as serve's flags
        add_setting_flag(parser, ModelSpec, setting, flag="--" + setting.replace("_", "-"))
    parser.add_argument("--out", type=Path, help="append the JSON lines to this file as well")
    parser.add_argument("--plot", type=Path, default=None, help="PNG of kernel time by category")
    parser.add_argument("--replot", type=Path, help="only draw --plot from these JSON lines")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot:
        return replot(args.replot, args.plot, plot)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.backend = args.backend or ("compile" if device.type == "cuda" else "eager")
    dtype = args.dtype or ("fp16" if device.type == "cuda" else "fp32")
    bundle = load_model(
        ModelSpec(preset=args.model, weights=args.weights), device=device, dtype=dtype
    )
    if args.feature_bank:
        bundle = bundle.with_feature_bank(
            frames=args.feature_bank,
            rows=max(args.batch),
            tokens=BankTokens(args.feature_bank_tokens),
            reduce_from=args.feature_bank_reduce_from,
        )
    gflop = count_gflop(network_calls(bundle, 1), 1)  # before compiling: eager operators
    bundle = prepare_backend(bundle, Backend(args.backend))
    records = []
    with record_sinks(args.out) as outputs:
        for batch in args.batch:
            records.append(run_batch(bundle, batch, gflop, args))
            emit(records[-1], outputs)
    draw_or_explain(records, args.plot, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Micro-benchmark: each Triton kernel against its PyTorch reference, on CUDA.

    python -m livediff.bench.kernels [--out bench/results/kernels.jsonl] [--rep-ms 200]

Prints one JSON line per (kernel, impl, timing, shape, dtype) with the keys ``kernel, impl,
shape, dtype, ms_median, speedup, device, torch, date`` plus ``timing``, ``gbps``, ``triton``.

Two timings per case, both medians from ``triton.testing``:

- ``cuda_graph`` (``do_bench_cudagraph``): the call captured in a CUDA graph and replayed, so
  it is GPU time only, as the engine's captured step sees it;
- ``eager`` (``do_bench``, L2 flushed between calls): what a plain Python call costs,
  launch overhead included.

``speedup`` is reference time / this row's time under the same timing (1.0 for reference
rows). ``gbps`` is the minimum bytes the op must move (inputs read once, outputs written once)
over the time: compare it with the GPU's memory bandwidth (H100 SXM ~3.35 TB/s).
Shapes are SD-Turbo's: 512² images, 64² latents, and 1080p input for the preprocess.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from livediff.kernels import fused_step, lora_rows, postprocess, preprocess, similarity, yuv
from livediff.kernels._dispatch import triton_unavailable_reason


@dataclass(frozen=True)
class Case:
    kernel: str
    shape: str
    dtype: torch.dtype
    triton: Callable[[], Any]
    reference: Callable[[], Any]
    bytes_moved: int


def _bytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _preprocess_cases(gen: torch.Generator) -> Iterator[Case]:
    for n, (height, width), dtype in [
        (1, (1080, 1920), torch.float16),
        (4, (1080, 1920), torch.float16),
        (1, (1080, 1920), torch.float32),
        (1, (720, 1280), torch.float16),
        (1, (512, 512), torch.float16),
    ]:
        side = min(height, width)
        crop = ((height - side) // 2, (width - side) // 2, side, side)
        frames = torch.randint(
            0, 256, (n, height, width, 3), dtype=torch.uint8, device="cuda", generator=gen
        )
        out_bytes = n * 3 * 512 * 512 * dtype.itemsize
        moved = n * side * side * 3 + out_bytes  # the crop is all that must be read
        yield Case(
            "preprocess_rgb",
            f"{n}x{height}x{width}x3->{n}x3x512x512",
            dtype,
            partial(preprocess.rgb_to_model_input, frames, 512, 512, crop, dtype),
            partial(preprocess.reference_rgb, frames, crop, 512, 512, dtype),
            moved,
        )
        if (height, width) != (1080, 1920) or n != 1 or dtype != torch.float16:
            continue
        ch, cw = yuv.chroma_size(height, width)
        y = torch.randint(
            0, 256, (n, height, width), dtype=torch.uint8, device="cuda", generator=gen
        )
        u = torch.randint(0, 256, (n, ch, cw), dtype=torch.uint8, device="cuda", generator=gen)
        v = torch.randint(0, 256, (n, ch, cw), dtype=torch.uint8, device="cuda", generator=gen)
        uv = torch.stack([u, v], dim=-1).contiguous()
        moved = n * side * side * 3 // 2 + out_bytes
        yield Case(
            "preprocess_i420",
            f"{n}x{height}x{width} I420->{n}x3x512x512",
            dtype,
            partial(preprocess.i420_to_model_input, y, u, v, 512, 512, crop, dtype),
            partial(preprocess.reference_i420, y, u, v, crop, 512, 512, dtype),
            moved,
        )
        yield Case(
            "preprocess_nv12",
            f"{n}x{height}x{width} NV12->{n}x3x512x512",
            dtype,
            partial(preprocess.nv12_to_model_input, y, uv, 512, 512, crop, dtype),
            partial(preprocess.reference_nv12, y, uv, crop, 512, 512, dtype),
            moved,
        )


def _postprocess_cases(gen: torch.Generator) -> Iterator[Case]:
    for n, dtype in [(1, torch.float16), (4, torch.float16), (1, torch.float32)]:
        images = (torch.rand(n, 3, 512, 512, device="cuda", generator=gen) * 2 - 1).to(dtype)
        yield Case(
            "postprocess_rgb",
            f"{n}x3x512x512->{n}x512x512x3",
            dtype,
            partial(postprocess.model_output_to_rgb, images),
            partial(postprocess.reference_rgb, images),
            _bytes(images) + n * 512 * 512 * 3,
        )
        yield Case(
            "postprocess_i420",
            f"{n}x3x512x512->{n}x{yuv.i420_packed_length(512, 512)}",
            dtype,
            partial(postprocess.model_output_to_i420, images),
            partial(postprocess.reference_i420, images),
            _bytes(images) + n * yuv.i420_packed_length(512, 512),
        )


def _similarity_cases(gen: torch.Generator) -> Iterator[Case]:
    pairs = [
        ("512x512x3", torch.uint8, (512, 512, 3)),
        ("1080x1920x3", torch.uint8, (1080, 1920, 3)),
        ("1x3x512x512", torch.float16, (1, 3, 512, 512)),
    ]
    for label, dtype, shape in pairs:
        if dtype == torch.uint8:
            a = torch.randint(0, 256, shape, dtype=dtype, device="cuda", generator=gen)
            b = torch.randint(0, 256, shape, dtype=dtype, device="cuda", generator=gen)
        else:
            a = torch.randn(shape, device="cuda", generator=gen).to(dtype)
            b = torch.randn(shape, device="cuda", generator=gen).to(dtype)
        yield Case(
            "cosine_similarity",
            label,
            dtype,
            partial(similarity.frame_similarity, a, b),
            partial(similarity.reference, a, b),
            _bytes(a, b),
        )


def _step_cases(gen: torch.Generator) -> Iterator[Case]:
    configs = [(mode, 1, 1) for mode in ("none", "self")]
    configs += [(mode, 1, 4) for mode in ("none", "full", "self", "initialize")]
    configs += [("self", 1, 2), ("self", 2, 2)]
    for dtype in (torch.float16, torch.float32):
        for mode, frames, steps in configs if dtype == torch.float16 else [("self", 1, 4)]:
            rows = frames * steps
            uncond = {"full": rows, "initialize": frames}.get(mode, 0)
            shape = (rows, 4, 64, 64)

            def randn(*size: int, dtype: torch.dtype = dtype) -> torch.Tensor:
                return torch.randn(*size, device="cuda", generator=gen).to(dtype)

            alpha_bar = torch.linspace(0.05, 0.95, steps, device="cuda").repeat_interleave(frames)
            coefficients = torch.stack(
                [alpha_bar.sqrt(), (1 - alpha_bar).sqrt(), alpha_bar * 0.01, 1 - alpha_bar * 0.01]
            )
            state = {
                "x_t": randn(*shape),
                "eps": randn(uncond + rows, *shape[1:]),
                "stock": randn(*shape) if mode in ("self", "initialize") else None,
                "noise": randn(*shape),
                "coefficients": coefficients.to(dtype),
                "guidance_scale": torch.tensor(1.5, device="cuda", dtype=dtype),
                "delta": torch.tensor(0.8, device="cuda", dtype=dtype),
            }
            out = torch.empty(frames, *shape[1:], device="cuda", dtype=dtype)
            row = _bytes(out) // frames
            has_stock = state["stock"] is not None
            # Read x_t, eps, stock and noise[F:]; write out, x_t[F:] and stock[F:].
            moved = _bytes(state["x_t"], state["eps"], state["stock"]) + row * (rows - frames)
            moved += row * frames + row * (rows - frames) * (2 if has_stock else 1)

            def run_triton(
                s: dict[str, Any] = state, o: torch.Tensor = out, m: str = mode, f: int = frames
            ) -> None:
                fused_step.fused_step(**s, rcfg=m, frame_buffer_size=f, out=o)

            def run_reference(
                s: dict[str, Any] = state, o: torch.Tensor = out, m: str = mode, f: int = frames
            ) -> None:
                fused_step.reference(
                    s["x_t"],
                    s["eps"],
                    s["stock"],
                    s["noise"],
                    s["coefficients"],
                    s["guidance_scale"],
                    s["delta"],
                    o,
                    m,
                    f,
                )

            yield Case(
                "stream_batch_step",
                f"{mode} F={frames} steps={steps} {rows}x4x64x64",
                dtype,
                run_triton,
                run_reference,
                moved,
            )


# sd-turbo's LoRA-targeted linears at 512² (tokens, in, out): attention and proj at the 64², 32²
# and 16² levels, the feed-forward's GEGLU input and output at 64².
LORA_LAYERS = [
    (4096, 320, 320),
    (4096, 320, 2560),
    (4096, 1280, 320),
    (1024, 640, 640),
    (256, 1280, 1280),
]


def _lora_cases(gen: torch.Generator) -> Iterator[Case]:
    """Per-session LoRAs at rank 16, 2 slots per row, 8 packed LoRAs: one row with one LoRA
    (a single stream) and 16 rows over 4 LoRAs (the lora suite's batch)."""
    dtype, rank, loras, slots = torch.float16, 16, 8, 2
    for rows in (1, 16):
        for tokens, width, features in LORA_LAYERS:
            x = torch.randn(rows, tokens, width, device="cuda", generator=gen).to(dtype)
            out = torch.randn(rows, tokens, features, device="cuda", generator=gen).to(dtype)
            a = (torch.randn(loras, width, rank, device="cuda", generator=gen) / width**0.5).to(
                dtype
            )
            b = (torch.randn(loras, rank, features, device="cuda", generator=gen) / rank).to(dtype)
            indices = torch.full((rows, slots), -1, dtype=torch.int32, device="cuda")
            indices[:, 0] = torch.arange(rows, device="cuda") % 4
            scales = torch.zeros(rows, slots, device="cuda")
            scales[:, 0] = 0.8
            args = (out, x, a, b, indices, scales)
            yield Case(
                "lora_rows",
                f"{rows}x{tokens}x{width}->{features} r{rank} {min(rows, 4)} LoRA",
                dtype,
                partial(torch.ops.livediff.lora_rows_add, *args),
                partial(lora_rows.reference, *args),
                _bytes(x, out, out) + rows * rank * (width + features) * dtype.itemsize,
            )


def _cases() -> Iterator[Case]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    yield from _preprocess_cases(gen)
    yield from _postprocess_cases(gen)
    yield from _similarity_cases(gen)
    yield from _step_cases(gen)
    yield from _lora_cases(gen)


def _time(fn: Callable[[], Any], timing: str, rep_ms: int) -> float:
    from triton.testing import do_bench, do_bench_cudagraph

    if timing == "cuda_graph":
        return float(do_bench_cudagraph(fn, rep=rep_ms, return_mode="median"))
    return float(do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m livediff.bench.kernels", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", help="also append the JSON lines to this file")
    parser.add_argument("--rep-ms", type=int, default=200, help="time budget per measurement (ms)")
    parser.add_argument("--kernel", action="append", help="only these kernels (repeatable)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "bench.kernels: no CUDA device; the Triton kernels run on CUDA only (nothing to time)",
            file=sys.stderr,
        )
        return 2
    reason = triton_unavailable_reason()
    if reason is not None:
        print(
            f"bench.kernels: {reason}; the ops would run their PyTorch reference", file=sys.stderr
        )
        return 2
    import triton

    common = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    sink = open(args.out, "a", encoding="utf-8") if args.out else None  # noqa: SIM115
    try:
        for case in _cases():
            if args.kernel and case.kernel not in args.kernel:
                continue
            for timing in ("cuda_graph", "eager"):
                reference_ms = _time(case.reference, timing, args.rep_ms)
                triton_ms = _time(case.triton, timing, args.rep_ms)
                for impl, ms in (("reference", reference_ms), ("triton", triton_ms)):
                    record = {
                        "kernel": case.kernel,
                        "impl": impl,
                        "timing": timing,
                        "shape": case.shape,
                        "dtype": str(case.dtype).removeprefix("torch."),
                        "ms_median": round(ms, 5),
                        "speedup": round(reference_ms / ms, 2),
                        "gbps": round(case.bytes_moved / (ms * 1e6), 1),
                        **common,
                    }
                    line = json.dumps(record)
                    print(line, flush=True)
                    if sink is not None:
                        print(line, file=sink, flush=True)
    finally:
        if sink is not None:
            sink.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

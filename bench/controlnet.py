"""What ControlNets and their preprocessors cost on the device.

    python -m livediff.bench.controlnet --batch 1,8 --out bench/results/controlnet-h200.jsonl

Random weights, the real architectures (sd-turbo family: its UNet and ``ControlNetModel``s
built from it; Depth Anything V2 Small; ControlNet's HED), 512², fp16 on CUDA (fp32 on CPU).
Each case is timed with device events around ``--iters`` calls after ``--warmup`` (medians),
as it runs eagerly and replayed as one CUDA graph (kernel time without launch gaps, which is
how the engine runs its hot step). One JSON line per (case, batch), with the device, torch version, commit and command:

- ``canny``: the ``livediff::canny`` op; also ``torch.compile`` of its PyTorch code, which
  decides whether a Triton version would pay (Inductor generates Triton kernels from it);
  and whether the GPU's edges equal the CPU's, bit for bit;
- ``depth``, ``soft_edge``: the networks with their pre- and post-processing;
- ``unet``: the UNet alone, with one and with two ControlNets (``predict_noise`` of a batch
  with control inputs), and the largest difference between graphed and eager outputs.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import torch

from livediff.bench.records import environment, int_list, record_sinks
from livediff.kernels.canny import canny, reference_canny
from livediff.models.bundle import ModelBundle, WeightsMode
from livediff.models.control_images import PreprocessorNetworks, preprocess
from livediff.models.controlnet import ControlNetSpec
from livediff.models.controlnet_loading import load_controlnet
from livediff.models.depth import load_depth_estimator
from livediff.models.loading import ModelSpec, load_model
from livediff.models.soft_edge import load_soft_edge_detector
from livediff.models.unet_batch import UNetBatch

SIZE = 512


def emit(record: dict[str, Any], sinks: Sequence[TextIO]) -> None:
    """One JSON line (not the stream-benchmark schema of :mod:`livediff.bench.records`)."""
    line = json.dumps(record)
    for sink in sinks:
        print(line, file=sink, flush=True)


def time_ms(fn: Callable[[], Any], *, warmup: int, iters: int, device: torch.device) -> float:
    """Median milliseconds per call (device events on CUDA, wall clock on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            fn()
            times.append((time.perf_counter() - began) * 1e3)
    return float(torch.tensor(times).median())


def graphed(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """``fn`` captured as one CUDA graph (after warm-up on a side stream); replay returns its output."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.inference_mode():
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(graph):
        out = fn()

    def replay() -> torch.Tensor:
        graph.replay()
        return out

    return replay


def _timings(
    fn: Callable[[], torch.Tensor], args: argparse.Namespace, device: torch.device
) -> dict[str, float]:
    result = {"eager_ms": time_ms(fn, warmup=args.warmup, iters=args.iters, device=device)}
    if device.type == "cuda":
        result["graph_ms"] = time_ms(
            graphed(fn), warmup=args.warmup, iters=args.iters, device=device
        )
    return result


def _frames(batch: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(batch)
    return torch.randint(0, 256, (batch, SIZE, SIZE, 3), dtype=torch.uint8, generator=gen).to(
        device
    )


def bench_canny(args: argparse.Namespace, batch: int, device: torch.device) -> dict[str, Any]:
    images = _frames(batch, device).permute(0, 3, 1, 2).float() / 255
    low, high = (
        torch.full((batch,), 100.0, device=device),
        torch.full((batch,), 200.0, device=device),
    )
    sigma = torch.full((batch,), 1.0, device=device)
    record: dict[str, Any] = _timings(lambda: canny(images, low, high, sigma), args, device)
    if device.type == "cuda":
        began = time.perf_counter()
        compiled = torch.compile(reference_canny, fullgraph=True, dynamic=False)
        out = compiled(images, low, high, sigma, 12)
        torch.cuda.synchronize()
        record["compile_s"] = round(time.perf_counter() - began, 1)
        record["compiled_ms"] = time_ms(
            lambda: compiled(images, low, high, sigma, 12),
            warmup=args.warmup,
            iters=args.iters,
            device=device,
        )
        record["compiled_graph_ms"] = time_ms(
            graphed(lambda: compiled(images, low, high, sigma, 12)),
            warmup=args.warmup,
            iters=args.iters,
            device=device,
        )
        cpu = canny(images.cpu(), low.cpu(), high.cpu(), sigma.cpu())
        record["gpu_equals_cpu"] = bool(torch.equal(canny(images, low, high, sigma).cpu(), cpu))
        record["compiled_equals_eager"] = bool(torch.equal(out, canny(images, low, high, sigma)))
    return record


def bench_network(
    kind: str,
    networks: PreprocessorNetworks,
    args: argparse.Namespace,
    batch: int,
    device: torch.device,
) -> dict[str, Any]:
    frames = _frames(batch, device)
    return _timings(lambda: preprocess(kind, frames, (SIZE, SIZE), networks=networks), args, device)


def bench_unet(
    bundle: ModelBundle, args: argparse.Namespace, batch: int, device: torch.device
) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(0)
    opts: dict[str, Any] = {"device": device, "dtype": bundle.dtype}
    seq, dim = bundle.embed_shape
    base = {
        "latents": torch.randn(batch, 4, SIZE // 8, SIZE // 8, generator=gen).to(**opts),
        "timesteps": torch.full((batch,), 499, device=device),
        "embeds": torch.randn(batch, seq, dim, generator=gen).to(**opts),
    }
    records = []
    for nets in range(len(bundle.controlnets) + 1):
        model = bundle.with_controlnets(bundle.controlnets[:nets])
        fields = dict(base)
        if nets:
            fields["control_images"] = torch.rand(batch, nets, 3, SIZE, SIZE, generator=gen).to(
                **opts
            )
            fields["control_scales"] = torch.full((batch, nets), 0.8, **opts)
        batch_in = UNetBatch(**fields)

        def step(m: ModelBundle = model, b: UNetBatch = batch_in) -> torch.Tensor:
            return m.predict_noise(b)

        record = {"case": "unet", "controlnets": nets, **_timings(step, args, device)}
        if device.type == "cuda":
            replay = graphed(step)
            eager = step()
            record["graph_vs_eager_max_abs"] = float((replay() - eager).abs().max())
        records.append(record)
    return records


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int_list, default=[1, 8])
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--cases", default="canny,depth,soft_edge,unet")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    cases = set(args.cases.split(","))
    networks = PreprocessorNetworks(
        depth=load_depth_estimator(device=device, dtype=dtype) if "depth" in cases else None,
        soft_edge=load_soft_edge_detector(device=device, dtype=dtype)
        if "soft_edge" in cases
        else None,
    )
    bundle = None
    if "unet" in cases:
        bundle = load_model(
            ModelSpec("sd-turbo", weights=WeightsMode.RANDOM), device=device, dtype=dtype
        )
        nets = [
            load_controlnet(ControlNetSpec("random", name=n, seed=i), bundle)
            for i, n in enumerate("ab")
        ]
        bundle = bundle.with_controlnets(nets)
    common = {
        "suite": "controlnet",
        "size": SIZE,
        "dtype": str(dtype).removeprefix("torch."),
        **environment(device),
    }
    with record_sinks(args.out) as sinks:
        for batch in args.batch:
            if "canny" in cases:
                emit(
                    {**common, "case": "canny", "batch": batch, **bench_canny(args, batch, device)},
                    sinks,
                )
            for kind in ("depth", "soft_edge"):
                if kind in cases:
                    emit(
                        {
                            **common,
                            "case": kind,
                            "batch": batch,
                            **bench_network(kind, networks, args, batch, device),
                        },
                        sinks,
                    )
            if bundle is not None:
                for record in bench_unet(bundle, args, batch, device):
                    emit({**common, "batch": batch, **record}, sinks)


if __name__ == "__main__":
    main()

"""The ``peers`` suite: StreamDiffusion 0.1.1 and diffusers img2img on the same networks and inputs.

Everything runs in one process on one device: the same architecture and random weights (same
seed), the same uint8 input frames, img2img, 1 step at strength 0.5, fp16, one sync per frame.
Each peer's time includes converting our uint8 frame to its input and its output back to
uint8, since that is what a user of it pays.

Peers (``pip install 'livediff[bench]'`` and ``pip install --no-deps streamdiffusion==0.1.1``):

- ``diffusers``: ``StableDiffusionImg2ImgPipeline`` (``…XLImg2ImgPipeline`` for SDXL) with
  the tiny VAE and precomputed prompt embeddings, eager.
- ``streamdiffusion``: ``StreamDiffusion`` 0.1.1 (SD 1.5/2.1 only; it has no SDXL
  conditioning), eager, and with its UNet and TAESD halves under ``torch.compile`` with CUDA
  graphs (``mode="reduce-overhead"``), its best without TensorRT.
- ``livediff``: this project, eager and compiled (whole-step CUDA graph), for the comparison.

Run ``python -m livediff.bench.peers --help``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import LCMScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline

from livediff.bench.plots import draw_or_explain, replot
from livediff.bench.records import emit, environment, gpu_memory_peak_mb, record_sinks, summarize
from livediff.engine.backend_fit import make_stream
from livediff.engine.config import StreamConfig
from livediff.models.backends import Backend, prepare_backend
from livediff.models.bundle import ModelBundle, WeightsMode
from livediff.models.loading import ModelSpec, load_model

PROMPT = "a photo of a cat"
STRENGTH_T_INDEX = (24,)  # strength 0.5, 1 step (see livediff.engine.lcm_schedule)

Runner = Callable[[torch.Tensor], torch.Tensor]  # uint8 [H, W, 3] on device → uint8 [h, w, 3]


def _to_unit(frame: torch.Tensor) -> torch.Tensor:
    return frame.permute(2, 0, 1).unsqueeze(0).to(torch.float16) / 255.0


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    return (
        ((images[0].float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0)
    )


def diffusers_runner(bundle: ModelBundle, size: int) -> Runner:
    scheduler = LCMScheduler.from_config(bundle.scheduler_config)
    if bundle.preset.is_sdxl:
        pipe: Any = StableDiffusionXLImg2ImgPipeline(
            vae=bundle.vae,
            text_encoder=bundle.text_encoders[0],
            text_encoder_2=bundle.text_encoders[1],
            tokenizer=bundle.tokenizers[0],
            tokenizer_2=bundle.tokenizers[1],
            unet=bundle.unet,
            scheduler=scheduler,
        )
        embeds, _, pooled, _ = pipe.encode_prompt(
            PROMPT, device=bundle.device, do_classifier_free_guidance=False
        )
        kwargs: dict[str, Any] = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
    else:
        pipe = StableDiffusionImg2ImgPipeline(
            vae=bundle.vae,
            text_encoder=bundle.text_encoders[0],
            tokenizer=bundle.tokenizers[0],
            unet=bundle.unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        embeds, _ = pipe.encode_prompt(PROMPT, bundle.device, 1, False)
        kwargs = {"prompt_embeds": embeds}
    pipe.set_progress_bar_config(disable=True)

    def run(frame: torch.Tensor) -> torch.Tensor:
        out = pipe(
            image=_to_unit(frame),
            num_inference_steps=2,
            strength=0.5,
            guidance_scale=0.0,
            output_type="pt",
            height=size,
            width=size,
            **kwargs,
        ).images
        return _to_uint8(out * 2 - 1)

    return run


def streamdiffusion_runner(bundle: ModelBundle, size: int, compiled: bool) -> Runner:
    from diffusers import StableDiffusionPipeline
    from streamdiffusion import StreamDiffusion

    pipe = StableDiffusionPipeline(
        vae=bundle.vae,
        text_encoder=bundle.text_encoders[0],
        tokenizer=bundle.tokenizers[0],
        unet=bundle.unet,
        scheduler=LCMScheduler.from_config(bundle.scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    stream = StreamDiffusion(
        pipe,
        t_index_list=list(STRENGTH_T_INDEX),
        torch_dtype=bundle.dtype,
        width=size,
        height=size,
        cfg_type="none",
    )
    stream.prepare(prompt=PROMPT, num_inference_steps=50)
    if compiled:
        stream.unet = torch.compile(stream.unet, mode="reduce-overhead", fullgraph=True)
        stream.vae.encoder = torch.compile(
            stream.vae.encoder, mode="reduce-overhead", fullgraph=True
        )
        stream.vae.decoder = torch.compile(
            stream.vae.decoder, mode="reduce-overhead", fullgraph=True
        )

    def run(frame: torch.Tensor) -> torch.Tensor:
        return _to_uint8(stream(_to_unit(frame)))

    return run


def livediff_runner(bundle: ModelBundle, size: int, backend: Backend) -> Runner:
    prepare_backend(bundle, backend)
    stream = make_stream(
        bundle,
        backend,
        StreamConfig(width=size, height=size),
        prompt=PROMPT,
        t_index_list=STRENGTH_T_INDEX,
    )

    def run(frame: torch.Tensor) -> torch.Tensor:
        return stream.process(frame)[0].image

    return run


def measure(
    name: str, runner: Runner, frames: list[torch.Tensor], count: int, warmup: int
) -> dict[str, Any]:
    started = time.perf_counter()
    for i in range(warmup):
        runner(frames[i % len(frames)])
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - started
    times = []
    for i in range(count):
        t0 = time.perf_counter()
        out = runner(frames[i % len(frames)])
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1000.0)
    assert out.dtype == torch.uint8 and out.shape[-1] == 3
    return {**summarize(times), "warmup_s": round(warmup_s, 2)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="livediff bench --suite peers", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--model", default="sd-turbo", choices=("sd-turbo", "sdxl-turbo", "sd15-lcm")
    )
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument(
        "--systems",
        default="diffusers,streamdiffusion,streamdiffusion-compiled,livediff-eager,livediff-compile",
    )
    parser.add_argument("--out", type=Path)
    parser.add_argument("--plot", type=Path, help="PNG of fps and latency per system")
    parser.add_argument("--replot", type=Path, help="only draw --plot from these JSON lines")
    args = parser.parse_args(argv)
    if args.replot:
        return replot(args.replot, args.plot)
    if not torch.cuda.is_available():
        print("livediff bench --suite peers: needs a CUDA device", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    generator = torch.Generator().manual_seed(0)
    frames = [
        torch.randint(0, 256, (args.size, args.size, 3), generator=generator, dtype=torch.uint8).to(
            device
        )
        for _ in range(8)
    ]
    records: list[dict[str, Any]] = []
    with record_sinks(args.out) as outputs:
        for system in args.systems.split(","):
            if system.startswith("streamdiffusion") and args.model == "sdxl-turbo":
                continue
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            bundle = load_model(
                ModelSpec(preset=args.model, weights=WeightsMode.RANDOM),
                device=device,
                dtype="fp16",
            )
            if system == "diffusers":
                runner = diffusers_runner(bundle, args.size)
            elif system.startswith("streamdiffusion"):
                runner = streamdiffusion_runner(
                    bundle, args.size, compiled=system.endswith("compiled")
                )
            else:
                runner = livediff_runner(bundle, args.size, Backend(system.split("-", 1)[1]))
            result = measure(system, runner, frames, args.frames, args.warmup)
            name, _, variant = system.partition("-")
            record = {
                "system": name,
                "variant": variant or "eager",
                "suite": "peers",
                "model": args.model,
                "weights": "random",
                "width": args.size,
                "height": args.size,
                "steps": 1,
                "mode": "img2img",
                "rcfg": "none",
                "sessions": 1,
                **result,
                "gpu_mem_peak_mb": gpu_memory_peak_mb(device),
                **environment(device),
            }
            emit(record, outputs)
            records.append(record)
            del runner, bundle
    draw_or_explain(records, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What an IP-Adapter costs on the device: per frame (the UNet call) and per image change.

    python -m livediff.bench.ip_adapter --batch 1,8 --out bench/results/ip-adapter-h200.jsonl

Random weights, the real architectures (``sd15-lcm``'s UNet and h94's SD 1.5 adapters: the
OpenCLIP ViT-H/14 encoder, the plain projection to 4 tokens, the plus resampler to 16), 512²,
fp16 on CUDA (fp32 on CPU), the UNet with the speed recipe's SDPA and fused QKV (no
``torch.compile``). Timed with device events around ``--iters`` calls after ``--warmup``
(medians), eagerly and replayed as one CUDA graph. One JSON line per case:

- ``unet``: ``predict_noise`` without the adapter, with every row at scale 0.8, and with every
  row at scale 0 (a session without an image sharing the call pays what it costs), per batch;
  ``graph_vs_eager_max_abs`` checks the captured call;
- ``encode``: one image change: CLIP preprocessing on the host, the encoder and the
  projection (:class:`~livediff.models.image_prompts.ImagePromptEncoder`, uncached).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from livediff.bench.controlnet import _timings, emit, graphed
from livediff.bench.records import environment, int_list, record_sinks
from livediff.models.bundle import ModelBundle
from livediff.models.image_prompts import ImagePromptEncoder, row_inputs
from livediff.models.ip_adapter_loading import load_ip_adapter
from livediff.models.ip_adapter_spec import IPAdapterSpec
from livediff.models.loading import ModelSpec, load_model
from livediff.models.recipe import Recipe, apply_recipe
from livediff.models.spec import WeightsMode
from livediff.models.unet_batch import UNetBatch

SIZE = 512


def bench_unet(
    plain: ModelBundle,
    styled: ModelBundle,
    encoder: ImagePromptEncoder | None,
    args: argparse.Namespace,
    batch: int,
    device: torch.device,
) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(0)
    opts: dict[str, Any] = {"device": device, "dtype": plain.dtype}
    seq, dim = plain.embed_shape
    base = {
        "latents": torch.randn(batch, 4, SIZE // 8, SIZE // 8, generator=gen).to(**opts),
        "timesteps": torch.full((batch,), 499, device=device),
        "embeds": torch.randn(batch, seq, dim, generator=gen).to(**opts),
    }
    image = np.random.RandomState(1).randint(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    prompt = encoder.encode_array(image) if encoder is not None else None
    records = []
    cases = (("none", None),) if styled is plain else (("scale 0.8", 0.8), ("scale 0", 0.0))
    for case, scale in cases:
        model, fields = plain, dict(base)
        if scale is not None:
            assert encoder is not None and prompt is not None
            model = styled
            tokens, scales = row_inputs([prompt] * batch, [scale] * batch, encoder.adapter)
            fields.update(ip_tokens=tokens, ip_scales=scales)
        batch_in = UNetBatch(**fields)

        def step(m: ModelBundle = model, b: UNetBatch = batch_in) -> torch.Tensor:
            return m.predict_noise(b)

        record = {"case": "unet", "ip_adapter": case, **_timings(step, args, device)}
        if device.type == "cuda":
            replay = graphed(step)
            record["graph_vs_eager_max_abs"] = float((replay() - step()).abs().max())
        records.append(record)
    return records


def bench_encode(
    encoder: ImagePromptEncoder, args: argparse.Namespace, device: torch.device
) -> dict[str, Any]:
    image = np.random.RandomState(2).randint(0, 256, (720, 1280, 3), dtype=np.uint8)
    times = []
    for i in range(args.warmup + args.iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        tokens, _ = encoder.encode(image)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return {
        "case": "encode",
        "image": "1280x720",
        "tokens": list(tokens.shape),
        "wall_ms": float(np.median(times)),
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int_list, default=[1, 8])
    parser.add_argument("--variants", default="plain,plus")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    recipe = Recipe(fuse_qkv=True, channels_last=device.type == "cuda", compile=False)
    plain = apply_recipe(
        load_model(ModelSpec("sd15-lcm", weights=WeightsMode.RANDOM), device=device, dtype=dtype),
        recipe,
    )
    env = environment(device)
    with record_sinks(args.out) as sinks:
        for batch in args.batch:  # before any adapter's processors are on the UNet
            common = {"suite": "ip_adapter", "model": "sd15-lcm", "size": SIZE, **env}
            for record in bench_unet(plain, plain, None, args, batch, device):
                emit({**common, "dtype": str(dtype), "batch": batch, **record}, sinks)
        for variant in args.variants.split(","):
            adapter = load_ip_adapter(IPAdapterSpec("random", variant=variant), plain)
            styled = plain.with_ip_adapter(adapter)
            encoder = ImagePromptEncoder(adapter)
            common = {
                "suite": "ip_adapter",
                "model": "sd15-lcm",
                "variant": variant,
                "size": SIZE,
                "dtype": str(dtype),
                **env,
            }
            emit({**common, **bench_encode(encoder, args, device)}, sinks)
            for batch in args.batch:
                for record in bench_unet(plain, styled, encoder, args, batch, device):
                    emit({**common, "batch": batch, **record}, sinks)


if __name__ == "__main__":
    main()

"""``livediff bench --suite consistency``: what the feature bank and latent feedback cost, and
how much they steady the output.

    python -m livediff.bench.consistency --model sd-turbo --weights random --frames 100 \\
        --out bench/results/consistency-h200.jsonl

One stream per case, the same moving clip for every case (a scene panning a pixel per frame,
so consecutive inputs differ a little everywhere): milliseconds per frame (one sync per frame,
frame in and out on the device), device memory peak, and a **flicker figure**: the mean
frame-to-frame change of the output over that of the input. With random weights the figure
checks the plumbing, not quality: a real model (``--source`` or ``--model`` with cached
weights) makes it a measurement. The first record is the plain model's (no bank installed:
the frame a user gets without a bank-capable server; ``bank_installed: false``), and each
bank-capable record's ``ratio_to_plain`` is against it (``--no-plain-reference`` skips it).
Cases: ``BANK:FUSION:FEEDBACK`` on the bank-capable model (``0:0:0``: its bank unused;
default: that, a bank of 2 with and without fusion, feedback 0.3, both together), once per
``--bank-tokens`` value (what a bank frame keeps on the layers of at least ``--bank-reduce-from``
tokens; records carry ``feature_bank_tokens`` and ``feature_bank_reduce_from``).
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from livediff.bench.plots import _figure, draw_or_explain, save_figure
from livediff.bench.records import (
    emit,
    environment,
    gpu_memory_peak_mb,
    record_sinks,
    reset_memory,
    summarize,
)
from livediff.engine.backend_fit import make_stream
from livediff.engine.config import GenerationParams, StreamConfig
from livediff.exceptions import UsageError
from livediff.models.backends import Backend, prepare_backend, resolve_backend
from livediff.models.bank_tokens import DEFAULT_BANK_TOKENS, DEFAULT_REDUCE_FROM, BankTokens
from livediff.models.loading import ModelSpec, load_model


@dataclass(frozen=True)
class Case:
    feature_bank: int
    feature_fusion: float
    latent_feedback: float

    @classmethod
    def parse(cls, text: str) -> Case:
        try:
            bank, fusion, feedback = text.split(":")
            return cls(int(bank), float(fusion), float(feedback))
        except ValueError:
            raise UsageError(f"--cases: {text!r} is not BANK:FUSION:FEEDBACK") from None


DEFAULT_CASES = "0:0:0,2:0:0,2:0.8:0,0:0:0.3,2:0.8:0.3"


def panning_clip(size: int, count: int, seed: int = 0) -> list[np.ndarray]:
    """A random texture panned one pixel per frame (smoothed: a scene, not noise)."""
    rng = np.random.default_rng(seed)
    wide = rng.integers(0, 256, (size // 8, (size + count) // 8 + 2, 3)).astype(np.uint8)
    wide = np.kron(wide, np.ones((8, 8, 1), dtype=np.uint8))
    return [np.ascontiguousarray(wide[:size, i : i + size]) for i in range(count)]


def flicker(outputs: Sequence[np.ndarray], inputs: Sequence[np.ndarray]) -> float:
    """Mean |out_t − out_t−1| over mean |in_t − in_t−1| (the same frames)."""

    def change(frames: Sequence[np.ndarray]) -> float:
        return float(
            np.mean([np.abs(b.astype(np.int16) - a).mean() for a, b in itertools.pairwise(frames)])
        )

    return change(outputs) / max(change(inputs), 1e-9)


def run_case(bundle: Any, backend: Backend, case: Case, args: argparse.Namespace) -> dict[str, Any]:
    config = StreamConfig(width=args.size, height=args.size)
    params = GenerationParams.for_preset(bundle.preset).updated(
        prompt="a watercolor painting of a city",
        steps=args.steps,
        feature_bank=case.feature_bank,
        bank_interval=args.bank_interval,
        feature_fusion=case.feature_fusion,
        latent_feedback=case.latent_feedback,
    )
    stream = make_stream(bundle, backend, config, params)
    device = bundle.device
    clip = panning_clip(args.size, args.warmup + args.frames)
    frames = [torch.from_numpy(f).to(device) for f in clip]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, outputs = [], []
    for i, frame in enumerate(frames):
        start = time.perf_counter()
        produced = stream.process(frame)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = (time.perf_counter() - start) * 1000
        if i >= args.warmup:
            times.append(elapsed)
            outputs += [out.image.cpu().numpy() for out in produced]
    delay = stream.delay
    bank, usage = bundle.feature_bank, stream.bank_usage()
    return {
        **summarize(times),
        "feature_bank": case.feature_bank,
        "feature_fusion": case.feature_fusion,
        "latent_feedback": case.latent_feedback,
        "ip_adapter": False,
        "bank_interval": args.bank_interval,
        "flicker": round(flicker(outputs, clip[args.warmup - delay : len(clip) - delay]), 4),
        "gpu_mem_peak_mb": gpu_memory_peak_mb(device),
        "bank_mb": usage["mb"] if usage is not None else 0.0,  # this session's bank
        "bank_pool_mb": round(bank.bytes() / 2**20, 1) if bank is not None else 0.0,
        "stream": type(stream).__name__,  # CapturedStream: the whole step replays as one graph
    }


def case_label(record: dict[str, Any]) -> str:
    if not record.get("bank_installed", True):
        return "plain model (no bank installed)"
    tokens = record.get("feature_bank_tokens")
    return (
        f"bank {record['feature_bank']} fusion {record['feature_fusion']:g} "
        f"feedback {record['latent_feedback']:g}" + (f" {tokens}" if tokens else "")
    )


def draw(records: Sequence[dict[str, Any]], path: Path) -> None:
    """ms per frame (median, p99) and the flicker figure, per case."""
    plt, (figure, axes) = _figure(len(records), 2)
    labels = [case_label(r) for r in records]
    rows = range(len(records))
    axes[0][0].barh(rows, [r["ms_p99"] for r in records], color="#c8d6e5", label="p99")
    axes[0][0].barh(rows, [r["ms_median"] for r in records], color="#2e86de", label="median")
    axes[0][0].set_xlabel("ms per frame")
    axes[0][0].legend()
    axes[0][1].barh(rows, [r["flicker"] for r in records], color="#10ac84")
    axes[0][1].set_xlabel("flicker: output change / input change")
    for ax in axes[0]:
        ax.set_yticks(list(rows), labels)
        ax.invert_yaxis()
    save_figure(plt, figure, path)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="livediff bench --suite consistency", description=__doc__)
    parser.add_argument("--model", default="sd-turbo")
    parser.add_argument("--weights", default="random", choices=("random", "pretrained"))
    parser.add_argument("--source", default=None, help="HF id, folder or file of real weights")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--bank-interval", type=int, default=1)
    parser.add_argument(
        "--cases", default=DEFAULT_CASES, help="BANK:FUSION:FEEDBACK, comma-separated"
    )
    parser.add_argument(
        "--no-plain-reference",
        dest="plain_reference",
        action="store_false",
        help="skip the first record: the same stream on a model without a feature bank "
        "(each bank record's ratio_to_plain is against it)",
    )
    parser.add_argument(
        "--bank-tokens",
        default=DEFAULT_BANK_TOKENS.value,
        help="comma-separated --feature-bank-tokens values (full, merged, pooled); the cases "
        "run once per value, each on its own bank-capable model",
    )
    parser.add_argument("--bank-reduce-from", type=int, default=DEFAULT_REDUCE_FROM)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None, help="PNG of the records")
    args = parser.parse_args(argv)
    try:
        args.bank_tokens = [BankTokens(v.strip()) for v in args.bank_tokens.split(",") if v.strip()]
    except ValueError:
        parser.error(f"--bank-tokens: {args.bank_tokens!r}: expected full, merged or pooled")
    if not args.bank_tokens:
        parser.error("--bank-tokens needs at least one value")
    if args.warmup < 2:
        parser.error(
            "--warmup must be at least 2 (the Stream Batch delay and the flicker baseline)"
        )
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cases = [Case.parse(text) for text in args.cases.split(",") if text.strip()]
    spec = ModelSpec(
        preset=args.model,
        weights=args.weights,
        source=args.source,
        feature_bank_frames=max([c.feature_bank for c in cases] + [1]),
        feature_bank_rows=8,
    )

    def ready(tokens: BankTokens | None) -> tuple[Any, Backend]:
        """The model, with a feature bank keeping ``tokens`` (None: no bank)."""
        bundle = load_model(spec, device=args.device, dtype=args.dtype)
        if tokens is not None:
            bundle = bundle.with_feature_bank(
                frames=spec.feature_bank_frames,
                rows=spec.feature_bank_rows,
                tokens=tokens,
                reduce_from=args.bank_reduce_from,
            )
        backend = resolve_backend(args.backend, bundle.device)
        # compiled on CUDA, both streams replay their whole step as one graph (make_stream)
        return prepare_backend(bundle, backend), backend

    base = {
        "suite": "consistency",
        "model": args.model,
        "weights": args.weights,
        "width": args.size,
        "height": args.size,
        "steps": args.steps,
        "mode": "img2img",
        "rcfg": "none",
        "sessions": 1,
    }
    records = []
    with record_sinks(args.out) as sinks:
        plain_ms = None
        if args.plain_reference:  # the frame a user gets without a bank-capable model
            bundle, backend = ready(None)
            result = run_case(bundle, backend, Case(0, 0.0, 0.0), args)
            record = {**base, "system": f"livediff {backend.value}", **result}
            record = {**record, "bank_installed": False, **environment(bundle.device)}
            emit(record, sinks)
            records.append(record)
            plain_ms, device = record["ms_median"], bundle.device
            del bundle  # the bank-capable model's memory peak is its own
            reset_memory(device)
        for tokens in args.bank_tokens:
            bundle, backend = ready(tokens)
            for case in cases:
                record = {**base, "system": f"livediff {backend.value}"}
                record.update(run_case(bundle, backend, case, args), bank_installed=True)
                record["feature_bank_tokens"] = tokens.value
                record["feature_bank_reduce_from"] = args.bank_reduce_from
                if plain_ms:
                    record["ratio_to_plain"] = round(record["ms_median"] / plain_ms, 3)
                record.update(environment(bundle.device))
                emit(record, sinks)
                records.append(record)
            device = bundle.device
            del bundle
            reset_memory(device)
    draw_or_explain(records, args.plot, draw)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``livediff bench --suite lora``: what per-session LoRAs cost a shared batch, next to no LoRA
and a LoRA fused at load, and what loading a LoRA at runtime does to live sessions.

    livediff bench --suite lora --backend compile \\
        --out bench/results/lora-h200.jsonl --plot bench/results/lora-h200.png

(sd-turbo architecture, random weights, 512², 1 step, compile backend.) On a fresh H200
most of the run is compiling: five UNet graphs of ~40–55 s each cold (none: batch 1 and 16;
fused reuses them from Inductor's cache; per-session rank 16: 1 and 16; rank 64: 16 only) plus
12 cases of ``--warmup`` 2 + ``--seconds`` 3 s, about 5–6 minutes in all, less with a warm
cache. ``--systems``, ``--ranks``, ``--sessions`` narrow it (several runs may append to one
``--out``; ``--replot`` draws the PNG from it). CPU smoke:
``livediff bench --suite lora --model tiny --sessions 1,2 --loras 0,1,2 --seconds 1``.

Random LoRA files (diffusers / PEFT ``.safetensors``, every layer per-session LoRAs take:
attention q/k/v/out, feed-forward, linear ``proj_in``/``proj_out``) are written for the model,
one folder per ``--ranks`` value, and used as a user would:

- ``none``: the model without LoRA (``loras`` 0);
- ``fused``: the first LoRA fused at load (``--lora FILE``; ``loras`` 1, every session);
- ``per-session`` (and ``per-session-unmerged``, ``--no-lora-merge``: the per-row kernels
  even where every row agrees): the folder as ``--lora-library`` (buffers of ``max_rank`` = the rank), and
  session ``k`` of N asks for LoRA ``k mod L`` (``loras`` L distinct in the batch; 0: the
  library is there, no session uses it). The first rank runs at every session count, the
  others at the most sessions only.

Every case runs N sessions through the real engine (:func:`livediff.bench.multi.run_livediff`),
each source delivering a frame every 1/``--fps`` s; with more frames than the device answers,
batches hold every session. Each JSON line adds: ``loras``, ``rank``, ``ms_median``/``ms_p99``
= device ms **per batch** (the batch's outputs carry its time), ``batch_frames_p50``,
``latency_ms_p50``/``latency_ms_p99`` (arrival → output), ``drop_rate`` (and the multi
suite's ``drops_by_reason``, ``late``), ``gpu_mem_peak_mb``,
``compile_s`` (compile + capture of the system's model), ``recipe``.

``case: "load"`` records (per-session, the most sessions and LoRAs, at ``--load-fps``): while
the sessions stream, a further LoRA is loaded as ``POST /loras`` does (``Engine.load_lora``:
the file read in a thread, the buffer write between two batches). ``load_ms`` = that call's
time; ``stall_ms`` = the largest gap between consecutive outputs of any session across the
load, next to ``gap_ms_median`` and ``gap_ms_max`` (the usual and the largest gap outside the
load: a stall as large outside it is not the load's doing) and ``frame_interval_ms``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

from livediff.bench.multi import Scene, run_livediff
from livediff.bench.plots import _figure, draw_or_explain, replot, save_figure
from livediff.bench.records import (
    choice_list,
    emit,
    environment,
    gpu_memory_peak_mb,
    percentile,
    record_sinks,
    reset_memory,
)
from livediff.engine.config import GenerationParams, StreamConfig
from livediff.engine.runtime import Engine, RuntimeConfig
from livediff.engine.runtime_config import BatchOverlap
from livediff.engine.session import SessionOutput
from livediff.exceptions import UsageError
from livediff.models.backends import (
    Backend,
    default_backend,
    prepare_backend,
    recipe_for,
    runtime_bundle,
)
from livediff.models.bundle import ModelBundle
from livediff.models.loading import ModelSpec, load_model
from livediff.models.lora_files import layer_features, target_layers
from livediff.models.lora_library_config import LoraLibraryConfig
from livediff.models.lora_setup import attach_lora_library
from livediff.models.presets import LoraRef, get_preset
from livediff.settings.flags import add_setting_flag

SYSTEMS = ("none", "fused", "per-session", "per-session-unmerged")
PER_SESSION = ("per-session", "per-session-unmerged")
LATE = "late"  # the name of the LoRA loaded at runtime


# ---------------------------------------------------------------------- LoRA files
def write_lora(unet: torch.nn.Module, path: Path, rank: int, seed: int) -> Path:
    """A random LoRA of ``rank`` on every layer per-session LoRAs take, in diffusers / PEFT's
    layout (alpha = rank: scale 1); small updates, so outputs stay finite in fp16."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, layer in sorted(target_layers(unet).items()):
        features_in, features_out = layer_features(layer)
        down = torch.randn(rank, features_in, generator=gen) / features_in**0.5
        up = torch.randn(features_out, rank, generator=gen) * 0.05 / rank**0.5
        if isinstance(layer, torch.nn.Conv2d):  # a 1×1 convolution's LoRA: [rank, in, 1, 1] …
            down, up = down[..., None, None], up[..., None, None]
        tensors[f"unet.{name}.lora_A.weight"] = down.half().contiguous()
        tensors[f"unet.{name}.lora_B.weight"] = up.half().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


@dataclass(frozen=True)
class LoraFiles:
    """Per rank: the library folder (``style0`` … ``style{count-1}``) and the runtime one."""

    root: Path
    ranks: tuple[int, ...]
    count: int

    def library(self, rank: int) -> Path:
        return self.root / f"rank{rank}" / "library"

    def style(self, rank: int, index: int) -> Path:
        return self.library(rank) / f"style{index}.safetensors"

    def late(self, rank: int) -> Path:
        return self.root / f"rank{rank}" / f"{LATE}.safetensors"

    def write(self, unet: torch.nn.Module) -> None:
        for rank in self.ranks:
            for index in range(self.count):
                write_lora(unet, self.style(rank, index), rank, seed=1000 * rank + index)
            write_lora(unet, self.late(rank), rank, seed=1000 * rank + 999)


# ---------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    system: str
    rank: int  # 0: no LoRA
    sessions: int
    loras: int
    load: bool = False  # a LoRA is loaded at runtime while the sessions stream


def plan(args: argparse.Namespace) -> list[Case]:
    """The cases, grouped by the model they need (one load + compile per system and rank)."""
    cases: list[Case] = []
    for system in args.systems:
        if system == "none":
            cases += [Case("none", 0, n, 0) for n in args.sessions]
        elif system == "fused":
            cases += [Case("fused", args.ranks[0], n, 1) for n in args.sessions]
        else:
            for position, rank in enumerate(args.ranks):
                # The first rank at every point; the others (a compile each) at the most
                # sessions only, and not without LoRAs (that costs the same at every rank).
                counts = [c for c in args.loras if c or position == 0]
                counts_of = args.sessions if position == 0 else [max(args.sessions)]
                cases += [Case(system, rank, n, c) for n in counts_of for c in counts if c <= n]
                if position == 0 and args.load:
                    most = max(args.sessions)
                    used = max(c for c in args.loras if c <= most)
                    cases.append(Case(system, rank, most, used, load=True))
    return cases


@dataclass
class Seen:
    """Every output of a case: per session its finish times, per batch its frames and ms."""

    done: dict[int, list[float]] = field(default_factory=lambda: defaultdict(list))
    batches: dict[float, list[float]] = field(default_factory=lambda: defaultdict(list))
    load_span: tuple[float, float] | None = None
    load_ms: float | None = None

    def add(self, k: int, out: SessionOutput, window: tuple[float, float]) -> None:
        if not window[0] <= out.t_done < window[1]:
            return
        self.done[k].append(out.t_done)
        if out.compute_ms is not None and not out.skipped:
            self.batches[out.t_done].append(out.compute_ms)  # a batch's outputs share t_done

    def batch_ms(self) -> list[float]:
        return [sum(shares) for shares in self.batches.values()]

    def gaps(self) -> tuple[list[float], list[float]]:
        """Gaps between a session's consecutive outputs (ms): across the load, and the others."""
        across: list[float] = []
        others: list[float] = []
        for times in self.done.values():
            for a, b in itertools.pairwise(times):
                gap = (b - a) * 1000.0
                span = self.load_span
                (across if span and b >= span[0] and a <= span[1] else others).append(gap)
        return across, others


def session_settings(case: Case) -> Any:
    def settings(k: int) -> dict[str, Any]:
        if case.system not in PER_SESSION or not case.loras:
            return {"seed": k}
        return {"seed": k, "loras": [{"name": f"style{k % case.loras}", "scale": 1.0}]}

    return settings


async def measure(
    bundle: ModelBundle,
    config: StreamConfig,
    params: GenerationParams,
    args: argparse.Namespace,
    case: Case,
    files: LoraFiles,
) -> tuple[Any, Seen]:
    seen = Seen()
    window_of: dict[str, tuple[float, float]] = {}
    outputs: list[tuple[int, SessionOutput]] = []

    async def during(engine: Engine, window: tuple[float, float]) -> None:
        window_of["w"] = window
        if not case.load:
            return
        loop = asyncio.get_running_loop()
        await asyncio.sleep(max(0.0, window[0] + args.seconds / 3 - loop.time()))
        began = loop.time()
        await engine.load_lora(LATE, str(files.late(case.rank)))
        ended = loop.time()
        seen.load_span, seen.load_ms = (began, ended), (ended - began) * 1000.0

    def on_output(k: int, out: SessionOutput) -> None:
        outputs.append((k, out))

    run_args = argparse.Namespace(**vars(args))
    if case.load:
        run_args.fps = args.load_fps
    tally = await run_livediff(
        bundle,
        config,
        params,
        run_args,
        case.sessions,
        args.overlap,
        open_params=session_settings(case),
        on_output=on_output,
        during=during,
    )
    for k, out in outputs:
        seen.add(k, out, window_of["w"])
    return tally, seen


# ---------------------------------------------------------------------- models
def system_bundle(
    args: argparse.Namespace, system: str, rank: int, files: LoraFiles, device: torch.device
) -> tuple[ModelBundle, float | None, str]:
    """The model a system runs, ready for ``--backend`` (compiled and captured per bucket)."""
    loras: tuple[LoraRef, ...] = ()
    if system == "fused":
        loras = (LoraRef(str(files.style(rank, 0)), 1.0),)
    spec = ModelSpec(preset=args.model, weights=args.weights, loras=loras)
    bundle = load_model(spec, device=device, dtype=args.dtype)
    if system in PER_SESSION:
        library = LoraLibraryConfig(
            library=str(files.library(rank)),
            max_loras=files.count + 1,  # room for the LoRA loaded at runtime
            max_rank=rank,
            slots_per_row=args.slots_per_row,
            merge=system == "per-session",
        )
        bundle = attach_lora_library(bundle, library)
    recipe = recipe_for(bundle).label if args.backend is Backend.COMPILE else "eager"
    bundle = prepare_backend(bundle, args.backend)
    latent = (args.size // bundle.vae_scale_factor, args.size // bundle.vae_scale_factor)
    ready = runtime_bundle(
        bundle, args.backend, latent_size=latent, buckets=args.buckets, show_progress=False
    )
    report = getattr(ready, "compile_report", None)
    return ready, (round(report.seconds, 1) if report is not None else None), recipe


def record(
    case: Case,
    tally: Any,
    seen: Seen,
    bundle: ModelBundle,
    args: argparse.Namespace,
    compile_s: float | None,
    recipe: str,
) -> dict[str, Any]:
    answered = len(tally.latency_ms)
    per_batch = seen.batch_ms()
    frames = [len(shares) for shares in seen.batches.values()]
    across, others = seen.gaps()
    fps = args.load_fps if case.load else args.fps
    return {
        "system": case.system,
        "suite": "lora",
        "case": "load" if case.load else "steady",
        "model": bundle.preset.name,
        "weights": bundle.weights.value,
        "width": args.size,
        "height": args.size,
        "steps": args.steps,
        "mode": "img2img",
        "rcfg": "none",
        "sessions": case.sessions,
        "loras": case.loras,
        "rank": case.rank,
        "fps": round(tally.done_in_window / args.seconds, 2),
        "ms_median": round(percentile(per_batch, 50), 3),
        "ms_p99": round(percentile(per_batch, 99), 3),
        "batches": len(per_batch),
        "batch_frames_p50": percentile(frames, 50) if frames else None,
        "latency_ms_p50": round(percentile(tally.latency_ms, 50), 3),
        "latency_ms_p99": round(percentile(tally.latency_ms, 99), 3),
        "drop_rate": round(1.0 - answered / tally.delivered, 4) if tally.delivered else None,
        "drops_by_reason": tally.drops_by_reason,  # the multi suite's: why frames were lost
        "late": tally.late,
        "gpu_mem_peak_mb": gpu_memory_peak_mb(bundle.device),
        "load_ms": round(seen.load_ms, 2) if seen.load_ms is not None else None,
        "stall_ms": round(max(across), 2) if case.load and across else None,
        "gap_ms_median": round(percentile(others, 50), 2) if case.load and others else None,
        "gap_ms_max": round(max(others), 2) if case.load and others else None,
        "frame_interval_ms": round(1000.0 / fps, 2),
        "input_fps": fps,
        "seconds": args.seconds,
        "buckets": list(args.buckets),
        "slots_per_row": args.slots_per_row if case.system in PER_SESSION else None,
        "lora_merges": None if bundle.loras is None else bundle.loras.merge.merges,
        "compile_s": compile_s,
        "recipe": recipe,
        "overlap": args.overlap.value,
        "backend": args.backend.value,
        "dtype": str(bundle.dtype).removeprefix("torch."),
        **environment(bundle.device),
    }


# ---------------------------------------------------------------------- plot
def case_label(record: dict[str, Any]) -> str:
    label = f"{record['system']} {record['sessions']}×"
    if record["loras"]:
        label += f" {record['loras']} LoRA r{record['rank']}"
    return label + (" + load" if record.get("case") == "load" else "")


def draw(records: Sequence[dict[str, Any]], path: Path) -> None:
    """ms per batch (median, p99) per case, and each over no LoRA at the same session count."""
    plt, (figure, axes) = _figure(len(records), 2)
    rows = range(len(records))
    labels = [case_label(r) for r in records]
    cost, ratio = axes[0]
    cost.barh(rows, [r["ms_p99"] for r in records], color="#c8d6e5", label="p99")
    cost.barh(rows, [r["ms_median"] for r in records], color="#2e86de", label="median")
    cost.set(xlabel="device ms per batch", title=records[0]["device"])
    cost.legend()
    plain = {r["sessions"]: r["ms_median"] for r in records if r["system"] == "none"}
    ratios = [
        r["ms_median"] / plain[r["sessions"]] if plain.get(r["sessions"]) else 0 for r in records
    ]
    ratio.barh(rows, ratios, color="#10ac84")
    ratio.axvline(1.0, color="black", linewidth=0.8)
    ratio.set(xlabel="ms per batch ÷ no LoRA, same sessions")
    for ax in (cost, ratio):
        ax.set_yticks(list(rows), labels)
        ax.invert_yaxis()
    save_figure(plt, figure, path)


# ---------------------------------------------------------------------- entry point
def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers"
        ) from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected integers ≥ 0")
    return values


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="livediff bench --suite lora",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default="sd-turbo")
    parser.add_argument("--weights", default="random", choices=("random", "pretrained"))
    parser.add_argument(
        "--backend",
        choices=[b.value for b in Backend],
        default=None,
        help="default: compile on CUDA, eager on CPU",
    )
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, help="default: fp16 on CUDA, fp32 on CPU")
    parser.add_argument("--size", type=int, default=None, help="default: the preset's")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument(
        "--systems",
        type=choice_list(list(SYSTEMS)),
        default=list(SYSTEMS[:3]),
        help=f"of {', '.join(SYSTEMS)} (default: the first three)",
    )
    parser.add_argument("--sessions", type=_ints, default=[1, 16], help="session counts")
    parser.add_argument(
        "--loras", type=_ints, default=[0, 1, 4], help="distinct per-session LoRAs in the batch"
    )
    parser.add_argument("--ranks", type=_ints, default=[16, 64])
    parser.add_argument("--slots-per-row", type=int, default=2)
    parser.add_argument("--fps", type=float, default=30.0, help="frames per second per source")
    parser.add_argument(
        "--load-fps", type=float, default=15.0, help="per source, in the runtime-load case"
    )
    parser.add_argument(
        "--no-load", dest="load", action="store_false", help="skip the runtime-load case"
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds per case")
    parser.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="unmeasured seconds first (default 2 on CUDA, 0.5 on CPU)",
    )
    parser.add_argument("--frame-size", type=int, default=None, help="default: --size")
    parser.add_argument("--deadline-ms", type=float, default=100.0)
    parser.add_argument(
        "--overlap", choices=[o.value for o in BatchOverlap], default=BatchOverlap.OFF.value
    )
    add_setting_flag(parser, RuntimeConfig, "batch_buckets", flag="--buckets")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None, help="PNG of the records")
    parser.add_argument("--replot", type=Path, help="only draw --plot from these JSON lines")
    args = parser.parse_args(argv)
    if 0 in args.ranks:
        parser.error("--ranks: a LoRA's rank is at least 1")
    if 0 in args.sessions:
        parser.error("--sessions: at least 1")
    args.overlap = BatchOverlap(args.overlap)
    args.degrade, args.scene, args.noise = False, Scene.MOVING, 2  # what run_livediff reads
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot:
        return replot(args.replot, args.plot, draw)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.dtype = args.dtype or ("fp16" if device.type == "cuda" else "fp32")
    args.backend = Backend(args.backend) if args.backend else default_backend(device)
    if args.warmup is None:
        args.warmup = 2.0 if device.type == "cuda" else 0.5
    chosen_buckets = args.buckets != RuntimeConfig().batch_buckets
    cases = plan(args)
    if not cases:
        raise UsageError("--systems/--sessions/--loras leave no case to run")
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="livediff-lora-bench-") as folder:
        files = LoraFiles(Path(folder), tuple(args.ranks), max(max(args.loras), 1))
        preset = get_preset(args.model)
        with torch.device("meta"):  # the layers' shapes, no weights
            skeleton = UNet2DConditionModel.from_config(preset.unet_config)
        files.write(skeleton)
        args.size = args.size or preset.width
        args.frame_size = args.frame_size or args.size
        config = StreamConfig(width=args.size, height=args.size)
        with record_sinks(args.out) as sinks:
            groups: dict[tuple[str, int], list[Case]] = {}
            for case in cases:
                groups.setdefault((case.system, case.rank), []).append(case)
            for (system, rank), group in groups.items():
                if not chosen_buckets:  # compile only the rows this model's cases batch
                    args.buckets = tuple(sorted({c.sessions * args.steps for c in group}))
                bundle, compile_s, recipe = system_bundle(args, system, rank, files, device)
                params = GenerationParams.for_preset(bundle.preset, steps=args.steps)
                for case in group:
                    reset_memory(device)
                    tally, seen = asyncio.run(measure(bundle, config, params, args, case, files))
                    records.append(record(case, tally, seen, bundle, args, compile_s, recipe))
                    emit(records[-1], sinks)
                    if case.load and bundle.loras is not None:  # the next case starts as before
                        bundle.loras.unload(LATE)
                del bundle
                gc.collect()
                if args.backend is Backend.COMPILE:
                    torch._dynamo.reset()  # the next model compiles diffusers' same forward
    draw_or_explain(records, args.plot, draw)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

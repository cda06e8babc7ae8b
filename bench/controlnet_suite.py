"""``livediff bench --suite controlnet``: what ControlNets cost a live stream, end to end.

    livediff bench --suite controlnet --backend compile \\
        --out bench/results/controlnet-suite-h200.jsonl --plot bench/results/controlnet-suite-h200.png

    livediff bench --suite controlnet --model tiny --size 64 --frames 3 --warmup 2 \\
        --seconds 1 --sessions 2 --fps 5      # CPU smoke (eager)

One process, one device, the sd-turbo architecture with random weights (``--model``), 512²,
img2img at strength 0.5, 1 step, fp16 on CUDA (fp32 on CPU). ControlNets are the family's
real architecture with seeded random weights (``cn0``, ``cn1`` at scale 0.8), the depth
preprocessor is Depth Anything V2 Small with random weights. The default run (about five
minutes of an H200, compiles included: three compiled bundles, buckets 1 and 8) has:

- **single** (``sessions: 1``): one stream, closed loop, one sync per frame, frame in and
  out on the device; compiled, the fastest way livediff runs it (``stream``): the whole
  step as one CUDA graph (``CapturedStream``, as ``livediff run``), canny and the
  ControlNets inside it (:mod:`livediff.engine.captured_control`; before 2026-12-02 a
  ``Stream`` whose UNet and VAE calls replayed the server's per-bucket graphs; depth still
  runs call by call, ``not_captured``):
  ControlNets ``none`` (0), ``canny`` (1), ``depth`` (1), ``canny+depth`` (2; the default
  ``--single``). ``ratio_to_plain`` = ms_median ÷ the plain (0-net) stream's of this run;
  ``preprocess_ms`` = the case's preprocessors alone (device time, median);
- **diffusers** (``system: "diffusers"``): ``StableDiffusionImg2ImgPipeline`` (0) and
  ``StableDiffusionControlNetImg2ImgPipeline`` (1, canny) on the same architecture and
  random weights, TAESD, precomputed prompt embeddings, 1 step, the control image made by
  livediff's own canny (so only the pipeline differs), the UNet, the ControlNet and TAESD's
  halves under ``torch.compile(mode="reduce-overhead", fullgraph=True)`` with
  ``--backend compile`` (``variant``; it runs after livediff's cases, with dynamo's cache
  reset, since both compile diffusers' forwards). ``livediff_speedup`` = its ms_median ÷
  livediff's for the same case;
- **sessions** (``--sessions``, default 8, × ``--fps`` 30 each): the real
  :class:`~livediff.engine.runtime.Engine` (cross-session batching, deadline drops, no
  degrading) with one canny ControlNet per session, and none for comparison (``--multi``),
  via :func:`livediff.bench.multi.run_livediff`: ``drop_rate``, ``latency_ms_p50``/``p99``
  (source arrival → output), ``ms_median`` = device time per output frame.

With ``--control-overlap off,on`` every case with nets runs twice: the nets one after the
other on one CUDA stream, then beside the UNet's down blocks on a second one (the default,
:mod:`livediff.models.unet_halves`); ``control_overlap`` says which (``null`` without nets).
A single case that runs call by call (depth: it replays the per-bucket graphs, captured with
the default) runs once, with the default. ``--with-nets K`` gives the case's nets to the first
K sessions only, and ``--controlnet-rows shared,apart`` runs the sessions cases with nets
under both rules (``RuntimeConfig.controlnet_rows``: the sessions without nets share the
calls and run the nets at scale 0, or run the UNet alone in calls of their own); the records
say ``sessions_with_nets`` and ``controlnet_rows``.

Every record has ``suite: "controlnet"``, ``case`` (``single``/``sessions``), ``system``,
``controlnets`` (0, 1, 2), ``preprocessor`` (``null``, ``canny``, ``depth``,
``canny+depth``), ``sessions``, ``ms_median``, ``ms_p99``, ``fps``, ``latency_ms_p99``,
``drop_rate`` (single cases: ``null``, nothing arrives on a clock in a closed loop, and
``latency_ms_p99`` is ``ms_p99``), ``gpu_mem_peak_mb`` (peak device memory during the case), ``controlnet_mb`` (one loaded
ControlNet's parameter bytes), ``controlnet_peak_mb`` (peak device memory its loading
allocated; ``null`` on CPU), ``depth_net_mb``, ``compile_s`` (livediff: compiling and
capturing the bundle the case runs on, shared by the cases with as many nets), ``warmup_s``
(single: the warm-up frames, where diffusers compiles), and device, torch, commit, date,
command. A summary of the issue's targets goes to stderr.

The kernel and network microbenchmark (canny, depth, soft edge, the UNet with 0/1/2 nets,
eager vs CUDA graph) is ``livediff bench --suite controlnet --micro [its options]``
(:mod:`livediff.bench.controlnet`).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from livediff.bench import multi
from livediff.bench.consistency import panning_clip
from livediff.bench.plots import _figure, draw_or_explain, replot, save_figure
from livediff.bench.records import (
    emit,
    environment,
    gpu_memory_peak_mb,
    int_list,
    record_sinks,
    reset_memory,
)
from livediff.bench.records import summarize as summarize_ms
from livediff.engine.backend_fit import make_stream, whole_step_blockers
from livediff.engine.config import GenerationParams, StreamConfig
from livediff.engine.runtime_config import BatchOverlap, ControlNetRows
from livediff.engine.stream import Stream
from livediff.exceptions import UsageError
from livediff.models.backends import Backend, prepare_backend, resolve_backend, runtime_bundle
from livediff.models.bundle import ModelBundle, WeightsMode
from livediff.models.control_images import PreprocessorNetworks, preprocess
from livediff.models.control_uses import ControlNetSpec, Preprocessor
from livediff.models.controlnet import LoadedControlNet
from livediff.models.controlnet_loading import load_controlnet
from livediff.models.depth import load_depth_estimator
from livediff.models.loading import ModelSpec, load_model, resolve_dtype

PROMPT = "a photo of a cat"
STRENGTH = 0.5  # 1 step at strength 0.5: what the peers suite runs (diffusers: 2 steps × 0.5)
SCALE = 0.8
Runner = Callable[[torch.Tensor], Any]  # uint8 [H, W, 3] on the device → its output


@dataclass(frozen=True)
class Case:
    """The preprocessors of a case, one per ControlNet slot (``()``: no ControlNet)."""

    preprocessors: tuple[Preprocessor, ...]

    @classmethod
    def parse(cls, text: str) -> Case:
        text = text.strip()
        if text in ("none", "0"):
            return cls(())
        try:
            return cls(tuple(Preprocessor(p) for p in text.split("+")))
        except ValueError:
            raise UsageError(
                f"case {text!r}: expected none or preprocessors joined by '+' (canny+depth)"
            ) from None

    @property
    def controlnets(self) -> int:
        return len(self.preprocessors)

    @property
    def label(self) -> str | None:
        return "+".join(p.value for p in self.preprocessors) or None

    def uses(self) -> tuple[str, ...]:
        """The session's ``controlnets``: slot k is ``cnK`` with this case's k-th preprocessor."""
        return tuple(f"cn{k}:{SCALE}:{p.value}" for k, p in enumerate(self.preprocessors))


def cases(text: str) -> list[Case]:
    return [Case.parse(item) for item in text.split(",") if item.strip()]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def closed_loop(
    runner: Runner, frames: Sequence[torch.Tensor], warmup: int, count: int, device: torch.device
) -> dict[str, Any]:
    """:func:`~livediff.bench.records.summarize` of ``count`` frames after ``warmup`` (one sync
    per frame), with ``warmup_s``: the warm-up frames' seconds (first calls compile)."""
    began = time.perf_counter()
    for i in range(warmup):
        runner(frames[i % len(frames)])
    _sync(device)
    warmup_s = time.perf_counter() - began
    times = []
    for i in range(count):
        began = time.perf_counter()
        runner(frames[(warmup + i) % len(frames)])
        _sync(device)
        times.append((time.perf_counter() - began) * 1000.0)
    return {**summarize_ms(times), "warmup_s": round(warmup_s, 2)}


def param_mb(module: torch.nn.Module) -> float:
    nbytes = sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
    return round(nbytes / 2**20, 1)


# ---------------------------------------------------------------------- livediff
def single_stream(
    prepared: ModelBundle,
    graphed: ModelBundle,
    backend: Backend,
    config: StreamConfig,
    params: GenerationParams,
) -> Stream:
    """The single stream :func:`make_stream` builds: the whole step as one CUDA graph over the
    ``prepared`` model where it can (no per-frame inputs), else call by call over ``graphed``
    (the UNet and VAE calls replay the per-bucket graphs of :func:`runtime_bundle`)."""
    if whole_step_blockers(prepared):
        return make_stream(graphed, backend, config, params)
    return make_stream(prepared, backend, config, params)


def preprocess_ms(
    case: Case, bundle: ModelBundle, frame: torch.Tensor, args: argparse.Namespace
) -> float:
    """Device time (median) of the case's preprocessors alone on one frame."""
    if not case.preprocessors:
        return 0.0
    from livediff.bench.controlnet import time_ms

    size = (args.size, args.size)

    def run() -> None:
        for kind in case.preprocessors:
            preprocess(kind, frame[None], size, networks=bundle.control_networks)

    return round(time_ms(run, warmup=1, iters=args.frames, device=bundle.device), 3)


def multi_args(args: argparse.Namespace, backend: Backend) -> argparse.Namespace:
    """What :func:`livediff.bench.multi.run_livediff` and ``multi.record`` read."""
    return argparse.Namespace(
        deadline_ms=args.deadline_ms,
        buckets=args.buckets,
        degrade=False,
        fps=args.fps,
        warmup=args.session_warmup,
        seconds=args.seconds,
        frame_size=args.size,
        scene=multi.Scene.MOVING,
        noise=2,
        steps=1,
        backend=backend.value,
    )


# ---------------------------------------------------------------------- diffusers
def _to_unit(frame: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return frame.permute(2, 0, 1).unsqueeze(0).to(dtype) / 255.0


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    return (images[0].float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0)


def diffusers_runner(
    bundle: ModelBundle, controlnet: LoadedControlNet | None, size: int, compiled: bool
) -> Runner:
    """diffusers img2img (with ``controlnet``: ControlNet img2img, control image by our canny)."""
    from diffusers import (
        LCMScheduler,
        StableDiffusionControlNetImg2ImgPipeline,
        StableDiffusionImg2ImgPipeline,
    )

    parts: dict[str, Any] = {
        "vae": bundle.vae,
        "text_encoder": bundle.text_encoders[0],
        "tokenizer": bundle.tokenizers[0],
        "unet": bundle.unet,
        "scheduler": LCMScheduler.from_config(bundle.scheduler_config),
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }
    pipe: Any
    if controlnet is None:
        pipe = StableDiffusionImg2ImgPipeline(**parts)
    else:
        pipe = StableDiffusionControlNetImg2ImgPipeline(**parts, controlnet=controlnet.net)
    pipe.set_progress_bar_config(disable=True)
    embeds, _ = pipe.encode_prompt(PROMPT, bundle.device, 1, False)
    if compiled:
        options = {"mode": "reduce-overhead", "fullgraph": True}
        nets = [pipe.unet, pipe.vae.encoder, pipe.vae.decoder]
        if controlnet is not None:
            nets.append(pipe.controlnet)
        for net in nets:
            net.compile(**options)
    dtype = bundle.dtype

    def run(frame: torch.Tensor) -> torch.Tensor:
        if compiled:
            torch.compiler.cudagraph_mark_step_begin()
        kwargs: dict[str, Any] = {}
        if controlnet is not None:
            edges = preprocess(Preprocessor.CANNY, frame[None], (size, size), dtype=dtype)
            kwargs = {"control_image": edges, "controlnet_conditioning_scale": SCALE}
        images = pipe(
            image=_to_unit(frame, dtype),
            prompt_embeds=embeds,
            num_inference_steps=2,
            strength=STRENGTH,
            guidance_scale=0.0,
            output_type="pt",
            height=size,
            width=size,
            **kwargs,
        ).images
        return _to_uint8(images)

    return run


# ---------------------------------------------------------------------- the run
@dataclass
class Run:
    """What every case of one run shares."""

    args: argparse.Namespace
    backend: Backend
    device: torch.device
    dtype: torch.dtype
    config: StreamConfig
    frames: list[torch.Tensor]
    memory: dict[str, float | None]
    sinks: list[Any]
    records: list[dict[str, Any]]

    def base(self, bundle: ModelBundle, system: str, case: Case, sessions: int) -> dict[str, Any]:
        return {
            "system": system,
            "suite": "controlnet",
            "model": bundle.preset.name,
            "weights": bundle.weights.value,
            "width": self.config.width,
            "height": self.config.height,
            "steps": 1,
            "mode": self.config.mode.value,
            "rcfg": self.config.rcfg.value,
            "sessions": sessions,
            "controlnets": case.controlnets,
            "preprocessor": case.label,
            "backend": self.backend.value,
            "dtype": str(self.dtype).removeprefix("torch."),
        }

    def emit(self, record: dict[str, Any]) -> None:
        record = {**record, **self.memory, **environment(self.device)}
        emit(record, self.sinks)
        self.records.append(record)


def load_livediff(run: Run, nets: int, depth: bool) -> tuple[ModelBundle, list[LoadedControlNet]]:
    """The model with ``nets`` random ControlNets (``cn0``…) and the preprocessor networks,
    prepared for the backend; sets ``run.memory`` (what one ControlNet holds)."""
    spec = ModelSpec(preset=run.args.model, weights=WeightsMode.RANDOM)
    bundle = load_model(spec, device=run.device, dtype=run.dtype)
    cuda = run.device.type == "cuda"
    loaded = []
    for k in range(nets):
        if cuda:
            torch.cuda.synchronize(run.device)
            torch.cuda.reset_peak_memory_stats(run.device)
            before = torch.cuda.memory_allocated(run.device)
        net = load_controlnet(ControlNetSpec("random", name=f"cn{k}", seed=k), bundle)
        if k == 0:
            run.memory["controlnet_mb"] = param_mb(net.net)
            run.memory["controlnet_peak_mb"] = (
                round((torch.cuda.max_memory_allocated(run.device) - before) / 2**20, 1)
                if cuda
                else None
            )
        loaded.append(net)
    networks = PreprocessorNetworks()
    if depth:
        networks.depth = load_depth_estimator("random", device=run.device, dtype=run.dtype)
        run.memory["depth_net_mb"] = param_mb(networks.depth.net)
    bundle = prepare_backend(bundle.with_controlnets(loaded, networks), run.backend)
    return bundle, loaded


def session_settings(case: Case, with_nets: int, k: int) -> dict[str, Any]:
    """Session ``k``'s settings in a sessions case: the first ``with_nets`` use the case's
    nets, the others none."""
    return {"seed": k, "controlnets": case.uses() if k < with_nets else ()}


def run_livediff(run: Run, single: list[Case], sessions: list[Case]) -> None:
    args = run.args
    counts = sorted({c.controlnets for c in [*single, *sessions]})
    if not counts:
        return
    depth = any(Preprocessor.DEPTH in c.preprocessors for c in [*single, *sessions])
    full, nets = load_livediff(run, max(counts), depth)
    factor = full.vae_scale_factor
    latent = (args.size // factor, args.size // factor)
    plain_ms: float | None = None
    for count in counts:
        in_sessions = [c for c in sessions if c.controlnets == count]
        buckets = tuple(args.buckets) if in_sessions else (1,)
        began = time.perf_counter()
        prepared = full.with_controlnets(nets[:count])
        bundle = runtime_bundle(
            prepared,
            run.backend,
            latent_size=latent,
            buckets=buckets,
            show_progress=False,
        )
        compile_s = round(time.perf_counter() - began, 1)  # compile + capture of its buckets
        base = GenerationParams.for_preset(bundle.preset, steps=1, strength=STRENGTH)
        for case in (c for c in single if c.controlnets == count):
            params = base.updated(prompt=PROMPT, controlnets=case.uses())
            overlaps = args.control_overlap if case.controlnets else [prepared.control_overlap]
            for overlap in overlaps:
                reset_memory(run.device)
                chosen = dataclasses.replace(prepared, control_overlap=overlap)
                stream = single_stream(chosen, bundle, run.backend, run.config, params)
                if stream.bundle is not chosen and overlap != prepared.control_overlap:
                    del stream  # call by call over the per-bucket graphs: captured with the default
                    continue
                summary = closed_loop(
                    stream.process, run.frames, args.warmup, args.frames, run.device
                )
                if not case.preprocessors:
                    plain_ms = summary["ms_median"]
                run.emit(
                    {
                        **run.base(bundle, "livediff", case, 1),
                        "case": "single",
                        "stream": type(stream).__name__,
                        "control_overlap": overlap if case.controlnets else None,
                        **summary,
                        "compile_s": compile_s,
                        "latency_ms_p99": summary["ms_p99"],
                        "drop_rate": None,
                        "ratio_to_plain": (
                            round(summary["ms_median"] / plain_ms, 3) if plain_ms else None
                        ),
                        "preprocess_ms": preprocess_ms(case, bundle, run.frames[0], args),
                        "gpu_mem_peak_mb": gpu_memory_peak_mb(run.device),
                    }
                )
                del stream
        engines = {(prepared.control_overlap, False): bundle}  # (overlap, apart): built when asked
        for case in in_sessions:
            params = base.updated(prompt=PROMPT, controlnets=case.uses())
            settings = multi_args(args, run.backend)
            overlap = BatchOverlap(args.overlap)
            on = overlap is BatchOverlap.ON or (
                overlap is BatchOverlap.AUTO and run.device.type == "cuda"
            )
            with_nets = args.sessions if args.with_nets is None else args.with_nets
            beside = args.control_overlap if case.controlnets else [prepared.control_overlap]
            rules = args.controlnet_rows if case.controlnets else [ControlNetRows.SHARED]
            for control_overlap, rule in itertools.product(beside, rules):
                reset_memory(run.device)
                apart = rule is ControlNetRows.APART
                if (control_overlap, apart) not in engines:  # the same compiled nets
                    engines[control_overlap, apart] = runtime_bundle(
                        dataclasses.replace(prepared, control_overlap=control_overlap),
                        run.backend,
                        latent_size=latent,
                        buckets=buckets,
                        show_progress=False,
                        plain_unet=apart,
                    )
                model = engines[control_overlap, apart]
                tally = asyncio.run(
                    multi.run_livediff(
                        model,
                        run.config,
                        params,
                        settings,
                        args.sessions,
                        overlap,
                        controlnet_rows=rule,
                        open_params=partial(session_settings, case, with_nets),
                    )
                )
                record = multi.record(
                    "livediff", tally, model, run.config, params, settings, args.sessions
                )
                run.emit(
                    {
                        **{k: v for k, v in record.items() if k not in environment(run.device)},
                        **run.base(model, "livediff", case, args.sessions),
                        "case": "sessions",
                        "overlap": "on" if on else "off",
                        "control_overlap": control_overlap if case.controlnets else None,
                        "controlnet_rows": rule.value if case.controlnets else None,
                        "sessions_with_nets": min(with_nets, args.sessions)
                        if case.controlnets
                        else 0,
                        "compile_s": compile_s,
                    }
                )
        del engines
        del bundle, prepared
        reset_memory(run.device)
    del full, nets
    reset_memory(run.device)


def run_diffusers(run: Run, peer: list[Case]) -> None:
    if not peer:
        return
    args = run.args
    bundle = load_model(
        ModelSpec(preset=args.model, weights=WeightsMode.RANDOM), device=run.device, dtype=run.dtype
    )
    compiled = run.backend is Backend.COMPILE and run.device.type == "cuda"
    if compiled:  # diffusers' forwards are livediff's code objects: drop livediff's compiled code
        torch._dynamo.reset()
    for case in peer:
        reset_memory(run.device)
        net = (
            load_controlnet(ControlNetSpec("random", name="cn0", seed=0), bundle)
            if case.preprocessors
            else None
        )
        runner = diffusers_runner(bundle, net, args.size, compiled)
        summary = closed_loop(runner, run.frames, args.warmup, args.frames, run.device)
        ours = find_record(run.records, "livediff", "single", 1, case.label)
        run.emit(
            {
                **run.base(bundle, "diffusers", case, 1),
                "case": "single",
                "variant": "compile" if compiled else "eager",
                **summary,
                "latency_ms_p99": summary["ms_p99"],
                "drop_rate": None,
                "livediff_speedup": (
                    round(summary["ms_median"] / ours["ms_median"], 2) if ours else None
                ),
                "gpu_mem_peak_mb": gpu_memory_peak_mb(run.device),
            }
        )
        del runner, net
    del bundle
    reset_memory(run.device)


def find_record(
    records: Sequence[dict[str, Any]], system: str, case: str, sessions: int, pre: str | None
) -> dict[str, Any] | None:
    """The last record of ``system``'s ``case`` with ``sessions`` and preprocessor ``pre``."""
    for r in reversed(records):
        if (r["system"], r["case"], r["sessions"], r["preprocessor"]) == (
            system,
            case,
            sessions,
            pre,
        ):
            return r
    return None


def targets(records: Sequence[dict[str, Any]], sessions: int) -> list[str]:
    """The issue's targets against this run's records, one line each (what is measured)."""

    def find(system: str, case: str, n: int, pre: str | None) -> dict[str, Any] | None:
        return find_record(records, system, case, n, pre)

    lines = []
    canny = find("livediff", "single", 1, "canny")
    if canny and canny.get("ratio_to_plain") is not None:
        ratio = canny["ratio_to_plain"]
        lines.append(f"canny frame / plain frame: {ratio} (target <= 1.35: {ratio <= 1.35})")
    peer = find("diffusers", "single", 1, "canny")
    if peer and peer.get("livediff_speedup") is not None:
        speedup = peer["livediff_speedup"]
        lines.append(f"speedup vs diffusers ControlNet: {speedup}x (target >= 3: {speedup >= 3})")
    many = find("livediff", "sessions", sessions, "canny")
    if many and many["drop_rate"] is not None:
        ok = many["drop_rate"] < 0.02 and many["latency_ms_p99"] <= 50
        lines.append(
            f"{sessions} sessions x {many['input_fps']} fps with canny: drops "
            f"{many['drop_rate']:.2%}, latency p99 {many['latency_ms_p99']} ms "
            f"(target < 2 % and <= 50 ms: {ok})"
        )
    for pre in ("depth", "canny+depth"):
        r = find("livediff", "single", 1, pre)
        if r:
            lines.append(
                f"{pre}: {r['ms_median']} ms per frame ({r['ratio_to_plain']}x plain), "
                f"preprocessing {r['preprocess_ms']} ms"
            )
    if records and records[-1].get("controlnet_mb") is not None:
        lines.append(
            f"one loaded ControlNet: {records[-1]['controlnet_mb']} MB of parameters, "
            f"{records[-1].get('controlnet_peak_mb')} MB peak while loading"
        )
    return lines


# ---------------------------------------------------------------------- plot
def record_label(record: dict[str, Any]) -> str:
    pre = record["preprocessor"] or "no ControlNet"
    variant = f" {record['variant']}" if record.get("variant") else ""
    if record["case"] == "sessions":
        return f"livediff {record['sessions']} sessions, {pre}"
    return f"{record['system']}{variant}, {pre}"


def draw(records: Sequence[dict[str, Any]], path: Path) -> None:
    """Single stream: ms per frame (median bar, p99 tick) per system and case; sessions:
    latency p99 and drop rate per case."""
    single = [r for r in records if r["case"] == "single"]
    many = [r for r in records if r["case"] == "sessions"]
    plt, (figure, axes) = _figure(max(len(single), len(many), 1), 2)
    left, right = axes[0]
    rows = list(range(len(single)))
    colors = ["tab:blue" if r["system"] == "livediff" else "tab:gray" for r in single]
    left.barh(rows, [r["ms_median"] for r in single], color=colors)
    left.scatter([r["ms_p99"] for r in single], rows, color="black", marker="|", s=200)
    left.set_yticks(rows, [record_label(r) for r in single], fontsize="small")
    left.invert_yaxis()
    first = records[0]
    left.set(
        xlabel="ms per frame, one stream (bar: median, tick: p99)",
        title=f"{first['model']} {first['width']}², 1 step, {first['device']}",
    )
    rows = list(range(len(many)))
    right.barh(rows, [r["latency_ms_p99"] for r in many], color="tab:orange")
    for row, r in zip(rows, many, strict=True):
        drops = "" if r["drop_rate"] is None else f" drops {r['drop_rate']:.1%}"
        right.annotate(drops, (r["latency_ms_p99"], row), fontsize="small", va="center")
    right.set_yticks(rows, [record_label(r) for r in many], fontsize="small")
    right.invert_yaxis()
    fps = many[0]["input_fps"] if many else "?"
    right.set(xlabel=f"arrival → output p99 (ms), sessions at {fps} fps each")
    for axis in (left, right):
        axis.grid(True, axis="x", alpha=0.3)
    save_figure(plt, figure, path)


# ---------------------------------------------------------------------- entry point
def rows_list(text: str) -> list[ControlNetRows]:
    try:
        return [ControlNetRows(t.strip()) for t in text.split(",") if t.strip()] or [
            ControlNetRows(text)
        ]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected shared, apart or both joined by ','"
        ) from None


def overlap_list(text: str) -> list[bool]:
    values = {"on": True, "off": False}
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items or any(t not in values for t in items):
        raise argparse.ArgumentTypeError(f"{text!r}: expected on, off or both joined by ','")
    return [values[t] for t in items]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="livediff bench --suite controlnet",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default="sd-turbo")
    parser.add_argument("--backend", default="auto", help="auto (compile on CUDA), eager, compile")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, help="default: fp16 on CUDA, fp32 on CPU")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--frames", type=int, default=100, help="measured frames per single case")
    parser.add_argument("--warmup", type=int, default=10, help="unmeasured frames first")
    parser.add_argument(
        "--single",
        type=cases,
        default=cases("none,canny,depth,canny+depth"),
        help="livediff single-stream cases: none or preprocessors joined by '+' ('': skip them)",
    )
    parser.add_argument(
        "--peer", type=cases, default=cases("none,canny"), help="diffusers cases: none, canny"
    )
    parser.add_argument("--multi", type=cases, default=cases("none,canny"), help="sessions cases")
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--fps", type=float, default=30.0, help="each session's input rate")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds, sessions")
    parser.add_argument(
        "--session-warmup",
        type=float,
        default=None,
        help="unmeasured seconds before, sessions (default 2 on CUDA, 1 on CPU)",
    )
    parser.add_argument("--deadline-ms", type=float, default=100.0)
    parser.add_argument("--buckets", type=int_list, default=[1, 8])
    parser.add_argument(
        "--overlap", choices=[o.value for o in BatchOverlap], default=BatchOverlap.OFF.value
    )
    parser.add_argument(
        "--control-overlap",
        type=overlap_list,
        default=[True],
        help="cases with nets (single and sessions): the nets beside the UNet on a second "
        "stream (on), one after the other (off), or both (off,on; the targets read the last)",
    )
    parser.add_argument(
        "--controlnet-rows",
        type=rows_list,
        default=[ControlNetRows.SHARED],
        help="sessions cases with nets: shared (sessions without nets share their calls and "
        "run the nets at scale 0), apart (they run the UNet alone, in calls of their own), or "
        "both (shared,apart)",
    )
    parser.add_argument(
        "--with-nets",
        type=int,
        default=None,
        help="sessions cases with nets: how many of the --sessions use them (default: all; "
        "the others use none)",
    )
    parser.add_argument("--out", type=Path, help="append the JSON lines to this file as well")
    parser.add_argument("--plot", type=Path, help="PNG of the records")
    parser.add_argument("--replot", type=Path, help="only draw --plot from these JSON lines")
    args = parser.parse_args(argv)
    for case in args.peer:
        if case.preprocessors not in ((), (Preprocessor.CANNY,)):
            raise UsageError(
                f"--peer: diffusers runs none or canny, not {case.label} "
                "(its control image comes from livediff's canny)"
            )
    if args.with_nets is not None and not 0 <= args.with_nets <= args.sessions:
        parser.error(f"--with-nets {args.with_nets}: expected 0 to --sessions {args.sessions}")
    if args.multi and max(args.buckets) < args.sessions:
        parser.error(f"--buckets {args.buckets}: the largest must hold --sessions {args.sessions}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--micro"]:
        from livediff.bench import controlnet

        controlnet.main(argv[1:])
        return 0
    args = parse_args(argv)
    if args.replot:
        return replot(args.replot, args.plot, draw)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = resolve_dtype(args.dtype, device)
    if args.session_warmup is None:
        args.session_warmup = 2.0 if device.type == "cuda" else 1.0
    backend = resolve_backend(args.backend, device)
    frames = [
        torch.from_numpy(f).to(device)
        for f in panning_clip(args.size, min(args.warmup + args.frames, 64))
    ]
    with record_sinks(args.out) as sinks:
        run = Run(
            args=args,
            backend=backend,
            device=device,
            dtype=dtype,
            config=StreamConfig(width=args.size, height=args.size),
            frames=frames,
            memory={"controlnet_mb": None, "controlnet_peak_mb": None, "depth_net_mb": None},
            sinks=sinks,
            records=[],
        )
        run_livediff(run, args.single, args.multi)
        run_diffusers(run, args.peer)
    for line in targets(run.records, args.sessions):
        print(f"controlnet suite: {line}", file=sys.stderr)
    draw_or_explain(run.records, args.plot, draw)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

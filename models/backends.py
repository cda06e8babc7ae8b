"""Backends: how a model's networks run. Chosen by config, checked loudly at start-up.

- ``eager``: plain PyTorch (SDPA attention). Works everywhere; the CPU default.
- ``compile``: the speed recipe (:mod:`livediff.models.recipe`) plus CUDA graphs — the whole
  frame step as one graph for a single stream (the engine's ``CapturedStream``, which
  :func:`livediff.engine.backend_fit.make_stream` picks), per batch bucket for the
  multi-session runtime (:class:`~livediff.models.graphed.GraphedBundle`). The CUDA default.
- ``tensorrt``: ONNX export + TensorRT engines (``pip install 'livediff[tensorrt]'``), cached
  in ``~/.cache/livediff/tensorrt``, each replayed as a CUDA graph per batch bucket
  (:class:`~livediff.models.tensorrt_engine.TensorRTBundle`).

A backend that cannot start raises :class:`~livediff.exceptions.BackendError` at start-up;
nothing falls back to a slower path behind the user's back. Every backend logs at start-up what
the fused kernels run as (:func:`livediff.kernels.status.kernels_status`): a WARNING on CUDA
when they run their PyTorch references. The ``compile`` backend on CUDA needs Triton (Inductor
generates Triton kernels), so there a Triton that cannot be imported is a ``BackendError``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from enum import Enum
from typing import Any

import torch
from tqdm import tqdm

from livediff.exceptions import BackendError
from livediff.kernels._dispatch import triton_unavailable_reason
from livediff.kernels.status import describe, kernels_status
from livediff.models.bundle import ModelBundle
from livediff.models.compile_cache import artifact_key, packaged_compile
from livediff.models.compiled_canny import PaddedCanny
from livediff.models.control_images import PreprocessorNetworks
from livediff.models.graphed import GraphedBundle
from livediff.models.lora_fusion import SELF_PARTS, fits
from livediff.models.lora_store import MAX_RANK
from livediff.models.recipe import Recipe, apply_recipe
from livediff.models.spec import Precision
from livediff.models.tensorrt_engine import TensorRTBundle, load_tensorrt_bundle

log = logging.getLogger(__name__)


class Backend(str, Enum):
    EAGER = "eager"
    COMPILE = "compile"
    TENSORRT = "tensorrt"


def default_backend(device: torch.device) -> Backend:
    return Backend.COMPILE if device.type == "cuda" else Backend.EAGER


def prepare_backend(
    bundle: ModelBundle, backend: Backend | str, recipe: Recipe | None = None
) -> ModelBundle:
    """Make ``bundle`` ready for ``backend``, or raise :class:`BackendError` saying why it can't."""
    backend = Backend(backend)
    recipe = recipe or recipe_for(bundle)
    if bundle.loras is not None and backend is Backend.COMPILE and not recipe.fuse_qkv:
        log.info(
            "per-session LoRAs of max_rank %d: the compile recipe keeps q/k/v separate (a "
            "fused call takes max_rank <= %d)",
            bundle.loras.capacity.max_rank,
            MAX_RANK // len(SELF_PARTS),
        )
    _report_kernels(bundle, needs_triton=backend is Backend.COMPILE and recipe.compile)
    if backend is Backend.EAGER:
        plain = Recipe(
            fuse_qkv=False, channels_last=False, compile=False, precision=recipe.precision
        )
        return apply_recipe(bundle, plain)
    if backend is Backend.COMPILE:
        return apply_recipe(bundle, recipe)
    if recipe.precision is not Precision.NATIVE:
        raise BackendError(
            f"the tensorrt backend builds its engines in the model's dtype: --precision "
            f"{recipe.precision.value} runs with --backend compile (or eager)"
        )
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        raise BackendError(
            "the tensorrt backend needs NVIDIA TensorRT: pip install 'livediff[tensorrt]' "
            f"(import failed: {exc}). Use --backend compile meanwhile."
        ) from exc
    return load_tensorrt_bundle(bundle)


def recipe_for(bundle: ModelBundle) -> Recipe:
    """The default speed recipe for ``bundle``: q/k/v fused, per-session LoRA layers with them,
    unless the library's ranks are too large for one fused call
    (:func:`livediff.models.lora_fusion.fits`); the bundle's precision (``ModelSpec.precision``,
    then what the recipe applied) and its ``compile_batch`` are the recipe's."""
    fuse = bundle.loras is None or fits(bundle.loras.capacity)
    return Recipe(fuse_qkv=fuse, precision=bundle.precision, compile_batch=bundle.compile_batch)


def _report_kernels(bundle: ModelBundle, *, needs_triton: bool) -> None:
    """Say at start-up which fused kernels run as Triton and which as references, and why."""
    status = kernels_status(bundle.device)
    on_cuda = bundle.device.type == "cuda"
    unavailable = triton_unavailable_reason()
    if on_cuda and needs_triton and unavailable is not None:
        raise BackendError(
            f"the compile backend on CUDA needs Triton (Inductor generates Triton kernels): "
            f"{unavailable}. Install the triton that matches torch, or use --backend eager."
        )
    phrases = describe(status)
    shown = phrases if len(set(phrases.values())) > 1 else next(iter(phrases.values()))
    if on_cuda and any(op["impl"] != "triton" for op in status["ops"].values()):
        log.warning("fused kernels run their PyTorch references on CUDA: %s", shown)
    else:
        log.info("fused kernels: %s", shown)


def resolve_backend(backend: Backend | str | None, device: torch.device) -> Backend:
    """``None``/``"auto"`` → the device's default; anything else must be a :class:`Backend`."""
    if backend is None or backend == "auto":
        return default_backend(device)
    try:
        return Backend(backend)
    except ValueError:
        choices = ", ".join(b.value for b in Backend)
        raise BackendError(f"unknown backend {backend!r}; choose auto, {choices}") from None


def runtime_bundle(
    bundle: ModelBundle,
    backend: Backend,
    *,
    latent_size: tuple[int, int],
    buckets: Sequence[int],
    show_progress: bool = True,
    recipe: Recipe | None = None,
    plain_unet: bool = False,
) -> ModelBundle:
    """The bundle a multi-session runtime should use: per-bucket CUDA graphs when compiled on CUDA.

    Compiling and capturing happens here, before any session starts (a capture must not race
    the worker), with a progress bar; Inductor's on-disk cache makes the next start quicker.
    ``plain_unet``: with ControlNets, also the UNet alone per bucket (GraphedBundle.warm_up).
    """
    if isinstance(bundle, TensorRTBundle):  # prepare_backend built it: capture, don't re-wrap
        with tqdm(desc="tensorrt capture", disable=not show_progress) as bar:
            bundle.warm_up(latent_size, buckets=buckets, progress=_progress(bar))
        return bundle
    if backend is not Backend.COMPILE or bundle.device.type != "cuda":
        return bundle
    graphed = GraphedBundle.wrap(bundle)
    graphed.setup_graphs(unet_buckets=buckets, frame_buckets=buckets, latent_size=latent_size)
    canny = PaddedCanny(buckets) if bundle.controlnets else None  # the engine's, per bucket
    if canny is not None:
        networks = bundle.control_networks or PreprocessorNetworks()
        graphed.control_networks = dataclasses.replace(networks, canny=canny)
    key = artifact_key(
        bundle,
        recipe=(recipe or recipe_for(bundle)).label,
        buckets=buckets,
        latent_size=latent_size,
    )
    with_nets = bool(bundle.controlnets)
    steps = (3 + with_nets + (plain_unet and with_nets)) * len(buckets)
    with (
        packaged_compile(key) as report,
        tqdm(total=steps, desc="compile + capture", disable=not show_progress) as bar,
    ):
        graphed.warm_up(progress=_progress(bar), plain_unet=plain_unet)
        if canny is not None:
            factor = bundle.vae_scale_factor
            pixels = (latent_size[0] * factor, latent_size[1] * factor)
            canny.warm_up(pixels, device=bundle.device, dtype=bundle.dtype)
            bar.update(len(buckets))
    graphed.compile_report = report
    log.info(
        "compile + capture of %d graphs: %.1f s, %s",
        steps,
        report.seconds,
        report.describe(),
    )
    return graphed


def _progress(bar: Any) -> Callable[[str], None]:
    """A warm-up's progress callback: name the step on the bar, then count it."""

    def step(name: str) -> None:
        bar.set_postfix_str(name)
        bar.update()

    return step

"""Compiled artefacts kept between starts, so a fresh machine starts in seconds, not minutes.

The compile backend's first start compiles every UNet and VAE graph (Inductor code generation
and Triton kernel builds: minutes for SD-Turbo's six batch buckets). PyTorch can package what a
process compiled — Inductor's FX-graph cache, AOTAutograd's, the Triton kernels and autotuning
results — into one blob (``torch.compiler.save_cache_artifacts``) and load it into a new
process's caches (``load_cache_artifacts``), where the same compiles then hit the cache.
:func:`packaged_compile` does both around a warm-up: it loads the package for this key if one
exists, and writes one after a warm-up that found none. ``livediff compile`` builds it ahead of
time. Tracing (Dynamo) and CUDA-graph capture still run at start; code generation does not.

Where: ``$XDG_CACHE_HOME/livediff/compile/<key>.bin`` (by default ``~/.cache/livediff``), or
``$LIVEDIFF_COMPILE_CACHE`` (a folder; ``off`` turns packaging off). The key (SHA-256 of a
canonical JSON, :func:`artifact_key`) names what the compiled code depends on: the preset and
the networks' architecture configs, the dtype, the speed recipe (its label names fp8 when
``precision=fp8``), the batch buckets and latent size, torch's and Triton's versions and the
GPU. Weight values are not in it: the recipe does not freeze weights into the code
(``freezing`` off), so the same architecture compiles to the same code whatever its weights;
with ``freezing`` on a digest of the weights joins the key.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from livediff.models.bundle import ModelBundle
from livediff.models.canonical_config import canonical_json, public_config

log = logging.getLogger(__name__)
FORMAT_VERSION = 1  # bumped when what goes into a package changes


@dataclass
class CacheReport:
    """What :func:`packaged_compile` did: where the package is, whether it was loaded or written."""

    path: Path | None
    loaded: bool = False
    written_bytes: int = 0
    seconds: float = 0.0
    caches: dict[str, int] = field(default_factory=dict)  # cache hits/misses during the block

    def describe(self) -> str:
        if self.path is None:
            where = "compile packages are off (LIVEDIFF_COMPILE_CACHE=off)"
        elif self.loaded:
            where = f"from the packaged compile cache {self.path}"
        elif self.written_bytes:
            where = f"compiled; packaged for later starts in {self.path} ({self.written_bytes / 1e6:.1f} MB)"
        else:
            where = "compiled (nothing to package)"
        return f"{where}; {describe_caches(self.caches)}" if self.caches else where


# Dynamo's counters that say whether a compile was code generation or a cache read:
# (counter group, counter) -> the name a report gives it
CACHE_COUNTERS = {
    ("inductor", "fxgraph_cache_hit"): "inductor_hits",
    ("inductor", "fxgraph_cache_miss"): "inductor_misses",
    ("inductor", "fxgraph_cache_bypass"): "inductor_bypasses",
    ("aot_autograd", "autograd_cache_hit"): "aot_hits",
    ("aot_autograd", "autograd_cache_miss"): "aot_misses",
}


def cache_counts() -> dict[str, int]:
    """Dynamo's cache counters now (process totals), by :data:`CACHE_COUNTERS`' names."""
    from torch._dynamo.utils import counters

    return {name: int(counters[group][key]) for (group, key), name in CACHE_COUNTERS.items()}


def describe_caches(caches: dict[str, int]) -> str:
    """``"Inductor cache: 3 of 5 graphs read, 2 generated"`` and the like."""
    hits, misses = caches.get("inductor_hits", 0), caches.get("inductor_misses", 0)
    text = f"Inductor cache: {hits} of {hits + misses} graphs read, {misses} generated"
    if caches.get("inductor_bypasses"):
        text += f", {caches['inductor_bypasses']} not cacheable"
    return text


def cache_dir() -> Path | None:
    """The folder packages live in, or ``None`` when ``LIVEDIFF_COMPILE_CACHE=off``."""
    setting = os.environ.get("LIVEDIFF_COMPILE_CACHE", "")
    if setting.lower() in ("off", "0", "none"):
        return None
    if setting:
        return Path(setting)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "livediff" / "compile"


def artifact_key(
    bundle: ModelBundle,
    *,
    recipe: str,
    buckets: Sequence[int],
    latent_size: tuple[int, int],
    weights_digest: str | None = None,
) -> str:
    """The package name for this compile (see the module docstring for what goes in)."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    device = bundle.device
    fields: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "preset": bundle.preset.name,
        "unet": _config_of(bundle.unet),
        "vae": _config_of(bundle.vae),
        "dtype": str(bundle.dtype),
        "recipe": recipe,
        "buckets": sorted(int(b) for b in buckets),
        "latent_size": list(latent_size),
        "torch": torch.__version__,
        "triton": triton_version,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "weights": weights_digest,
        "controlnets": [[c.name, c.source, _config_of(c.net)] for c in bundle.controlnets],
        # what changes the UNet's graphs besides its config: the bank's pools and reduction,
        # the per-session LoRA buffers, the image-prompt processors
        "feature_bank": _bank_of(bundle),
        "loras": (
            None
            if bundle.loras is None
            else [bundle.loras.store.capacity.max_loras, bundle.loras.store.capacity.max_rank]
        ),
        "ip_adapter": (
            None
            if bundle.ip_adapter is None
            else [bundle.ip_adapter.name, bundle.ip_adapter.variant.value]
        ),
    }
    return hashlib.sha256(canonical_json(fields).encode()).hexdigest()[:24]


def _bank_of(bundle: ModelBundle) -> list[Any] | None:
    bank = bundle.feature_bank
    if bank is None:
        return None
    context = bank.context
    return [context.slots, context.frames, context.tokens.value, context.reduce_from]


def _config_of(module: Any) -> Any:
    """The module's class and its public config (:func:`public_config`)."""
    if getattr(module, "config", None) is None:
        return type(module).__name__
    return {"class": type(module).__name__, **public_config(module)}


@contextmanager
def packaged_compile(key: str) -> Iterator[CacheReport]:
    """Load the package named ``key`` before the block (if there is one); write it after a block
    that compiled without one. A package that cannot be read is reported and ignored."""
    folder = cache_dir()
    report = CacheReport(None if folder is None else folder / f"{key}.bin")
    started = time.perf_counter()
    counts_before = cache_counts()
    if report.path is not None and report.path.is_file():
        try:
            report.loaded = (
                torch.compiler.load_cache_artifacts(report.path.read_bytes()) is not None
            )
            reason = "not a compile package"
        except Exception as exc:  # a package from another build: compile as if it were absent
            reason = f"{type(exc).__name__}: {exc}"
        if not report.loaded:
            log.warning(
                "compile package %s could not be loaded (%s); compiling", report.path, reason
            )
    yield report
    report.seconds = time.perf_counter() - started
    report.caches = {name: count - counts_before[name] for name, count in cache_counts().items()}
    if report.path is None or report.loaded:
        return
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        return
    data = saved[0]
    report.path.parent.mkdir(parents=True, exist_ok=True)
    partial = report.path.with_suffix(".part")
    partial.write_bytes(data)
    partial.replace(report.path)  # atomic: a reader never sees half a package
    report.written_bytes = len(data)

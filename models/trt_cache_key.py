"""What a TensorRT engine is built for: its optimisation profile, input shapes and cache key.

An engine is only valid for the exact weights, graph, shape ranges, precision, TensorRT
version and GPU architecture it was built for. :class:`EngineKey` names every one of these
and hashes them (SHA-256 over a canonical JSON form) into the engine's file name, so a
changed input can never load a stale engine. StreamDiffusion's cache key leaves out the
resolution range and the LoRA, so a second resolution or LoRA silently reuses the first
engine (its issue #152); here both are in the key.

Fields of the key:

- ``graph``: which network (``unet``, ``vae_encoder``, ``vae_decoder``).
- ``preset``: the model preset's name.
- ``weights``: :func:`weights_digest` of the network — its class, architecture config and
  every tensor of its ``state_dict`` (name, dtype, shape, bytes). Weights are what an engine
  bakes in, so this covers the source (HF id, folder, file), the seed of random weights and
  every LoRA with its scale: livediff fuses LoRAs into the weights at load.
- ``profile``: the batch and image-side ranges (:class:`EngineProfile`).
- ``dtype``: ``fp16`` or ``fp32``.
- ``tensorrt_version`` and ``compute_capability``: engines are specific to both.
- ``export_version`` and ``opset``: how the ONNX graph was written (bumped by
  :mod:`livediff.models.onnx_export` when its graphs change).

The source path is deliberately not in the key: the same weights moved to another folder
are the same engine, and the weights digest already tells different weights apart.

Also here, free of TensorRT: the input shapes a profile sets per graph (:func:`profile_shapes`)
and the batch buckets that fit it (:func:`usable_buckets`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from livediff.exceptions import ParameterError
from livediff.models.bundle import ModelBundle
from livediff.models.canonical_config import canonical_json, public_config
from livediff.models.onnx_export import EXPORT_VERSION, OPSET, TIME_IDS, GraphName

VAE_FACTOR = 8  # pixels per latent cell
DEFAULT_BUCKETS = (1, 2, 4, 8, 16)
Shape = tuple[int, ...]
ProfileShapes = dict[str, tuple[Shape, Shape, Shape]]


def default_engine_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/livediff/tensorrt``, by default ``~/.cache/livediff/tensorrt``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "livediff" / "tensorrt"


def _check_range(name: str, values: tuple[int, int, int], low: int, multiple: int) -> None:
    if (
        len(values) != 3
        or any(isinstance(v, bool) or not isinstance(v, int) for v in values)
        or not low <= values[0] <= values[1] <= values[2]
        or any(v % multiple for v in values)
    ):
        raise ParameterError(
            f"{name}={values!r}: expected (min, opt, max) integers with {low} <= min <= opt <= max"
            + (f", each a multiple of {multiple}" if multiple > 1 else "")
        )


@dataclass(frozen=True)
class EngineProfile:
    """One TensorRT optimisation profile, as ``(min, opt, max)`` triples.

    ``batch`` is the rows of one call; ``side`` is the image height and width in pixels (each
    may vary independently within the range; latents are ``side / 8``). TensorRT accepts any
    shape inside the ranges and tunes its kernels for ``opt``.

    Default: batch 1 / 4 / 16 and sides 384 / 512 / 1024 px, i.e. latents 48 / 64 / 128.
    """

    batch: tuple[int, int, int] = (1, 4, 16)
    side: tuple[int, int, int] = (384, 512, 1024)

    def __post_init__(self) -> None:
        object.__setattr__(self, "batch", tuple(self.batch))
        object.__setattr__(self, "side", tuple(self.side))
        _check_range("batch", self.batch, 1, 1)
        _check_range("side", self.side, 64, VAE_FACTOR)

    @property
    def latent_side(self) -> tuple[int, int, int]:
        low, opt, high = self.side
        return low // VAE_FACTOR, opt // VAE_FACTOR, high // VAE_FACTOR

    def covers(self, rows: int, height: int, width: int) -> bool:
        """Whether ``rows`` images of ``height`` × ``width`` pixels fit this profile."""
        low, _, high = self.side
        return self.batch[0] <= rows <= self.batch[2] and all(
            low <= side <= high for side in (height, width)
        )

    def describe(self) -> str:
        return (
            f"batch {self.batch[0]}–{self.batch[2]}, "
            f"{self.side[0]}–{self.side[2]} px per side (multiples of {VAE_FACTOR})"
        )


@dataclass(frozen=True)
class EngineKey:
    """Everything one engine depends on; :meth:`digest` names its file in the cache."""

    graph: str
    preset: str
    weights: str
    profile: EngineProfile
    dtype: str
    tensorrt_version: str
    compute_capability: tuple[int, int]
    export_version: int
    opset: int

    def fields(self) -> dict[str, Any]:
        return asdict(self)

    def digest(self) -> str:
        canonical = json.dumps(self.fields(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    @property
    def filename(self) -> str:
        return f"{self.preset}-{self.graph}-{self.digest()[:32]}.engine"


def dtype_name(dtype: torch.dtype) -> str:
    names = {torch.float16: "fp16", torch.float32: "fp32"}
    if dtype not in names:
        raise ParameterError(f"TensorRT engines are built in fp16 or fp32, not {dtype}")
    return names[dtype]


def _tensor_digest(name: str, tensor: torch.Tensor) -> bytes:
    data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy()
    digest = hashlib.sha256(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    digest.update(data.data)
    return digest.digest()


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 of ``module``'s class, public config and every ``state_dict`` tensor.

    Tensors are hashed in parallel threads (``hashlib`` releases the GIL on large buffers), so
    a 2 GB fp16 UNet takes about a second; the config's private keys (``_name_or_path`` …)
    are left out because they name where the weights came from, not what they are.
    """
    state = module.state_dict()
    total = hashlib.sha256(type(module).__qualname__.encode())
    total.update(canonical_json(public_config(module)).encode())
    names = sorted(state)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for part in pool.map(lambda n: _tensor_digest(n, state[n]), names):
            total.update(part)
    return total.hexdigest()


def profile_shapes(bundle: ModelBundle, graph: GraphName, profile: EngineProfile) -> ProfileShapes:
    """(min, opt, max) shape of every input of ``graph``, as the optimisation profile sets them."""

    def each(make: Callable[[int, int, int], Shape]) -> tuple[Shape, Shape, Shape]:
        b, s, lat = profile.batch, profile.side, profile.latent_side
        return make(b[0], s[0], lat[0]), make(b[1], s[1], lat[1]), make(b[2], s[2], lat[2])

    if graph is GraphName.VAE_ENCODER:
        return {"images": each(lambda b, s, _: (b, 3, s, s))}
    if graph is GraphName.VAE_DECODER:
        return {"latents": each(lambda b, _, lat: (b, 4, lat, lat))}
    seq, dim = bundle.embed_shape
    shapes = {
        "sample": each(lambda b, _, lat: (b, 4, lat, lat)),
        "timestep": each(lambda b, _s, _l: (b,)),
        "encoder_hidden_states": each(lambda b, _s, _l: (b, seq, dim)),
    }
    if bundle.preset.is_sdxl:
        pooled = int(bundle.pooled_dim or 0)
        shapes["text_embeds"] = each(lambda b, _s, _l: (b, pooled))
        shapes["time_ids"] = each(lambda b, _s, _l: (b, TIME_IDS))
    return shapes


def engine_key(
    bundle: ModelBundle,
    graph: GraphName,
    profile: EngineProfile,
    *,
    tensorrt_version: str,
    compute_capability: tuple[int, int],
    weights: str | None = None,
) -> EngineKey:
    """The cache key of ``graph``'s engine; ``weights`` skips re-hashing an already hashed network."""
    network = bundle.unet if graph is GraphName.UNET else bundle.vae
    return EngineKey(
        graph=graph.value,
        preset=bundle.preset.name,
        weights=weights or weights_digest(network),
        profile=profile,
        dtype=dtype_name(bundle.dtype),
        tensorrt_version=tensorrt_version,
        compute_capability=(int(compute_capability[0]), int(compute_capability[1])),
        export_version=EXPORT_VERSION,
        opset=OPSET,
    )


def usable_buckets(buckets: Sequence[int], profile: EngineProfile) -> tuple[int, ...]:
    """``buckets`` inside the profile's batch range, sorted; refuses a set with none."""
    low, _, high = profile.batch
    usable = tuple(sorted({int(b) for b in buckets if low <= b <= high}))
    if not usable:
        raise ParameterError(f"no batch bucket of {tuple(buckets)} is within batch {low}–{high}")
    return usable

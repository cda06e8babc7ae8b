"""TensorRT engines for a bundle's UNet and VAE halves: built once, cached on disk, run as CUDA graphs.

Start-up (:func:`load_tensorrt_bundle`): each graph (``unet``, ``vae_encoder``,
``vae_decoder``) has an :class:`~livediff.models.trt_cache_key.EngineKey` whose digest names its
file in the cache folder (default ``~/.cache/livediff/tensorrt``). A missing engine is built:
the graph is exported to ONNX (:mod:`.onnx_export`) in a temporary folder inside the cache,
parsed, and built in the bundle's dtype with one optimisation profile
(:class:`~livediff.models.trt_cache_key.EngineProfile`: by default batch 1 / 4 / 16 and sides
384 / 512 / 1024 px as min / opt / max, latents 48 / 64 / 128), then written atomically with its
key as JSON beside it. That takes minutes for an SD-sized UNet; later starts load in seconds.
One activation scratch buffer, sized for the largest engine, is shared by all contexts.

Calls work like :class:`~livediff.models.graphed.GraphedBundle`'s: ``n`` rows run in the
smallest bucket ``>= n``. Each (graph, bucket, row shape) gets its own execution context, with
input and output buffers allocated once and their addresses set once; it runs once (TensorRT
settles shape-dependent state on its first enqueue), then is captured as a CUDA graph around
``execute_async_v3``. A call copies its rows into the static inputs, replays the graph and
returns a view of the first ``n`` rows of the static output, valid until the next call of the
same bucket. Rows beyond the largest bucket run in chunks of it (copied out, logged once); a
shape outside the profile raises :class:`BackendError`.

Calls must come from one thread on one CUDA stream (the GPU worker's): the shared scratch makes
concurrent calls unsafe. ``tensorrt`` is imported inside functions only, so this module imports
on machines without it.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from livediff.exceptions import BackendError
from livediff.models.bundle import ModelBundle
from livediff.models.onnx_export import TIME_IDS, GraphName, export_graph, io_names
from livediff.models.trt_cache_key import (
    DEFAULT_BUCKETS,
    EngineKey,
    EngineProfile,
    ProfileShapes,
    default_engine_cache_dir,
    engine_key,
    profile_shapes,
    usable_buckets,
    weights_digest,
)
from livediff.models.unet_batch import UNetBatch

log = logging.getLogger(__name__)


def import_tensorrt() -> Any:
    """The ``tensorrt`` module, or a :class:`BackendError` that says how to install it."""
    try:
        import tensorrt
    except ImportError as exc:
        raise BackendError(
            "the tensorrt backend needs NVIDIA TensorRT: pip install 'livediff[tensorrt]' "
            f"(import failed: {exc}). Use --backend compile meanwhile."
        ) from exc
    return tensorrt


def build_engine(
    trt: Any, logger: Any, onnx_path: Path, shapes: ProfileShapes, *, fp16: bool
) -> Any:
    """Parse ``onnx_path`` and build a serialised engine (TensorRT's host memory) for ``shapes``."""
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in shapes.items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendError(f"TensorRT could not build an engine from {onnx_path}; see its log")
    return serialized


@dataclass(frozen=True)
class CachedEngine:
    """An engine file in the cache; ``built`` says whether this start built it."""

    key: EngineKey
    path: Path
    built: bool


def _write_atomic(path: Path, data: Any) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    with open(partial, "wb") as file:
        file.write(memoryview(data))
    os.replace(partial, path)  # a concurrent start sees the old file or the whole new one


def ensure_engines(
    bundle: ModelBundle, trt: Any, logger: Any, profile: EngineProfile, cache_dir: Path
) -> dict[GraphName, CachedEngine]:
    """Find each graph's engine in ``cache_dir``, building the missing ones; see the module docstring."""
    capability = torch.cuda.get_device_capability(bundle.device)
    digests = {"unet": weights_digest(bundle.unet), "vae": weights_digest(bundle.vae)}
    keys = {
        graph: engine_key(
            bundle,
            graph,
            profile,
            tensorrt_version=str(trt.__version__),
            compute_capability=capability,
            weights=digests["unet" if graph is GraphName.UNET else "vae"],
        )
        for graph in GraphName
    }
    cache_dir.mkdir(parents=True, exist_ok=True)
    missing = [graph for graph, key in keys.items() if not (cache_dir / key.filename).is_file()]
    if missing:
        with tempfile.TemporaryDirectory(prefix=".onnx-", dir=cache_dir) as scratch:
            for graph in missing:
                path = cache_dir / keys[graph].filename
                log.warning(
                    "building the TensorRT engine for %s of %s (%s, %s): minutes, once; cached as %s",
                    graph.value,
                    bundle.preset.name,
                    keys[graph].dtype,
                    profile.describe(),
                    path,
                )
                onnx = export_graph(bundle, graph, scratch)
                shapes = profile_shapes(bundle, graph, profile)
                plan = build_engine(
                    trt, logger, onnx.path, shapes, fp16=bundle.dtype == torch.float16
                )
                _write_atomic(path, plan)
                path.with_suffix(".json").write_text(json.dumps(keys[graph].fields(), indent=2))
    return {
        graph: CachedEngine(key, cache_dir / key.filename, graph in missing)
        for graph, key in keys.items()
    }


def _torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    table = {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.BF16: torch.bfloat16,
        trt.DataType.INT32: torch.int32,
        trt.DataType.INT64: torch.int64,
        trt.DataType.BOOL: torch.bool,
    }
    return table[dtype]


def _device_memory_size(engine: Any) -> int:
    size = getattr(engine, "device_memory_size_v2", None)  # TensorRT >= 10.1
    return int(engine.device_memory_size if size is None else size)


@dataclass
class _Binding:
    context: Any
    inputs: list[torch.Tensor]
    output: torch.Tensor
    graph: torch.cuda.CUDAGraph


@dataclass
class EngineRunner:
    """One engine's contexts and CUDA graphs, one per (bucket, row shape); see the module docstring.

    ``pixels_per_cell`` converts the first input's spatial size to pixels (8 for latents, 1
    for images) to check it against ``profile``.
    """

    name: str
    engine: Any
    trt: Any
    inputs: tuple[str, ...]
    output: str
    buckets: tuple[int, ...]
    profile: EngineProfile
    scratch: torch.Tensor
    pixels_per_cell: int
    _bindings: dict[tuple[Any, ...], _Binding] = field(default_factory=dict)
    _warned_oversize: bool = False

    def bucket_for(self, rows: int) -> int | None:
        index = bisect.bisect_left(self.buckets, rows)
        return self.buckets[index] if index < len(self.buckets) else None

    def bind(self, bucket: int, templates: Sequence[torch.Tensor]) -> _Binding:
        """The binding of ``bucket`` for rows shaped like ``templates``; created and captured once."""
        key = (bucket, *(tuple(t.shape[1:]) for t in templates))
        binding = self._bindings.get(key)
        if binding is not None:
            return binding
        height, width = (int(s) * self.pixels_per_cell for s in templates[0].shape[2:4])
        if not self.profile.covers(bucket, height, width):
            raise BackendError(
                f"tensorrt {self.name}: {bucket} rows of {height}×{width} px are outside the "
                f"engine's profile ({self.profile.describe()})"
            )
        device = self.scratch.device
        with torch.cuda.device(device):  # the caller's thread may have another current device
            return self._bind(key, bucket, templates, device)

    def _bind(
        self, key: tuple[Any, ...], bucket: int, templates: Sequence[torch.Tensor], device: Any
    ) -> _Binding:
        context = self.engine.create_execution_context(
            self.trt.ExecutionContextAllocationStrategy.USER_MANAGED
        )
        if hasattr(context, "set_device_memory"):  # TensorRT >= 10.1
            context.set_device_memory(self.scratch.data_ptr(), self.scratch.numel())
        else:
            context.device_memory = self.scratch.data_ptr()
        inputs = []
        for name, template in zip(self.inputs, templates, strict=True):
            dtype = _torch_dtype(self.trt, self.engine.get_tensor_dtype(name))
            static = torch.zeros((bucket, *template.shape[1:]), dtype=dtype, device=device)
            if not context.set_input_shape(name, tuple(static.shape)):
                raise BackendError(f"tensorrt {self.name}: {name} {tuple(static.shape)} refused")
            context.set_tensor_address(name, static.data_ptr())
            inputs.append(static)
        shape = tuple(context.get_tensor_shape(self.output))
        out_dtype = _torch_dtype(self.trt, self.engine.get_tensor_dtype(self.output))
        output = torch.empty(shape, dtype=out_dtype, device=device)
        context.set_tensor_address(self.output, output.data_ptr())
        if not context.execute_async_v3(torch.cuda.current_stream(device).cuda_stream):
            raise BackendError(f"tensorrt {self.name}: the first run of bucket {bucket} failed")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            captured = context.execute_async_v3(torch.cuda.current_stream(device).cuda_stream)
        if not captured:
            raise BackendError(f"tensorrt {self.name}: capturing bucket {bucket} failed")
        binding = _Binding(context, inputs, output, graph)
        self._bindings[key] = binding
        log.info("captured tensorrt %s for bucket %d, rows %s", self.name, bucket, key[1:])
        return binding

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor:
        rows = int(tensors[0].shape[0])
        bucket = self.bucket_for(rows)
        if bucket is None:
            return self._chunked(tensors, rows)
        binding = self.bind(bucket, tensors)
        for static, value in zip(binding.inputs, tensors, strict=True):
            static[:rows].copy_(value)
        binding.graph.replay()
        return binding.output[:rows]

    def _chunked(self, tensors: Sequence[torch.Tensor], rows: int) -> torch.Tensor:
        step = self.buckets[-1]
        if not self._warned_oversize:
            log.warning("tensorrt %s: %d rows run in chunks of %d", self.name, rows, step)
            self._warned_oversize = True
        result: torch.Tensor | None = None
        for start in range(0, rows, step):
            length = min(step, rows - start)
            part = self(*(t.narrow(0, start, length) for t in tensors))
            if result is None:
                result = part.new_empty((rows, *part.shape[1:]))
            result.narrow(0, start, length).copy_(part)
        assert result is not None
        return result


class TensorRTBundle(ModelBundle):
    """A :class:`ModelBundle` whose UNet and VAE calls run TensorRT engines; see the module docstring."""

    def setup_engines(
        self,
        runners: dict[GraphName, EngineRunner],
        engines: dict[GraphName, CachedEngine],
        keep_alive: tuple[Any, ...],
    ) -> None:
        self._runners = runners
        self.engines = engines
        self._keep_alive = keep_alive  # the TensorRT runtime must outlive its engines

    @property
    def buckets(self) -> tuple[int, ...]:
        """The batch buckets that have (or will get) a captured graph."""
        return self._runners[GraphName.UNET].buckets

    @property
    def smallest_side(self) -> int:
        """The smallest image height or width (px) every engine's profile accepts."""
        return max(runner.profile.side[0] for runner in self._runners.values())

    def captured(self) -> int:
        """How many (graph, bucket, row shape) bindings are captured so far."""
        return sum(len(runner._bindings) for runner in self._runners.values())

    @torch.inference_mode()
    def warm_up(
        self,
        latent_size: tuple[int, int],
        *,
        buckets: Sequence[int] | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        """Capture every bucket at ``latent_size`` now, not on first use.

        ``buckets`` (those inside the profile's batch range) replace the set-up buckets first.
        """
        h, w = latent_size
        seq, dim = self.embed_shape
        opts: dict[str, Any] = {"device": self.device, "dtype": self.dtype}
        unet = [
            torch.zeros(1, 4, h, w, **opts),
            torch.zeros(1, device=self.device),
            torch.zeros(1, seq, dim, **opts),
        ]
        if self.pooled_dim:
            unet += [torch.zeros(1, self.pooled_dim, **opts), torch.zeros(1, TIME_IDS, **opts)]
        factor = self.vae_scale_factor
        templates = {
            GraphName.UNET: unet,
            GraphName.VAE_ENCODER: [torch.zeros(1, 3, h * factor, w * factor, **opts)],
            GraphName.VAE_DECODER: [torch.zeros(1, 4, h, w, **opts)],
        }
        for graph, runner in self._runners.items():
            if buckets is not None:
                runner.buckets = usable_buckets(buckets, runner.profile)
            for bucket in runner.buckets:
                runner.bind(bucket, templates[graph])
                if progress is not None:
                    progress(f"{graph.value}[{bucket}]")

    @torch.inference_mode()
    def predict_noise(self, batch: UNetBatch) -> torch.Tensor:
        if batch.control_images is not None:  # load_tensorrt_bundle refuses ControlNets
            raise BackendError("the tensorrt backend has no ControlNet inputs")
        tensors = [batch.latents, batch.timesteps, batch.embeds]
        if batch.text_embeds is not None and batch.time_ids is not None:
            tensors += [batch.text_embeds, batch.time_ids]
        return self._runners[GraphName.UNET](*tensors)

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self._runners[GraphName.VAE_ENCODER](images)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self._runners[GraphName.VAE_DECODER](latents)

    @classmethod
    def wrap(cls, bundle: ModelBundle) -> TensorRTBundle:
        return cls(**{name: getattr(bundle, name) for name in bundle.__dataclass_fields__})


def load_tensorrt_bundle(
    bundle: ModelBundle,
    *,
    profile: EngineProfile | None = None,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    cache_dir: str | Path | None = None,
) -> TensorRTBundle:
    """``bundle`` running TensorRT engines, built now or loaded from the cache.

    Raises :class:`BackendError` when TensorRT is missing, the bundle is not on CUDA in fp16 or
    fp32, or an engine cannot be built or loaded. The PyTorch networks stay as they are.
    """
    if bundle.controlnets:
        names = ", ".join(bundle.controlnet_names())
        raise BackendError(
            f"the tensorrt backend does not export ControlNets yet ({names}); "
            "use --backend compile, which captures them with the UNet"
        )
    if bundle.loras is not None:
        raise BackendError(
            "the tensorrt backend does not run per-session LoRAs; use --backend compile, or "
            "fuse the LoRAs at load (--lora)"
        )
    if bundle.ip_adapter is not None:
        raise BackendError(
            f"the tensorrt backend does not export IP-Adapters yet ({bundle.ip_adapter.name}); "
            "use --backend compile, which captures them with the UNet"
        )
    trt = import_tensorrt()
    if bundle.device.type != "cuda":
        raise BackendError(
            f"the tensorrt backend needs a CUDA device; this model is on {bundle.device}"
        )
    if bundle.dtype not in (torch.float16, torch.float32):
        raise BackendError(
            f"the tensorrt backend runs fp16 or fp32, not {bundle.dtype}; use --dtype fp16"
        )
    profile = profile or EngineProfile()
    usable = usable_buckets(buckets, profile)
    folder = Path(cache_dir) if cache_dir is not None else default_engine_cache_dir()
    logger = trt.Logger(trt.Logger.WARNING)
    with torch.cuda.device(bundle.device):
        files = ensure_engines(bundle, trt, logger, profile, folder)
        runtime = trt.Runtime(logger)
        engines = {}
        for graph, cached in files.items():
            engine = runtime.deserialize_cuda_engine(cached.path.read_bytes())
            if engine is None:
                raise BackendError(
                    f"TensorRT could not load the cached engine {cached.path}; delete it to rebuild"
                )
            engines[graph] = engine
        size = max(256, *(_device_memory_size(e) for e in engines.values()))
        scratch = torch.empty(size, dtype=torch.uint8, device=bundle.device)
    runners = {
        graph: EngineRunner(
            name=graph.value,
            engine=engine,
            trt=trt,
            inputs=io_names(bundle, graph)[0],
            output=io_names(bundle, graph)[1][0],
            buckets=usable,
            profile=profile,
            scratch=scratch,
            pixels_per_cell=1 if graph is GraphName.VAE_ENCODER else bundle.vae_scale_factor,
        )
        for graph, engine in engines.items()
    }
    result = TensorRTBundle.wrap(bundle)
    result.setup_engines(runners, files, keep_alive=(runtime, logger))
    built = [g.value for g, f in files.items() if f.built]
    log.info("tensorrt engines ready (%s); built now: %s", folder, ", ".join(built) or "none")
    return result

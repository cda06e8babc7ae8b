"""CUDA graphs per batch bucket around a bundle's UNet and VAE halves.

A call with ``n`` rows runs the graph of the smallest bucket ``>= n``: the rows are copied into
that bucket's static input buffers, the graph replays, and the first ``n`` rows of its static
output are returned. Padding rows hold whatever the buffer held before (finite values from an
earlier call, or zeros); their outputs are never read.

The returned tensor is a view of the bucket's static output: it is valid until the next call
that uses the same bucket. The engine consumes every output before the next call, which is the
contract this relies on.

Graphs are captured lazily on the first call of each bucket (after warm-up iterations on a side
stream, as CUDA graph capture requires) or eagerly with :meth:`GraphedBundle.warm_up`.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from livediff.exceptions import BackendError
from livediff.models.bundle import ModelBundle
from livediff.models.unet_batch import UNetBatch

log = logging.getLogger(__name__)
WARMUP_ITERATIONS = 3


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: list[torch.Tensor]
    output: torch.Tensor


@dataclass
class BucketGraphs:
    """One captured graph per (bucket, row shapes) for a function of static-shaped tensors.

    Row shapes are part of the key, so a new resolution (the runtime's degrade step) captures
    its own graphs on first use. Calls with more rows than the largest bucket run the
    function directly (compiled, not graphed) and say so once in the log.
    """

    name: str
    buckets: tuple[int, ...]
    function: Callable[..., torch.Tensor]
    _graphs: dict[tuple[Any, ...], _Captured] = field(default_factory=dict)
    _warned_oversize: bool = False

    def bucket_for(self, rows: int) -> int | None:
        index = bisect.bisect_left(self.buckets, rows)
        return self.buckets[index] if index < len(self.buckets) else None

    def capture(self, bucket: int, templates: Sequence[torch.Tensor]) -> _Captured:
        key = (bucket, *((tuple(t.shape[1:]), t.dtype) for t in templates))
        captured = self._graphs.get(key)
        if captured is not None:
            return captured
        inputs = [
            torch.zeros((bucket, *t.shape[1:]), dtype=t.dtype, device=t.device) for t in templates
        ]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(WARMUP_ITERATIONS):
                self.function(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # Each graph keeps its own memory pool: outputs of one bucket must survive replays of
        # others. thread_local: other threads (prompt encoding) may use the GPU meanwhile.
        with torch.inference_mode(), torch.cuda.graph(graph, capture_error_mode="thread_local"):
            output = self.function(*inputs)
        captured = _Captured(graph, inputs, output)
        self._graphs[key] = captured
        log.info("captured %s graph for bucket %d, rows %s", self.name, bucket, key[1:])
        return captured

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor:
        rows = int(tensors[0].shape[0])
        bucket = self.bucket_for(rows)
        if bucket is None:
            if not self._warned_oversize:
                log.warning(
                    "%s: %d rows exceed the largest bucket %d; running without a graph",
                    self.name,
                    rows,
                    self.buckets[-1],
                )
                self._warned_oversize = True
            return self.function(*tensors)
        captured = self.capture(bucket, tensors)
        for static, value in zip(captured.inputs, tensors, strict=True):
            static[:rows].copy_(value)
        captured.graph.replay()
        return captured.output[:rows]


class GraphedBundle(ModelBundle):
    """A :class:`ModelBundle` whose UNet and VAE calls replay CUDA graphs per bucket."""

    def setup_graphs(
        self,
        *,
        unet_buckets: Sequence[int],
        frame_buckets: Sequence[int],
        latent_size: tuple[int, int],
    ) -> None:
        """Choose the buckets; ``latent_size`` is what :meth:`warm_up` captures ahead of use."""
        if self.device.type != "cuda":
            raise BackendError("CUDA graphs need a CUDA device")
        base = ModelBundle
        self._latent_size = latent_size

        def unet(*tensors: torch.Tensor) -> torch.Tensor:
            return base.predict_noise(self, UNetBatch(*tensors))

        self._unet_graphs = BucketGraphs("unet", tuple(sorted(unet_buckets)), unet)
        self._encode_graphs = BucketGraphs(
            "vae-encode", tuple(sorted(frame_buckets)), lambda x: base.encode(self, x)
        )
        self._decode_graphs = BucketGraphs(
            "vae-decode", tuple(sorted(frame_buckets)), lambda z: base.decode(self, z)
        )

    def _templates(self) -> dict[str, list[torch.Tensor]]:
        h, w = self._latent_size
        factor = self.vae_scale_factor
        seq, dim = self.embed_shape
        opts: dict[str, Any] = {"device": self.device, "dtype": self.dtype}
        unet = [
            torch.zeros(1, 4, h, w, **opts),
            torch.zeros(1, dtype=torch.long, device=self.device),
            torch.zeros(1, seq, dim, **opts),
        ]
        if self.pooled_dim:
            unet += [torch.zeros(1, self.pooled_dim, **opts), torch.zeros(1, 6, **opts)]
        return {
            "unet": unet,
            "vae-encode": [torch.zeros(1, 3, h * factor, w * factor, **opts)],
            "vae-decode": [torch.zeros(1, 4, h, w, **opts)],
        }

    def warm_up(self, progress: Callable[[str], None] | None = None) -> None:
        """Compile and capture every bucket at the set-up latent size now, not on first use."""
        templates = self._templates()
        for graphs in (self._unet_graphs, self._encode_graphs, self._decode_graphs):
            for bucket in graphs.buckets:
                graphs.capture(bucket, templates[graphs.name])
                if progress is not None:
                    progress(f"{graphs.name}[{bucket}]")

    @torch.inference_mode()
    def predict_noise(self, batch: UNetBatch) -> torch.Tensor:
        tensors = [batch.latents, batch.timesteps, batch.embeds]
        if batch.text_embeds is not None and batch.time_ids is not None:
            tensors += [batch.text_embeds, batch.time_ids]
        return self._unet_graphs(*tensors)

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self._encode_graphs(images.to(device=self.device, dtype=self.dtype))

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self._decode_graphs(latents)

    @classmethod
    def wrap(cls, bundle: ModelBundle) -> GraphedBundle:
        return cls(**{name: getattr(bundle, name) for name in bundle.__dataclass_fields__})

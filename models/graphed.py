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
    """One captured graph per bucket for a function of static-shaped tensors."""

    name: str
    buckets: tuple[int, ...]
    function: Callable[..., torch.Tensor]
    example: Callable[[int], list[torch.Tensor]]  # bucket size → zero-filled inputs of that size
    _graphs: dict[int, _Captured] = field(default_factory=dict)

    def bucket_for(self, rows: int) -> int:
        index = bisect.bisect_left(self.buckets, rows)
        if index == len(self.buckets):
            raise BackendError(
                f"{self.name}: {rows} rows exceed the largest batch bucket {self.buckets[-1]}"
            )
        return self.buckets[index]

    def capture(self, bucket: int) -> _Captured:
        captured = self._graphs.get(bucket)
        if captured is not None:
            return captured
        inputs = self.example(bucket)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(WARMUP_ITERATIONS):
                self.function(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # Each graph keeps its own memory pool: outputs of one bucket must survive replays of others.
        with torch.inference_mode(), torch.cuda.graph(graph):
            output = self.function(*inputs)
        captured = _Captured(graph, inputs, output)
        self._graphs[bucket] = captured
        log.info("captured %s graph for bucket %d", self.name, bucket)
        return captured

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor:
        rows = int(tensors[0].shape[0])
        captured = self.capture(self.bucket_for(rows))
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
        if self.device.type != "cuda":
            raise BackendError("CUDA graphs need a CUDA device")
        if self.preset.is_sdxl:
            raise BackendError(
                "per-bucket graphs for SDXL's added conditioning are not implemented; use the whole-step graph"
            )
        h, w = latent_size
        factor = self.vae_scale_factor
        seq, dim = self.embed_shape
        opts = {"device": self.device, "dtype": self.dtype}
        base = ModelBundle

        def unet_inputs(rows: int) -> list[torch.Tensor]:
            return [
                torch.zeros(rows, 4, h, w, **opts),
                torch.full((rows,), 999, dtype=torch.long, device=self.device),
                torch.zeros(rows, seq, dim, **opts),
            ]

        def unet(
            latents: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor
        ) -> torch.Tensor:
            return base.predict_noise(self, UNetBatch(latents, timesteps, embeds))

        self._unet_graphs = BucketGraphs("unet", tuple(sorted(unet_buckets)), unet, unet_inputs)
        self._encode_graphs = BucketGraphs(
            "vae-encode",
            tuple(sorted(frame_buckets)),
            lambda x: base.encode(self, x),
            lambda rows: [torch.zeros(rows, 3, h * factor, w * factor, **opts)],
        )
        self._decode_graphs = BucketGraphs(
            "vae-decode",
            tuple(sorted(frame_buckets)),
            lambda z: base.decode(self, z),
            lambda rows: [torch.zeros(rows, 4, h, w, **opts)],
        )

    def warm_up(self, progress: Callable[[str], None] | None = None) -> None:
        """Compile and capture every bucket now instead of on first use."""
        for graphs in (self._unet_graphs, self._encode_graphs, self._decode_graphs):
            for bucket in graphs.buckets:
                graphs.capture(bucket)
                if progress is not None:
                    progress(f"{graphs.name}[{bucket}]")

    @torch.inference_mode()
    def predict_noise(self, batch: UNetBatch) -> torch.Tensor:
        return self._unet_graphs(batch.latents, batch.timesteps, batch.embeds)

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self._encode_graphs(images.to(device=self.device, dtype=self.dtype))

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self._decode_graphs(latents)

    @classmethod
    def wrap(cls, bundle: ModelBundle) -> GraphedBundle:
        return cls(**{name: getattr(bundle, name) for name in bundle.__dataclass_fields__})

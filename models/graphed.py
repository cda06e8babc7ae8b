"""CUDA graphs per batch bucket around a bundle's UNet and VAE halves.

A call with ``n`` rows runs the graph of the smallest bucket ``>= n``: the rows are copied into
that bucket's static input buffers, the graph replays, and the first ``n`` rows of its static
output are returned. Padding rows hold whatever the buffer held before (finite values from an
earlier call, or zeros); their outputs are never read. A caller that packed its rows straight
into those buffers (:meth:`GraphedBundle.input_buffers`) pays no copy at all: a call whose
inputs *are* the static buffers replays at once.

The returned tensor is a view of the bucket's static output: it is valid until the next call
that uses the same bucket. The engine consumes every output before the next call, which is the
contract this relies on.

Graphs are captured lazily on the first call of each bucket (after warm-up iterations on a side
stream, as CUDA graph capture requires) or eagerly with :meth:`GraphedBundle.warm_up`.
"""

from __future__ import annotations

import bisect
import itertools
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
BANK_INPUTS = ("bank_slots", "bank_frames", "bank_write", "bank_fusion")
LORA_INPUTS = ("lora_indices", "lora_scales")


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]
    output: torch.Tensor


Named = dict[str, torch.Tensor]


@dataclass
class BucketGraphs:
    """One captured graph per (bucket, input names and row shapes) for a function of named tensors.

    Row shapes are part of the key, so a new resolution (the runtime's degrade step) captures
    its own graphs on first use; so are the names, so a batch with another set of per-row
    inputs gets its own graph. Calls with more rows than the largest bucket run the function
    directly (compiled, not graphed) and say so once in the log.
    """

    name: str
    buckets: tuple[int, ...]
    function: Callable[[Named], torch.Tensor]
    zero_padded: frozenset[str] = frozenset()  # inputs whose padding rows must be zeros
    _graphs: dict[tuple[Any, ...], _Captured] = field(default_factory=dict)
    _warned_oversize: bool = False

    def bucket_for(self, rows: int) -> int | None:
        index = bisect.bisect_left(self.buckets, rows)
        return self.buckets[index] if index < len(self.buckets) else None

    def capture(self, bucket: int, templates: Named) -> _Captured:
        key = (bucket, *((name, tuple(t.shape[1:]), t.dtype) for name, t in templates.items()))
        captured = self._graphs.get(key)
        if captured is not None:
            return captured
        inputs = {
            name: torch.zeros((bucket, *t.shape[1:]), dtype=t.dtype, device=t.device)
            for name, t in templates.items()
        }
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(WARMUP_ITERATIONS):
                self.function(inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # Each graph keeps its own memory pool: outputs of one bucket must survive replays of
        # others. thread_local: other threads (prompt encoding) may use the GPU meanwhile.
        with torch.inference_mode(), torch.cuda.graph(graph, capture_error_mode="thread_local"):
            output = self.function(inputs)
        captured = _Captured(graph, inputs, output)
        self._graphs[key] = captured
        log.info("captured %s graph for bucket %d, rows %s", self.name, bucket, key[1:])
        return captured

    def __call__(self, named: Named) -> torch.Tensor:
        rows = int(next(iter(named.values())).shape[0])
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
            return self.function(named)
        captured = self.capture(bucket, named)
        for name, value in named.items():
            static = captured.inputs[name]
            if not _same_view(static, value):  # packed in place by the caller: nothing to copy
                static[:rows].copy_(value)
                if name in self.zero_padded:  # e.g. feature bank writes: padding writes nowhere
                    static[rows:].zero_()
        captured.graph.replay()
        return captured.output[:rows]


def _same_view(static: torch.Tensor, value: torch.Tensor) -> bool:
    return value.data_ptr() == static.data_ptr() and value.stride() == static.stride()


class GraphedBundle(ModelBundle):
    """A :class:`ModelBundle` whose UNet and VAE calls replay CUDA graphs per bucket."""

    compile_report: Any = None  # what models.compile_cache did at warm-up (a CacheReport)

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

        bank_sizes: set[tuple[int, ...]] = set()  # latent sizes whose bank pools exist

        def unet(named: Named) -> torch.Tensor:
            batch = UNetBatch(**named)
            size = tuple(batch.latents.shape[1:])
            if self.feature_bank is not None and size not in bank_sizes:
                bank_sizes.add(size)  # before the first compiled call at this size
                base.make_bank_pools(self, batch)
            return base.predict_noise(self, batch)

        self._graphs = {
            "unet": BucketGraphs(
                "unet",
                tuple(sorted(unet_buckets)),
                unet,
                frozenset(n for n in UNetBatch.row_fields() if UNetBatch.pads_with_zeros(n)),
            ),
            "encode": BucketGraphs(
                "vae-encode", tuple(sorted(frame_buckets)), lambda n: base.encode(self, n["x"])
            ),
            "decode": BucketGraphs(
                "vae-decode", tuple(sorted(frame_buckets)), lambda n: base.decode(self, n["x"])
            ),
        }

    def _templates(self) -> dict[str, Named]:
        h, w = self._latent_size
        factor = self.vae_scale_factor
        seq, dim = self.embed_shape
        opts: dict[str, Any] = {"device": self.device, "dtype": self.dtype}
        unet = {
            "latents": torch.zeros(1, 4, h, w, **opts),
            "timesteps": torch.zeros(1, dtype=torch.long, device=self.device),
            "embeds": torch.zeros(1, seq, dim, **opts),
        }
        if self.pooled_dim:
            unet["text_embeds"] = torch.zeros(1, self.pooled_dim, **opts)
            unet["time_ids"] = torch.zeros(1, 6, **opts)
        if self.controlnets:  # every session of this model sends them (engine.control_plan)
            slots = len(self.controlnets)
            unet["control_images"] = torch.zeros(1, slots, 3, h * factor, w * factor, **opts)
            unet["control_scales"] = torch.zeros(1, slots, **opts)
        if self.feature_bank is not None:  # sessions that bank send them (bank_live)
            frames = self.feature_bank.frames
            unet["bank_slots"] = torch.zeros(1, dtype=torch.long, device=self.device)
            unet["bank_frames"] = torch.zeros(1, frames, **opts)
            unet["bank_write"] = torch.zeros(1, dtype=torch.long, device=self.device)
            unet["bank_fusion"] = torch.zeros(1, 2, **opts)
        if self.loras is not None:  # every row carries its LoRA slots (none: scale 0)
            slots = self.loras.capacity.slots_per_row
            unet["lora_indices"] = torch.full((1, slots), -1, dtype=torch.int32, device=self.device)
            unet["lora_scales"] = torch.zeros(1, slots, dtype=torch.float32, device=self.device)
        if self.ip_adapter is not None:  # every session sends them (zeros and scale 0: off)
            unet["ip_tokens"] = torch.zeros(1, *self.ip_adapter.token_shape, **opts)
            unet["ip_scales"] = torch.zeros(1, **opts)
        return {
            "unet": unet,
            "encode": {"x": torch.zeros(1, 3, h * factor, w * factor, **opts)},
            "decode": {"x": torch.zeros(1, 4, h, w, **opts)},
        }

    def warm_up(
        self, progress: Callable[[str], None] | None = None, *, plain_unet: bool = False
    ) -> None:
        """Compile and capture every bucket at the set-up latent size now, not on first use.

        ``plain_unet``: a model with ControlNets also gets the UNet's graphs for calls without
        control inputs (a server that keeps sessions without nets apart:
        ``RuntimeConfig.controlnet_rows``). A model with a feature bank always gets the graphs
        for calls where no row banks (they carry no bank inputs: ``StreamBatch.bank_live``) and
        for calls where every row holds all its bank frames (no ``bank_frames``: unmasked), and
        one with a per-session LoRA library the graphs for calls without LoRA inputs (no row
        uses one, or the weights hold every row's: :mod:`livediff.models.lora_merge`)."""
        templates = self._templates()
        variants = {stage: [named] for stage, named in templates.items()}
        optional: list[tuple[str, ...]] = []  # groups of UNet inputs some calls leave out
        if plain_unet and self.controlnets:
            optional.append(("control_images", "control_scales"))
        if self.feature_bank is not None:
            optional.append(BANK_INPUTS)
            optional.append(("bank_frames",))  # every row holds all its frames: no mask
        if self.loras is not None:  # calls whose rows' LoRAs the weights hold (lora_merge)
            optional.append(LORA_INPUTS)
        for left_out in itertools.product((False, True), repeat=len(optional)):
            names = {n for group, out in zip(optional, left_out, strict=True) if out for n in group}
            if names:
                variants["unet"].append(
                    {k: v for k, v in templates["unet"].items() if k not in names}
                )
        for stage, graphs in self._graphs.items():
            for named in variants[stage]:
                for bucket in graphs.buckets:
                    graphs.capture(bucket, named)
                    if progress is not None:
                        progress(f"{graphs.name}[{bucket}]")

    def input_buffers(
        self, stage: str, bucket: int, like: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor] | None:
        graphs = self._graphs.get(stage)
        if graphs is None or bucket not in graphs.buckets:
            return None
        return graphs.capture(bucket, like).inputs

    @torch.inference_mode()
    def predict_noise(self, batch: UNetBatch) -> torch.Tensor:
        return self._graphs["unet"](dict(batch.tensors()))

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self._graphs["encode"]({"x": images.to(device=self.device, dtype=self.dtype)})

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self._graphs["decode"]({"x": latents})

    @classmethod
    def wrap(cls, bundle: ModelBundle) -> GraphedBundle:
        return cls(**{name: getattr(bundle, name) for name in bundle.__dataclass_fields__})

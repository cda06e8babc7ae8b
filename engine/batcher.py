"""Several sessions' work as one call: VAE encode, UNet rows and VAE decode, padded to buckets.

Each stage concatenates the sessions' tensors into a buffer allocated once per (stage, shape)
and written in place with ``copy_`` (no ``torch.cat`` per frame), pads the rows up to the next
size in ``batch_buckets`` with copies of the first real row (so a compiled model sees a few
static shapes; the padding's outputs are never read), runs the model once, and hands each
session a view of its own rows. Which sessions may be packed together is the scheduler's
grouping rule (:mod:`livediff.engine.scheduler`).

Outputs go to host memory here too: on CUDA into pinned buffers with ``non_blocking`` copies,
to be waited for through one event by the worker; on CPU they already are host tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from livediff.engine.scheduler import bucket_for
from livediff.kernels.postprocess import model_output_to_rgb
from livediff.models.bundle import ModelBundle
from livediff.models.unet_batch import UNetBatch


@dataclass(frozen=True)
class PackedCall:
    """What one UNet call looked like, for metrics."""

    rows: int
    padded_rows: int
    sessions: int


class Batcher:
    """Packs, runs and splits batched model calls; used by the worker thread only."""

    def __init__(self, bundle: ModelBundle, buckets: Sequence[int]) -> None:
        self.bundle = bundle
        self.buckets = tuple(buckets)
        self._buffers: dict[tuple[str, tuple[int, ...], torch.dtype], torch.Tensor] = {}

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        key = (name, shape, dtype)
        buffer = self._buffers.get(key)
        if buffer is None:
            buffer = torch.empty(shape, dtype=dtype, device=self.bundle.device)
            self._buffers[key] = buffer
        return buffer

    def _pack(self, name: str, parts: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
        """Rows of ``parts`` one after another in a bucket-sized buffer; returns it and the offsets."""
        rows = sum(int(part.shape[0]) for part in parts)
        first = parts[0]
        buffer = self._buffer(name, (bucket_for(rows, self.buckets), *first.shape[1:]), first.dtype)
        offsets, offset = [], 0
        for part in parts:
            count = int(part.shape[0])
            buffer.narrow(0, offset, count).copy_(part)
            offsets.append(offset)
            offset += count
        if offset < buffer.shape[0]:
            padding = buffer.narrow(0, offset, buffer.shape[0] - offset)
            padding.copy_(first.narrow(0, 0, 1).expand_as(padding))
        return buffer, offsets

    @staticmethod
    def _split(
        result: torch.Tensor, offsets: Sequence[int], parts: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        return [result.narrow(0, o, int(p.shape[0])) for o, p in zip(offsets, parts, strict=True)]

    # ------------------------------------------------------------------ stages
    def encode(self, pixels: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``[F_i, 3, H, W]`` images in [-1, 1] per session → their latents ``[F_i, 4, h, w]``."""
        if not pixels:
            return []
        packed, offsets = self._pack("pixels", pixels)
        return self._split(self.bundle.encode(packed), offsets, pixels)

    def predict(self, batches: Sequence[UNetBatch]) -> tuple[list[torch.Tensor], PackedCall]:
        """One UNet call over every session's rows; returns the noise per session."""
        latents, offsets = self._pack("latents", [b.latents for b in batches])
        timesteps, _ = self._pack("timesteps", [b.timesteps for b in batches])
        embeds, _ = self._pack("embeds", [b.embeds for b in batches])
        text_embeds = time_ids = None
        if batches[0].text_embeds is not None:
            text_embeds, _ = self._pack("text_embeds", [b.text_embeds for b in batches])
            time_ids, _ = self._pack("time_ids", [b.time_ids for b in batches])
        eps = self.bundle.predict_noise(
            UNetBatch(latents, timesteps, embeds, text_embeds, time_ids)
        )
        rows = sum(b.rows for b in batches)
        call = PackedCall(rows=rows, padded_rows=int(latents.shape[0]), sessions=len(batches))
        return self._split(eps, offsets, [b.latents for b in batches]), call

    def decode_rgb(
        self, latents: Sequence[torch.Tensor], sizes: Sequence[tuple[int, int]]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Finished latents per session → uint8 ``[F_i, H, W, 3]`` per session, on the device and on the host.

        ``sizes`` are the (height, width) each session's outputs must have; images rendered
        smaller (degraded resolution) are resized bilinearly first. Host tensors are valid once
        the worker's output event has fired (CUDA) or at once (CPU).
        """
        packed, offsets = self._pack("decode", latents)
        images = self.bundle.decode(packed)
        if all(tuple(images.shape[-2:]) == size for size in sizes):
            total = sum(int(lat.shape[0]) for lat in latents)
            rgb = model_output_to_rgb(images.narrow(0, 0, total))
            host = self.to_host([rgb])[0]
            return self._split(rgb, offsets, latents), self._split(host, offsets, latents)
        rgbs = [
            model_output_to_rgb(resize(images.narrow(0, o, int(lat.shape[0])), size))
            for o, lat, size in zip(offsets, latents, sizes, strict=True)
        ]
        return rgbs, self.to_host(rgbs)

    def to_host(self, rgbs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Start copying each tensor to host memory; on CUDA valid only once the worker's event fired."""
        if self.bundle.device.type != "cuda":
            return [rgb.cpu() for rgb in rgbs]
        hosts = []
        for rgb in rgbs:
            host = torch.empty(rgb.shape, dtype=rgb.dtype, pin_memory=True)
            host.copy_(rgb, non_blocking=True)
            hosts.append(host)
        return hosts


def resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[N, 3, h, w]`` model images → ``[N, 3, *size]`` (bilinear), unchanged when already that size."""
    if tuple(images.shape[-2:]) == size:
        return images
    return F.interpolate(images.to(torch.float32), size=size, mode="bilinear", align_corners=False)


def resize_rgb(rgb: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 ``[N, h, w, 3]`` → uint8 ``[N, *size, 3]`` (bilinear), unchanged when already that size."""
    if tuple(rgb.shape[1:3]) == size:
        return rgb
    images = rgb.permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1.0
    return model_output_to_rgb(resize(images, size))

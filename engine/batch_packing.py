"""Several sessions' work as one call: VAE encode, UNet rows and VAE decode, padded to buckets.

Each stage writes the sessions' rows one after another into a buffer with ``copy_`` (no
``torch.cat`` per frame) and pads them up to the next size in ``batch_buckets`` with copies of
the first real row (so a compiled model sees a few static shapes; the padding's outputs are
never read), runs the model once, and hands each session a view of its own rows. The buffer is
the model's own static input where it has one (a CUDA-graphed bundle: see
:meth:`~livediff.models.bundle.ModelBundle.input_buffers`), so packing is the only device copy;
otherwise one allocated per (stage, shape) and reused. The UNet's inputs are packed field by
field over :class:`~livediff.models.unet_batch.UNetBatch`'s per-row fields, whatever they are.
Which sessions may be packed together is the scheduler's grouping rule
(:mod:`livediff.engine.batch_planning`).

Outputs go to host memory here too: on CUDA into pinned buffers with ``non_blocking`` copies,
waited for through one event by the worker; on CPU they already are host tensors.

:meth:`BatchPacker.run_streams` drives the streams' phases around those calls (the order the
comment in :mod:`livediff.engine.stream` names) for any caller: the multi-session worker's
:class:`~livediff.engine.batch_step.BatchStep`, and a file job's
:class:`~livediff.engine.interleaved.InterleavedStreams`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F

from livediff.engine.batch_planning import bucket_for
from livediff.engine.control_batch import batched_controls
from livediff.engine.frames import OutputFormat, StreamOutput
from livediff.engine.stream import call_inputs
from livediff.kernels.postprocess import model_output_to_i420, model_output_to_rgb
from livediff.models.bundle import ModelBundle
from livediff.models.unet_batch import UNetBatch, field_names_in

if TYPE_CHECKING:
    from livediff.engine.stream import FrameGroup, Stream


@dataclass(frozen=True)
class PackedCall:
    """What one UNet call looked like, for metrics."""

    rows: int
    padded_rows: int
    sessions: int


class StreamRows(Protocol):
    """One stream's admitted frame group in a batched call, with its :meth:`Stream.model_input`."""

    @property
    def stream(self) -> Stream: ...

    @property
    def group(self) -> FrameGroup: ...

    @property
    def pixels(self) -> torch.Tensor | None: ...


@dataclass(frozen=True)
class BatchedAnswer:
    """What :meth:`BatchPacker.run_streams` gives back, per entry in the order given."""

    answers: list[list[StreamOutput]]  # Stream.complete's outputs
    frames: list[torch.Tensor]  # the decoded frames on the device (the entry's format)
    hosts: list[torch.Tensor]  # their host copies (empty without ``to_host``)
    call: PackedCall


class BatchPacker:
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

    def _targets(
        self, stage: str, parts: dict[str, Sequence[torch.Tensor | None]]
    ) -> tuple[dict[str, torch.Tensor], int]:
        """A bucket-sized buffer per input of ``stage``: the model's own where it has them."""
        rows = sum(int(p.shape[0]) for p in next(iter(parts.values())) if p is not None)
        bucket = bucket_for(rows, self.buckets)
        like = {name: _first(values) for name, values in parts.items()}
        targets = self.bundle.input_buffers(stage, bucket, like)
        if targets is None:
            targets = {
                name: self._buffer(f"{stage}.{name}", (bucket, *t.shape[1:]), t.dtype)
                for name, t in like.items()
            }
        return targets, rows

    @staticmethod
    def _fill(
        buffer: torch.Tensor,
        parts: Sequence[torch.Tensor | None],
        rows: Sequence[int],
        pad_zeros: bool = False,
    ) -> None:
        """``parts`` one after another into ``buffer`` (``None``: zeros), then pad with row 0
        (or zeros: :func:`~livediff.models.unet_batch.row_input`'s ``pad_zeros``)."""
        offset = 0
        for part, count in zip(parts, rows, strict=True):
            view = buffer.narrow(0, offset, count)
            if part is None:
                view.zero_()
            else:
                view.copy_(part)
            offset += count
        if offset < buffer.shape[0]:
            padding = buffer.narrow(0, offset, buffer.shape[0] - offset)
            if pad_zeros:
                padding.zero_()
            else:
                padding.copy_(buffer.narrow(0, 0, 1).expand_as(padding))

    def _pack(self, stage: str, parts: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
        """One tensor per session → its rows packed in ``stage``'s buffer, and their offsets."""
        targets, _ = self._targets(stage, {"x": parts})
        counts = [int(p.shape[0]) for p in parts]
        self._fill(targets["x"], parts, counts)
        return targets["x"], _offsets(counts)

    @staticmethod
    def _split(
        result: torch.Tensor, offsets: Sequence[int], counts: Sequence[int]
    ) -> list[torch.Tensor]:
        return [result.narrow(0, o, c) for o, c in zip(offsets, counts, strict=True)]

    # ------------------------------------------------------------------ streams
    def run_streams(
        self,
        entries: Sequence[StreamRows],
        sizes: Sequence[tuple[int, int]],
        formats: Sequence[OutputFormat],
        mark: Callable[[str], None] | None = None,
        *,
        nets: bool = True,
        to_host: bool = True,
    ) -> BatchedAnswer:
        """The entries' frame groups as one batched encode → UNet → decode (Stream Batch streams).

        Each stream's phases run in order around the packed calls: ``begin`` writes its rows,
        ``finish`` steps them, ``complete`` matches the decoded frames to the inputs they answer
        (after the Stream Batch delay). ``sizes`` and ``formats`` are each entry's output
        (height, width) and pixel format; ``mark(stage)`` is called after each stage (a
        :class:`~livediff.engine.metrics.StageTimer`'s). ``nets`` False: no row uses a net
        (every scale 0), so the call carries no control inputs. Raises what the model raises.
        """
        mark = mark or _no_mark
        latents = iter(self.encode([e.pixels for e in entries if e.pixels is not None]))
        mark("encode")
        requests = [e.stream.control_request(e.group, e.pixels) if nets else None for e in entries]
        # each preprocessor once over the rows of every stream that needs it
        controls = batched_controls(requests, self.bundle.control_networks)
        unet_inputs = [
            e.stream.begin(e.group, None if e.pixels is None else next(latents), e.pixels, c)
            for e, c in zip(entries, controls, strict=True)
        ]
        if not nets:
            unet_inputs = [
                replace(b, control_images=None, control_scales=None) for b in unet_inputs
            ]
        unet_inputs = call_inputs(self.bundle, unet_inputs, [e.stream for e in entries])
        eps, call = self.predict(unet_inputs)
        mark("unet")
        finished = [e.stream.finish(part) for e, part in zip(entries, eps, strict=True)]
        frames, hosts = self.decode_frames(finished, sizes, formats, to_host=to_host)
        mark("decode")
        answers = [
            e.stream.complete(e.group, frame, size)
            for e, frame, size in zip(entries, frames, sizes, strict=True)
        ]
        return BatchedAnswer(answers, frames, hosts, call)

    # ------------------------------------------------------------------ stages
    def encode(self, pixels: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``[F_i, 3, H, W]`` images in [-1, 1] per session → their latents ``[F_i, 4, h, w]``."""
        if not pixels:
            return []
        packed, offsets = self._pack("encode", pixels)
        counts = [int(p.shape[0]) for p in pixels]
        return self._split(self.bundle.encode(packed), offsets, counts)

    def predict(self, batches: Sequence[UNetBatch]) -> tuple[list[torch.Tensor], PackedCall]:
        """One UNet call over every session's rows; returns the noise per session.

        Every per-row field of the batches is packed the same way; a field only some sessions
        set is zero for the others (or refused, by the field's rule: :func:`field_names_in`).
        """
        names = field_names_in(batches)
        counts = [b.rows for b in batches]
        targets, rows = self._targets(
            "unet", {name: [getattr(b, name) for b in batches] for name in names}
        )
        kind = type(batches[0])
        for name in names:
            parts = [getattr(b, name) for b in batches]
            self._fill(targets[name], parts, counts, kind.pads_with_zeros(name))
        packed = type(batches[0])(**targets)
        eps = self.bundle.predict_noise(packed)
        padded = int(targets["latents"].shape[0])
        call = PackedCall(rows=rows, padded_rows=padded, sessions=len(batches))
        return self._split(eps, _offsets(counts), counts), call

    def decode_frames(
        self,
        latents: Sequence[torch.Tensor],
        sizes: Sequence[tuple[int, int]],
        formats: Sequence[OutputFormat],
        *,
        to_host: bool = True,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Finished latents per session → its frames, on the device and on the host (no host
        copies, ``[]``, without ``to_host``: the caller copies them itself).

        A session's frames are uint8 ``[F_i, H, W, 3]`` RGB, or packed I420 ``[F_i, L]`` when
        its format says so (converted here, on the device: the host never converts colour).
        ``sizes`` are the (height, width) each session's outputs must have; images rendered
        smaller (degraded resolution) are resized bilinearly first. Host tensors are valid
        once the worker's output event has fired (CUDA) or at once (CPU).
        """
        packed, offsets = self._pack("decode", latents)
        counts = [int(lat.shape[0]) for lat in latents]
        images = self.bundle.decode(packed)
        if len(set(formats)) == 1 and all(tuple(images.shape[-2:]) == s for s in sizes):
            frames = _postprocess(images.narrow(0, 0, sum(counts)), formats[0])
            split = self._split(frames, offsets, counts)
            if not to_host:
                return split, []
            return split, self._split(self.to_host([frames])[0], offsets, counts)
        outs = [
            _postprocess(resize(images.narrow(0, o, c), size), kind)
            for o, c, size, kind in zip(offsets, counts, sizes, formats, strict=True)
        ]
        return outs, self.to_host(outs) if to_host else []

    def to_host(self, rgbs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Start copying each tensor to host memory; on CUDA valid only once the worker's event fired.

        Each batch gets new pinned buffers: its outputs live on in outboxes, encoders and the
        similarity filter's last image, so they must never be overwritten. PyTorch's caching
        host allocator hands back freed blocks, so this costs no driver call once warm.
        """
        if self.bundle.device.type != "cuda":
            return [rgb.cpu() for rgb in rgbs]
        hosts = []
        for rgb in rgbs:
            host = torch.empty(rgb.shape, dtype=rgb.dtype, pin_memory=True)
            host.copy_(rgb, non_blocking=True)
            hosts.append(host)
        return hosts


def _postprocess(images: torch.Tensor, output: OutputFormat) -> torch.Tensor:
    if output is OutputFormat.I420:
        return model_output_to_i420(images)
    return model_output_to_rgb(images)


def _no_mark(stage: str) -> None:
    pass


def _first(values: Sequence[torch.Tensor | None]) -> torch.Tensor:
    return next(v for v in values if v is not None)


def _offsets(counts: Sequence[int]) -> list[int]:
    offsets, offset = [], 0
    for count in counts:
        offsets.append(offset)
        offset += count
    return offsets


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

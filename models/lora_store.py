"""Packed LoRA buffers: one pair of fixed device tensors per target layer, one slot per LoRA.

For every target layer (``Linear(in → out)``, or a 1×1 convolution from ``in`` to ``out``
channels) the store holds ``a`` ``[max_loras, in, max_rank]`` and ``b`` ``[max_loras,
max_rank, out]`` in the model's dtype, zero where no LoRA is loaded and past each LoRA's own rank. Loading a LoRA writes its weights into a free slot
(``a = down.T``, ``b = up.T · alpha/rank``; zeros in the layers it does not touch), unloading
zeroes the slot and frees it. The shapes never change, so a compiled or CUDA-graphed UNet that
reads these buffers (:mod:`livediff.models.lora_layers`) sees new LoRAs without recompiling or
re-capturing: :func:`livediff.kernels.lora_rows.lora_rows` picks each row's slots by index.

Fused projections (:mod:`livediff.models.lora_fusion`: an attention's ``to_q``/``to_k``/``to_v``
as one ``to_qkv``, a cross-attention's ``to_k``/``to_v`` as ``to_kv``) get one pair
(:meth:`LoraStore.fuse`): ``a`` ``[max_loras, in, k·max_rank]`` (the parts' down projections
side by side) and ``b`` ``[max_loras, k·max_rank, Σ out]`` (block diagonal: part ``i``'s rank
rows write only its own outputs), so ``x·a·b`` is the parts' updates concatenated. The parts'
own buffers become views of their blocks: loads and unloads by layer name write the fused
pair, and the zeros off the diagonal are never written.

Writes are ``copy_`` on the current CUDA stream: call :meth:`LoraStore.load` and
:meth:`LoraStore.unload` from the thread that runs the UNet, between calls (the GPU worker),
so a call never reads a half-written slot.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from livediff.exceptions import ModelLoadError, ParameterError
from livediff.models.lora_files import LoraFile, layer_features, target_layers
from livediff.models.lora_uses import MAX_LORA_USES

# A LoRA laid out as a slot holds it, in host memory: layer → (A [in, max_rank], B [max_rank, out]).
StagedLora = dict[str, tuple[torch.Tensor, torch.Tensor]]

MAX_SLOTS_PER_ROW = MAX_LORA_USES
MAX_RANK = 256  # the Triton kernel's limit (kernels/lora_rows.py TRITON_MAX_RANK)


@dataclass(frozen=True)
class LoraCapacity:
    """The static sizes of the packed buffers: fixed at start, so nothing recompiles later.

    ``max_loras``: LoRAs loaded at once; ``max_rank``: the largest rank a LoRA may have;
    ``slots_per_row``: how many LoRAs one session (one row) may combine.
    """

    max_loras: int = 8
    max_rank: int = 64
    slots_per_row: int = 2

    def __post_init__(self) -> None:
        for name, value, top in (
            ("max_loras", self.max_loras, 1024),
            ("max_rank", self.max_rank, MAX_RANK),
            ("slots_per_row", self.slots_per_row, MAX_SLOTS_PER_ROW),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
                raise ParameterError(
                    f"{name}={value!r} is out of range: expected an integer in [1, {top}]",
                    field=name,
                    limit=top,
                )


@dataclass(frozen=True)
class LoadedLora:
    """A LoRA in the store: its slot, rank, layers, and what it takes on the device."""

    name: str
    source: str
    slot: int
    rank: int
    layers: int
    bytes: int  # its own weights in the store's dtype (unpadded)
    slot_bytes: int  # what its slot reserves (every target layer at max_rank)
    ignored_text_encoder_keys: int

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "slot": self.slot,
            "rank": self.rank,
            "layers": self.layers,
            "bytes": self.bytes,
            "slot_bytes": self.slot_bytes,
            "ignored_text_encoder_keys": self.ignored_text_encoder_keys,
        }


class LoraStore:
    """The packed buffers of every target layer of one UNet, and which LoRA holds which slot."""

    def __init__(
        self,
        unet: torch.nn.Module,
        capacity: LoraCapacity,
        *,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.capacity = capacity
        self.device = device
        self.dtype = dtype
        layers = target_layers(unet)
        if not layers:
            raise ModelLoadError("this UNet has no linear layers that LoRAs apply to")
        n, r = capacity.max_loras, capacity.max_rank
        opts: dict[str, Any] = {"device": device, "dtype": dtype}
        self.buffers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, layer in layers.items():
            features_in, features_out = layer_features(layer)
            self.buffers[name] = (
                torch.zeros(n, features_in, r, **opts),
                torch.zeros(n, r, features_out, **opts),
            )
        # fused layer name → its (a, b); the parts' entries in ``buffers`` are views of them
        self.fused: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._fused_parts: set[str] = set()
        self._loaded: dict[str, LoadedLora] = {}
        self._retiring: set[str] = set()  # being unloaded: no new session may take them

    @property
    def slot_bytes(self) -> int:
        """Device memory one slot reserves (all target layers at ``max_rank``; a fused pair
        with its zeros off the diagonal)."""
        pairs = [pair for name, pair in self.buffers.items() if name not in self._fused_parts]
        total = sum(a[0].numel() + b[0].numel() for a, b in (*pairs, *self.fused.values()))
        return total * torch.empty((), dtype=self.dtype).element_size()

    def pair(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(a, b)`` of a target layer or of a fused projection."""
        return self.fused[name] if name in self.fused else self.buffers[name]

    def fuse(self, parts: Sequence[str], fused: str) -> tuple[torch.Tensor, torch.Tensor]:
        """One pair for the projections ``parts`` (same input, outputs concatenated in this
        order) under the name ``fused``; what the parts' slots hold is kept, and from now on
        their entries in :attr:`buffers` are views of its blocks. Call it before the pair is
        captured in a graph; no slot may be mid-write (the UNet's thread, between calls)."""
        if fused in self.fused or fused in self.buffers or self._fused_parts.intersection(parts):
            raise ModelLoadError(f"{fused} or one of its parts has fused LoRA buffers already")
        pairs = [self.buffers[name] for name in parts]
        if len({a.shape[1] for a, _ in pairs}) != 1:
            raise ModelLoadError(f"{', '.join(parts)} do not share their input: not fusable")
        rank = self.capacity.max_rank
        if rank * len(parts) > MAX_RANK:
            raise ModelLoadError(
                f"fusing {len(parts)} projections' LoRAs needs rank {rank * len(parts)} "
                f"(max_rank {rank} × {len(parts)}); the kernel takes up to {MAX_RANK}"
            )
        n, features_in = pairs[0][0].shape[:2]
        outs = [b.shape[2] for _, b in pairs]
        opts: dict[str, Any] = {"device": self.device, "dtype": self.dtype}
        a = torch.zeros(n, features_in, rank * len(parts), **opts)
        b = torch.zeros(n, rank * len(parts), sum(outs), **opts)
        offset = 0
        for i, (name, (part_a, part_b)) in enumerate(zip(parts, pairs, strict=True)):
            block_a = a[:, :, i * rank : (i + 1) * rank]
            block_b = b[:, i * rank : (i + 1) * rank, offset : offset + outs[i]]
            block_a.copy_(part_a)
            block_b.copy_(part_b)
            self.buffers[name] = (block_a, block_b)
            self._fused_parts.add(name)
            offset += outs[i]
        self.fused[fused] = (a, b)
        return a, b

    @property
    def total_bytes(self) -> int:
        return self.slot_bytes * self.capacity.max_loras

    def loaded(self) -> tuple[LoadedLora, ...]:
        return tuple(sorted(self._loaded.values(), key=lambda lora: lora.slot))

    def get(self, name: str) -> LoadedLora:
        entry = self._loaded.get(name)
        if entry is None:
            known = ", ".join(sorted(self._loaded)) or "none"
            raise ParameterError(f"unknown LoRA {name!r}; loaded: {known}", field="loras")
        if name in self._retiring:
            raise ParameterError(f"LoRA {name!r} is being unloaded", field="loras")
        return entry

    def retire(self, name: str) -> None:
        """From now on no row may take ``name`` (:meth:`row_inputs` refuses it); rows that
        have it keep it until :meth:`unload`. Any thread (a set's add is atomic)."""
        self._retiring.add(name)

    def keep(self, name: str) -> None:
        """Undo :meth:`retire` (the unload was refused)."""
        self._retiring.discard(name)

    def stage(self, lora: LoraFile) -> StagedLora:
        """``lora`` laid out as its slot will hold it, in host memory (page-locked on CUDA),
        so that :meth:`load` only queues one asynchronous copy per buffer. Any thread: this
        is the slow part (transposing, scaling, converting) and stays off the UNet's thread.

        Every layer's pair is a view of one host allocation: one page-locked allocation per
        LoRA, not one per buffer (each ``cudaHostAlloc`` takes the driver's locks the UNet's
        thread needs to launch; hundreds of them in a row stalled the sessions' frames)."""
        self._check_fits(lora)
        shapes = [
            (name, self.buffers[name][0].shape[1:], self.buffers[name][1].shape[1:])
            for name in lora.layers
        ]
        total = sum(a.numel() + b.numel() for _, a, b in shapes)
        host = torch.zeros(total, dtype=self.dtype, pin_memory=self.device.type == "cuda")
        staged: StagedLora = {}
        offset = 0
        for name, a_shape, b_shape in shapes:
            pair = lora.layers[name]
            host_a = host.narrow(0, offset, a_shape.numel()).view(a_shape)
            offset += a_shape.numel()
            host_b = host.narrow(0, offset, b_shape.numel()).view(b_shape)
            offset += b_shape.numel()
            host_a[:, : pair.rank].copy_(pair.down.t())
            host_b[: pair.rank].copy_(pair.up.t() * pair.scale)
            staged[name] = (host_a, host_b)
        return staged

    def load(self, lora: LoraFile, staged: StagedLora | None = None) -> LoadedLora:
        """Write ``lora`` (``staged`` by :meth:`stage`, or staged here) into a free slot; a
        loaded name or a full store is refused."""
        if lora.name in self._loaded:
            raise ParameterError(
                f"a LoRA named {lora.name!r} is loaded already: unload it first", field="loras"
            )
        self._check_fits(lora)
        used = {entry.slot for entry in self._loaded.values()}
        free = [slot for slot in range(self.capacity.max_loras) if slot not in used]
        if not free:
            raise ModelLoadError(
                f"all {self.capacity.max_loras} LoRA slots are in use: unload one first",
                field="loras",
                limit=self.capacity.max_loras,
            )
        slot = free[0]
        self._write(slot, self.stage(lora) if staged is None else staged)
        entry = LoadedLora(
            name=lora.name,
            source=lora.source,
            slot=slot,
            rank=lora.rank,
            layers=len(lora.layers),
            bytes=lora.bytes_at(self.dtype),
            slot_bytes=self.slot_bytes,
            ignored_text_encoder_keys=lora.ignored_text_encoder_keys,
        )
        self._loaded[lora.name] = entry
        return entry

    def _check_fits(self, lora: LoraFile) -> None:
        if lora.rank > self.capacity.max_rank:
            raise ModelLoadError(
                f"LoRA {lora.name!r} has rank {lora.rank}; this server's LoRA buffers hold "
                f"ranks up to max_rank={self.capacity.max_rank}",
                field="loras",
                limit=self.capacity.max_rank,
            )
        unknown = sorted(set(lora.layers) - set(self.buffers))
        if unknown:
            raise ModelLoadError(
                f"LoRA {lora.name!r} targets {unknown[0]}, which is not a LoRA layer of this UNet",
                field="loras",
            )

    def unload(self, name: str) -> LoadedLora:
        """Zero the LoRA's slot and free it; rows still pointing there add nothing."""
        self._retiring.discard(name)
        entry = self.get(name)
        for a, b in self.buffers.values():
            a[entry.slot].zero_()
            b[entry.slot].zero_()
        del self._loaded[name]
        return entry

    def _write(self, slot: int, staged: StagedLora) -> None:
        """Queue the slot's copies: no host sync (page-locked sources on CUDA; the caching
        host allocator keeps them until the copies are done)."""
        for name, (a, b) in self.buffers.items():
            pair = staged.get(name)
            if pair is None:
                a[slot].zero_()
                b[slot].zero_()
                continue
            a[slot].copy_(pair[0], non_blocking=True)
            b[slot].copy_(pair[1], non_blocking=True)

    def row_inputs(
        self, rows: Sequence[Sequence[tuple[str, float]]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``indices`` ``[rows, slots_per_row]`` int32 and ``scales`` (float32) for rows that
        each use a list of ``(name, scale)``; unused slots are index -1, scale 0."""
        width = self.capacity.slots_per_row
        indices = torch.full((len(rows), width), -1, dtype=torch.int32)
        scales = torch.zeros((len(rows), width), dtype=torch.float32)
        for row, uses in enumerate(rows):
            if len(uses) > width:
                raise ParameterError(
                    f"{len(uses)} LoRAs for one session; this server combines up to {width}",
                    field="loras",
                    limit=width,
                )
            for slot, (name, scale) in enumerate(uses):
                indices[row, slot] = self.get(name).slot
                scales[row, slot] = float(scale)
        return indices.to(self.device), scales.to(self.device)

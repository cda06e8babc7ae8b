"""The per-session LoRA library of one UNet: load and unload LoRAs by name at runtime, and the
per-row inputs that make a shared UNet call apply each session's own LoRAs.

Two ways to use a LoRA, chosen by config:

- **fused** (``--lora``, ``ModelSpec.loras``; :func:`livediff.models.pipelines.fuse_loras`):
  folded into the weights at load, for the whole server, at no per-frame cost. Any LoRA
  diffusers reads (convolution LoRAs and text-encoder parts included).
- **per session** (this module): the UNet's target linears (and 1×1 convolution ``proj_in`` /
  ``proj_out``) are rewritten once (:mod:`livediff.models.lora_layers`) to add each row's
  LoRAs from packed buffers of static size (:class:`~livediff.models.lora_store.LoraCapacity`). Loading, unloading and switching
  write buffers only: no recompile, no re-capture. Each row costs one segmented low-rank
  update per target layer (a row without LoRA, only the kernel's skip). Linear LoRAs and the
  1×1 ``proj_in`` / ``proj_out`` convolutions' only.

The engine's use, per call::

    library = LoraLibrary.attach(bundle.unet, LoraCapacity(max_loras=8, max_rank=64))
    library.load("ink", "/loras/ink.safetensors")        # or a folder, or a HF id
    indices, scales = library.row_inputs([[("ink", 0.8)], [], [("ink", 1.0), ("pastel", 0.5)]])
    batch = UNetBatch(..., lora_indices=indices, lora_scales=scales)
    bundle.with_loras(library).predict_noise(batch)       # or: with library.rows(indices, scales)
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from livediff.exceptions import ParameterError
from livediff.models import lora_fusion
from livediff.models.fp8 import unused_projections
from livediff.models.lora_files import LoraFile, read_lora, resolve_file
from livediff.models.lora_layers import LoraRowsConv2d, LoraRowsLinear, RowSelection, attach
from livediff.models.lora_merge import LoraMerge, MergeConfig, MergeKey
from livediff.models.lora_store import LoadedLora, LoraCapacity, LoraStore, StagedLora

log = logging.getLogger(__name__)


@dataclass
class LoraLibrary:
    """A UNet's packed LoRA store, the rewritten layers' row selection, and loading by name."""

    unet: Any  # diffusers UNet2DConditionModel, its target layers rewritten
    store: LoraStore
    selection: RowSelection
    merge: LoraMerge  # the LoRAs every row agrees on, folded into the weights

    @classmethod
    def attach(
        cls,
        unet: Any,
        capacity: LoraCapacity | None = None,
        *,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        merge: MergeConfig | None = None,
    ) -> LoraLibrary:
        """Rewrite ``unet``'s target layers once and allocate the buffers (in its device/dtype);
        ``merge``: when the calls' rows agree, fold their LoRAs into the weights
        (:mod:`livediff.models.lora_merge`; on by default)."""
        weight = next(unet.parameters())
        store = LoraStore(
            unet,
            capacity or LoraCapacity(),
            device=device or weight.device,
            dtype=dtype or weight.dtype,
        )
        selection = attach(unet, store)
        log.info(
            "per-session LoRAs: %d layers, %d slots of rank <= %d, %.1f MB reserved",
            len(store.buffers),
            store.capacity.max_loras,
            store.capacity.max_rank,
            store.total_bytes / 2**20,
        )
        return cls(unet, store, selection, LoraMerge(_called(unet), store, merge or MergeConfig()))

    def fuse_projections(self) -> int:
        """Fuse the UNet's q/k/v projections with their LoRAs (:mod:`livediff.models.lora_fusion`;
        the recipe's ``fuse_qkv``); returns how many attentions were fused."""
        count = lora_fusion.fuse_projections(self.unet, self.store, self.selection)
        self.merge.relayer(_called(self.unet))
        log.info(
            "per-session LoRAs: %d attentions' projections fused (%d fused LoRA pairs)",
            count,
            len(self.store.fused),
        )
        return count

    @property
    def capacity(self) -> LoraCapacity:
        return self.store.capacity

    def load(
        self,
        name: str,
        source: str,
        *,
        weight_name: str | None = None,
        local_files_only: bool | None = None,
    ) -> LoadedLora:
        """Read ``source`` (file, folder or HF id), check it against the UNet, pack it as ``name``.

        Refused (:class:`~livediff.exceptions.ModelLoadError`, ``field="loras"``): an unreadable
        or missing file, a convolution LoRA (but on a 1×1 ``proj_in`` / ``proj_out``), a layer or shape of another family, a rank above
        ``max_rank``, a full store; a name in use is a :class:`ParameterError`.
        """
        return self.add(
            self.read(name, source, weight_name=weight_name, local_files_only=local_files_only)
        )

    def read(
        self,
        name: str,
        source: str,
        *,
        weight_name: str | None = None,
        local_files_only: bool | None = None,
    ) -> LoraFile:
        """The file part of :meth:`load`: read and check ``source``, write no buffer (any thread)."""
        if not name or not name.strip():
            raise ParameterError("a LoRA needs a name", field="name")
        if name in self.names():
            raise ParameterError(
                f"a LoRA named {name!r} is loaded already: unload it first", field="name"
            )
        path = resolve_file(source, weight_name=weight_name, local_files_only=local_files_only)
        return read_lora(path, self.unet, name=name, source=source)

    def stage(self, lora: LoraFile) -> StagedLora:
        """The host part of the buffer write: ``lora`` laid out as a slot holds it, in
        page-locked memory (:meth:`LoraStore.stage`; any thread, and any device's library
        of this model takes the result)."""
        return self.store.stage(lora)

    def add(self, lora: LoraFile, staged: StagedLora | None = None) -> LoadedLora:
        """The buffer part of :meth:`load`: pack a read LoRA (``staged`` by :meth:`stage`
        off this thread, or here) into a free slot (the thread that runs the UNet, between
        calls: queued copies only, no host sync)."""
        self.merge.forget()  # the slot may have held a LoRA the weights hold
        entry = self.store.load(lora, staged)
        log.info(
            "loaded LoRA %r from %s into slot %d: rank %d, %d layers, %.2f MB",
            lora.name,
            lora.source,
            entry.slot,
            entry.rank,
            entry.layers,
            entry.bytes / 2**20,
        )
        return entry

    def unload(self, name: str) -> LoadedLora:
        self.merge.forget()
        entry = self.store.unload(name)
        log.info("unloaded LoRA %r (slot %d)", name, entry.slot)
        return entry

    def loaded(self) -> tuple[LoadedLora, ...]:
        return self.store.loaded()

    def names(self) -> tuple[str, ...]:
        return tuple(lora.name for lora in self.store.loaded())

    def row_inputs(
        self, rows: Sequence[Sequence[tuple[str, float]]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row ``(indices, scales)`` for ``UNetBatch.lora_indices`` / ``lora_scales``."""
        return self.store.row_inputs(rows)

    def merge_key(self, uses: Sequence[tuple[str, float]]) -> MergeKey:
        """What the weights would hold for a row that uses ``uses``: its LoRAs' packed slots
        and scales, sorted, scale 0 left out (:meth:`LoraMerge.plan`)."""
        return tuple(
            sorted((self.store.get(name).slot, float(scale)) for name, scale in uses if scale)
        )

    @contextmanager
    def rows(self, indices: torch.Tensor | None, scales: torch.Tensor | None) -> Iterator[None]:
        """Apply these rows' LoRAs to every UNet call inside the block."""
        with self.selection.applied(indices, scales):
            yield


def _called(unet: Any) -> dict[str, LoraRowsLinear | LoraRowsConv2d]:
    """The UNet's LoRA layers its forward calls (not the parts beside fused projections)."""
    unused = unused_projections(unet)
    return {
        name: module
        for name, module in unet.named_modules()
        if isinstance(module, LoraRowsLinear | LoraRowsConv2d) and name not in unused
    }

"""A session's per-session LoRAs as per-row inputs, and what one call's rows send the UNet.

The names are looked up in the model's :class:`~livediff.models.lora_library.LoraLibrary` when
the parameters are prepared (off the GPU worker); the result is two small device tensors
that :meth:`StreamBatch.set_loras` copies into every row of the session, and the host's
:data:`~livediff.models.lora_merge.MergeKey` of the same uses. A name the library does not
hold, too many uses, or LoRAs on a model without a library are refused with
``field="loras"``, and the session keeps what it had.

Per call, :func:`lora_inputs` asks the library's merge (:mod:`livediff.models.lora_merge`)
whether the weights hold every row's LoRAs; then the rows go without LoRA inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from livediff.exceptions import ParameterError
from livediff.models.bundle import ModelBundle
from livediff.models.lora_merge import MergeKey
from livediff.models.lora_uses import LoraUse
from livediff.models.unet_batch import UNetBatch


@dataclass(frozen=True)
class SessionLoras:
    """A session's LoRAs: ``indices`` and ``scales`` ``[slots]`` on the device, ``key`` on the host."""

    indices: torch.Tensor
    scales: torch.Tensor
    key: MergeKey


def resolve_loras(uses: Sequence[LoraUse], bundle: ModelBundle) -> SessionLoras | None:
    """The per-row inputs of ``uses``; ``None`` when the model has no library (and the
    session asks for none)."""
    library = bundle.loras
    if library is None:
        if uses:
            raise ParameterError(
                "this server has no per-session LoRA library (LoRAs given with --lora are fused "
                "into the model for every session)",
                field="loras",
            )
        return None
    pairs = [(use.name, use.scale) for use in uses]
    indices, scales = library.row_inputs([pairs])
    return SessionLoras(indices[0], scales[0], library.merge_key(pairs))


def lora_inputs(
    bundle: ModelBundle, batches: Sequence[UNetBatch], keys: Sequence[MergeKey | None]
) -> list[UNetBatch]:
    """``batches`` (one call's, with their sessions' ``keys``) as the UNet takes them: without
    LoRA inputs where the weights hold every row's LoRAs, or no row uses one. The thread that
    runs the UNet, just before the call (the merge writes the weights)."""
    library = bundle.loras
    if library is None or any(key is None for key in keys):
        return list(batches)
    if not library.merge.plan([key for key in keys if key is not None]):
        return list(batches)
    return [replace(batch, lora_indices=None, lora_scales=None) for batch in batches]

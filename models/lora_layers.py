"""The UNet's LoRA-targeted linears, rewritten to add each row's own LoRAs.

:func:`attach` replaces every target layer of a UNet (:func:`~livediff.models.lora_files.target_layers`)
with a :class:`LoraRowsLinear` that computes ``base(x) + Σ scale·(x·A)·B`` per row through
:func:`livediff.kernels.lora_rows.lora_rows`, over the :class:`~livediff.models.lora_store.LoraStore`'s
packed buffers. Which LoRAs a row uses is per-row input of the call (``UNetBatch.lora_indices``
and ``lora_scales``), handed to the layers for the duration of one call by
:meth:`RowSelection.applied`; outside such a call (or with ``None``) the layers are the base
linears exactly.

The rows the layers see are the rows of the UNet call: diffusers' attention and feed-forward
keep the batch as the first dimension. One UNet runs one call at a time (the GPU worker):
the selection belongs to that call.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from livediff.exceptions import ModelLoadError, UsageError
from livediff.kernels.lora_rows import lora_rows
from livediff.models.lora_files import target_layers
from livediff.models.lora_store import LoraStore


class RowSelection:
    """The current call's per-row LoRA indices ``[rows, slots]`` and scales, or ``None``."""

    def __init__(self) -> None:
        self.indices: torch.Tensor | None = None
        self.scales: torch.Tensor | None = None

    @contextmanager
    def applied(self, indices: torch.Tensor | None, scales: torch.Tensor | None) -> Iterator[None]:
        if (indices is None) != (scales is None):
            raise UsageError("LoRA rows need both indices and scales, or neither")
        self.indices, self.scales = indices, scales
        try:
            yield
        finally:
            self.indices = self.scales = None


class LoraRowsLinear(torch.nn.Module):
    """``base(x)`` plus, for every row, its LoRAs' updates from the packed buffers ``a``, ``b``.

    It has no ``weight`` of its own on purpose: code that would fold the base weights (fused
    QKV projections) fails loudly instead of dropping the LoRAs.
    """

    a: torch.Tensor
    b: torch.Tensor

    def __init__(
        self,
        base: torch.nn.Linear,
        a: torch.Tensor,
        b: torch.Tensor,
        selection: RowSelection,
    ) -> None:
        super().__init__()
        self.base = base
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.register_buffer("a", a, persistent=False)
        self.register_buffer("b", b, persistent=False)
        self.selection = selection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        indices, scales = self.selection.indices, self.selection.scales
        if indices is None or scales is None:
            return y
        rows = x.shape[0]
        flat = x.reshape(rows, -1, x.shape[-1]).contiguous()
        out = y.reshape(rows, -1, y.shape[-1])  # a view of y: updated in place
        lora_rows(flat, self.a, self.b, indices, scales, out=out)
        return y


def attach(unet: torch.nn.Module, store: LoraStore) -> RowSelection:
    """Replace ``unet``'s target layers by :class:`LoraRowsLinear` over ``store``'s buffers."""
    fused = [
        name for name, module in unet.named_modules() if getattr(module, "fused_projections", False)
    ]
    if fused:
        raise ModelLoadError(
            f"per-session LoRAs need the UNet's separate q/k/v projections, but {fused[0]} "
            "has them fused: build the model without fuse_qkv (Recipe(fuse_qkv=False))"
        )
    if any(isinstance(m, LoraRowsLinear) for m in unet.modules()):
        raise ModelLoadError("this UNet has per-session LoRA layers already")
    selection = RowSelection()
    for name, layer in target_layers(unet).items():
        a, b = store.buffers[name]
        parent_name, _, child = name.rpartition(".")
        parent = unet.get_submodule(parent_name)
        setattr(parent, child, LoraRowsLinear(layer, a, b, selection))
    return selection


def detach(unet: torch.nn.Module) -> None:
    """Put the base linears back (the LoRA buffers are left to the store)."""
    for name, module in list(unet.named_modules()):
        if isinstance(module, LoraRowsLinear):
            parent_name, _, child = name.rpartition(".")
            setattr(unet.get_submodule(parent_name), child, module.base)

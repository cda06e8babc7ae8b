"""The UNet's LoRA-targeted linears and 1×1 convolutions, rewritten to add each row's own LoRAs.

:func:`attach` replaces every target layer of a UNet (:func:`~livediff.models.lora_files.target_layers`)
with a :class:`LoraRowsLinear` (or, for SD 1.5's 1×1 convolution ``proj_in`` / ``proj_out``, a
:class:`LoraRowsConv2d`) that computes ``base(x) + Σ scale·(x·A)·B`` per row through
:func:`livediff.kernels.lora_rows.lora_rows`, over the :class:`~livediff.models.lora_store.LoraStore`'s
packed buffers. Which LoRAs a row uses is per-row input of the call (``UNetBatch.lora_indices``
and ``lora_scales``), handed to the layers for the duration of one call by
:meth:`RowSelection.applied`; outside such a call (or with ``None``) the layers are the base
layers exactly.

The rows the layers see are the rows of the UNet call: diffusers' attention and feed-forward
keep the batch as the first dimension, and so do the convolutions (``[rows, channels, height,
width]``: the pixels are a row's tokens). One UNet runs one call at a time (the GPU worker):
the selection belongs to that call.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from livediff.exceptions import ModelLoadError, UsageError
from livediff.kernels.lora_rows import lora_rows
from livediff.models.fp8 import Fp8Linear
from livediff.models.lora_files import is_pointwise_conv, target_layers
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


class _LoraRows(torch.nn.Module):
    """A base layer, the store's packed buffers ``a``, ``b`` for it, and the call's selection."""

    a: torch.Tensor
    b: torch.Tensor

    def __init__(
        self, base: torch.nn.Module, a: torch.Tensor, b: torch.Tensor, selection: RowSelection
    ) -> None:
        super().__init__()
        self.base = base
        self.register_buffer("a", a, persistent=False)
        self.register_buffer("b", b, persistent=False)
        self.selection = selection


class LoraRowsLinear(_LoraRows):
    """``base(x)`` plus, for every row, its LoRAs' updates from the packed buffers ``a``, ``b``.

    It has no ``weight`` of its own on purpose: code that would fold the base weights (fused
    QKV projections) fails loudly instead of dropping the LoRAs.
    """

    def __init__(
        self,
        base: torch.nn.Linear | Fp8Linear,  # Fp8Linear: --precision fp8 (the update stays as is)
        a: torch.Tensor,
        b: torch.Tensor,
        selection: RowSelection,
    ) -> None:
        super().__init__(base, a, b, selection)
        self.in_features = base.in_features
        self.out_features = base.out_features

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


class LoraRowsConv2d(_LoraRows):
    """A 1×1 convolution ``base(x)`` plus, for every row, its LoRAs' updates over channels.

    A 1×1 convolution is a linear map over channels at every pixel: the row's pixels are its
    tokens, ``[rows, in, H, W]`` read as ``[rows, H·W, in]``. In channels-last memory format
    (the recipe's) both the input and the output are those tokens already, so the update reads
    ``x`` and updates ``base(x)`` in place through views, with no copy; in contiguous (NCHW)
    format the tokens are a transposed copy each way. No ``weight`` of its own, as
    :class:`LoraRowsLinear`.
    """

    def __init__(
        self,
        base: torch.nn.Conv2d,
        a: torch.Tensor,
        b: torch.Tensor,
        selection: RowSelection,
    ) -> None:
        if not is_pointwise_conv(base):
            raise ModelLoadError(f"per-session LoRAs take 1×1 convolutions only, not {base}")
        super().__init__(base, a, b, selection)
        self.in_channels = base.in_channels
        self.out_channels = base.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        indices, scales = self.selection.indices, self.selection.scales
        if indices is None or scales is None:
            return y
        rows, channels, height, width = y.shape
        tokens = x.permute(0, 2, 3, 1).reshape(rows, height * width, x.shape[1]).contiguous()
        pixels = y.permute(0, 2, 3, 1)  # [rows, H, W, out]: contiguous when y is channels-last
        if pixels.is_contiguous():
            out = pixels.view(rows, height * width, channels)  # a view of y: updated in place
            lora_rows(tokens, self.a, self.b, indices, scales, out=out)
            return y
        out = pixels.reshape(rows, height * width, channels).contiguous()  # a copy (NCHW)
        lora_rows(tokens, self.a, self.b, indices, scales, out=out)
        y.copy_(out.view(rows, height, width, channels).permute(0, 3, 1, 2))
        return y


def attach(unet: torch.nn.Module, store: LoraStore) -> RowSelection:
    """Replace ``unet``'s target layers by :class:`LoraRowsLinear` / :class:`LoraRowsConv2d`
    over ``store``'s buffers."""
    fused = [
        name for name, module in unet.named_modules() if getattr(module, "fused_projections", False)
    ]
    if fused:
        raise ModelLoadError(
            f"per-session LoRAs need the UNet's separate q/k/v projections, but {fused[0]} "
            "has them fused: build the model without fuse_qkv (Recipe(fuse_qkv=False))"
        )
    if any(isinstance(m, LoraRowsLinear | LoraRowsConv2d) for m in unet.modules()):
        raise ModelLoadError("this UNet has per-session LoRA layers already")
    selection = RowSelection()
    for name, layer in target_layers(unet).items():
        a, b = store.buffers[name]
        parent_name, _, child = name.rpartition(".")
        parent = unet.get_submodule(parent_name)
        rows_layer: torch.nn.Module
        if isinstance(layer, torch.nn.Conv2d):
            rows_layer = LoraRowsConv2d(layer, a, b, selection)
        else:
            rows_layer = LoraRowsLinear(layer, a, b, selection)
        setattr(parent, child, rows_layer)
    return selection


def detach(unet: torch.nn.Module) -> None:
    """Put the base layers back (the LoRA buffers are left to the store)."""
    for name, module in list(unet.named_modules()):
        if isinstance(module, LoraRowsLinear | LoraRowsConv2d):
            parent_name, _, child = name.rpartition(".")
            setattr(unet.get_submodule(parent_name), child, module.base)

"""The segmented low-rank update of a shared batch: each row adds its own LoRAs' ``x·A·B``.

For every row ``r`` of ``x`` (``[rows, tokens, in]``) and every slot ``s`` of that row::

    out[r] += Σ_s scale[r, s] · (x[r] · A[index[r, s]]) · B[index[r, s]]

over LoRA weights packed in device buffers (Punica's SGMV / S-LoRA's idea, for the UNet):

==============  ==========================  ===============================================
argument        shape                       role
==============  ==========================  ===============================================
``out``         ``[rows, tokens, out]``     the base layer's output; updated in place
``x``           ``[rows, tokens, in]``      the layer's input
``a``           ``[loras, in, rank]``       down projections, ranks zero-padded to ``rank``
``b``           ``[loras, rank, out]``      up projections, zero-padded the same way
``indices``     ``[rows, slots]`` int32/64  which packed LoRA each slot of a row uses
``scales``      ``[rows, slots]`` float     its scale (the LoRA's alpha / rank folded in by
                                            the caller)
==============  ==========================  ===============================================

A slot whose index is outside ``[0, loras)`` (``-1`` by convention) or whose scale is 0 adds
nothing, and a row with no active slot is not touched: the Triton kernel skips it after two
loads. ``loras``, ``rank`` and ``slots`` are fixed by the buffers, so loading, unloading or
switching LoRAs writes buffers and never changes a shape (no recompile, no re-capture). No
value is checked on the host (that would need a device sync): a bad index is "no LoRA".

Numerics (reference and kernel alike): ``v = scale · (x·A)`` is accumulated in float32 and
rounded once to ``A``'s dtype (Punica's shrink), ``v·B`` is accumulated in float32 over every
slot, added to ``out`` in float32 and rounded once to ``out``'s dtype.

Op: ``torch.ops.livediff.lora_rows_add`` (mutates ``out``). Call it through :func:`lora_rows`.
"""

from __future__ import annotations

import torch

from livediff.exceptions import KernelInputError
from livediff.kernels._dispatch import float_dtype_problem, run_triton, triton_refusal

OP = "livediff::lora_rows_add"
TRITON_MAX_RANK = 256  # the kernel keeps one [tokens, rank] tile of x·A in registers
INDEX_DTYPES = (torch.int32, torch.int64)


def lora_rows(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    indices: torch.Tensor,
    scales: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out + Σ scale·(x·A)·B`` per row, in place; returns ``out`` (zeros when ``None``).

    ``x`` may also be ``[rows, in]`` (one token per row); ``out`` then has the same rank.
    """
    flat = x.ndim == 2
    if flat:
        x = x.unsqueeze(1)
        out = None if out is None else out.unsqueeze(1)
    if out is None:
        out = x.new_zeros((*x.shape[:2], b.shape[-1]))
    torch.ops.livediff.lora_rows_add(out, x, a, b, indices, scales)
    return out.squeeze(1) if flat else out


def check_args(
    out: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    indices: torch.Tensor,
    scales: torch.Tensor,
) -> None:
    if x.ndim != 3:
        raise KernelInputError(
            f"x is {tuple(x.shape)}: expected [rows, tokens, in_features]", field="x"
        )
    rows, tokens, width = x.shape
    if a.ndim != 3 or a.shape[1] != width:
        raise KernelInputError(
            f"a is {tuple(a.shape)}: expected [loras, {width}, rank] for x {tuple(x.shape)}",
            field="a",
        )
    loras, _, rank = a.shape
    if b.ndim != 3 or tuple(b.shape[:2]) != (loras, rank):
        raise KernelInputError(
            f"b is {tuple(b.shape)}: expected [{loras}, {rank}, out_features] to match a "
            f"{tuple(a.shape)}",
            field="b",
        )
    if tuple(out.shape) != (rows, tokens, b.shape[2]):
        raise KernelInputError(
            f"out is {tuple(out.shape)}: expected {(rows, tokens, b.shape[2])}", field="out"
        )
    if indices.ndim != 2 or indices.shape[0] != rows or indices.dtype not in INDEX_DTYPES:
        raise KernelInputError(
            f"indices are {tuple(indices.shape)} {indices.dtype}: expected [{rows}, slots] "
            "int32 or int64",
            field="indices",
        )
    if tuple(scales.shape) != tuple(indices.shape) or not scales.dtype.is_floating_point:
        raise KernelInputError(
            f"scales are {tuple(scales.shape)} {scales.dtype}: expected {tuple(indices.shape)} "
            "floats, one per slot",
            field="scales",
        )
    for name, tensor in (("a", a), ("b", b), ("out", out)):
        if tensor.dtype != x.dtype:
            raise KernelInputError(
                f"{name} is {tensor.dtype}: expected x's dtype {x.dtype}", field=name
            )
    devices = {t.device for t in (out, x, a, b, indices, scales)}
    if len(devices) > 1:
        raise KernelInputError(
            f"the tensors are on {sorted(map(str, devices))}: expected one device", field="x"
        )


def delta(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    indices: torch.Tensor,
    scales: torch.Tensor,
) -> torch.Tensor:
    """``Σ_s scale·(x·A)·B`` per row in float32, with the module docstring's rounding.

    Every slot is computed (a gather of its LoRA, inactive ones at weight 0): no branch on
    values, so it compiles and captures as is.
    """
    loras = a.shape[0]
    total = x.new_zeros((*x.shape[:2], b.shape[2]), dtype=torch.float32)
    x32 = x.to(torch.float32)
    for slot in range(indices.shape[1]):
        index = indices[:, slot].to(torch.int64)
        scale = scales[:, slot].to(torch.float32)
        active = (index >= 0) & (index < loras) & (scale != 0)
        safe = torch.where(active, index, torch.zeros_like(index))
        weight = torch.where(active, scale, torch.zeros_like(scale)).view(-1, 1, 1)
        shrunk = (torch.bmm(x32, a[safe].to(torch.float32)) * weight).to(a.dtype)
        total = total + torch.bmm(shrunk.to(torch.float32), b[safe].to(torch.float32))
    return total


def reference(
    out: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    indices: torch.Tensor,
    scales: torch.Tensor,
) -> None:
    out.copy_(out.to(torch.float32) + delta(x, a, b, indices, scales))


def _triton_refusal(
    out: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    indices: torch.Tensor,
    scales: torch.Tensor,
) -> str | None:
    problem = float_dtype_problem("x", x.dtype)
    if problem is None and a.shape[2] > TRITON_MAX_RANK:
        problem = f"rank {a.shape[2]} > {TRITON_MAX_RANK}: the kernel holds x·A in registers"
    return triton_refusal(problem, out=out, x=x, a=a, b=b, indices=indices, scales=scales)


@torch.library.custom_op(OP, mutates_args=("out",))
def lora_rows_add(
    out: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    indices: torch.Tensor,
    scales: torch.Tensor,
) -> None:
    """Reference implementation (every device)."""
    check_args(out, x, a, b, indices, scales)
    reference(out, x, a, b, indices, scales)


@lora_rows_add.register_kernel("cuda")
def _lora_rows_add_cuda(
    out: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    indices: torch.Tensor,
    scales: torch.Tensor,
) -> None:
    check_args(out, x, a, b, indices, scales)
    if not run_triton(OP, _triton_refusal(out, x, a, b, indices, scales), x.device):
        reference(out, x, a, b, indices, scales)
        return
    from livediff.kernels import _triton_lora_rows

    _triton_lora_rows.lora_rows_add(out, x, a, b, indices, scales)


@lora_rows_add.register_fake
def _lora_rows_add_fake(
    out: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    indices: torch.Tensor,
    scales: torch.Tensor,
) -> None:
    check_args(out, x, a, b, indices, scales)

"""StreamV2V's feature bank, per row of a shared UNet call (arXiv 2405.15757).

Each self-attention of the UNet (``attn1`` of every transformer block) attends to the keys and
values of the current frame *and* to those of up to ``frames`` earlier frames of the same row,
kept in a bank. On the blocks StreamV2V chooses for it (the mid block and the first two up
blocks: deep enough not to blur), **feature fusion** replaces each output token by a blend with
its nearest bank output token when their cosine similarity reaches a threshold::

    out = (1 - strength) · h + strength · nearest(h, bank outputs)     (cosine ≥ threshold)
    out = h                                                             (otherwise)

The banks of all rows live in one pool per attention layer, ``[slots, frames, tokens, channels]``
(keys, values, and outputs on fusion layers), so rows of many sessions share one call and the
call's shapes never change: which slot a row reads and writes, which of its frames hold
something, and its fusion strength and threshold are per-row tensors of the batch
(:class:`BankRows`: ``UNetBatch.bank_*``). Slot 0 is the empty slot: a row of zeros has no bank
and writes nowhere that is read, so a session without a bank shares the call for the price of
the masked keys; a call where no row banks carries no bank inputs and runs plain attention
(``StreamBatch.bank_live``). The engine owns which slot and frame a session's row uses
(``engine/feature_banks.py``); this module only computes.

**Reduced bank frames** (``models/bank_tokens.py``): on self-attentions of at least
``reduce_from`` tokens a frame can go into the bank merged to half its tokens (StreamV2V's token
merging) or 2×2-pooled to a quarter, so the largest layers attend to fewer bank keys.

A pool for a token count is made on the first call that has it (warm-up, before graph capture);
another resolution makes its own pools. Under ``torch.compile`` the call after that compiles
once more (the pools are now inputs); a graph bundle's warm-up makes both calls.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from livediff.exceptions import ParameterError
from livediff.models.bank_tokens import (
    DEFAULT_BANK_TOKENS,
    DEFAULT_REDUCE_FROM,
    BankTokens,
    reduction,
)

MAX_BANK_FRAMES = 4
FUSION_BLOCKS = ("mid_block.", "up_blocks.0.", "up_blocks.1.")  # StreamV2V's choice


@dataclass(frozen=True)
class BankRows:
    """One call's per-row bank inputs (the ``bank_*`` fields of a UNet batch)."""

    slots: torch.Tensor  # [rows] long: the row's slot (0: no bank)
    # [rows, F]: 1 where the slot's frame f holds a frame, else 0; None: every row holds all F
    # (the steady state of a stream: the attention then needs no mask, and runs unmasked)
    frames: torch.Tensor | None
    write: torch.Tensor  # [rows] long: the pool entry (slot · F + frame) this call's features
    # go to; 0 is the empty slot's, never read: a row that keeps nothing writes there
    fusion: torch.Tensor  # [rows, 2]: fusion strength in [0, 1] (0: off), cosine threshold
    grid: tuple[int, int] | None = None  # the call's latent (h, w): a pooled bank's layer grids


@dataclass
class BankContext:
    """What the processors of one UNet read: the pool's size and the current call's rows."""

    slots: int
    frames: int
    tokens: BankTokens = BankTokens.FULL  # what a frame keeps on layers of reduce_from or more
    reduce_from: int = DEFAULT_REDUCE_FROM
    rows: BankRows | None = None


class BankedSelfAttention:
    """A self-attention processor that also attends to the row's bank (see the module docstring)."""

    def __init__(self, name: str, context: BankContext, *, fuse: bool) -> None:
        self.name = name
        self.context = context
        self.fuse = fuse
        self._pools: dict[tuple[int, int, torch.dtype, torch.device], tuple[torch.Tensor, ...]] = {}

    def pool(self, tokens: int, channels: int, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``[slots · frames, tokens, channels]`` each for keys, values (and outputs if fusing).

        One tensor per kind, not views of one: Inductor turns an in-place write into a view
        of a buffer into a copy of the whole buffer (measured on the H200: ~85 µs per
        layer and call at 512², whatever the batch), while writes into a buffer of its own
        stay a scatter of the written rows."""
        key = (tokens, channels, like.dtype, like.device)
        pool = self._pools.get(key)
        if pool is None:
            kinds = 3 if self.fuse else 2
            size = self.context.slots * self.context.frames
            pool = tuple(
                torch.zeros(size, tokens, channels, dtype=like.dtype, device=like.device)
                for _ in range(kinds)
            )
            self._pools[key] = pool
        return pool

    def pools(self) -> Iterator[torch.Tensor]:
        return (tensor for pool in self._pools.values() for tensor in pool)

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **_: Any,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ParameterError(f"{self.name}: the feature bank serves self-attention only")
        rows, tokens = hidden_states.shape[:2]
        query, key, value = _projections(attn, hidden_states)
        bank = self.context.rows
        if bank is None:
            return _finish(attn, _attend(attn, query, key, value, None))
        context = self.context
        frames = context.frames
        kept, reduce = reduction(context.tokens, context.reduce_from, key, bank.grid)
        pool = self.pool(kept, key.shape[-1], key)
        index = (bank.slots[:, None] * frames + torch.arange(frames, device=key.device)).flatten()
        past_k = pool[0].index_select(0, index).view(rows, frames * kept, -1)
        past_v = pool[1].index_select(0, index).view(rows, frames * kept, -1)
        held = None if bank.frames is None else bank.frames.to(torch.bool)  # [rows, F]
        mask = None
        if held is not None:
            mask = torch.cat(
                [held.new_ones(rows, tokens), held.repeat_interleave(kept, dim=1)], dim=1
            )[:, None, None, :]
        out = _attend(
            attn,
            query,
            torch.cat([key, past_k], dim=1),
            torch.cat([value, past_v], dim=1),
            mask,
        )
        out = _finish(attn, out)
        written = bank.write
        pool[0].index_copy_(0, written, key if reduce is None else reduce(key))
        pool[1].index_copy_(0, written, value if reduce is None else reduce(value))
        if not self.fuse:
            return out
        past_o = pool[2].index_select(0, index).view(rows, frames, kept, -1)
        fused = fuse_nearest(out, past_o, held, bank.fusion[:, 0], bank.fusion[:, 1])
        # Written after the fusion read it: Inductor writes a pool in place only when nothing
        # reads its old contents later in the graph; read after the write, the whole output
        # pool was copied in every call.
        pool[2].index_copy_(0, written, out if reduce is None else reduce(out))
        return fused


def fuse_nearest(
    out: torch.Tensor,
    past: torch.Tensor,
    held: torch.Tensor | None,
    strength: torch.Tensor,
    threshold: torch.Tensor,
) -> torch.Tensor:
    """StreamV2V's feature fusion per row: ``out`` [rows, T, C], ``past`` [rows, F, T, C] with
    ``held`` [rows, F] (``None``: all held); rows with strength 0 or no match are returned
    unchanged."""
    rows, frames, tokens, channels = past.shape
    candidates = past.reshape(rows, frames * tokens, channels)
    similarity = F.normalize(out, dim=-1) @ F.normalize(candidates, dim=-1).transpose(1, 2)
    if held is not None:
        usable = held.repeat_interleave(tokens, dim=1)[:, None, :]
        similarity = similarity.masked_fill(~usable, -2.0)  # below every cosine
    best, nearest = similarity.max(dim=-1)  # [rows, T]
    neighbours = candidates.gather(1, nearest[..., None].expand(-1, -1, channels))
    s = strength.to(out.dtype)[:, None, None]
    match = (best >= threshold[:, None]) & (strength[:, None] > 0)
    return torch.where(match[..., None], out * (1 - s) + s * neighbours, out)


def _projections(attn: Any, hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
    if getattr(attn, "fused_projections", False) and hasattr(attn, "to_qkv"):
        return tuple(attn.to_qkv(hidden).chunk(3, dim=-1))
    return attn.to_q(hidden), attn.to_k(hidden), attn.to_v(hidden)


def _attend(
    attn: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    rows = query.shape[0]
    heads = attn.heads
    q, k, v = (
        t.view(rows, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (query, key, value)
    )
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
    return out.transpose(1, 2).reshape(rows, -1, heads * (value.shape[-1] // heads)).to(query.dtype)


def _finish(attn: Any, hidden: torch.Tensor) -> torch.Tensor:
    hidden = attn.to_out[1](attn.to_out[0](hidden))
    return hidden / attn.rescale_output_factor


def _self_attentions(unet: Any) -> Iterator[tuple[str, Any]]:
    for name, module in unet.named_modules():
        if name.endswith(".attn1") and hasattr(module, "processor"):
            yield name, module


def install_feature_bank(
    unet: Any,
    *,
    slots: int,
    frames: int,
    tokens: BankTokens = BankTokens.FULL,
    reduce_from: int = DEFAULT_REDUCE_FROM,
) -> BankContext:
    """Give every self-attention of ``unet`` a :class:`BankedSelfAttention` over a pool of
    ``slots`` rows' banks of up to ``frames`` frames, kept as ``tokens`` says on layers of at
    least ``reduce_from`` tokens; other processors stay as they are."""
    if not 1 <= frames <= MAX_BANK_FRAMES:
        raise ParameterError(
            f"feature bank frames={frames} must be in [1, {MAX_BANK_FRAMES}]",
            field="feature_bank",
            limit=MAX_BANK_FRAMES,
        )
    if slots < 2:
        raise ParameterError("a feature bank pool needs the empty slot and at least one more")
    if reduce_from < 1:
        raise ParameterError(f"feature bank reduce_from={reduce_from} must be 1 or more")
    context = BankContext(slots=slots, frames=frames, tokens=tokens, reduce_from=reduce_from)
    for name, module in _self_attentions(unet):
        for part in ("spatial_norm", "group_norm", "norm_q", "norm_k"):
            if getattr(module, part, None) is not None:
                raise ParameterError(
                    f"{name}: a self-attention with {part} is not served by the feature bank"
                )
        if getattr(module, "residual_connection", False):
            raise ParameterError(
                f"{name}: a self-attention with a residual connection is not served"
            )
        fuse = name.startswith(FUSION_BLOCKS)
        module.set_processor(BankedSelfAttention(name, context, fuse=fuse))
    return context


def bank_processors(unet: Any) -> list[BankedSelfAttention]:
    """The feature bank processors installed on ``unet`` (empty: none)."""
    return [
        m.processor
        for _, m in _self_attentions(unet)
        if isinstance(m.processor, BankedSelfAttention)
    ]


def bank_bytes(unet: Any) -> int:
    """Device memory the pools hold now (they grow on the first call at each resolution)."""
    return sum(p.numel() * p.element_size() for proc in bank_processors(unet) for p in proc.pools())


class SlotLease:
    """Slots of a :class:`FeatureBank` held by one session; given back by :meth:`release` or
    when the lease is garbage-collected (a stream dropped without closing loses nothing)."""

    def __init__(self, bank: FeatureBank, slots: tuple[int, ...]) -> None:
        self.slots = slots
        self._finalizer = weakref.finalize(self, bank._give_back, slots)

    def release(self) -> None:
        self._finalizer()


@dataclass
class FeatureBank:
    """A UNet's installed feature bank: the processors' context and who holds which slot.

    ``slots`` rows' banks (slot 0, the empty one, included) of up to ``frames`` frames each.
    Sessions lease one slot per UNet row they send (:meth:`lease`); leases are thread-safe.
    """

    context: BankContext
    unet: Any
    _free: list[int] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _calling: threading.Lock = field(default_factory=threading.Lock)

    @contextlib.contextmanager
    def serving(self, rows: BankRows) -> Iterator[None]:
        """The processors read ``rows`` during one UNet call (one caller at a time: the rows
        are the processors' shared context, and two threads may share a model in tests)."""
        with self._calling:
            self.context.rows = rows
            try:
                yield
            finally:
                self.context.rows = None

    def __post_init__(self) -> None:
        self._free = list(range(self.context.slots - 1, 0, -1))

    @property
    def frames(self) -> int:
        return self.context.frames

    @property
    def rows(self) -> int:
        """Session rows the pool can hold (the empty slot is not one)."""
        return self.context.slots - 1

    def free_rows(self) -> int:
        with self._lock:
            return len(self._free)

    def lease(self, count: int) -> SlotLease:
        with self._lock:
            if count > len(self._free):
                raise ParameterError(
                    f"the feature bank is full: {self.rows - len(self._free)} of its "
                    f"{self.rows} rows are in use and this session needs {count} "
                    "(--feature-bank-rows raises it)",
                    field="feature_bank",
                    limit=self.rows,
                )
            slots = tuple(self._free.pop() for _ in range(count))
        return SlotLease(self, slots)

    def _give_back(self, slots: tuple[int, ...]) -> None:
        with self._lock:
            self._free.extend(slots)

    def bytes(self) -> int:
        return bank_bytes(self.unet)

    @contextlib.contextmanager
    def entries_kept(self, entries: torch.Tensor | None) -> Iterator[None]:
        """The pools' ``entries`` (``slot · frames + frame``) as they are now, put back on exit:
        calls that must leave no trace write there (a graph capture's warm-up calls write
        their features where the frame's own call writes them again, over a frame the call
        still reads while the bank is full)."""
        if entries is None:
            yield
            return
        pools = [pool for proc in bank_processors(self.unet) for pool in proc.pools()]
        with torch.inference_mode():  # the pools are made in inference mode
            saved = [pool.index_select(0, entries) for pool in pools]
        try:
            yield
        finally:
            with torch.inference_mode():
                for pool, rows in zip(pools, saved, strict=True):
                    pool.index_copy_(0, entries, rows)

    def row_bytes(self) -> int:
        """Device memory one session row's bank takes (0 until the first call made the pools)."""
        return self.bytes() // self.context.slots


def attach_feature_bank(
    unet: Any,
    *,
    rows: int,
    frames: int,
    tokens: BankTokens = DEFAULT_BANK_TOKENS,
    reduce_from: int = DEFAULT_REDUCE_FROM,
) -> FeatureBank:
    """Install a feature bank for ``rows`` session rows of up to ``frames`` frames on ``unet``
    (frames kept as ``tokens`` says on layers of at least ``reduce_from`` tokens)."""
    context = install_feature_bank(
        unet, slots=rows + 1, frames=frames, tokens=tokens, reduce_from=reduce_from
    )
    return FeatureBank(context, unet)


def reinstall(unet: Any, processors: dict[str, BankedSelfAttention]) -> None:
    """Put bank processors back after something replaced every processor (the speed recipe)."""
    for name, module in _self_attentions(unet):
        if name in processors:
            module.set_processor(processors[name])


def installed(unet: Any) -> dict[str, BankedSelfAttention]:
    return {
        name: m.processor
        for name, m in _self_attentions(unet)
        if isinstance(m.processor, BankedSelfAttention)
    }

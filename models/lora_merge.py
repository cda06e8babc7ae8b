"""Per-session LoRAs at fused speed while every row of the calls uses the same ones.

The per-row update (:mod:`livediff.models.lora_layers`) costs a kernel per target layer and
call, ~190 of them in sd-turbo, even at one row. When every row of a UNet call uses the same
LoRAs at the same scales (one stream; or every session with the same style) that update is
one and the same weight change, so :class:`LoraMerge` folds it into the base layers' weights
(``W += scale · (A·B)ᵀ`` for each LoRA, the equation the fused mode applies at load) and the
call runs without LoRA inputs: the plain layers, no kernel. When the calls stop agreeing, the
base weights are copied back (bit for bit, from a copy kept at the first merge) before the
per-row path runs again.

The rule, per call (:meth:`LoraMerge.plan`), from each row's :data:`MergeKey` (its LoRAs'
packed slots and scales, known on the host):

- no row uses a LoRA: base weights, no LoRA inputs;
- every row uses the same LoRAs, and the weights hold them: no LoRA inputs;
- they agree, but the weights hold other LoRAs or none: the per-row path on the base weights
  until :attr:`MergeConfig.after_calls` calls in a row have agreed on the same LoRAs, then the
  merge (so calls that alternate between two sets, e.g. sessions at two resolutions, do not
  copy weights on every call);
- they differ: the per-row path on the base weights.

Writes happen on the thread and CUDA stream that run the UNet, between calls, like the
store's own (:mod:`livediff.models.lora_store`): captured graphs read the same weight tensors,
changed in place. Loading or unloading a LoRA puts the base weights back (:meth:`forget`), so a
slot that is reused never leaves an old LoRA in the weights.

Not merged (the per-row path always, said once in the log): base layers without a plain
weight (:class:`~livediff.models.fp8.Fp8Linear`'s are quantized), and Inductor's
``freezing``, which folds weights into the compiled code as constants.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from livediff.models.lora_layers import LoraRowsConv2d, LoraRowsLinear
from livediff.models.lora_store import LoraStore

log = logging.getLogger(__name__)

# A row's LoRAs as the weights would hold them: sorted (packed slot, scale), scale 0 left out.
MergeKey = tuple[tuple[int, float], ...]
NO_LORAS: MergeKey = ()
MERGE_AFTER_CALLS = 4
LoraLayer = LoraRowsLinear | LoraRowsConv2d


@dataclass(frozen=True)
class MergeConfig:
    """``enabled``: merge at all; ``after_calls``: agreeing calls in a row before a merge."""

    enabled: bool = True
    after_calls: int = MERGE_AFTER_CALLS


class LoraMerge:
    """Which LoRAs the base layers' weights hold now, and the copy that puts them back."""

    def __init__(
        self, layers: Mapping[str, LoraLayer], store: LoraStore, config: MergeConfig
    ) -> None:
        # name → the LoRA layer (its ``base``, read at each use: the recipe may replace it)
        self._layers = layers
        self._store = store
        self.config = config
        self.merged: MergeKey = NO_LORAS
        self._base: dict[str, torch.Tensor] | None = None  # the base weights, made at first merge
        self._streak: tuple[MergeKey, int] = (NO_LORAS, 0)
        self._refusal: str | None = None if config.enabled else "turned off"
        self.merges = 0  # how many times LoRAs were folded in (for tests and metrics)

    @property
    def base_bytes(self) -> int:
        """Device memory the base weights' copy holds (0 until the first merge)."""
        if self._base is None:
            return 0
        return sum(t.numel() * t.element_size() for t in self._base.values())

    def plan(self, keys: Sequence[MergeKey]) -> bool:
        """Set the weights for one call whose rows use ``keys``; ``True``: run it without LoRA
        inputs (the weights hold every row's LoRAs), ``False``: with the per-row inputs."""
        distinct = set(keys)
        if distinct == {NO_LORAS}:
            self._streak = (NO_LORAS, 0)
            self.restore()
            return True
        if len(distinct) != 1 or not self._mergeable():
            self._streak = (NO_LORAS, 0)
            self.restore()
            return False
        (key,) = distinct
        if key == self.merged:
            return True
        self.restore()
        count = self._streak[1] + 1 if self._streak[0] == key else 1
        self._streak = (key, count)
        if count < self.config.after_calls:
            return False
        return self._fold(key)

    @torch.no_grad()
    def restore(self) -> None:
        """Put the base weights back (nothing to do when they hold no LoRA)."""
        if self.merged == NO_LORAS:
            return
        assert self._base is not None
        for name, layer in self._layers.items():
            _weight(layer.base).copy_(self._base[name])
        self.merged = NO_LORAS

    def relayer(self, layers: Mapping[str, LoraLayer]) -> None:
        """The LoRA layers the UNet calls changed (its projections fused): the base weights
        back, and the copy of them made again at the next merge."""
        self.restore()
        self._layers = layers
        self._base = None
        self._streak = (NO_LORAS, 0)

    def forget(self) -> None:
        """A slot's contents changed (a LoRA loaded or unloaded): base weights, no streak."""
        self.restore()
        self._streak = (NO_LORAS, 0)

    @torch.no_grad()
    def _fold(self, key: MergeKey) -> bool:
        if not self._check():  # the layers as they are now (a recipe step may replace them)
            return False
        if self._base is None:
            self._base = {n: _weight(layer.base).clone() for n, layer in self._layers.items()}
            log.info(
                "per-session LoRAs: every row of the calls uses the same LoRAs; folding them "
                "into the weights (a copy of the base weights keeps %.1f MB)",
                self.base_bytes / 2**20,
            )
        for name, layer in self._layers.items():
            a, b = self._store.pair(name)  # a [loras, in, rank], b [loras, rank, out]
            weight = _weight(layer.base)
            for slot, scale in key:
                weight.addmm_(b[slot].t(), a[slot].t(), alpha=scale)  # [out, r] · [r, in]
        self.merged = key
        self.merges += 1
        return True

    def _mergeable(self) -> bool:
        return self._check() if self._refusal is None else self._refusal == ""

    def _check(self) -> bool:
        """Whether the layers can take a merge now; a refusal is kept and said once."""
        refusal = _why_not_mergeable(self._layers)
        if refusal and refusal != self._refusal:
            log.info("per-session LoRAs are not merged into the weights: %s", refusal)
        self._refusal = refusal
        return refusal == ""

    def refusal(self) -> str | None:
        """Why the LoRAs are never merged (``None``: not checked yet; ``""``: they can be)."""
        return self._refusal


def _why_not_mergeable(layers: Mapping[str, LoraLayer]) -> str:
    from torch._inductor import config as inductor  # the recipe's switch, process-wide

    if inductor.freezing:
        return "Inductor's freezing compiles the weights in as constants"
    for name, layer in layers.items():
        if not isinstance(layer.base, torch.nn.Linear | torch.nn.Conv2d):
            return f"{name} is a {type(layer.base).__name__} (no plain weight to fold into)"
    return ""


def _weight(layer: torch.nn.Module) -> torch.Tensor:
    """The layer's weight as ``[out, in]``, a view (a 1×1 convolution's ``[out, in, 1, 1]``)."""
    weight = layer.weight
    assert isinstance(weight, torch.Tensor)
    return weight.squeeze(-1).squeeze(-1) if weight.dim() == 4 else weight

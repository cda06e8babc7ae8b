"""ControlNets: what to load (:class:`ControlNetSpec`), a loaded net, and the per-row UNet call.

A ControlNet reads the UNet's inputs plus a control image and returns residuals that the UNet
adds to its skip connections (``down_block_additional_residuals``) and its middle block
(``mid_block_additional_residual``). livediff runs it per row of a shared batch:

- each row carries one control image per loaded ControlNet (``UNetBatch.control_images``,
  ``[rows, K, 3, H, W]`` in [0, 1], slot ``k`` for ``ModelBundle.controlnets[k]``) and one
  conditioning scale per net (``UNetBatch.control_scales``, ``[rows, K]``);
- :func:`control_residuals` runs every net over every row with ``conditioning_scale=1``,
  multiplies each row's residuals by that row's scale and sums the nets in order. diffusers'
  ``ControlNetModel`` multiplies its residuals by the (float) ``conditioning_scale`` as its
  last step, and ``MultiControlNetModel`` sums its nets in order, so a uniform scale gives
  what diffusers' ControlNet pipelines compute, and a row with scale 0 gives the UNet alone.

There is no branch on tensor values: a scale-0 row still runs the net (that is the "zero
residuals" rule); choosing which sessions share a call is the engine's business. Loading is
:mod:`livediff.models.controlnet_loading`.

``ControlNetUnionModel`` (SDXL union nets such as ``xinsir/controlnet-union-sdxl-1.0``) takes a
control mode per image; a loaded union net is bound to one mode (``ControlNetSpec.control_type``)
and then behaves like any other net here. Load the same file twice under two names for two modes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from livediff.exceptions import BatchCompositionError
from livediff.models.control_uses import (  # re-exported: defined here before
    RANDOM as RANDOM,
)
from livediff.models.control_uses import (
    UNION_CONTROL_TYPES as UNION_CONTROL_TYPES,
)
from livediff.models.control_uses import (
    ControlNetSpec as ControlNetSpec,
)
from livediff.models.control_uses import (
    union_control_index as union_control_index,
)
from livediff.models.presets import Family


@dataclass
class LoadedControlNet:
    """One ControlNet on the model's device and dtype, ready to run over a batch's rows."""

    name: str
    net: Any  # diffusers ControlNetModel or ControlNetUnionModel
    source: str
    family: Family | None  # read from the net's config; None for shapes no real family has
    guess_mode: bool = False
    control_type: torch.Tensor | None = None  # union nets: one-hot [num_control_type]
    control_index: int | None = None

    @property
    def is_union(self) -> bool:
        return self.control_type is not None

    def describe(self) -> str:
        kind = "union ControlNet" if self.is_union else "ControlNet"
        family = self.family.label if self.family else "custom shape"
        return f"{kind} {self.name!r} ({family}, from {self.source})"

    def residuals(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        embeds: torch.Tensor,
        image: torch.Tensor,
        added: dict[str, Any] | None,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The net's residuals for every row at ``conditioning_scale=1``: (down blocks, middle)."""
        common: dict[str, Any] = {
            "encoder_hidden_states": embeds,
            "conditioning_scale": 1.0,
            "added_cond_kwargs": added,
            "guess_mode": self.guess_mode,
            "return_dict": False,
        }
        if self.control_type is None:
            down, mid = self.net(latents, timesteps, controlnet_cond=image, **common)
        else:
            rows = latents.shape[0]
            down, mid = self.net(
                latents,
                timesteps,
                controlnet_cond=[image],
                control_type=self.control_type.expand(rows, -1),
                control_type_idx=[self.control_index],
                **common,
            )
        return list(down), mid


def control_residuals(
    controlnets: tuple[LoadedControlNet, ...],
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    embeds: torch.Tensor,
    added: dict[str, Any] | None,
    images: torch.Tensor | None,
    scales: torch.Tensor | None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every net's residuals, each row scaled by its own scale, summed over the nets in order.

    ``images`` is ``[rows, K, 3, H, W]`` in [0, 1] and ``scales`` ``[rows, K]``, with ``K`` the
    number of ``controlnets`` (slot ``k`` feeds ``controlnets[k]``).
    """
    check_control_inputs(controlnets, latents, images, scales)
    assert images is not None and scales is not None  # checked above
    down_total: list[torch.Tensor] = []
    mid_total: torch.Tensor | None = None
    for k, controlnet in enumerate(controlnets):
        image = images[:, k].to(latents.dtype)
        down, mid = controlnet.residuals(latents, timesteps, embeds, image, added)
        scale = scales[:, k].to(mid.dtype).view(-1, 1, 1, 1)
        down = [sample * scale for sample in down]
        mid = mid * scale
        if mid_total is None:
            down_total, mid_total = down, mid
        else:
            down_total = [total + sample for total, sample in zip(down_total, down, strict=True)]
            mid_total = mid_total + mid
    assert mid_total is not None  # check_control_inputs refuses K == 0
    return down_total, mid_total


def check_control_inputs(
    controlnets: tuple[LoadedControlNet, ...],
    latents: torch.Tensor,
    images: torch.Tensor | None,
    scales: torch.Tensor | None,
) -> None:
    """Shapes only (static under compile): one slot per loaded net, the pixel size of the latents."""
    if images is None or scales is None:
        raise BatchCompositionError(
            "a batch with ControlNet inputs needs both control_images and control_scales",
            field="control_images" if images is None else "control_scales",
        )
    if not controlnets:
        raise BatchCompositionError(
            "the batch carries control images but the model has no ControlNet loaded",
            field="control_images",
        )
    rows, _, height, width = latents.shape
    slots = len(controlnets)
    factor = 8  # every supported VAE downsamples by 8
    expected = (rows, slots, 3, height * factor, width * factor)
    if tuple(images.shape) != expected:
        raise BatchCompositionError(
            f"control_images is {tuple(images.shape)}; expected {expected} "
            f"(rows, one slot per loaded ControlNet, RGB, the pixel size of the latents)",
            field="control_images",
        )
    if tuple(scales.shape) != (rows, slots):
        raise BatchCompositionError(
            f"control_scales is {tuple(scales.shape)}; expected {(rows, slots)}",
            field="control_scales",
        )

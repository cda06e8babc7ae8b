"""The data contract between the engine and a model's UNet: rows in, noise predictions out."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Conditioning:
    """Prompt conditioning for one side (positive or negative) of guidance."""

    embeds: torch.Tensor  # [1, S, D]
    pooled: torch.Tensor | None = None  # [1, P] (SDXL)
    time_ids: torch.Tensor | None = None  # [1, 6] (SDXL)


@dataclass(frozen=True)
class UNetBatch:
    """The inputs of one UNet call, one row per latent; SDXL also sets ``text_embeds``/``time_ids``."""

    latents: torch.Tensor
    timesteps: torch.Tensor
    embeds: torch.Tensor
    text_embeds: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        return int(self.latents.shape[0])

    def narrow(self, start: int, length: int) -> UNetBatch:
        """A view of ``length`` rows from ``start``."""

        def cut(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.narrow(0, start, length)

        return UNetBatch(
            latents=self.latents.narrow(0, start, length),
            timesteps=self.timesteps.narrow(0, start, length),
            embeds=self.embeds.narrow(0, start, length),
            text_embeds=cut(self.text_embeds),
            time_ids=cut(self.time_ids),
        )


NoisePredictor = Callable[[UNetBatch], torch.Tensor]

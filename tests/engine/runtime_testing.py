"""Helpers for the live runtime tests: a probe model, a fake clock, distinct test frames.

The probe model keeps the tiny preset's text encoder (so prompts really differ) but replaces
the VAE and the UNet with per-row arithmetic. The random tiny networks answer almost the same
image whatever the input (a black and a white frame differ by ~0.01 grey levels on average),
which would let a frame that reached the wrong session go unnoticed; with the probe, every
output pixel depends strongly on its own input, prompt, seed and timestep, and on nothing
else, so batched results can be compared with single-session ones exactly.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from livediff.engine.config import GenerationParams, StreamConfig
from livediff.engine.runtime import Session, SessionOutput
from livediff.engine.stream import Stream
from livediff.models.bundle import ModelBundle
from livediff.models.unet_batch import UNetBatch


class FakeClock:
    """A monotonic clock that moves only when told to (thread-safe)."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds


@dataclass
class ProbeBundle(ModelBundle):
    """Per-row arithmetic stand-ins for the VAE and UNet (see the module docstring).

    ``unet_delay_s`` advances ``clock`` on every UNet call: a slow GPU, as the engine sees it
    through its injected clock, without any real waiting.
    """

    clock: FakeClock | None = None
    unet_delay_s: float = 0.0

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        pooled = F.avg_pool2d(images.to(torch.float32), self.vae_scale_factor)
        return torch.cat([pooled, pooled.mean(dim=1, keepdim=True)], dim=1).to(self.dtype)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return F.interpolate(
            latents[:, :3].to(torch.float32), scale_factor=self.vae_scale_factor, mode="nearest"
        )

    @torch.inference_mode()
    def predict_noise(self, batch: UNetBatch) -> torch.Tensor:
        if self.clock is not None and self.unet_delay_s:
            self.clock.advance(self.unet_delay_s)
        prompt = batch.embeds[:, :4, :4].mean(dim=2) * 4.0  # [rows, 4]: differs per prompt
        t = batch.timesteps.to(batch.latents.dtype)[:, None, None, None] / 1000.0
        return 0.5 * batch.latents + prompt[:, :, None, None] + t


def probe_from(bundle: ModelBundle, **extra: object) -> ProbeBundle:
    return ProbeBundle(**{f.name: getattr(bundle, f.name) for f in fields(ModelBundle)}, **extra)


def make_frame(session: int, index: int, size: int = 64) -> np.ndarray:
    """A frame that differs per session and per index (gradients, so position matters too)."""
    y, x = np.mgrid[0:size, 0:size]
    frame = np.empty((size, size, 3), dtype=np.uint8)
    frame[..., 0] = (x * 3 + session * 80) % 256
    frame[..., 1] = (y * 2 + index * 37) % 256
    frame[..., 2] = (x + y + session * 50 + index * 11) % 256
    return frame


def reference_outputs(
    bundle: ModelBundle, config: StreamConfig, params: GenerationParams, frames: list[np.ndarray]
) -> dict[int, np.ndarray]:
    """What one single-session Stream answers to ``frames``: input index → image."""
    stream = Stream(bundle, config, params)
    answers: dict[int, np.ndarray] = {}
    for frame in frames:
        for out in stream.process(frame):
            answers[out.index] = out.numpy()
    return answers


async def receive(session: Session, count: int) -> list[SessionOutput]:
    return [await session.recv() for _ in range(count)]


def accounting_holds(stats: dict[str, Any]) -> bool:
    """Both identities of :mod:`livediff.engine.metrics`, exactly."""
    inputs = (
        stats["processed"]
        + stats["skipped"]
        + stats["dropped_inbox"]
        + stats["dropped_deadline"]
        + stats["dropped_reconfigure"]
        + stats["in_flight"]
    )
    outputs = stats["received"] + stats["dropped_outbox"] + stats["outbox_depth"]
    return bool(stats["submitted"] == inputs and stats["processed"] + stats["skipped"] == outputs)

"""Stream Batch: one session's denoising state and the step that advances it.

With ``n`` denoising steps and a frame buffer of ``F`` frames, the latent buffer holds
``n * F`` rows: block ``k`` (rows ``k*F … (k+1)*F``) is a group of frames at step ``k``. Every
call writes the newest frames into block 0, runs *one* UNet call over all rows, and shifts
each block one step further. The block that finishes step ``n - 1`` is returned, so the output
of a call belongs to the frames given ``n - 1`` calls earlier (StreamDiffusion §3.1).

With ``use_denoising_batch=False`` the same frames run the ``n`` steps one after another
(sequential denoising, the reference): same noise per step, same equations, no delay.

Everything is allocated once in ``__init__`` and then written in place, so the step has static
shapes and addresses; live updates (:meth:`set_coefficients`, :meth:`set_embeddings`,
:meth:`set_noise`, :meth:`set_guidance`) ``copy_`` into the same buffers.

The step is split in two so several sessions can share one UNet call:
:meth:`begin` fills this session's rows of a :class:`UNetBatch`; :meth:`finish` takes the
noise predicted for those rows and returns the finished latents.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from livediff.engine.config import RCFGMode
from livediff.engine.lcm_schedule import StepCoefficients
from livediff.engine.rcfg import (
    guided_noise,
    lcm_denoise,
    reference_latent,
    renoise,
    residual_noise,
)
from livediff.exceptions import ParameterError
from livediff.kernels.fused_step import fused_step
from livediff.models.image_prompts import ImagePrompt
from livediff.models.unet_batch import Conditioning, NoisePredictor, UNetBatch

LATENT_CHANNELS = 4


@dataclass(frozen=True)
class FramesInFlight:
    """What :meth:`StreamBatch.snapshot` saved: the in-flight buffers and the blocks' use of
    ControlNets."""

    buffers: list[torch.Tensor]
    live_blocks: list[bool]


class StreamBatch:
    """Per-session Stream Batch buffers and step; see the module docstring."""

    def __init__(
        self,
        coefficients: StepCoefficients,
        *,
        frame_buffer_size: int,
        latent_size: tuple[int, int],
        embed_shape: tuple[int, int],
        pooled_dim: int | None,
        rcfg: RCFGMode,
        use_denoising_batch: bool,
        do_add_noise: bool,
        device: torch.device,
        dtype: torch.dtype,
        control_shape: tuple[int, int, int] | None = None,
        bank_frames: int | None = None,
        lora_slots: int | None = None,
        ip_token_shape: tuple[int, int] | None = None,
    ) -> None:
        self.steps = coefficients.steps
        self.frame_buffer_size = frame_buffer_size
        self.rcfg = rcfg
        self.use_denoising_batch = use_denoising_batch
        self.do_add_noise = do_add_noise
        self.device = device
        self.dtype = dtype
        f = frame_buffer_size
        self.latent_rows = self.steps * f if use_denoising_batch else f
        self.uncond_rows = {
            RCFGMode.FULL: self.latent_rows,
            RCFGMode.INITIALIZE: f,
        }.get(rcfg, 0)
        self.unet_rows = self.uncond_rows + self.latent_rows

        h, w = latent_size
        seq, dim = embed_shape
        opts: dict[str, Any] = {"device": device, "dtype": dtype}
        self._unet_latents = torch.zeros(self.unet_rows, LATENT_CHANNELS, h, w, **opts)
        self.x_t = self._unet_latents[self.uncond_rows :]
        self.noise = torch.zeros(self.steps * f, LATENT_CHANNELS, h, w, **opts)
        uses_stock = rcfg in (RCFGMode.SELF, RCFGMode.INITIALIZE)
        self.stock_noise = (
            torch.zeros(self.latent_rows, LATENT_CHANNELS, h, w, **opts) if uses_stock else None
        )
        self._timesteps = torch.zeros(self.unet_rows, dtype=torch.long, device=device)
        self._embeds = torch.zeros(self.unet_rows, seq, dim, **opts)
        self._text_embeds = torch.zeros(self.unet_rows, pooled_dim, **opts) if pooled_dim else None
        self._time_ids = torch.zeros(self.unet_rows, 6, **opts) if pooled_dim else None
        self._step_coeffs = torch.zeros(
            4, self.steps, 1, 1, 1, **opts
        )  # alpha, beta, c_skip, c_out per step
        self._row_coeffs = torch.zeros(4, self.latent_rows, 1, 1, 1, **opts)
        self._finished = torch.zeros(f, LATENT_CHANNELS, h, w, **opts)
        self.guidance_scale = torch.ones((), **opts)
        self.delta = torch.ones((), **opts)
        # ControlNet inputs, one slot per loaded net: each row's control images and scales
        # travel with its latent from block to block (push_control). ``control_shape`` is
        # (K nets, pixel height, pixel width).
        self._control_images: torch.Tensor | None = None
        self._control_scales: torch.Tensor | None = None
        self._scales_next: torch.Tensor | None = None
        if control_shape is not None:
            slots, height, width = control_shape
            self._control_images = torch.zeros(self.unet_rows, slots, 3, height, width, **opts)
            self._control_scales = torch.zeros(self.unet_rows, slots, **opts)
            self._scales_next = torch.zeros(slots, **opts)
        # On the host, for the scheduler (no device read): whether the next pushed frame uses a
        # net (a scale above 0), and whether each Stream Batch block's frame does; negative
        # rows mirror theirs (control_live).
        self._next_live = False
        self._live_blocks: list[bool] = [False] * self.steps
        # Feature bank inputs (the model has a bank of ``bank_frames`` frames per slot): every
        # row's slot, held frames, write entry and fusion. Zeros until set_bank_slots: no bank.
        # Only a buffer whose session banks sends them (``bank_live``): a call where no row
        # banks runs the UNet without the bank (plain self-attention, nothing read or kept).
        self.bank_frames = bank_frames
        self.bank_live = False
        self.bank_full = False  # this call's rows hold all bank_frames frames (host-known)
        self._bank: dict[str, torch.Tensor] = {}
        if bank_frames is not None:
            long: dict[str, Any] = {"device": device, "dtype": torch.long}
            self._bank = {
                "slots": torch.zeros(self.unet_rows, **long),
                "frames": torch.zeros(self.unet_rows, bank_frames, **opts),
                "write": torch.zeros(self.unet_rows, **long),
                "fusion": torch.zeros(self.unet_rows, 2, **opts),
            }
            # per call of a frame (steps when sequential, else one): slots, and write entries
            # per frame; held-frame masks by count
            self._slot_table = torch.zeros(self.calls_per_frame, self.unet_rows, **long)
            self._write_table = torch.zeros(
                self.calls_per_frame, bank_frames, self.unet_rows, **long
            )
            self._held_table = torch.tril(torch.ones(bank_frames + 1, bank_frames, **opts), -1)
        # Latent feedback: the last finished latents, blended into the next frames' x0.
        self._feedback_weight = 0.0
        self._feedback: torch.Tensor | None = None
        self._has_feedback = False
        # Per-session LoRAs: the packed slot and scale of each of the session's LoRAs, the
        # same in every row (index -1 / scale 0: none). ``lora_slots`` is the library's width.
        self._lora_indices: torch.Tensor | None = None
        self._lora_scales: torch.Tensor | None = None
        if lora_slots is not None:
            self._lora_indices = torch.full(
                (self.unet_rows, lora_slots), -1, dtype=torch.int32, device=device
            )
            self._lora_scales = torch.zeros(
                self.unet_rows, lora_slots, dtype=torch.float32, device=device
            )
        # IP-Adapter inputs (the model has an adapter with ``ip_token_shape`` (T, D) tokens):
        # every row's image-prompt tokens and scale. Zeros and scale 0 until set: no image.
        self._ip_tokens: torch.Tensor | None = None
        self._ip_scales: torch.Tensor | None = None
        if ip_token_shape is not None:
            self._ip_tokens = torch.zeros(self.unet_rows, *ip_token_shape, **opts)
            self._ip_scales = torch.zeros(self.unet_rows, **opts)
        self.set_coefficients(coefficients)

    @staticmethod
    def rows_for(
        steps: int, frame_buffer_size: int, rcfg: RCFGMode, use_denoising_batch: bool
    ) -> int:
        """UNet rows a buffer of this shape sends per call (:attr:`unet_rows`)."""
        f = frame_buffer_size
        latent = steps * f if use_denoising_batch else f
        return latent + {RCFGMode.FULL: latent, RCFGMode.INITIALIZE: f}.get(rcfg, 0)

    @property
    def calls_per_frame(self) -> int:
        return 1 if self.use_denoising_batch else self.steps

    # ------------------------------------------------------------------ feature bank
    def set_bank_slots(self, slots: tuple[int, ...] | None) -> None:
        """The bank slots of this buffer's rows, ``unet_rows`` per call of a frame (call-major),
        or ``None``: no bank (the empty slot)."""
        assert self.bank_frames is not None
        frames = self.bank_frames
        self.bank_live = slots is not None
        self.bank_full = False
        if slots is None:
            self._slot_table.zero_()
            self._write_table.zero_()
            for tensor in self._bank.values():
                tensor.zero_()
            return
        table = torch.tensor(slots, dtype=torch.long).view(self.calls_per_frame, self.unet_rows)
        self._slot_table.copy_(table)
        entries = table[:, None, :] * frames + torch.arange(frames)[None, :, None]
        self._write_table.copy_(entries)

    def set_bank_fusion(self, strength: float, threshold: float) -> None:
        self._bank["fusion"][:, 0].fill_(strength)
        self._bank["fusion"][:, 1].fill_(threshold)

    def bank_call(self, call: int, held: int, write: int | None) -> None:
        """Set the bank inputs of call ``call`` of a frame: ``held`` frames to attend to, and
        the frame its features are kept in (``None``: not kept)."""
        if not self._bank:
            return
        self.bank_full = self.bank_live and held == self.bank_frames
        self._bank["slots"].copy_(self._slot_table[call])
        self._bank["frames"].copy_(self._held_table[held])
        if write is None:
            self._bank["write"].zero_()
        else:
            self._bank["write"].copy_(self._write_table[call, write])

    # ------------------------------------------------------------------ latent feedback
    def set_feedback(self, weight: float) -> None:
        """Blend ``weight`` of the last finished latents into each new frame's x0 (0: off)."""
        self._feedback_weight = float(weight)
        if weight and self._feedback is None:
            self._feedback = torch.zeros_like(self._finished)
            self._has_feedback = False

    def reset_feedback(self) -> None:
        self._has_feedback = False

    def feed_back(self, x0: torch.Tensor) -> torch.Tensor:
        """``x0`` with the last finished latents blended in, once there are some."""
        if not self._feedback_weight or self._feedback is None or not self._has_feedback:
            return x0
        return torch.lerp(x0, self._feedback.to(x0.dtype), self._feedback_weight)

    def keep_for_feedback(self, finished: torch.Tensor) -> None:
        if self._feedback_weight and self._feedback is not None:
            self._feedback.copy_(finished)
            self._has_feedback = True

    # ------------------------------------------------------------------ live updates
    def set_coefficients(self, coefficients: StepCoefficients) -> None:
        """Swap in a new ``t_index_list`` with the same number of steps."""
        if coefficients.steps != self.steps:
            raise ParameterError(
                f"this buffer runs {self.steps} steps, not {coefficients.steps}",
                field="t_index_list",
            )
        self.coefficients = coefficients
        stacked = torch.stack(
            [
                coefficients.alpha_sqrt,
                coefficients.beta_sqrt,
                coefficients.c_skip,
                coefficients.c_out,
            ]
        ).view(4, self.steps, 1, 1, 1)
        self._step_coeffs.copy_(stacked)
        if self.use_denoising_batch:
            self._row_coeffs.copy_(
                self._step_coeffs.repeat_interleave(self.frame_buffer_size, dim=1)
            )
            latent_t = coefficients.timesteps.repeat_interleave(self.frame_buffer_size)
            self._timesteps[self.uncond_rows :].copy_(latent_t)
            self._timesteps[: self.uncond_rows].copy_(latent_t[: self.uncond_rows])
        else:
            self._timesteps.fill_(int(coefficients.timesteps[0]))

    def set_embeddings(self, cond: Conditioning, uncond: Conditioning | None) -> None:
        """Write the prompt conditioning into every row (negative rows first)."""
        self._fill(slice(self.uncond_rows, None), cond)
        if self.uncond_rows:
            if uncond is None:
                raise ParameterError(
                    f"RCFG {self.rcfg.value} needs negative-prompt conditioning",
                    field="negative_prompt",
                )
            self._fill(slice(0, self.uncond_rows), uncond)

    def _fill(self, rows: slice, cond: Conditioning) -> None:
        self._embeds[rows].copy_(cond.embeds.expand_as(self._embeds[rows]))
        if self._text_embeds is not None and self._time_ids is not None:
            if cond.pooled is None or cond.time_ids is None:
                raise ParameterError(
                    "this model needs pooled text embeddings and time ids (SDXL)", field="pooled"
                )
            self._text_embeds[rows].copy_(cond.pooled.expand_as(self._text_embeds[rows]))
            self._time_ids[rows].copy_(cond.time_ids.expand_as(self._time_ids[rows]))

    def set_noise(self, noise: torch.Tensor) -> None:
        """Fixed per-step noise, one block per step (``[steps * F, 4, h, w]``)."""
        self.noise.copy_(noise)

    def set_guidance(self, guidance_scale: float, delta: float) -> None:
        self.guidance_scale.fill_(guidance_scale)
        self.delta.fill_(delta)

    def set_control_scales(self, scales: torch.Tensor) -> None:
        """ControlNet scales ``[K]``, one per slot (0: that net is off), for the frames pushed
        from now on (frames in flight keep theirs, as they keep their control images)."""
        assert self._scales_next is not None
        self._scales_next.copy_(scales.to(self._scales_next))
        self._next_live = bool((scales != 0).any())

    def set_loras(self, indices: torch.Tensor, scales: torch.Tensor) -> None:
        """The session's LoRA slots and scales ``[slots]``, for every row from the next call
        on (as a new prompt applies to every row)."""
        assert self._lora_indices is not None and self._lora_scales is not None
        self._lora_indices.copy_(indices.expand_as(self._lora_indices))
        self._lora_scales.copy_(scales.expand_as(self._lora_scales))

    def set_image_prompt(self, prompt: ImagePrompt | None, scale: float) -> None:
        """The session's style image for every row from the next call on (as a new prompt
        applies to every row): conditioned rows get its tokens, negative rows (RCFG full and
        initialize) its unconditional tokens; ``None`` (or scale 0) turns it off."""
        assert self._ip_tokens is not None and self._ip_scales is not None
        if prompt is None:
            self._ip_tokens.zero_()
            self._ip_scales.zero_()
            return
        cond, uncond = self._ip_tokens[self.uncond_rows :], self._ip_tokens[: self.uncond_rows]
        cond.copy_(prompt.tokens.expand_as(cond))
        uncond.copy_(prompt.uncond_tokens.expand_as(uncond))
        self._ip_scales.fill_(scale)

    def push_control(self, images: torch.Tensor) -> None:
        """The new frame group's control images ``[F, K, 3, H, W]`` in [0, 1], with the scales
        of :meth:`set_control_scales`.

        With Stream Batch they go into block 0 after every block moved one step on (block
        ``k`` keeps the control images and scales of the frames its latents came from);
        negative rows get those of the latents they mirror. Sequentially, every row gets them.
        """
        assert self._control_images is not None and self._control_scales is not None
        assert self._scales_next is not None
        f = self.frame_buffer_size
        scales = self._scales_next.expand(f, -1)
        if self.use_denoising_batch:
            self._live_blocks = [self._next_live, *self._live_blocks[:-1]]
        else:
            self._live_blocks = [self._next_live] * self.steps
        for buffer, new in ((self._control_images, images), (self._control_scales, scales)):
            if not self.use_denoising_batch:
                rows = buffer.shape[0] // f
                buffer.view(rows, *new.shape).copy_(new.unsqueeze(0).expand(rows, *new.shape))
                continue
            latent = buffer[self.uncond_rows :]
            for k in range(self.steps - 1, 0, -1):  # from the last block down: no overlap
                latent[k * f : (k + 1) * f].copy_(latent[(k - 1) * f : k * f])
            latent[:f].copy_(new)
            if self.rcfg is RCFGMode.FULL:
                buffer[: self.uncond_rows].copy_(latent)
            elif self.rcfg is RCFGMode.INITIALIZE:
                buffer[:f].copy_(new)

    @property
    def control_live(self) -> bool:
        """Whether any row of the next UNet call uses a ControlNet (a scale above 0), known on
        the host: the next frame enters with the scales set now, and the frames in flight
        keep theirs (with Stream Batch the last block's frame leaves before that call)."""
        if not self.use_denoising_batch:
            return self._next_live
        return self._next_live or any(self._live_blocks[:-1])

    def latest_control(self) -> torch.Tensor | None:
        """The control images ``[K, 3, H, W]`` the newest frame's UNet rows take (the last
        frame of the group :meth:`push_control` wrote last), ``None`` without ControlNets."""
        if self._control_images is None:
            return None
        f = self.frame_buffer_size
        return self._control_images[(self.uncond_rows if self.use_denoising_batch else 0) + f - 1]

    def _in_flight(self) -> list[torch.Tensor]:
        """The buffers that carry the frames in flight from one group to the next."""
        buffers = [self.x_t, self.stock_noise, self._control_images, self._control_scales]
        return [b for b in buffers if b is not None]

    def reset(self) -> None:
        """Forget the frames in flight (the next ``steps - 1`` outputs are warm-up again)."""
        for buffer in self._in_flight():
            buffer.zero_()
        self._live_blocks = [False] * self.steps

    def snapshot(self) -> FramesInFlight:
        """Copies of the frames in flight, for :meth:`restore` (a graph capture mid-stream
        runs the step a few times and must leave the stream where it was)."""
        return FramesInFlight(
            [buffer.clone() for buffer in self._in_flight()], list(self._live_blocks)
        )

    def restore(self, snapshot: FramesInFlight) -> None:
        for buffer, saved in zip(self._in_flight(), snapshot.buffers, strict=True):
            buffer.copy_(saved)
        self._live_blocks = list(snapshot.live_blocks)

    # ------------------------------------------------------------------ the step
    def step(
        self,
        x0: torch.Tensor,
        predict_noise: NoisePredictor,
        first_latent: torch.Tensor | None = None,
        bank_calls: list[tuple[int, int | None]] | None = None,
    ) -> torch.Tensor:
        """Advance by one frame group; ``x0`` is ``[F, 4, h, w]`` (encoded input or zeros).

        ``first_latent`` replaces ``a0 * x0 + b0 * noise`` as the step-0 latent (txt2img).
        """
        if not self.use_denoising_batch:
            if first_latent is None:
                alpha, beta = self._step_coeffs[0, 0], self._step_coeffs[1, 0]
                first_latent = renoise(x0, self.noise[: self.frame_buffer_size], alpha, beta)
            return self.run_sequential(first_latent, x0, predict_noise, bank_calls)
        batch = self.begin(x0, first_latent)
        return self.finish(predict_noise(batch)).clone()

    def begin(self, x0: torch.Tensor, first_latent: torch.Tensor | None = None) -> UNetBatch:
        """Write the new frames into step 0 and return the UNet inputs of all rows.

        ``first_latent`` replaces ``a0 * x0 + b0 * noise`` (txt2img passes fresh noise).
        """
        f = self.frame_buffer_size
        alpha, beta = self._step_coeffs[0, 0], self._step_coeffs[1, 0]
        new = self.x_t[:f]
        if first_latent is None:
            new.copy_(renoise(x0, self.noise[:f], alpha, beta))
        else:
            new.copy_(first_latent)
        if self.rcfg is RCFGMode.SELF:
            assert self.stock_noise is not None
            self.stock_noise[:f].copy_(residual_noise(new, x0, alpha, beta))
        if self.rcfg is RCFGMode.FULL:
            self._unet_latents[: self.uncond_rows].copy_(self.x_t)
        elif self.rcfg is RCFGMode.INITIALIZE:
            self._unet_latents[:f].copy_(new)
        return self._batch()

    def unet_inputs(self) -> UNetBatch:
        """The UNet rows as the buffers hold them now (nothing written: :meth:`begin` writes)."""
        return self._batch()

    def _batch(self) -> UNetBatch:
        bank = self._bank if self.bank_live else {}
        return UNetBatch(
            latents=self._unet_latents,
            timesteps=self._timesteps,
            embeds=self._embeds,
            text_embeds=self._text_embeds,
            time_ids=self._time_ids,
            control_images=self._control_images,
            control_scales=self._control_scales,
            lora_indices=self._lora_indices,
            lora_scales=self._lora_scales,
            bank_slots=bank.get("slots"),
            bank_frames=bank.get("frames"),
            bank_write=bank.get("write"),
            bank_fusion=bank.get("fusion"),
            ip_tokens=self._ip_tokens,
            ip_scales=self._ip_scales,
        )

    def finish(self, eps: torch.Tensor) -> torch.Tensor:
        """Guidance and the LCM step for every row, then shift the blocks; returns the finished block.

        One fused kernel (:func:`livediff.kernels.fused_step.fused_step`; its PyTorch reference
        off CUDA) does what :mod:`livediff.engine.rcfg` spells out. The result is a buffer this
        object reuses: it is valid until the next ``finish``.
        """
        return fused_step(
            self.x_t,
            eps.contiguous(),  # channels-last UNet output would send the kernel down its reference path
            self.stock_noise,
            self.noise if self.do_add_noise else None,
            self._row_coeffs,
            self.guidance_scale,
            self.delta,
            rcfg=self.rcfg.value,
            frame_buffer_size=self.frame_buffer_size,
            out=self._finished,
        )

    def run_sequential(
        self,
        x_t: torch.Tensor,
        x0: torch.Tensor,
        predict_noise: NoisePredictor,
        bank_calls: list[tuple[int, int | None]] | None = None,
    ) -> torch.Tensor:
        """All steps for one frame group, one UNet call per step (the reference path);
        ``bank_calls``: each call's (held frames, frame kept) for the feature bank."""
        f = self.frame_buffer_size
        stock = residual_noise(x_t, x0, self._step_coeffs[0, 0], self._step_coeffs[1, 0])
        x0_hat = x_t
        for k in range(self.steps):
            alpha, beta, c_skip, c_out = self._step_coeffs[:, k]
            self._timesteps.fill_(int(self.coefficients.timesteps[k]))
            self.x_t.copy_(x_t)
            uncond = self.uncond_rows if (self.rcfg is RCFGMode.FULL or k == 0) else 0
            if uncond:
                self._unet_latents[:uncond].copy_(x_t[:uncond])
            start = self.uncond_rows - uncond
            if self._bank and bank_calls is not None:
                self.bank_call(k, *bank_calls[k])
            eps = predict_noise(self._batch().narrow(start, uncond + f))
            if self.rcfg is RCFGMode.INITIALIZE and k == 0:
                stock = eps[:f].clone()
            eps_uncond = eps[:uncond] if self.rcfg is RCFGMode.FULL else None
            guided = guided_noise(
                self.rcfg, eps[uncond:], eps_uncond, stock, self.guidance_scale, self.delta
            )
            x0_hat = lcm_denoise(x_t, guided, alpha, beta, c_skip, c_out)
            if k + 1 < self.steps:
                x_ref = reference_latent(x_t, stock, alpha, beta)
                a_next, b_next = self._step_coeffs[0, k + 1], self._step_coeffs[1, k + 1]
                noise = self.noise[(k + 1) * f : (k + 2) * f] if self.do_add_noise else None
                x_t = renoise(x0_hat, noise, a_next, b_next)
                stock = residual_noise(x_t, x_ref, a_next, b_next)
        return x0_hat

"""One stream: frames in, generated frames out (the StreamDiffusion algorithm, per session).

>>> stream = Stream(bundle, prompt="a watercolor painting", strength=0.5)
>>> for frame in frames:              # uint8 H×W×3, numpy or torch, any size
...     for out in stream.process(frame):
...         show(out.numpy())

With ``n`` steps and ``use_denoising_batch`` the answer to input ``i`` comes out with input
``i + n - 1`` (the Stream Batch delay); :meth:`flush` drains the frames still in flight.
Every output says which input it answers (:class:`StreamOutput.index`).

Live updates (:meth:`update`) take effect at the next frame. Prompt encoding happens in
:meth:`prepare_update`, which may run on another thread; :meth:`apply_update` only copies into
existing buffers (a new step *count* is the one change that reallocates the latent buffer).
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from livediff.engine.config import GenerationMode, GenerationParams, RCFGMode, StreamConfig
from livediff.engine.frames import StreamOutput, as_uint8_frame, fit_crop
from livediff.engine.schedule import LCMSchedule, StepCoefficients
from livediff.engine.similarity import SimilarityFilter, similarity_signal
from livediff.engine.stream_batch import StreamBatch
from livediff.exceptions import ParameterError
from livediff.kernels.postprocess import model_output_to_rgb
from livediff.kernels.preprocess import rgb_to_model_input
from livediff.models.bundle import ModelBundle
from livediff.models.prompts import PromptEncoder
from livediff.models.unet_batch import Conditioning

log = logging.getLogger(__name__)
_PROMPT_FIELDS = ("prompt", "negative_prompt", "blend")
_SCHEDULE_FIELDS = ("steps", "strength", "t_index_list")


@dataclass(frozen=True)
class PreparedUpdate:
    """A checked parameter change with its prompt conditioning already encoded."""

    params: GenerationParams
    changed: frozenset[str]
    cond: Conditioning | None = None
    uncond: Conditioning | None = None
    coefficients: StepCoefficients | None = None


class Stream:
    """A single stream's state and step; see the module docstring."""

    def __init__(
        self,
        bundle: ModelBundle,
        config: StreamConfig | None = None,
        params: GenerationParams | None = None,
        *,
        session_id: str = "-",
        **param_overrides: Any,
    ) -> None:
        config = config or StreamConfig()
        preset = bundle.preset
        if config.width is None or config.height is None:
            config = config.with_resolution(config.width or preset.width, config.height or preset.height)
        self.config = config
        self.bundle = bundle
        self.session_id = session_id
        self.width, self.height = int(config.width or preset.width), int(config.height or preset.height)
        base = params or GenerationParams(strength=preset.default_strength, steps=preset.default_steps)
        self.params = base.updated(**param_overrides) if param_overrides else base
        self.schedule = LCMSchedule(bundle.scheduler_config, config.num_inference_steps)
        self.prompts = PromptEncoder(bundle, self.width, self.height)
        self.filter = SimilarityFilter(self.params.similarity_threshold, self.params.max_skip_frames, self.params.seed)
        self._generator = torch.Generator()
        self._group: list[tuple[torch.Tensor, int, Any]] = []
        self._in_flight: deque[list[int]] = deque()
        self._last_output: list[StreamOutput] = []
        self._frames_in = 0
        self._cond: Conditioning | None = None
        self._uncond: Conditioning | None = None
        self.batch = self._new_batch(self.schedule.coefficients(self._t_index_list(self.params)))
        self.apply_update(self._prepare(self.params, frozenset(("prompt", "seed", "strength", "guidance_scale"))))

    # ------------------------------------------------------------------ set-up
    @property
    def latent_size(self) -> tuple[int, int]:
        factor = self.bundle.vae_scale_factor
        return self.height // factor, self.width // factor

    @property
    def delay(self) -> int:
        """Frame groups between an input and its output (``steps - 1`` with Stream Batch)."""
        return self.batch.steps - 1 if self.config.use_denoising_batch else 0

    def _t_index_list(self, params: GenerationParams) -> tuple[int, ...]:
        if self.config.mode is GenerationMode.TXT2IMG and params.t_index_list is None:
            return self.schedule.resolve(None, 1.0, params.steps)
        return self.schedule.resolve(params.t_index_list, params.strength, params.steps)

    def _new_batch(self, coefficients: StepCoefficients) -> StreamBatch:
        return StreamBatch(
            coefficients,
            frame_buffer_size=self.config.frame_buffer_size,
            latent_size=self.latent_size,
            embed_shape=self.bundle.embed_shape,
            pooled_dim=self.bundle.pooled_dim,
            rcfg=self.config.rcfg,
            use_denoising_batch=self.config.use_denoising_batch,
            do_add_noise=self.config.do_add_noise,
            device=self.bundle.device,
            dtype=self.bundle.dtype,
        )

    def _noise(self, seed: int) -> torch.Tensor:
        self._generator.manual_seed(seed)
        shape = (self.batch.steps * self.config.frame_buffer_size, 4, *self.latent_size)
        return torch.randn(shape, generator=self._generator, dtype=torch.float32)

    # ------------------------------------------------------------------ live updates
    def prepare_update(self, **changes: Any) -> PreparedUpdate:
        """Check ``changes`` and encode any new prompt; touches no stream state (thread-safe)."""
        return self._prepare(self.params.updated(**changes), frozenset(changes))

    def _prepare(self, params: GenerationParams, changed: frozenset[str]) -> PreparedUpdate:
        cond = uncond = None
        if changed & set(_PROMPT_FIELDS):
            cond = self.prompts.encode(params.prompt, params.blend)
            if self.config.rcfg in (RCFGMode.FULL, RCFGMode.INITIALIZE):
                uncond = self.prompts.encode_negative(params.negative_prompt)
        coefficients = None
        if changed & set(_SCHEDULE_FIELDS):
            coefficients = self.schedule.coefficients(self._t_index_list(params))
        return PreparedUpdate(params, changed, cond, uncond, coefficients)

    def apply_update(self, update: PreparedUpdate) -> None:
        """Swap a prepared update in between two frames (only copies into existing buffers)."""
        params, changed = update.params, update.changed
        rebuilt = False
        if update.coefficients is not None:
            if update.coefficients.steps == self.batch.steps:
                self.batch.set_coefficients(update.coefficients)
            else:
                log.info("[%s] steps %d -> %d: new latent buffer; frames in flight are dropped",
                         self.session_id, self.batch.steps, update.coefficients.steps)
                self.batch = self._new_batch(update.coefficients)
                self._in_flight.clear()
                rebuilt = True
        if update.cond is not None:
            self._cond, self._uncond = update.cond, update.uncond
        if (update.cond is not None or rebuilt) and self._cond is not None:
            self.batch.set_embeddings(self._cond, self._uncond)
        if rebuilt or "seed" in changed:
            self.batch.set_noise(self._noise(params.seed))
            self.filter.reseed(params.seed)
        if rebuilt or changed & {"guidance_scale", "delta"}:
            self.batch.set_guidance(params.guidance_scale, params.delta)
        if changed & {"similarity_threshold", "max_skip_frames"}:
            self.filter.configure(params.similarity_threshold, params.max_skip_frames)
        self.params = params

    def update(self, **changes: Any) -> None:
        """Change live parameters; they apply from the next frame on."""
        self.apply_update(self.prepare_update(**changes))

    # ------------------------------------------------------------------ frames
    def process(self, frame: Any = None, *, tag: Any = None) -> list[StreamOutput]:
        """Feed one frame (``None`` in txt2img mode); returns the outputs this call produced."""
        if self.config.mode is GenerationMode.TXT2IMG:
            image = torch.zeros(1, 1, 3, dtype=torch.uint8) if frame is None else as_uint8_frame(frame)
        elif frame is None:
            raise ParameterError("img2img needs an input frame")
        else:
            image = as_uint8_frame(frame)
        index = self._frames_in
        self._frames_in += 1
        self._group.append((image, index, tag))
        if len(self._group) < self.config.frame_buffer_size:
            return []
        group, self._group = self._group, []
        return self._run_group(group)

    def __call__(self, frame: Any = None) -> torch.Tensor | None:
        """Shortcut for ``frame_buffer_size=1``: the newest output image, or ``None`` while filling."""
        outputs = self.process(frame)
        return outputs[-1].image if outputs else None

    def _should_skip(self, group: list[tuple[torch.Tensor, int, Any]]) -> bool:
        if not self.filter.enabled or not self._last_output or self.config.mode is GenerationMode.TXT2IMG:
            return False
        signals = [similarity_signal(image) for image, _, _ in group]
        signal = signals[0] if len(signals) == 1 else torch.cat([torch.as_tensor(s) for s in signals])
        return self.filter.should_skip(signal)

    def _run_group(self, group: list[tuple[torch.Tensor, int, Any]], *, emit: bool = True) -> list[StreamOutput]:
        indices = [index for _, index, _ in group]
        if emit and self._should_skip(group):
            previous = self._last_output
            return [StreamOutput(previous[i % len(previous)].image, index, skipped=True) for i, index in enumerate(indices)]
        with torch.inference_mode():
            x0, first_latent = self._encode(group)
            x0_hat = self.batch.step(x0, self.bundle.predict_noise, first_latent)
            decoded = model_output_to_rgb(self.bundle.decode(x0_hat))
        self._in_flight.append(indices if emit else [])
        if len(self._in_flight) <= self.delay:
            return []
        answered = self._in_flight.popleft()
        outputs = [StreamOutput(decoded[i], index) for i, index in enumerate(answered)]
        if outputs:
            self._last_output = outputs
        return outputs

    def _encode(self, group: list[tuple[torch.Tensor, int, Any]]) -> tuple[torch.Tensor, torch.Tensor | None]:
        f = len(group)
        if self.config.mode is GenerationMode.TXT2IMG:
            shape = (f, 4, *self.latent_size)
            fresh = torch.randn(shape, generator=self._generator, dtype=torch.float32)
            x0 = torch.zeros(shape, device=self.bundle.device, dtype=self.bundle.dtype)
            return x0, fresh.to(device=self.bundle.device, dtype=self.bundle.dtype)
        device = self.bundle.device
        pixels = []
        for image, _, _ in group:
            crop = fit_crop(int(image.shape[0]), int(image.shape[1]), self.height, self.width, self.config.fit)
            frame = image.to(device, non_blocking=True).unsqueeze(0)
            pixels.append(rgb_to_model_input(frame, self.height, self.width, crop, self.bundle.dtype))
        images = pixels[0] if f == 1 else torch.cat(pixels)
        return self.bundle.encode(images), None

    def flush(self) -> list[StreamOutput]:
        """Run the frames still in flight to completion (e.g. at the end of a file)."""
        outputs: list[StreamOutput] = []
        if self._group:  # a partial group: pad it with its last frame
            pad = self._group[-1]
            group = self._group + [(pad[0], -1, None)] * (self.config.frame_buffer_size - len(self._group))
            self._group = []
            outputs += [o for o in self._run_group(group) if o.index >= 0]
        if not self._last_output and not self._in_flight:
            return outputs
        filler_source = self._last_frames
        while any(self._in_flight):
            outputs += [o for o in self._run_group(filler_source(), emit=False) if o.index >= 0]
        self._in_flight.clear()
        return outputs

    def _last_frames(self) -> list[tuple[torch.Tensor, int, Any]]:
        blank = torch.zeros(self.height, self.width, 3, dtype=torch.uint8)
        return [(blank, -1, None)] * self.config.frame_buffer_size

    @property
    def frames_in(self) -> int:
        return self._frames_in

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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from livediff.engine.config import GenerationMode, GenerationParams, RCFGMode, StreamConfig
from livediff.engine.control_batch import ControlRequest
from livediff.engine.control_plan import ControlPlan, resolve_control
from livediff.engine.feature_banks import BankState, SceneCuts, bank_inputs
from livediff.engine.frames import (
    InputImage,
    StreamOutput,
    YuvFrame,
    as_input_frame,
    fit_crop,
    frame_size,
    upload_frame,
)
from livediff.engine.lcm_schedule import LCMSchedule, StepCoefficients
from livediff.engine.lora_plan import SessionLoras, lora_inputs, resolve_loras
from livediff.engine.similarity import SimilarityFilter, similarity_signal
from livediff.engine.stream_batch import StreamBatch
from livediff.exceptions import ParameterError
from livediff.kernels.postprocess import model_output_to_rgb
from livediff.kernels.preprocess import i420_to_model_input, rgb_to_model_input
from livediff.kernels.yuv import i420_to_rgb_float, split_i420
from livediff.models.bundle import ModelBundle
from livediff.models.feature_bank import SlotLease
from livediff.models.image_prompts import ImagePrompt
from livediff.models.lora_merge import MergeKey
from livediff.models.prompts import PromptEncoder
from livediff.models.unet_batch import Conditioning, UNetBatch

log = logging.getLogger(__name__)
_PROMPT_FIELDS = ("prompt", "negative_prompt", "blend")
_SCHEDULE_FIELDS = ("steps", "strength", "t_index_list")
_CONSISTENCY_FIELDS = frozenset(
    ("feature_bank", "bank_interval", "feature_fusion", "fusion_threshold", "latent_feedback")
)


_IMAGE_PROMPT_FIELDS = ("ip_image", "ip_scale")


_TXT2IMG_PLACEHOLDER = torch.zeros(1, 1, 3, dtype=torch.uint8)


def _luma_or_rgb(image: InputImage) -> torch.Tensor:
    """What the similarity filter compares: the RGB frame, or a YUV frame's luma plane."""
    return image.y if isinstance(image, YuvFrame) else image


@dataclass(frozen=True)
class FrameGroup:
    """``frame_buffer_size`` frames that go through the model together, with their indices and tags.

    An index of -1 marks a filler frame (padding or draining) whose output is never emitted.
    """

    images: list[InputImage]
    indices: list[int]
    tags: list[Any]
    emit: bool = True


@dataclass(frozen=True)
class PreparedUpdate:
    """A checked parameter change with its prompt conditioning already encoded."""

    params: GenerationParams
    changed: frozenset[str]
    cond: Conditioning | None = None
    uncond: Conditioning | None = None
    coefficients: StepCoefficients | None = None
    control: ControlPlan | None = None
    bank_lease: SlotLease | None = None  # new feature bank slots for this session's rows
    loras: SessionLoras | None = None  # the rows' LoRA slots and scales
    image_prompt: ImagePrompt | None = None  # the new style image's tokens ("ip_image" changed)


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
            config = config.with_resolution(
                config.width or preset.width, config.height or preset.height
            )
        self.config = config
        self.bundle = bundle
        self.session_id = session_id
        self.width, self.height = (
            int(config.width or preset.width),
            int(config.height or preset.height),
        )
        base = params or GenerationParams.for_preset(preset)
        self.params = base.updated(**param_overrides) if param_overrides else base
        self.schedule = LCMSchedule(bundle.scheduler_config, config.num_inference_steps)
        self.prompts = PromptEncoder(bundle, self.width, self.height)
        self.filter = SimilarityFilter(
            self.params.similarity_threshold, self.params.max_skip_frames, self.params.seed
        )
        self._generator = torch.Generator()
        self._pending: list[tuple[InputImage, int, Any]] = []
        self._in_flight: deque[FrameGroup | None] = deque()
        self._last_output: list[StreamOutput] = []
        self._output_size = (self.height, self.width)
        self._frames_in = 0
        self._cond: Conditioning | None = None
        self._uncond: Conditioning | None = None
        self._control: ControlPlan | None = None
        self._client_images: dict[int, torch.Tensor] = {}  # slot → [1, 3, H, W] the client sent
        self._bank = BankState(self.params.feature_bank, self.params.bank_interval)
        self._bank_lease: SlotLease | None = None
        self._cuts = SceneCuts(self.params.scene_cut)
        self._loras: SessionLoras | None = None
        self._image_prompt: ImagePrompt | None = None
        self.batch = self._new_batch(self.schedule.coefficients(self._t_index_list(self.params)))
        self.apply_update(
            self._prepare(
                self.params,
                frozenset(("prompt", "seed", "strength", "guidance_scale", "controlnets"))
                | {"loras", *_IMAGE_PROMPT_FIELDS}
                | _CONSISTENCY_FIELDS,
            )
        )

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
            control_shape=(
                (len(self.bundle.controlnets), self.height, self.width)
                if self.bundle.controlnets
                else None
            ),
            bank_frames=self.bundle.feature_bank.frames if self.bundle.feature_bank else None,
            lora_slots=self.bundle.loras.capacity.slots_per_row if self.bundle.loras else None,
            ip_token_shape=self.bundle.ip_adapter.token_shape if self.bundle.ip_adapter else None,
        )

    def _noise(self, seed: int) -> torch.Tensor:
        self._generator.manual_seed(seed)
        shape = (self.batch.steps * self.config.frame_buffer_size, 4, *self.latent_size)
        return torch.randn(shape, generator=self._generator, dtype=torch.float32)

    # ------------------------------------------------------------------ live updates
    def prepare_update(self, **changes: Any) -> PreparedUpdate:
        """Check ``changes`` and encode any new prompt; touches no stream state (thread-safe)."""
        return self._prepare(self.params.updated(**changes), frozenset(changes))

    def prepare_params(self, params: GenerationParams, changed: frozenset[str]) -> PreparedUpdate:
        """Like :meth:`prepare_update`, for callers that track the target parameters themselves.

        ``params`` is the complete new parameter set; ``changed`` names the fields that differ from
        the parameters the stream will have when the update is applied. Touches no stream state.
        """
        return self._prepare(params, changed)

    def _prepare(self, params: GenerationParams, changed: frozenset[str]) -> PreparedUpdate:
        cond = uncond = None
        if changed & set(_PROMPT_FIELDS):
            cond = self.prompts.encode(params.prompt, params.blend)
            if self.config.rcfg in (RCFGMode.FULL, RCFGMode.INITIALIZE):
                uncond = self.prompts.encode_negative(params.negative_prompt)
        coefficients = None
        if changed & set(_SCHEDULE_FIELDS):
            coefficients = self.schedule.coefficients(self._t_index_list(params))
        control = None
        if "controlnets" in changed:
            control = resolve_control(
                params.controlnets,
                self.bundle,
                has_input_frames=self.config.mode is not GenerationMode.TXT2IMG,
            )
        loras = resolve_loras(params.loras, self.bundle) if "loras" in changed else None
        lease = self._lease_for(params, changed, coefficients)
        image_prompt = self._image_prompt_for(params) if "ip_image" in changed else None
        return PreparedUpdate(
            params,
            changed,
            cond,
            uncond,
            coefficients,
            control,
            loras=loras,
            bank_lease=lease,
            image_prompt=image_prompt,
        )

    def _image_prompt_for(self, params: GenerationParams) -> ImagePrompt | None:
        """The uploaded style image ``ip_image`` names (``None``: no image)."""
        if params.ip_image is None:
            return None
        prompts = self.bundle.image_prompts
        if prompts is None:
            raise ParameterError(
                "this server runs no IP-Adapter: start it with --ip-adapter SOURCE[:VARIANT] "
                "([model.ip_adapter]) to use style images",
                field="ip_image",
            )
        prompt = prompts.lookup(params.ip_image)
        if prompt is None:
            raise ParameterError(
                f"no uploaded style image has the key {params.ip_image}: upload it first "
                f"(it may have left the cache of the last {prompts.cache_entries} images)",
                field="ip_image",
            )
        return prompt

    def _lease_for(
        self,
        params: GenerationParams,
        changed: frozenset[str],
        coefficients: StepCoefficients | None,
    ) -> SlotLease | None:
        """New bank slots when the session starts a bank or changes its row count, else None."""
        if params.latent_feedback and self.config.mode is GenerationMode.TXT2IMG:
            raise ParameterError(
                "latent_feedback blends into input frames: a txt2img session has none",
                field="latent_feedback",
            )
        if not params.feature_bank:
            return None
        bank = self.bundle.feature_bank
        if bank is None:
            raise ParameterError(
                "this server runs no feature bank: start it with --feature-bank-frames N "
                "([model] feature_bank_frames)",
                field="feature_bank",
            )
        if params.feature_bank > bank.frames:
            raise ParameterError(
                f"feature_bank={params.feature_bank}: this server keeps at most {bank.frames} "
                "frames per session",
                field="feature_bank",
                limit=bank.frames,
            )
        steps = coefficients.steps if coefficients is not None else self.batch.steps
        use_batch = self.config.use_denoising_batch
        rows = StreamBatch.rows_for(
            steps, self.config.frame_buffer_size, self.config.rcfg, use_batch
        )
        needed = rows * (1 if use_batch else steps)
        held = self._bank_lease
        if held is not None and len(held.slots) >= needed:  # fewer rows keep some of theirs
            return None
        return bank.lease(needed)

    def apply_update(self, update: PreparedUpdate) -> None:
        """Swap a prepared update in between two frames (only copies into existing buffers)."""
        params, changed = update.params, update.changed
        rebuilt = False
        if update.coefficients is not None:
            if update.coefficients.steps == self.batch.steps:
                self.batch.set_coefficients(update.coefficients)
            else:
                log.info(
                    "[%s] steps %d -> %d: new latent buffer; frames in flight are dropped",
                    self.session_id,
                    self.batch.steps,
                    update.coefficients.steps,
                )
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
        if update.control is not None:
            self._control = update.control
        if (update.control is not None or rebuilt) and self._control is not None:
            self.batch.set_control_scales(self._control.scales(self._client_images))
        self._apply_consistency(update, rebuilt)
        if update.loras is not None:
            self._loras = update.loras
        if (update.loras is not None or rebuilt) and self._loras is not None:
            self.batch.set_loras(self._loras.indices, self._loras.scales)
        if "ip_image" in changed:
            self._image_prompt = update.image_prompt
        if (rebuilt or changed & set(_IMAGE_PROMPT_FIELDS)) and self.bundle.ip_adapter is not None:
            self.batch.set_image_prompt(self._image_prompt, params.ip_scale)
        self.params = params

    def _apply_consistency(self, update: PreparedUpdate, rebuilt: bool) -> None:
        """Feature bank slots and state, fusion and latent feedback (see engine.feature_banks)."""
        params, changed = update.params, update.changed
        if update.bank_lease is not None:
            if self._bank_lease is not None:
                self._bank_lease.release()
            self._bank_lease = update.bank_lease
        elif not params.feature_bank and self._bank_lease is not None:
            self._bank_lease.release()
            self._bank_lease = None
        if self.batch.bank_frames is not None:
            if rebuilt or update.bank_lease is not None or "feature_bank" in changed:
                lease, rows = self._bank_lease, self.batch.unet_rows * self.batch.calls_per_frame
                self.batch.set_bank_slots(lease.slots[:rows] if lease is not None else None)
            if rebuilt or changed & {"feature_bank", "feature_fusion", "fusion_threshold"}:
                self.batch.set_bank_fusion(params.feature_fusion, params.fusion_threshold)
        self._bank.size, self._bank.interval = params.feature_bank, params.bank_interval
        self._cuts.threshold = params.scene_cut
        if rebuilt or "latent_feedback" in changed:
            self.batch.set_feedback(params.latent_feedback)
        if rebuilt or update.cond is not None or "feature_bank" in changed:
            self.start_over()

    def set_client_image(self, slot: int, image: torch.Tensor) -> None:
        """The control image the client sent for ControlNet ``slot`` (``[1, 3, H, W]`` in
        [0, 1], :func:`~livediff.engine.client_control.fit_control_image`), for the frames
        pushed from now on; it stays until the next one for that slot."""
        self._client_images[slot] = image
        if self._control is not None:  # a client use waiting for its first image starts now
            self.batch.set_control_scales(self._control.scales(self._client_images))

    @property
    def client_images(self) -> dict[int, torch.Tensor]:
        """The control images the client sent, by ControlNet slot (read-only view)."""
        return dict(self._client_images)

    def bank_usage(self) -> dict[str, float] | None:
        """The rows this session's feature bank holds and their device memory (None: no bank)."""
        bank, lease = self.bundle.feature_bank, self._bank_lease
        if bank is None or lease is None:
            return None
        rows = len(lease.slots)
        return {"rows": rows, "mb": round(rows * bank.row_bytes() / 2**20, 1)}

    def start_over(self) -> None:
        """Forget the feature bank's frames and the fed-back latent (new prompt, scene cut)."""
        self._bank.reset()
        self.batch.reset_feedback()

    def _consistency_step(self, group: FrameGroup) -> tuple[int, int | None]:
        """Before a frame group's calls: the scene-cut check, then the bank's (held, write)."""
        consistent = self.params.feature_bank or self.params.latent_feedback
        watching = consistent and self.config.mode is not GenerationMode.TXT2IMG
        if watching and self._cuts.is_cut(similarity_signal(_luma_or_rgb(group.images[0]))):
            log.info(
                "[%s] scene cut: the feature bank and latent feedback start over", self.session_id
            )
            self.start_over()
        if self._bank_lease is None:
            return 0, None
        return self._bank.advance()

    def set_bank_call(self, group: FrameGroup) -> None:
        """The scene-cut check, then the feature bank inputs of the group's (single, batched)
        UNet call written into the Stream Batch's static bank inputs."""
        held, write = self._consistency_step(group)
        if self._bank_lease is not None:
            self.batch.bank_call(0, held, write)

    def update(self, **changes: Any) -> None:
        """Change live parameters; they apply from the next frame on."""
        self.apply_update(self.prepare_update(**changes))

    # ------------------------------------------------------------------ frames
    def process(self, frame: Any = None, *, tag: Any = None) -> list[StreamOutput]:
        """Feed one frame (``None`` in txt2img mode); returns the outputs this call produced."""
        group = self.admit(frame, tag)
        return [] if group is None else self.run(group)

    def __call__(self, frame: Any = None) -> torch.Tensor | None:
        """Shortcut for ``frame_buffer_size=1``: the newest output image, or ``None`` while filling."""
        outputs = self.process(frame)
        return outputs[-1].image if outputs else None

    def run(self, group: FrameGroup) -> list[StreamOutput]:
        """All phases for one frame group on this stream alone (the single-session path)."""
        skipped = self.skip_outputs(group)
        if skipped is not None:
            return skipped
        with torch.inference_mode():
            pixels = self.model_input(group)
            x0 = None if pixels is None else self.bundle.encode(pixels)
            if self.config.use_denoising_batch:
                x0_hat = self.finish(self.predict_noise(self.begin(group, x0, pixels)))
            else:
                x0, first = self._latents(group, x0)
                self._push_control(group, pixels, x0)
                bank_call = self._consistency_step(group)
                x0 = self.batch.feed_back(x0) if first is None else x0
                calls = [bank_call] * self.batch.steps if self._bank_lease is not None else None
                x0_hat = self.batch.step(x0, self.predict_noise, first, calls)
                self.batch.keep_for_feedback(x0_hat)
            rgb = model_output_to_rgb(self.bundle.decode(x0_hat))
        return self.complete(group, rgb)

    @property
    def lora_key(self) -> MergeKey | None:
        """This stream's LoRAs as the weights would hold them (``None``: no LoRA library)."""
        return None if self._loras is None else self._loras.key

    def predict_noise(self, batch: UNetBatch) -> torch.Tensor:
        """One UNet call over this stream's rows alone (its LoRAs merged where they can be, its
        bank's attention unmasked once the bank is full)."""
        (batch,) = call_inputs(self.bundle, [batch], [self])
        return self.bundle.predict_noise(batch)

    # The phases below let a runtime batch several streams into one UNet call:
    # admit → skip_outputs → model_input → (encode, batched) → begin → (UNet, batched) → finish
    # → (decode, batched) → complete. Only Stream Batch (use_denoising_batch) splits this way.
    def admit(self, frame: Any = None, tag: Any = None) -> FrameGroup | None:
        """Validate a frame and add it to the current group; returns the group once it is full."""
        if self.config.mode is GenerationMode.TXT2IMG:
            image = _TXT2IMG_PLACEHOLDER if frame is None else as_input_frame(frame)
        elif frame is None:
            raise ParameterError("img2img needs an input frame")
        else:
            image = as_input_frame(frame)
        self._pending.append((image, self._frames_in, tag))
        self._frames_in += 1
        if len(self._pending) < self.config.frame_buffer_size:
            return None
        pending, self._pending = self._pending, []
        return FrameGroup([p[0] for p in pending], [p[1] for p in pending], [p[2] for p in pending])

    def skip_outputs(self, group: FrameGroup) -> list[StreamOutput] | None:
        """The previous outputs again if the similarity filter skips this group, else ``None``."""
        if not group.emit or not self.filter.enabled or self.config.mode is GenerationMode.TXT2IMG:
            return None
        signals = [
            torch.as_tensor(similarity_signal(_luma_or_rgb(image))) for image in group.images
        ]
        signal = signals[0] if len(signals) == 1 else torch.cat(signals)
        if not self.filter.should_skip(signal, can_skip=bool(self._last_output)):
            return None
        previous = self._last_output
        return [
            StreamOutput(previous[i % len(previous)].image, index, skipped=True, tag=tag)
            for i, (index, tag) in enumerate(zip(group.indices, group.tags, strict=True))
        ]

    def model_input(self, group: FrameGroup) -> torch.Tensor | None:
        """Frames fitted to the model: ``[F, 3, H, W]`` in [-1, 1] on the model device (``None`` in txt2img)."""
        if self.config.mode is GenerationMode.TXT2IMG:
            return None
        device, pixels = self.bundle.device, []
        for image in group.images:
            crop = fit_crop(*frame_size(image), self.height, self.width, self.config.fit)
            size = (self.height, self.width, crop, self.bundle.dtype)
            if isinstance(image, YuvFrame):  # planes upload as they are; the kernel converts
                y, u, v = (p.to(device, non_blocking=True).unsqueeze(0) for p in image.planes())
                pixels.append(i420_to_model_input(y, u, v, *size))
            else:
                frame = upload_frame(image, device).unsqueeze(0)
                pixels.append(rgb_to_model_input(frame, *size))
        return pixels[0] if len(pixels) == 1 else torch.cat(pixels)

    def _latents(
        self, group: FrameGroup, x0: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(x0, first_latent): txt2img starts from fresh seeded noise on a zero x0."""
        if x0 is not None:
            return x0, None
        shape = (len(group.images), 4, *self.latent_size)
        fresh = torch.randn(shape, generator=self._generator, dtype=torch.float32)
        zeros = torch.zeros(shape, device=self.bundle.device, dtype=self.bundle.dtype)
        return zeros, fresh.to(device=self.bundle.device, dtype=self.bundle.dtype)

    def begin(
        self,
        group: FrameGroup,
        x0: torch.Tensor | None,
        pixels: torch.Tensor | None = None,
        control: torch.Tensor | None = None,
    ) -> UNetBatch:
        """Write the group's latents (and control images, from ``pixels``: the group's
        :meth:`model_input`; or ``control``, made for :meth:`control_request` with other
        sessions') into step 0 and return this stream's UNet rows."""
        latents, first = self._latents(group, x0)
        self._push_control(group, pixels, latents, control)
        self.set_bank_call(group)
        if first is None:
            latents = self.batch.feed_back(latents)
        return self.batch.begin(latents, first)

    def control_request(
        self, group: FrameGroup, pixels: torch.Tensor | None
    ) -> ControlRequest | None:
        """What the group's control images need (``None``: this model has no ControlNet), for
        :func:`~livediff.engine.control_batch.control_images` over a batch's sessions."""
        if self._control is None:
            return None
        return self._control.request(
            (self.height, self.width),
            pixels,
            self._previous_output(),
            rows=len(group.images),
            like=torch.empty(0, device=self.bundle.device, dtype=self.bundle.dtype),
            client=self._client_images,
        )

    def _push_control(
        self,
        group: FrameGroup,
        pixels: torch.Tensor | None,
        like: torch.Tensor,
        control: torch.Tensor | None = None,
    ) -> None:
        if self._control is None:
            return
        if control is None:
            control = self._control.images(
                (self.height, self.width),
                pixels,
                self._previous_output(),
                rows=len(group.images),
                like=like,
                networks=self.bundle.control_networks,
                client=self._client_images,
            )
        self.batch.push_control(control)

    def _previous_output(self) -> torch.Tensor | None:
        """The last output frame as uint8 ``[1, H, W, 3]`` (RGB or I420 outputs), or ``None``."""
        if not self._last_output:
            return None
        image = self._last_output[-1].image
        if image.ndim == 1:  # packed I420 (an encoder's output format)
            y, u, v = split_i420(image.unsqueeze(0), *self._output_size)
            return i420_to_rgb_float(y, u, v) / 255
        return image.unsqueeze(0)

    def finish(self, eps: torch.Tensor) -> torch.Tensor:
        """Noise predicted for this stream's rows → the finished latents ``[F, 4, h, w]``."""
        finished = self.batch.finish(eps)
        self.batch.keep_for_feedback(finished)
        return finished

    def complete(
        self, group: FrameGroup, rgb: torch.Tensor, output_size: tuple[int, int] | None = None
    ) -> list[StreamOutput]:
        """Match decoded frames to the inputs they answer (after the Stream Batch delay).

        ``rgb`` are uint8 ``[F, H, W, 3]`` frames, or packed I420 ``[F, L]`` of
        ``output_size`` (height, width; default the stream's).
        """
        self._output_size = output_size or (self.height, self.width)
        self._in_flight.append(group if group.emit else None)
        if len(self._in_flight) <= self.delay:
            return []
        answered = self._in_flight.popleft()
        if answered is None:
            return []
        outputs = [
            StreamOutput(rgb[i], index, tag=tag)
            for i, (index, tag) in enumerate(zip(answered.indices, answered.tags, strict=True))
            if index >= 0
        ]
        if outputs:
            self._last_output = outputs
        return outputs

    def flush(self) -> list[StreamOutput]:
        """Run the frames still in flight to completion (e.g. at the end of a file)."""
        outputs: list[StreamOutput] = []
        group = self.pending_group()
        if group is not None:
            outputs += self.run(group)
        while (filler := self.filler_group()) is not None:
            outputs += self.run(filler)
        return outputs

    # flush() in two parts, so that a caller batching several streams can run their groups
    # together (engine.interleaved): the partial group, then fillers until nothing is left.
    def pending_group(self) -> FrameGroup | None:
        """The partial group of the frames admitted since the last full one, padded with its
        last frame (whose copies are not emitted); ``None`` when there is none. It leaves the
        stream: run it next."""
        if not self._pending:
            return None
        image = self._pending[-1][0]
        missing = self.config.frame_buffer_size - len(self._pending)
        pending, self._pending = self._pending, []
        return FrameGroup(
            [p[0] for p in pending] + [image] * missing,
            [p[1] for p in pending] + [-1] * missing,
            [p[2] for p in pending] + [None] * missing,
        )

    def filler_group(self) -> FrameGroup | None:
        """A group that only moves the frames in flight on (it emits nothing itself), or
        ``None`` once no frame is left in flight (the delay line is then emptied)."""
        if not any(entry is not None for entry in self._in_flight):
            self._in_flight.clear()
            return None
        # The newest real frames again: a filler of another size would make a compiled step
        # capture a graph for it.
        images = next(group.images for group in reversed(self._in_flight) if group is not None)
        return FrameGroup(images, [-1] * len(images), [None] * len(images), emit=False)

    @property
    def frames_in(self) -> int:
        return self._frames_in


def call_inputs(
    bundle: ModelBundle, batches: Sequence[UNetBatch], streams: Sequence[Stream]
) -> list[UNetBatch]:
    """One UNet call's ``batches`` (one per stream) as the UNet takes them: the per-call rules
    that leave inputs out on the host — a full bank's mask (:func:`bank_inputs`) and LoRA
    inputs the weights hold or no row uses (:func:`lora_inputs`). The UNet's thread, just
    before the call (a LoRA merge writes the weights)."""
    batches = bank_inputs(batches, [s.batch.bank_full for s in streams])
    return lora_inputs(bundle, batches, [s.lora_key for s in streams])

"""A loaded model: its networks on one device, and the three calls the engine makes on them."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from diffusers import AutoencoderTiny

from livediff.exceptions import BatchCompositionError
from livediff.models.bank_tokens import DEFAULT_BANK_TOKENS, DEFAULT_REDUCE_FROM, BankTokens
from livediff.models.controlnet import LoadedControlNet, control_residuals
from livediff.models.feature_bank import BankRows, FeatureBank, attach_feature_bank
from livediff.models.image_prompts import ImagePromptEncoder
from livediff.models.ip_adapter import LoadedIPAdapter, check_ip_inputs
from livediff.models.presets import ModelPreset
from livediff.models.spec import CompileBatch, Precision, WeightsMode
from livediff.models.spec import VaeKind as VaeKind  # re-exported: defined here before
from livediff.models.unet_batch import UNetBatch
from livediff.models.unet_halves import halves_of

if TYPE_CHECKING:
    from livediff.models.control_images import PreprocessorNetworks
    from livediff.models.lora_library import LoraLibrary

VAE_SCALE_FACTOR = 8  # every supported VAE downsamples by 8


@dataclass
class ModelBundle:
    """The networks of one model on one device and dtype, ready for inference."""

    preset: ModelPreset
    unet: Any  # diffusers UNet2DConditionModel (its stubs hide config/forward from type checkers)
    vae: Any  # diffusers AutoencoderTiny (TAESD) or AutoencoderKL
    text_encoders: tuple[Any, ...]
    tokenizers: tuple[Any, ...]
    scheduler_config: dict[str, Any]
    device: torch.device
    dtype: torch.dtype
    weights: WeightsMode
    source: str
    # The ControlNets a batch's control slots feed, in slot order (UNetBatch.control_images).
    controlnets: tuple[LoadedControlNet, ...] = ()
    # The networks the depth / soft edge preprocessors run (None: none loaded).
    control_networks: PreprocessorNetworks | None = None
    # StreamV2V's feature bank on the UNet's self-attentions (None: not installed).
    feature_bank: FeatureBank | None = None
    # Per-session LoRAs: the UNet's rewritten layers and packed buffers (UNetBatch.lora_*).
    loras: LoraLibrary | None = None
    # The IP-Adapter a batch's ip_tokens / ip_scales feed (its processors are on the UNet).
    ip_adapter: LoadedIPAdapter | None = None
    # Its style images → prompt tokens, cached by content (one per model: sessions share it).
    image_prompts: ImagePromptEncoder | None = None
    # On CUDA, run the ControlNets on a second stream beside the UNet's down blocks
    # (:mod:`livediff.models.unet_halves`); False: one after the other, on one stream.
    control_overlap: bool = True
    # How the denoisers' linears compute: asked for at load (ModelSpec.precision), applied by
    # the speed recipe (models/recipe.py), which sets it to what it applied.
    precision: Precision = Precision.NATIVE
    # How compiled graphs cover the batch buckets (ModelSpec.compile_batch), for the recipe.
    compile_batch: CompileBatch = CompileBatch.PER_BUCKET

    @property
    def vae_scale_factor(self) -> int:
        return VAE_SCALE_FACTOR

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def embed_shape(self) -> tuple[int, int]:
        """(sequence length, width) of the UNet's cross-attention conditioning."""
        return 77, int(self.unet.config.cross_attention_dim)

    @property
    def pooled_dim(self) -> int | None:
        """Width of SDXL's pooled text embedding, ``None`` for other families."""
        if not self.preset.is_sdxl:
            return None
        return int(self.text_encoders[-1].config.projection_dim)

    def input_buffers(
        self, stage: str, bucket: int, like: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor] | None:
        """Where to write ``bucket`` rows of ``stage``'s inputs so the call reads them in place.

        ``stage`` is ``"unet"`` (the per-row fields of a :class:`UNetBatch`), ``"encode"`` or
        ``"decode"`` (one tensor, named ``"x"``); ``like`` gives each input's row shape and
        dtype. A model with static input buffers (CUDA graphs) returns them, so the caller's
        packing is the only copy; ``None`` (here): the caller packs into buffers of its own.
        """
        return None

    def describe(self) -> str:
        return f"{self.preset.name} ({self.weights.value} weights from {self.source}) on {self.device} {self.dtype}"

    def with_controlnets(
        self,
        controlnets: Sequence[LoadedControlNet],
        networks: PreprocessorNetworks | None = None,
    ) -> ModelBundle:
        """The same networks with ``controlnets`` as the control slots (a shallow copy), and
        the preprocessors' ``networks`` (kept when not given)."""
        return replace(
            self,
            controlnets=tuple(controlnets),
            control_networks=networks if networks is not None else self.control_networks,
        )

    def with_feature_bank(
        self,
        *,
        frames: int,
        rows: int,
        tokens: BankTokens = DEFAULT_BANK_TOKENS,
        reduce_from: int = DEFAULT_REDUCE_FROM,
    ) -> ModelBundle:
        """The same networks with a feature bank of ``rows`` session rows of up to ``frames``
        frames installed on the UNet (in place: the UNet is shared with ``self``), frames kept
        as ``tokens`` says on self-attentions of at least ``reduce_from`` tokens
        (``models/bank_tokens.py``)."""
        bank = attach_feature_bank(
            self.unet, rows=rows, frames=frames, tokens=tokens, reduce_from=reduce_from
        )
        return replace(self, feature_bank=bank)

    def with_loras(self, library: LoraLibrary | None) -> ModelBundle:
        """The same networks with ``library`` (attached to this bundle's UNet) for per-session
        LoRAs (a shallow copy)."""
        if library is not None and library.unet is not self.unet:
            raise BatchCompositionError("a LoRA library belongs to the UNet it was attached to")
        return replace(self, loras=library)

    def with_ip_adapter(self, adapter: LoadedIPAdapter) -> ModelBundle:
        """The same networks with ``adapter`` for the image-prompt inputs (a shallow copy).

        Its processors go onto the shared UNet; calls without ``ip_tokens`` give what they gave
        before (:mod:`livediff.models.ip_adapter`), so the original bundle is unaffected.
        """
        adapter.install(self.unet)
        return replace(self, ip_adapter=adapter, image_prompts=ImagePromptEncoder(adapter))

    def controlnet_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.controlnets)

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], ``[B, 3, H, W]`` → scaled latents ``[B, 4, H/8, W/8]``."""
        images = images.to(device=self.device, dtype=self.dtype)
        encoded = self.vae.encode(images)
        if isinstance(self.vae, AutoencoderTiny):
            latents = encoded.latents
        else:
            latents = encoded.latent_dist.mode()
        return latents * self.scaling_factor

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents → images in [-1, 1] (not clamped)."""
        return self.vae.decode(latents / self.scaling_factor, return_dict=False)[0]

    @torch.inference_mode()
    def predict_noise(self, batch: UNetBatch) -> torch.Tensor:
        """One UNet call over every row of ``batch``, with its ControlNets' residuals if it has
        control inputs (:func:`~livediff.models.controlnet.control_residuals`) and its image
        prompts if it has IP-Adapter inputs (:mod:`livediff.models.ip_adapter`)."""
        added = None
        if batch.text_embeds is not None:
            added = {"text_embeds": batch.text_embeds, "time_ids": batch.time_ids}
        context: Any = batch.embeds
        if batch.ip_tokens is not None or batch.ip_scales is not None:
            tokens, scales = check_ip_inputs(
                self.ip_adapter, batch.latents, batch.ip_tokens, batch.ip_scales
            )
            context = (batch.embeds, tokens, scales)  # read by RowIPAdapterAttnProcessor
        with self._bank_rows(batch), self._lora_rows(batch):
            if batch.control_images is not None or batch.control_scales is not None:
                return self._with_controlnets(batch, context, added)
            return self.unet(
                batch.latents,
                batch.timesteps,
                encoder_hidden_states=context,
                added_cond_kwargs=added,
                return_dict=False,
            )[0]

    def _with_controlnets(
        self, batch: UNetBatch, context: Any, added: dict[str, Any] | None
    ) -> torch.Tensor:
        """The UNet's halves around the ControlNets' residuals; on CUDA with
        :attr:`control_overlap` the nets run on a second stream beside the first half.

        The side stream waits for everything queued before this call and the caller's stream
        waits for the nets before the second half, so both are ordered like one stream (and
        captured as a fork and a join). The residuals are allocated on the side stream and read
        on the caller's; the allocator may reuse their memory on the side stream only, for the
        next call's nets, which first wait for the caller's stream again: no use overlaps a reuse.
        """
        halves = halves_of(self.unet)
        device = batch.latents.device
        beside = self.control_overlap and batch.latents.is_cuda
        side = halves.side_stream(device) if beside else None
        if side is not None:
            side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            down, mid = control_residuals(
                self.controlnets,
                batch.latents,
                batch.timesteps,
                batch.embeds,
                added,
                batch.control_images,
                batch.control_scales,
            )
        first = halves.down(batch.latents, batch.timesteps, context, added)
        if side is not None:
            torch.cuda.current_stream(device).wait_stream(side)
        return halves.up(*first, down, mid)

    @torch.inference_mode()
    def make_bank_pools(self, batch: UNetBatch) -> None:
        """Allocate the feature bank's pools for ``batch``'s latent size with one eager UNet
        call (``torch.compiler.set_stance("force_eager")``) that keeps and reads nothing.

        Each banked attention makes its pool on the first call with a token count; made inside
        a compiled call, that changes what dynamo guarded on, and the next call compiles the
        whole UNet again (on an H200 that doubled the bank bundle's compile, past 190 s).
        Call it before the first compiled call at a latent size. The call's rows use the empty
        slot only (slot 0, no frame held, writes to entry 0): no session's bank changes.
        """
        if self.feature_bank is None:
            return
        rows = batch.rows
        device = batch.latents.device
        frames = self.feature_bank.frames
        empty = replace(
            batch,
            bank_slots=torch.zeros(rows, dtype=torch.long, device=device),
            bank_frames=torch.zeros(rows, frames, dtype=batch.latents.dtype, device=device),
            bank_write=torch.zeros(rows, dtype=torch.long, device=device),
            bank_fusion=torch.zeros(rows, 2, dtype=batch.latents.dtype, device=device),
        )
        with torch.compiler.set_stance("force_eager"):
            ModelBundle.predict_noise(self, empty)

    def _bank_rows(self, batch: UNetBatch) -> AbstractContextManager[None]:
        """The rows' feature bank inputs for one call (none: a no-op context)."""
        if self.feature_bank is None or batch.bank_slots is None:
            return contextlib.nullcontext()
        assert batch.bank_write is not None and batch.bank_fusion is not None
        return self.feature_bank.serving(
            BankRows(
                batch.bank_slots,
                batch.bank_frames,
                batch.bank_write,
                batch.bank_fusion,
                grid=(batch.latents.shape[-2], batch.latents.shape[-1]),
            )
        )

    def _lora_rows(self, batch: UNetBatch) -> Any:
        """The rows' per-session LoRAs applied for one call (none: a no-op context)."""
        if self.loras is not None:
            return self.loras.rows(batch.lora_indices, batch.lora_scales)
        if batch.lora_indices is not None:
            raise BatchCompositionError(
                "a batch with per-session LoRA rows reached a model without a LoRA library",
                field="lora_indices",
            )
        return contextlib.nullcontext()

"""The UNet in two halves around the ControlNet residuals, so the ControlNets can run beside the
first half on a second CUDA stream.

diffusers' ``UNet2DConditionModel`` adds a ControlNet's residuals only after its last down
block (to the skip connections) and after its middle block. Everything before — the time
embedding, ``conv_in`` and the down blocks — does not depend on them, and neither does the
ControlNet depend on it: both read the same latents, timesteps and prompt. So a step with
ControlNets is

- :attr:`UNetHalves.down`: time embedding, ``conv_in``, the down blocks → the sample, the skip
  connections, the embedding and the (processed) prompt conditioning;
- the ControlNets, at the same time, on :meth:`UNetHalves.side_stream` (CUDA);
- :attr:`UNetHalves.up`: the residuals added, the middle block, the up blocks, the output.

At batch 1 neither half fills an H200 (their GEMMs and convolutions have too few rows for 132
multiprocessors), so the two streams overlap on the device; inside a CUDA graph the fork and
the join are edges of the graph. Both halves are transcriptions of diffusers 0.42's
``UNet2DConditionModel.forward`` for the configurations livediff loads (no class labels,
attention masks, ``timestep_cond``, GLIGEN or T2I adapters, no ``image_hint`` embedding): the
tests check ``up(down(…))`` against ``unet(…)`` with and without residuals.

Each half is compiled like the UNet (:func:`install` with the recipe's options); a UNet
prepared without a recipe gets eager halves on first use (:func:`halves_of`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from livediff.exceptions import ModelLoadError

ATTRIBUTE = "_livediff_halves"
Down = tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor, Any]


def unsupported(unet: Any) -> list[str]:
    """What of ``unet``'s configuration the halves do not transcribe (empty: none)."""
    found = []
    if unet.config.class_embed_type is not None:
        found.append("class embeddings")
    if unet.config.addition_embed_type == "image_hint":
        found.append("an image_hint embedding")
    if getattr(unet, "position_net", None) is not None:
        found.append("GLIGEN")
    return found


class UNetHalves:
    """:attr:`down` and :attr:`up` of one UNet (its own modules: nothing is copied); both are
    :meth:`run_down` / :meth:`run_up`, or their compiled versions (:func:`install`)."""

    def __init__(self, unet: Any) -> None:
        found = unsupported(unet)
        if found:
            raise ModelLoadError(
                f"this UNet has {' and '.join(found)}: livediff runs ControlNets on UNets "
                "without them"
            )
        self.unet = unet
        self.down: Callable[..., Down] = self.run_down
        self.up: Callable[..., torch.Tensor] = self.run_up
        self._side: dict[int, torch.cuda.Stream] = {}  # per device index, made on first use

    def run_down(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: Any,
        added_cond_kwargs: dict[str, Any] | None,
    ) -> Down:
        unet = self.unet
        if unet.config.center_input_sample:
            sample = 2 * sample - 1.0
        t_emb = unet.get_time_embed(sample=sample, timestep=timestep)
        emb = unet.time_embedding(t_emb, None)
        aug_emb = unet.get_aug_embed(
            emb=emb,
            encoder_hidden_states=encoder_hidden_states,
            added_cond_kwargs=added_cond_kwargs,
        )
        emb = emb + aug_emb if aug_emb is not None else emb
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        context = unet.process_encoder_hidden_states(
            encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs
        )
        sample = unet.conv_in(sample)
        skips: tuple[torch.Tensor, ...] = (sample,)
        for block in unet.down_blocks:
            if getattr(block, "has_cross_attention", False):
                sample, res = block(hidden_states=sample, temb=emb, encoder_hidden_states=context)
            else:
                sample, res = block(hidden_states=sample, temb=emb)
            skips += res
        return sample, skips, emb, context

    def run_up(
        self,
        sample: torch.Tensor,
        skips: tuple[torch.Tensor, ...],
        emb: torch.Tensor,
        context: Any,
        down_residuals: Sequence[torch.Tensor] | None,
        mid_residual: torch.Tensor | None,
    ) -> torch.Tensor:
        unet = self.unet
        if down_residuals is not None:
            skips = tuple(s + r for s, r in zip(skips, down_residuals, strict=True))
        if unet.mid_block is not None:
            if getattr(unet.mid_block, "has_cross_attention", False):
                sample = unet.mid_block(sample, emb, encoder_hidden_states=context)
            else:
                sample = unet.mid_block(sample, emb)
        if mid_residual is not None:
            sample = sample + mid_residual
        factor = 2**unet.num_upsamplers
        forward_upsample_size = any(d % factor != 0 for d in skips[0].shape[-2:])
        upsample_size = None
        for i, block in enumerate(unet.up_blocks):
            is_final = i == len(unet.up_blocks) - 1
            res = skips[-len(block.resnets) :]
            skips = skips[: -len(block.resnets)]
            if not is_final and forward_upsample_size:
                upsample_size = skips[-1].shape[2:]
            if getattr(block, "has_cross_attention", False):
                sample = block(
                    hidden_states=sample,
                    temb=emb,
                    res_hidden_states_tuple=res,
                    encoder_hidden_states=context,
                    upsample_size=upsample_size,
                )
            else:
                sample = block(
                    hidden_states=sample,
                    temb=emb,
                    res_hidden_states_tuple=res,
                    upsample_size=upsample_size,
                )
        if unet.conv_norm_out:
            sample = unet.conv_norm_out(sample)
            sample = unet.conv_act(sample)
        return unet.conv_out(sample)

    def side_stream(self, device: torch.device) -> torch.cuda.Stream:
        """The second stream the ControlNets run on (one per UNet and device)."""
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in self._side:
            self._side[index] = torch.cuda.Stream(device=index)
        return self._side[index]


def install(unet: Any, compile_options: dict[str, Any] | None) -> UNetHalves:
    """Give ``unet`` its halves, compiled with ``compile_options`` (``None``: eager)."""
    halves = UNetHalves(unet)
    if compile_options is not None:
        halves.down = torch.compile(halves.run_down, **compile_options)
        halves.up = torch.compile(halves.run_up, **compile_options)
    setattr(unet, ATTRIBUTE, halves)
    return halves


def halves_of(unet: Any) -> UNetHalves:
    """``unet``'s halves: the installed ones, or eager ones installed now."""
    halves = getattr(unet, ATTRIBUTE, None)
    if isinstance(halves, UNetHalves):
        return halves
    return install(unet, None)

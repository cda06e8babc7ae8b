"""ONNX graphs of a bundle's UNet and VAE halves, with dynamic batch and spatial axes.

This is the first half of the TensorRT backend (:mod:`livediff.models.tensorrt_engine`), and
is useful alone: the graphs run in onnxruntime too. Each graph is written to its own folder
(``<folder>/<graph>/model.onnx``) because a graph over 2 GB keeps its weights in external
files beside it. The graph's dtype is the bundle's (fp16 or fp32); opset 17 or later.

Naming contract (names, shapes and dtypes; ``B`` batch, ``h``/``w`` latent height/width,
``H = 8h``/``W = 8w`` image height/width; "model" is the bundle's dtype):

``unet``
    inputs  ``sample`` [B, 4, h, w] model · ``timestep`` [B] float32 ·
    ``encoder_hidden_states`` [B, 77, D] model; SDXL presets add ``text_embeds`` [B, P]
    model and ``time_ids`` [B, 6] model.
    output  ``noise_pred`` [B, 4, h, w] model.
``vae_encoder``
    input ``images`` [B, 3, H, W] model in [-1, 1] · output ``latents`` [B, 4, h, w] model,
    already multiplied by the VAE's scaling factor (what :meth:`ModelBundle.encode` returns).
``vae_decoder``
    input ``latents`` [B, 4, h, w] model, scaled · output ``images`` [B, 3, H, W] model in
    [-1, 1], not clamped (what :meth:`ModelBundle.decode` returns).

Dynamic axes are named ``batch``, ``latent_height``, ``latent_width``, ``image_height`` and
``image_width``; image sides must be multiples of 8. The timestep is float32 whatever the
model dtype: diffusers computes the timestep embedding in float32, and a float input keeps
int64 out of the engine.

The exporter is PyTorch's TorchScript tracer (``dynamo=False``): it needs no ``onnxscript``
and traces diffusers' UNet as is. Tracing records one path through Python control flow, so
the UNet is traced at a latent size that is *not* a multiple of its upsampling factor: that
takes diffusers' path which upsamples to the skip connection's size, read from the tensors
at run time, so the graph is right for every size (at multiples it equals the default ×2).
The bundle must be unmodified (no ``torch.compile``, no VAE slicing or tiling).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import torch

from livediff.exceptions import ParameterError
from livediff.models.bundle import ModelBundle

log = logging.getLogger(__name__)
OPSET = 17
EXPORT_VERSION = 1  # bump when a graph below changes: it is part of the engine cache key
SEQUENCE_LENGTH = 77
TIME_IDS = 6


class GraphName(str, Enum):
    UNET = "unet"
    VAE_ENCODER = "vae_encoder"
    VAE_DECODER = "vae_decoder"


@dataclass(frozen=True)
class OnnxGraph:
    """One exported graph: where it is and its input and output names, in order."""

    name: GraphName
    path: Path
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def unet_input_names(bundle: ModelBundle) -> tuple[str, ...]:
    names = ("sample", "timestep", "encoder_hidden_states")
    return (*names, "text_embeds", "time_ids") if bundle.preset.is_sdxl else names


def io_names(bundle: ModelBundle, graph: GraphName) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(inputs, outputs) of ``graph`` for ``bundle``, as the contract above names them."""
    if graph is GraphName.UNET:
        return unet_input_names(bundle), ("noise_pred",)
    if graph is GraphName.VAE_ENCODER:
        return ("images",), ("latents",)
    return ("latents",), ("images",)


class _UNet(torch.nn.Module):
    def __init__(self, unet: Any, sdxl: bool) -> None:
        super().__init__()
        self.unet, self.sdxl = unet, sdxl

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, *conditioning: Any) -> Any:
        added = None
        if self.sdxl:
            added = {"text_embeds": conditioning[1], "time_ids": conditioning[2]}
        return self.unet(
            sample,
            timestep,
            encoder_hidden_states=conditioning[0],
            added_cond_kwargs=added,
            return_dict=False,
        )[0]


class _VaeEncoder(torch.nn.Module):
    def __init__(self, vae: Any, scaling_factor: float) -> None:
        super().__init__()
        self.vae, self.scaling_factor = vae, scaling_factor

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        encoded = self.vae.encode(images)
        latents = encoded.latents if hasattr(encoded, "latents") else encoded.latent_dist.mode()
        return latents * self.scaling_factor


class _VaeDecoder(torch.nn.Module):
    def __init__(self, vae: Any, scaling_factor: float) -> None:
        super().__init__()
        self.vae, self.scaling_factor = vae, scaling_factor

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.scaling_factor, return_dict=False)[0]


def _check_bundle(bundle: ModelBundle) -> None:
    if bundle.dtype not in (torch.float16, torch.float32):
        raise ParameterError(f"ONNX export supports fp16 and fp32 models, not {bundle.dtype}")
    if getattr(bundle.vae, "use_slicing", False) or getattr(bundle.vae, "use_tiling", False):
        raise ParameterError("ONNX export needs a VAE without slicing or tiling")


def _trace_latent_size(bundle: ModelBundle) -> tuple[int, int]:
    """A small latent size off the upsampling grid (see the module docstring), height ≠ width."""
    factor = 2 ** int(bundle.unet.num_upsamplers)
    return 2 * factor + 1, 3 * factor + 1


def _example_inputs(
    bundle: ModelBundle, graph: GraphName, latent: tuple[int, int]
) -> tuple[torch.Tensor, ...]:
    opts: dict[str, Any] = {"device": bundle.device, "dtype": bundle.dtype}
    generator = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator).to(**opts)

    batch, (h, w) = 2, latent
    if graph is GraphName.VAE_ENCODER:
        factor = bundle.vae_scale_factor
        return (randn(batch, 3, h * factor, w * factor).clamp(-1, 1),)
    if graph is GraphName.VAE_DECODER:
        return (randn(batch, 4, h, w),)
    seq, dim = bundle.embed_shape
    timestep = torch.tensor([999.0, 499.0], device=bundle.device)
    inputs = [randn(batch, 4, h, w), timestep, randn(batch, seq, dim)]
    if bundle.preset.is_sdxl:
        assert bundle.pooled_dim is not None
        inputs += [randn(batch, bundle.pooled_dim), randn(batch, TIME_IDS).abs() * 512]
    return tuple(inputs)


def _dynamic_axes(graph: GraphName, names: tuple[str, ...]) -> dict[str, dict[int, str]]:
    latent = {0: "batch", 2: "latent_height", 3: "latent_width"}
    image = {0: "batch", 2: "image_height", 3: "image_width"}
    if graph is GraphName.UNET:
        axes = {name: {0: "batch"} for name in names}
        axes["sample"] = axes["noise_pred"] = latent
        return axes
    if graph is GraphName.VAE_ENCODER:
        return {"images": image, "latents": latent}
    return {"latents": latent, "images": image}


def _module(bundle: ModelBundle, graph: GraphName) -> torch.nn.Module:
    if graph is GraphName.UNET:
        return _UNet(bundle.unet, bundle.preset.is_sdxl)
    wrapper = _VaeEncoder if graph is GraphName.VAE_ENCODER else _VaeDecoder
    return wrapper(bundle.vae, bundle.scaling_factor)


def export_graph(
    bundle: ModelBundle, graph: GraphName, folder: str | Path, *, opset: int = OPSET
) -> OnnxGraph:
    """Export one graph of ``bundle`` to ``folder/<graph>/model.onnx``; returns where and how.

    Raises :class:`ParameterError` for a bundle the contract does not cover (a dtype other
    than fp16/fp32, a VAE with slicing or tiling, opset < 17).
    """
    _check_bundle(bundle)
    if opset < OPSET:
        raise ParameterError(f"opset={opset}: the graphs need opset {OPSET} or later")
    graph = GraphName(graph)
    inputs, outputs = io_names(bundle, graph)
    path = Path(folder) / graph.value / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    module = _module(bundle, graph).eval()
    example = _example_inputs(bundle, graph, _trace_latent_size(bundle))
    with warnings.catch_warnings(), torch.no_grad():
        # The tracer warns about every Python-side shape check in diffusers, and that the
        # TorchScript exporter is legacy; the size contract above is what makes them safe.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message="Constant folding")  # strided slices stay
        torch.onnx.export(
            module,
            example,
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=list(inputs),
            output_names=list(outputs),
            dynamic_axes=_dynamic_axes(graph, inputs + outputs),
            do_constant_folding=True,
        )
    log.info("exported %s of %s to %s", graph.value, bundle.preset.name, path)
    return OnnxGraph(graph, path, inputs, outputs)


def export_graphs(
    bundle: ModelBundle,
    folder: str | Path,
    *,
    graphs: tuple[GraphName, ...] = tuple(GraphName),
    opset: int = OPSET,
) -> dict[GraphName, OnnxGraph]:
    """Export each of ``graphs`` (default: all three) of ``bundle`` under ``folder``."""
    return {graph: export_graph(bundle, graph, folder, opset=opset) for graph in graphs}

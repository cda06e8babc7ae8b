"""Soft edges for the soft-edge (HED) ControlNets: ControlNet's HED network, batched on the device.

The network is the one of ControlNet's HED annotator (``ControlNetHED_Apache2``): five VGG-like
blocks of 3×3 convolutions (64, 128, 256, 512, 512 channels, max-pooled between blocks), each
with a 1×1 side output; the five side outputs, resized to the image, are averaged and passed
through a sigmoid. Its input is RGB in [0, 255] minus a learnt per-channel offset.

Weights: ``source="random"`` builds it with seeded random weights (speed runs and tests: the
edges are then meaningless but the shape, range and cost are the real ones); a ``.pth`` or
``.safetensors`` file with the annotator's state dict (``ControlNetHED.pth`` of
``lllyasviel/Annotators``: keys ``norm``, ``block1.convs.0.weight`` …) loads the real
network. PiDiNet weights are a different network and are not read here.

:meth:`SoftEdgeDetector.__call__`: ``[N, 3, H, W]`` in [0, 1] → ``[N, 3, H, W]`` in [0, 1],
white edges on black, the three channels equal.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from livediff.exceptions import KernelInputError, ModelLoadError

log = logging.getLogger(__name__)
BLOCKS = ((3, 64, 2), (64, 128, 2), (128, 256, 3), (256, 512, 3), (512, 512, 3))


class DoubleConvBlock(nn.Module):
    """``layers`` 3×3 convolutions with ReLU, optionally after a 2×2 max-pool, and a side output."""

    def __init__(self, in_channels: int, out_channels: int, layers: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1))
        for _ in range(1, layers):
            self.convs.append(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.projection = nn.Conv2d(out_channels, 1, kernel_size=1)

    def forward(
        self, x: torch.Tensor, down_sampling: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if down_sampling:
            x = F.max_pool2d(x, kernel_size=2, stride=2)
        for conv in self.convs:
            x = F.relu(conv(x))
        return x, self.projection(x)


class HEDNetwork(nn.Module):
    """ControlNet's HED annotator network; returns the five side outputs (logits)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.Parameter(torch.zeros(1, 3, 1, 1))
        for i, (cin, cout, layers) in enumerate(BLOCKS, start=1):
            self.add_module(f"block{i}", DoubleConvBlock(cin, cout, layers))

    def forward(self, rgb255: torch.Tensor) -> list[torch.Tensor]:
        h = rgb255 - self.norm
        sides = []
        for i in range(1, len(BLOCKS) + 1):
            h, side = getattr(self, f"block{i}")(h, down_sampling=i > 1)
            sides.append(side)
        return sides


@dataclass
class SoftEdgeDetector:
    """The HED network on one device and dtype; call it on a batch of images."""

    net: HEDNetwork
    source: str
    device: torch.device
    dtype: torch.dtype

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, 3, H, W]`` in [0, 1] → soft edges ``[N, 3, H, W]`` in [0, 1]."""
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise KernelInputError(
                f"expected float RGB images [N, 3, H, W] in [0, 1], got {images.dtype} "
                f"{tuple(images.shape)}",
                field="images",
            )
        size = tuple(images.shape[-2:])
        sides = self.net(images.to(device=self.device, dtype=self.dtype) * 255)
        resized = [F.interpolate(s, size=size, mode="bilinear", align_corners=False) for s in sides]
        edges = torch.sigmoid(torch.stack(resized).mean(dim=0))
        return edges.expand(-1, 3, -1, -1).contiguous()


def _read_weights(path: str) -> dict[str, torch.Tensor]:
    if not os.path.exists(path):
        raise ModelLoadError(f"soft edge weights not found: {path}", field="soft_edge")
    try:
        if path.endswith(".safetensors"):
            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise ModelLoadError(f"soft edge weights {path} cannot be read: {exc}") from exc


def load_soft_edge_detector(
    source: str = "random",
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> SoftEdgeDetector:
    """``"random"`` (seeded) or a file with ControlNet's HED weights (``ControlNetHED.pth``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = HEDNetwork()
    if source != "random":
        state = _read_weights(source)
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ModelLoadError(
                f"{source} is not ControlNet's HED network (ControlNetHED.pth): {str(exc)[:300]}",
                field="soft_edge",
            ) from exc
    described = source if source != "random" else f"random init (seed {seed})"
    net = net.to(device=device, dtype=dtype).eval().requires_grad_(False)
    log.info("soft edge detector: HED (%s) on %s %s", described, device, dtype)
    return SoftEdgeDetector(net=net, source=described, device=torch.device(device), dtype=dtype)

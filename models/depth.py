"""Depth maps for the depth ControlNets: Depth Anything V2 Small, batched, pre- and post-processing in torch.

The network is transformers' ``DepthAnythingForDepthEstimation`` with the architecture of
``depth-anything/Depth-Anything-V2-Small-hf`` (DINOv2-S/14 backbone, features from layers
3, 6, 9 and 12, DPT head), written out in :func:`depth_anything_v2_small_config` so that
``source="random"`` builds it offline with seeded random weights (speed runs, tests). Real
weights come from that HF id (the HF cache; downloaded unless offline) or a saved folder.

:meth:`DepthEstimator.__call__` takes images ``[N, 3, H, W]`` in [0, 1] on the device and
gives ``[N, 3, H, W]`` in [0, 1], near bright, far dark, what the depth ControlNets expect:

1. resize (bicubic) so that both sides reach 518 with the aspect ratio kept, each side a
   multiple of the patch size 14 (the rule of the model's image processor: "keep aspect
   ratio", "ensure multiple of 14", scaling as little as possible);
2. ImageNet normalisation (mean 0.485 0.456 0.406, std 0.229 0.224 0.225);
3. the network: relative inverse depth at that size;
4. resize back (bicubic), then each image scaled to [0, 1] by its own minimum and maximum
   (no host sync: the extremes stay on the device), and repeated on 3 channels.

The model's image processor resizes with PIL's bicubic filter; here it is torch's (OpenCV's
``INTER_CUBIC`` kernel, which Depth Anything's own code uses), so pixel values differ a little
from the processor's where the resize is not the identity.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub import constants as hf_constants
from transformers import AutoModelForDepthEstimation, DepthAnythingConfig, Dinov2Config

from livediff.exceptions import KernelInputError
from livediff.models.fetch import fetch

log = logging.getLogger(__name__)
DEPTH_ANYTHING_V2_SMALL = "depth-anything/Depth-Anything-V2-Small-hf"
INPUT_SIZE = 518
PATCH = 14
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def depth_anything_v2_small_config() -> DepthAnythingConfig:
    """The architecture of ``depth-anything/Depth-Anything-V2-Small-hf`` (its config.json)."""
    backbone: dict[str, Any] = {  # a dict: the type stubs lack the backbone keys
        "image_size": INPUT_SIZE,
        "patch_size": PATCH,
        "hidden_size": 384,
        "num_attention_heads": 6,
        "num_hidden_layers": 12,
        "mlp_ratio": 4,
        "out_indices": [3, 6, 9, 12],
        "out_features": ["stage3", "stage6", "stage9", "stage12"],
        "reshape_hidden_states": False,
    }
    return DepthAnythingConfig(
        backbone_config=Dinov2Config(**backbone),
        patch_size=PATCH,
        reassemble_hidden_size=384,
        reassemble_factors=[4, 2, 1, 0.5],
        neck_hidden_sizes=[48, 96, 192, 384],
        fusion_hidden_size=64,
        head_hidden_size=32,
        head_in_index=-1,
        depth_estimation_type="relative",
    )


def network_input_size(height: int, width: int) -> tuple[int, int]:
    """(height, width) the network sees for an image of ``height`` × ``width``."""
    scale_h, scale_w = INPUT_SIZE / height, INPUT_SIZE / width
    if abs(1 - scale_w) < abs(1 - scale_h):
        scale_h = scale_w
    else:
        scale_w = scale_h
    return _multiple_of_patch(scale_h * height), _multiple_of_patch(scale_w * width)


def _multiple_of_patch(value: float) -> int:
    size = round(value / PATCH) * PATCH
    return size if size > 0 else PATCH


@dataclass
class DepthEstimator:
    """Depth Anything on one device and dtype; call it on a batch of images."""

    net: Any
    source: str
    device: torch.device
    dtype: torch.dtype

    def __post_init__(self) -> None:
        opts: dict[str, Any] = {"device": self.device, "dtype": self.dtype}
        self._mean = torch.tensor(IMAGENET_MEAN, **opts).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, **opts).view(1, 3, 1, 1)

    def network_input(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, 3, H, W]`` in [0, 1] → the normalised ``pixel_values`` the network takes."""
        size = network_input_size(images.shape[-2], images.shape[-1])
        x = images.to(device=self.device, dtype=self.dtype)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False)
        return (x - self._mean) / self._std

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, 3, H, W]`` in [0, 1] → depth ``[N, 3, H, W]`` in [0, 1] (near is 1)."""
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise KernelInputError(
                f"expected float RGB images [N, 3, H, W] in [0, 1], got {images.dtype} "
                f"{tuple(images.shape)}",
                field="images",
            )
        height, width = images.shape[-2:]
        depth = self.net(pixel_values=self.network_input(images)).predicted_depth[:, None]
        depth = F.interpolate(depth, size=(height, width), mode="bicubic", align_corners=False)
        return normalise_per_image(depth).expand(-1, 3, -1, -1).contiguous()


def normalise_per_image(maps: torch.Tensor) -> torch.Tensor:
    """Each ``[1, H, W]`` map of ``[N, 1, H, W]`` to [0, 1] by its own extremes (a flat map: 0)."""
    low = maps.amin(dim=(1, 2, 3), keepdim=True)
    high = maps.amax(dim=(1, 2, 3), keepdim=True)
    return ((maps - low) / (high - low).clamp_min(1e-6)).clamp(0, 1)


def load_depth_estimator(
    source: str = "random",
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    offline: bool | None = None,
) -> DepthEstimator:
    """``"random"`` (the V2 Small architecture, seeded), an HF id, or a saved folder.

    ``offline`` defaults to ``HF_HUB_OFFLINE``: then an HF id is read from the cache only.
    """
    if source == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = AutoModelForDepthEstimation.from_config(depth_anything_v2_small_config())
        described = f"random init (seed {seed})"
    else:
        net = fetch(
            "depth model",
            source,
            bool(hf_constants.HF_HUB_OFFLINE) if offline is None else offline,
            lambda local: AutoModelForDepthEstimation.from_pretrained(
                source, local_files_only=local
            ),
            without_weights="depth source 'random'",
        )
        described = source
    net = net.to(device=device, dtype=dtype).eval().requires_grad_(False)
    log.info("depth estimator: Depth Anything V2 Small (%s) on %s %s", described, device, dtype)
    return DepthEstimator(net=net, source=described, device=torch.device(device), dtype=dtype)

"""Client control images in the engine: kept per session per net, through new Streams.

The websocket and data-channel tests prove the protocol and the frames; here the engine's
rules: a session keeps its images when its Stream is rebuilt at a lower resolution (and the
image is fitted down there as frames are), a txt2img session may feed a net client images,
and a refused image changes nothing the session keeps.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from livediff.engine.client_control import (
    MAX_IMAGE_BYTES,
    awaiting,
    decode_control_image,
    place_control_image,
)
from livediff.engine.config import GenerationMode, GenerationParams, StreamConfig
from livediff.engine.degrade import DegradeLevel, DegradePolicy
from livediff.engine.session_plans import SwapStream, build_plan, carry_control_images, replan
from livediff.exceptions import FrameTooLargeError, InvalidFrameError, ParameterError
from livediff.models.bundle import ModelBundle
from livediff.models.control_uses import ControlNetSpec
from livediff.models.controlnet_loading import load_controlnet

CONFIG = StreamConfig(width=128, height=128)
POLICY = DegradePolicy(resolution_scale=0.5, min_side=64)
PARAMS = GenerationParams(strength=0.5, steps=1, controlnets=("pose:1:client", "edges:1:canny"))


@pytest.fixture(scope="module")
def controlled(tiny_bundle: ModelBundle) -> ModelBundle:
    nets = [
        load_controlnet(ControlNetSpec("random", name=name, seed=seed), tiny_bundle)
        for name, seed in (("edges", 1), ("pose", 2))
    ]
    return tiny_bundle.with_controlnets(nets)


def skeleton() -> np.ndarray:
    image = np.zeros((64, 64, 3), np.uint8)
    image[10:50, 30:34] = 255
    return image


def test_images_are_kept_through_a_lower_resolution_and_a_rebuild(
    controlled: ModelBundle,
) -> None:
    plan = build_plan(controlled, CONFIG, PARAMS, DegradeLevel.NORMAL, POLICY, "s")
    assert awaiting(plan.requested, controlled, plan.control_images) == ["pose"]
    item, waiting = place_control_image(plan, controlled, "pose", skeleton())
    assert (item.slot, waiting) == (1, [])  # pose is the second loaded net
    item.stream.set_client_image(item.slot, item.image)  # what the worker does
    assert item.stream.batch._scales_next is not None
    assert item.stream.batch._scales_next.tolist() == [1.0, 1.0]  # pose starts with its image
    swap = replan(plan, PARAMS, DegradeLevel.LOWER_RESOLUTION, POLICY, controlled, "s")
    assert isinstance(swap, SwapStream) and (swap.stream.width, swap.stream.height) == (64, 64)
    torch.testing.assert_close(swap.stream.client_images[1], item.image)  # full size, kept
    images = swap.stream._control.images(  # what the 64×64 Stream feeds its rows
        (64, 64),
        torch.zeros(1, 3, 64, 64),
        None,
        rows=1,
        like=torch.zeros(1),
        client=swap.stream.client_images,
    )
    down = F.interpolate(item.image, size=(64, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(images[0, 1], down[0])
    rebuilt = build_plan(controlled, CONFIG, PARAMS, DegradeLevel.NORMAL, POLICY, "s")
    carry_control_images(plan, rebuilt)  # a Stream lost to a fault keeps its images too
    torch.testing.assert_close(rebuilt.stream.client_images[1], item.image)


def test_a_txt2img_session_may_feed_a_net_client_images(controlled: ModelBundle) -> None:
    txt2img = StreamConfig(width=128, height=128, mode=GenerationMode.TXT2IMG)
    params = GenerationParams(steps=1, controlnets=("pose:0.7:client",))
    plan = build_plan(controlled, txt2img, params, DegradeLevel.NORMAL, POLICY, "t")
    item, _ = place_control_image(plan, controlled, "pose", skeleton())
    item.stream.set_client_image(item.slot, item.image)
    assert len(item.stream.process(None)) == 1


def test_a_refused_image_changes_nothing(controlled: ModelBundle) -> None:
    plan = build_plan(controlled, CONFIG, PARAMS, DegradeLevel.NORMAL, POLICY, "r")
    first, _ = place_control_image(plan, controlled, "pose", skeleton())
    with pytest.raises(InvalidFrameError, match="does not decode") as bad:
        place_control_image(plan, controlled, "pose", b"\x89PNG broken")
    assert bad.value.field == "control_image"
    with pytest.raises(InvalidFrameError, match=r"uint8 RGB \[H, W, 3\]"):
        place_control_image(plan, controlled, "pose", np.zeros((8, 8), np.uint8))
    with pytest.raises(ParameterError, match="does not feed controlnet 'edges'"):
        place_control_image(plan, controlled, "edges", skeleton())
    assert list(plan.control_images) == [1] and plan.control_images[1] is first.image


def test_an_image_over_16_mib_is_refused_before_decoding() -> None:
    with pytest.raises(FrameTooLargeError, match="at most 16777216") as refused:
        decode_control_image(b"\x89PNG" + bytes(MAX_IMAGE_BYTES))
    assert refused.value.field == "control_image" and refused.value.limit == MAX_IMAGE_BYTES

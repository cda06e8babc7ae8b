"""Control previews read the control image each net took for the newest frame of a Stream.

:func:`livediff.engine.control_previews.read_previews` reads the Stream Batch's own UNet
inputs; the reference is written out: a passthrough net's image is the frame itself, a canny
net's is OpenCV's Canny of it, for the frame pushed last, whatever the steps, the denoising
batch or the guidance rows (an older frame's image is still in the buffer, in other rows).
"""

from __future__ import annotations

import numpy as np
import pytest

from livediff.engine.config import GenerationParams, RCFGMode, StreamConfig
from livediff.engine.control_previews import read_previews
from livediff.engine.stream import Stream
from livediff.models.bundle import ModelBundle
from livediff.models.control_uses import CannyParams, ControlNetSpec, ControlUse
from livediff.models.controlnet_loading import load_controlnet

cv2 = pytest.importorskip("cv2")
from helpers.canny_reference import opencv_canny, scene  # noqa: E402  (after the cv2 skip)

SIZE = 128
CANNY = CannyParams(low=60, high=140, sigma=1.0)


@pytest.fixture(scope="module")
def controlled(tiny_bundle: ModelBundle) -> ModelBundle:
    nets = [
        load_controlnet(ControlNetSpec("random", name=name, seed=seed), tiny_bundle)
        for name, seed in (("edges", 1), ("tile", 2), ("pose", 3))
    ]
    return tiny_bundle.with_controlnets(nets)


@pytest.mark.parametrize(
    ("steps", "batched", "rcfg"),
    [
        (3, True, RCFGMode.NONE),
        (2, True, RCFGMode.FULL),
        (2, False, RCFGMode.SELF),
        (1, True, RCFGMode.NONE),
    ],
)
def test_each_net_previews_the_image_it_took_for_the_newest_frame(
    controlled: ModelBundle, steps: int, batched: bool, rcfg: RCFGMode
) -> None:
    config = StreamConfig(width=SIZE, height=SIZE, use_denoising_batch=batched, rcfg=rcfg)
    uses = (
        ControlUse(controlnet="tile", scale=0.5, preprocessor="passthrough"),
        ControlUse(controlnet="edges", scale=1.0, preprocessor="canny", params=CANNY),
        ControlUse(controlnet="pose", scale=1.0, preprocessor="client"),  # no image: no preview
    )
    params = GenerationParams(prompt="a fox", guidance_scale=1.5, steps=steps, controlnets=uses)
    stream = Stream(controlled, config, params)
    assert list(read_previews(stream, controlled)) == ["tile", "edges"]  # before a frame too
    for seed in range(4):
        frame = scene(seed, SIZE, SIZE)
        stream.process(frame)
        previews = read_previews(stream, controlled)
        assert list(previews) == ["tile", "edges"]
        assert np.abs(previews["tile"].astype(int) - frame.astype(int)).max() <= 1
        edges = opencv_canny(frame, CANNY.low, CANNY.high, CANNY.sigma)
        np.testing.assert_array_equal(previews["edges"], np.repeat(edges[..., None] * 255, 3, 2))


def test_a_model_without_controlnets_has_no_preview(tiny_bundle: ModelBundle) -> None:
    stream = Stream(tiny_bundle, StreamConfig(width=SIZE, height=SIZE), GenerationParams())
    stream.process(scene(0, SIZE, SIZE))
    assert read_previews(stream, tiny_bundle) == {}

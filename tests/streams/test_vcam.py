"""The virtual camera (through pyvirtualcam's registered Y4M test backend) and ``livediff camera``.

The browser half of the loop — the Y4M written here played as Chromium's camera — is in
``tests/browser/test_browser.py``.
"""

from __future__ import annotations

import glob
from pathlib import Path

import numpy as np
import pytest

from helpers.streams_testing import (
    TEST_RUNTIME,
    distance,
    pattern,
    read_video,
    reference_output,
    visible_tiny_bundle,
    write_y4m,
)
from livediff.cli import main
from livediff.engine.runtime import Engine
from livediff.exceptions import MediaError
from livediff.models.bundle import ModelBundle
from livediff.streams.camera_source import CameraSource
from livediff.streams.local_pipeline import run_local_pipeline
from livediff.streams.vcam import VirtualCamera

VIDEO_DEVICES = sorted(glob.glob("/dev/video*"))
FOX = {"prompt": "a red fox", "seed": 11}
WHALE = {"prompt": "a blue whale", "seed": 22}


@pytest.fixture(scope="module")
def bundle() -> ModelBundle:
    return visible_tiny_bundle()


def test_y4m_backend_writes_what_the_camera_is_sent(tmp_path: Path) -> None:
    frames = [pattern(64, 48, seed) for seed in range(5)]
    with VirtualCamera(64, 48, fps=15, backend="y4m", device=str(tmp_path / "cam.y4m")) as camera:
        for image in frames:
            camera.send(image)
        assert (camera.backend, camera.device, camera.frames_sent) == (
            "y4m",
            str(tmp_path / "cam.y4m"),
            5,
        )
        with pytest.raises(MediaError, match="64x48"):
            camera.send(np.zeros((10, 10, 3), np.uint8))
    back = read_video(tmp_path / "cam.y4m")
    assert len(back) == 5
    for index, image in enumerate(back):  # in order, each the frame sent (up to yuv420p rounding)
        nearest = min(range(5), key=lambda k: distance(image, frames[k]))
        assert nearest == index and distance(image, frames[index]) < 10


def test_unknown_backend_is_refused_with_the_choices() -> None:
    with pytest.raises(MediaError, match=r"not available here; choose one of: .*y4m"):
        VirtualCamera(64, 64, backend="no-such-backend")


@pytest.mark.skipif(bool(VIDEO_DEVICES), reason="a /dev/video* device exists")
def test_without_a_device_the_error_says_how_to_create_one(tmp_path: Path) -> None:
    with pytest.raises(
        MediaError, match="sudo modprobe v4l2loopback exclusive_caps=1 card_label=livediff"
    ):
        VirtualCamera(128, 128)
    clip = write_y4m(tmp_path / "in.y4m", [pattern(64, 64, 1)])
    assert main(["camera", "--input", str(clip), "--model", "tiny", "--weights", "random"]) == 2


@pytest.mark.skipif(not VIDEO_DEVICES, reason="needs a v4l2loopback device (/dev/video*)")
def test_real_virtual_camera_accepts_frames() -> None:
    with VirtualCamera(128, 128, fps=30) as camera:
        camera.send(pattern(128, 128, 1))
        assert camera.frames_sent == 1 and camera.device.startswith("/dev/video")


def test_camera_source_loops_a_file_with_rising_timestamps(tmp_path: Path) -> None:
    clip = write_y4m(tmp_path / "in.y4m", [pattern(32, 32, seed) for seed in range(3)], fps=10)
    source = CameraSource(str(clip), loop=True, realtime=False, max_frames=7)
    frames = list(source.frames())
    assert [f.index for f in frames] == list(range(7))
    pts = [f.time.pts for f in frames]
    assert pts == sorted(pts) and len(set(pts)) == 7
    assert distance(frames[3].image, frames[0].image) < 1  # the loop starts over
    assert source.frame_rate == 10


async def test_local_pipeline_sends_the_models_output_to_the_virtual_camera(
    bundle: ModelBundle, tmp_path: Path
) -> None:
    image = pattern(160, 120, seed=3)
    clip = write_y4m(tmp_path / "in.y4m", [image] * 4)
    engine = Engine(bundle, None, TEST_RUNTIME, None)
    await engine.start()
    try:
        with VirtualCamera(128, 128, backend="y4m", device=str(tmp_path / "out.y4m")) as camera:
            source = CameraSource(str(clip), realtime=False)
            result = await run_local_pipeline(engine, source, [camera], params=WHALE)
            assert camera.frames_sent == result.frames_out
        assert len(engine.sessions) == 0  # the pipeline closed its session
    finally:
        await engine.stop()
    assert result.frames_in == 4 and result.refused == 0 and result.frames_out >= 1
    written = read_video(tmp_path / "out.y4m")
    assert len(written) == result.frames_out
    source_frame = read_video(clip)[0]
    whale, fox = (
        reference_output(bundle, source_frame, **WHALE),
        reference_output(bundle, source_frame, **FOX),
    )
    assert all(distance(frame, whale) * 2 < distance(frame, fox) for frame in written)

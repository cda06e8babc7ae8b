"""NDI in and out: ``livediff camera`` against the binding's own sender and receiver, on loopback.

NDI announces its sources by mDNS on every network interface, so these tests run inside a
loopback-only network namespace (``test_in_loopback_netns`` runs this module there); sources
on this machine are found through ``127.0.0.1`` without mDNS. Without mDNS, 127.0.0.1 answers
for the first NDI program on the machine only: so the ``--ndi-out`` test has the camera as the
only sender (this process only receives), and the NDI input test runs sender, camera pipeline
and engine in this one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from helpers.streams_testing import (
    FOX,
    NEEDS_NETNS,
    REPO,
    TEST_RUNTIME,
    WHALE,
    distance,
    export_visible_tiny,
    netns_module_runner,
    pattern,
    read_video,
    reference_output,
    running_server,
    write_y4m,
)
from livediff.models.bundle import ModelBundle
from livediff.models.loading import ModelSpec, load_model
from livediff.streams.media import MediaTime

NDIlib = pytest.importorskip(
    "NDIlib", reason="NDI needs ndi-python (pip install 'livediff[creative]'): no wheel here"
)

test_in_loopback_netns = netns_module_runner(__file__)
WAIT_S = 240.0  # a guard against a hang (the model loads in the child first), not a measurement


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_visible_tiny(tmp_path_factory.mktemp("ndi") / "model")


@pytest.fixture(scope="module")
def bundle(model_dir: Path) -> ModelBundle:
    return load_model(ModelSpec(preset="tiny", source=str(model_dir)), device="cpu", dtype="fp32")


@dataclass(frozen=True)
class Received:
    image: np.ndarray  # RGB
    timecode: int
    frame_rate: Fraction


def _finder() -> Any:
    settings = NDIlib.FindCreate()
    settings.extra_ips = "127.0.0.1"
    return NDIlib.find_create_v2(settings)


def receive(name: str, count: int, child: Child | None = None) -> list[Received]:
    """``count`` video frames from the NDI source ``name`` (the binding's own receiver)."""
    assert NDIlib.initialize()
    finder, deadline = _finder(), time.monotonic() + WAIT_S
    try:
        source = None
        while source is None:
            if child is not None:
                child.check_alive()
            assert time.monotonic() < deadline, f"no NDI source {name!r}"
            NDIlib.find_wait_for_sources(finder, 500)
            source = next(
                (
                    s
                    for s in NDIlib.find_get_current_sources(finder)
                    if s.ndi_name.endswith(f"({name})")
                ),
                None,
            )
        settings = NDIlib.RecvCreateV3()
        settings.color_format = NDIlib.RECV_COLOR_FORMAT_RGBX_RGBA
        receiver = NDIlib.recv_create_v3(settings)
        NDIlib.recv_connect(receiver, source)
        frames: list[Received] = []
        try:
            while len(frames) < count:
                if child is not None:
                    child.check_alive()
                assert time.monotonic() < deadline, f"{len(frames)} of {count} frames"
                kind, video, _, _ = NDIlib.recv_capture_v2(receiver, 500)
                if kind != NDIlib.FRAME_TYPE_VIDEO:
                    continue
                frames.append(
                    Received(
                        np.array(video.data[:, :, :3]),
                        video.timecode,
                        Fraction(video.frame_rate_N, video.frame_rate_D),
                    )
                )
                NDIlib.recv_free_video_v2(receiver, video)
        finally:
            NDIlib.recv_destroy(receiver)
        return frames
    finally:
        NDIlib.find_destroy(finder)


@dataclass(frozen=True)
class Child:
    """A ``livediff camera`` process; its output goes to a file (a pipe nobody reads fills up)."""

    process: subprocess.Popen[bytes]
    log: Path

    def check_alive(self) -> None:
        assert self.process.poll() is None, f"livediff camera exited:\n{self.output()}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]


@contextlib.contextmanager
def camera(model_dir: Path, folder: Path, *args: str) -> Iterator[Child]:
    argv = [sys.executable, "-m", "livediff", "-v", "camera", "--model", "tiny", "--source"]
    argv += [str(model_dir), "--device", "cpu", *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    log = folder / "camera.log"
    with open(log, "wb") as sink:
        process = subprocess.Popen(argv, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        yield Child(process, log)
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@NEEDS_NETNS
def test_ndi_out_publishes_the_processed_frames_with_the_inputs_rate_and_times(
    model_dir: Path, bundle: ModelBundle, tmp_path: Path
) -> None:
    image = pattern(160, 120, seed=3)
    clip = write_y4m(tmp_path / "in.y4m", [image] * 30, fps=25)
    with camera(
        model_dir, tmp_path, "--input", str(clip), "--loop", "--ndi-out", "livediff-out",
        "--prompt", str(WHALE["prompt"]), "--seed", str(WHALE["seed"]),
    ) as child:  # fmt: skip
        frames = receive("livediff-out", 6, child)
    played = read_video(clip)[0]
    whale, fox = reference_output(bundle, played, **WHALE), reference_output(bundle, played, **FOX)
    for frame in frames:
        assert frame.image.shape == (128, 128, 3)  # the model's size, not the 160×120 input's
        assert frame.frame_rate == 25
        assert distance(frame.image, whale) < 8, distance(frame.image, whale)  # NDI's codec loss
        assert distance(frame.image, whale) * 2 < distance(frame.image, fox)
        assert distance(frame.image[:120], image[:, 16:144]) > 30  # not the input
    # Each output's timecode is its input's pts: a whole number of 1/25 s frames (100 ns ticks).
    ticks = [frame.timecode for frame in frames]
    assert ticks == sorted(set(ticks))
    assert all(abs(t / 400_000 - round(t / 400_000)) < 1e-3 for t in ticks), ticks


@contextlib.contextmanager
def ndi_sender(name: str, image: np.ndarray, rate: int) -> Iterator[None]:
    """The binding's own sender: ``image`` as the NDI source ``name``, ``rate`` times a second."""
    assert NDIlib.initialize()
    settings = NDIlib.SendCreate()
    settings.ndi_name, settings.clock_video = name, False
    sender = NDIlib.send_create(settings)
    frame = NDIlib.VideoFrameV2()
    frame.data = np.concatenate([image, np.full((*image.shape[:2], 1), 255, np.uint8)], axis=2)
    frame.FourCC = NDIlib.FOURCC_VIDEO_TYPE_RGBX
    frame.frame_rate_N, frame.frame_rate_D = rate, 1
    stop = threading.Event()

    def send() -> None:
        while not stop.wait(1 / rate):  # pacing a test source, as a camera would be paced
            NDIlib.send_send_video_v2(sender, frame)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10)
        NDIlib.send_destroy(sender)


class Collected:
    """A frame sink that keeps what it is sent, with its time."""

    def __init__(self) -> None:
        self.frames: list[tuple[np.ndarray, MediaTime | None]] = []

    def send(self, image: np.ndarray, time: MediaTime | None = None) -> None:
        self.frames.append((np.array(image), time))


@NEEDS_NETNS
async def test_an_ndi_input_feeds_the_engine(bundle: ModelBundle) -> None:
    """In one process: without mDNS, 127.0.0.1 answers for one NDI program's sources only."""
    from livediff.engine.runtime import Engine
    from livediff.streams.local_pipeline import run_local_pipeline
    from livediff.streams.ndi_io import NDI_TIME_BASE, NdiSource

    image = pattern(160, 120, seed=5)
    collected = Collected()
    with ndi_sender("livediff-in", image, 24):
        source = await asyncio.to_thread(NdiSource, "livediff-in", max_frames=8)
        assert source.source.endswith("(livediff-in)") and source.frame_rate == 24
        engine = Engine(bundle, None, TEST_RUNTIME, None)
        await engine.start()
        try:
            result = await run_local_pipeline(engine, source, [collected], params=FOX)
        finally:
            await engine.stop()
    assert result.frames_in == 8 and result.frames_out == len(collected.frames) >= 1
    fox, whale = reference_output(bundle, image, **FOX), reference_output(bundle, image, **WHALE)
    for output, time_of in collected.frames:
        assert output.shape == (128, 128, 3)
        assert distance(output, fox) < 8 and distance(output, fox) * 2 < distance(output, whale)
        assert time_of is not None and time_of.time_base == NDI_TIME_BASE
    ticks = [time_of.pts for _, time_of in collected.frames if time_of is not None]
    assert ticks == sorted(set(ticks)) and ticks[0] < 60 * 10_000_000  # from the first frame on


@NEEDS_NETNS
def test_a_missing_ndi_source_is_named_with_those_seen(tmp_path: Path) -> None:
    from livediff.exceptions import MediaError
    from livediff.streams.ndi_io import NdiSource

    with pytest.raises(MediaError, match=r"no NDI source 'nobody-sends-this' within 0.5 s"):
        NdiSource("nobody-sends-this", find_timeout_s=0.5)


def test_without_ndi_python_the_camera_says_what_to_install(tmp_path: Path) -> None:
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "NDIlib.py").write_text("raise ImportError('no NDI runtime in this test')\n")
    clip = write_y4m(tmp_path / "in.y4m", [pattern(64, 48, seed=1)] * 2)
    env = {**os.environ, "PYTHONPATH": f"{shim}{os.pathsep}{REPO}"}
    for args in (["--input", str(clip), "--ndi-out", "x"], ["--input", "ndi:somebody"]):
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "livediff",
                "camera",
                "--model",
                "tiny",
                "--weights",
                "random",
                *args,
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 2, done.stderr
        assert "pip install 'livediff[creative]'" in done.stderr, done.stderr


def test_camera_only_flags_are_refused_with_an_ndi_input() -> None:
    from livediff.cli import main

    for flag in (["--loop"], ["--input-size", "640x480"], ["--input-fps", "30"], ["--no-realtime"]):
        argv = [
            "camera",
            "--input",
            "ndi:somebody",
            *flag,
            "--model",
            "tiny",
            "--weights",
            "random",
        ]
        assert main(argv) == 2
    assert main(["camera", "--input", "ndi:", "--model", "tiny", "--weights", "random"]) == 2


@NEEDS_NETNS
async def test_serve_publishes_each_websocket_session_as_an_ndi_source(
    bundle: ModelBundle,
) -> None:
    from aiohttp import web

    from livediff.clients.ws_client import WsClient
    from livediff.engine.runtime import Engine
    from livediff.streams.app import create_app
    from livediff.streams.server_config import ServerConfig
    from livediff.streams.slow_clients import start_runner

    image = pattern(160, 120, seed=7)
    engine = Engine(bundle, None, TEST_RUNTIME, None)
    await engine.start()
    config = ServerConfig()
    runner = await start_runner(create_app(engine, config, ndi_out="livediff"), config)
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        host, port = runner.addresses[0][:2]
        async with await WsClient.connect(f"ws://{host}:{port}/ws", params=WHALE) as client:
            receiving = asyncio.ensure_future(
                asyncio.to_thread(receive, f"livediff {client.session}", 3)
            )
            while not receiving.done():  # frames until the receiver has its three
                await client.send_frame(image)
                await client.recv_frame()
            frames = receiving.result()
    finally:
        await runner.cleanup()
        await engine.stop()
    whale, fox = reference_output(bundle, image, **WHALE), reference_output(bundle, image, **FOX)
    for frame in frames:
        assert frame.image.shape == (128, 128, 3)
        assert distance(frame.image, whale) * 2 < distance(frame.image, fox)
    ticks = [frame.timecode for frame in frames]
    assert ticks == sorted(set(ticks))  # the inputs' arrival times, in order


@NEEDS_NETNS
async def test_serve_publishes_each_webrtc_session_as_an_ndi_source(bundle: ModelBundle) -> None:
    from livediff.clients.webrtc_client import ImageTrack, WebRTCClient
    from livediff.streams.server_config import ServerConfig

    image = pattern(160, 120, seed=9)
    config = ServerConfig(host_addresses=("127.0.0.1",))
    async with running_server(bundle, config, ndi_out="livediff") as (base, _, _):
        client = WebRTCClient(base, params=FOX)
        await client.connect(ImageTrack(image, fps=30))
        try:
            receiving = asyncio.ensure_future(
                asyncio.to_thread(receive, f"livediff {client.session}", 3)
            )
            while not receiving.done():  # the client keeps reading its own answers meanwhile
                await client.recv_frame()
            frames = receiving.result()
        finally:
            await client.close()
    fox, whale = reference_output(bundle, image, **FOX), reference_output(bundle, image, **WHALE)
    for frame in frames:
        assert frame.image.shape == (128, 128, 3)  # I420 from the engine, RGB at the receiver
        assert distance(frame.image, fox) * 2 < distance(frame.image, whale)
    ticks = [frame.timecode for frame in frames]
    assert ticks == sorted(set(ticks))  # the RTP timestamps of the inputs, in order

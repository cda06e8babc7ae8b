"""Headless Chromium against a real ``livediff serve``: the page streams its camera through the model.

Chromium's fake camera plays a Y4M clip the test writes. Everything runs inside a loopback-only
network namespace (run directly, the module contributes one test that re-runs it under
``unshare --net``). Needs Debian's ``chromium`` and the ``playwright`` package (never
``playwright install``).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from helpers.streams_testing import (
    FOX,
    NEEDS_NETNS,
    REPO,
    WHALE,
    distance,
    export_visible_tiny,
    netns_module_runner,
    pattern,
    read_video,
    reference_output,
    write_y4m,
)
from livediff.models.bundle import ModelBundle
from livediff.models.loading import ModelSpec, load_model

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
try:
    from playwright.sync_api import Browser, Page, sync_playwright
except ImportError:  # pragma: no cover
    sync_playwright = None  # type: ignore[assignment]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(), reason="needs Chromium: apt-get install -y chromium"
    ),
    pytest.mark.skipif(
        sync_playwright is None, reason="needs the playwright package (pip install playwright)"
    ),
]
test_in_loopback_netns = netns_module_runner(__file__)

CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    "--autoplay-policy=no-user-gesture-required",
    "--allow-loopback-in-peer-connection",
    "--disable-features=WebRtcHideLocalIpsWithMdns",
]
CONFIG_TOML = """
[params]
prompt = "a red fox"
seed = 11

[server]
host_addresses = ["127.0.0.1"]
stats_interval_s = 0.25

[runtime]
deadline_ms = 600000

[runtime.degrade]
enabled = false
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("browser")


@pytest.fixture(scope="module")
def model_dir(workdir: Path) -> Path:
    return export_visible_tiny(workdir / "model")


@pytest.fixture(scope="module")
def bundle(model_dir: Path) -> ModelBundle:
    return load_model(ModelSpec(preset="tiny", source=str(model_dir)), device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def config_file(workdir: Path) -> Path:
    path = workdir / "livediff.toml"
    path.write_text(CONFIG_TOML)
    return path


@pytest.fixture(scope="module")
def camera_clip(workdir: Path) -> Path:
    return write_y4m(workdir / "camera.y4m", [pattern(320, 240, seed=5)] * 15)


@pytest.fixture(scope="module")
def server_url(model_dir: Path, config_file: Path, workdir: Path) -> Iterator[str]:
    """``livediff serve`` as users run it, on a free port; its URL from the first line it prints."""
    argv = [
        sys.executable,
        "-m",
        "livediff",
        "serve",
        "--model",
        "tiny",
        "--source",
        str(model_dir),
    ]
    argv += ["--port", "0", "--config", str(config_file)]
    stderr = open(workdir / "serve.log", "w")  # noqa: SIM115 (closed at teardown)
    server = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        assert server.stdout is not None
        line = server.stdout.readline()  # blocks until the server is up, or '' if it died
        assert "listening on" in line, (
            f"livediff serve did not start: {line!r}\n{(workdir / 'serve.log').read_text()[-3000:]}"
        )
        yield line.rsplit(" ", 1)[1].strip()
    finally:
        server.terminate()
        assert server.wait(timeout=60) == 0, (workdir / "serve.log").read_text()[-3000:]
        stderr.close()


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Any]:
    """``launch(camera_y4m)`` → a headless Chromium whose camera plays that clip."""
    assert sync_playwright is not None
    with sync_playwright() as playwright:
        browsers: list[Browser] = []

        def start(clip: Path) -> Browser:
            browser = playwright.chromium.launch(
                executable_path=CHROMIUM,
                headless=True,
                args=[*CHROMIUM_FLAGS, f"--use-file-for-fake-video-capture={clip}"],
            )
            browsers.append(browser)
            return browser

        yield start
        for browser in browsers:
            browser.close()


def open_page(browser: Browser, url: str) -> Page:
    page = browser.new_page()
    page.on("console", lambda message: print("console:", message.text))
    page.goto(url)
    return page


def wait_for_frames(page: Page, count: int) -> None:
    page.wait_for_function(
        f"window.livediff.framesDecoded > {count} || window.livediff.state === 'error'",
        polling=100,
        timeout=180_000,
    )
    state = page.evaluate("[window.livediff.state, window.livediff.errors]")
    assert state[0] == "connected", f"page state {state}"


def snapshot(page: Page, which: str) -> np.ndarray:
    shot = page.evaluate(f"window.livediff.snapshot('{which}')")
    rgba = np.asarray(shot["data"], dtype=np.uint8).reshape(shot["height"], shot["width"], 4)
    return rgba[..., :3]


def next_output(page: Page) -> np.ndarray:
    """The output once at least one more frame has been decoded."""
    decoded = page.evaluate("window.livediff.framesDecoded")
    wait_for_frames(page, decoded)
    return snapshot(page, "output")


@NEEDS_NETNS
@pytest.mark.parametrize("codec", ["vp8", "h264"])
def test_page_streams_the_camera_through_the_model(
    launch: Any, server_url: str, camera_clip: Path, bundle: ModelBundle, codec: str
) -> None:
    camera = read_video(camera_clip)[0]
    references = {
        "fox": reference_output(bundle, camera, **FOX),
        "whale": reference_output(bundle, camera, **WHALE),
    }
    page = open_page(launch(camera_clip), f"{server_url}?autostart=1&codec={codec}")
    wait_for_frames(page, 5)
    assert (
        page.evaluate("window.livediff.codec") == {"vp8": "video/VP8", "h264": "video/H264"}[codec]
    )
    output = snapshot(page, "output")
    assert output.shape == (128, 128, 3)  # the model's resolution; the camera sends 320×240
    assert distance(output, references["fox"]) * 2 < distance(output, references["whale"])
    assert distance(output, camera[56:184, 96:224]) > 30  # not the camera picture sent back
    page.wait_for_function(
        "window.livediff.serverStats && window.livediff.serverStats.frames_out > 0", timeout=60_000
    )
    stats = page.evaluate("window.livediff.serverStats")
    assert stats["session"] == page.evaluate("window.livediff.session") and stats["frames_in"] > 0
    # live update over the data channel, as the prompt/seed controls send it
    assert page.evaluate("window.livediff.update({prompt: 'a blue whale', seed: 22})") == {
        "ok": True,
        "id": 1,
    }
    seen = []
    for _ in range(40):
        image = next_output(page)
        seen.append(
            "whale"
            if distance(image, references["whale"]) < distance(image, references["fox"])
            else "fox"
        )
        if seen[-3:] == ["whale"] * 3:
            break
    assert seen[-3:] == ["whale"] * 3, seen


@NEEDS_NETNS
def test_virtual_camera_output_plays_as_the_browser_camera(
    launch: Any,
    server_url: str,
    camera_clip: Path,
    model_dir: Path,
    config_file: Path,
    bundle: ModelBundle,
    tmp_path: Path,
) -> None:
    vcam_file = tmp_path / "vcam.y4m"
    argv = [
        sys.executable,
        "-m",
        "livediff",
        "camera",
        "--model",
        "tiny",
        "--source",
        str(model_dir),
    ]
    argv += [
        "--config",
        str(config_file),
        "--prompt",
        str(WHALE["prompt"]),
        "--seed",
        str(WHALE["seed"]),
    ]
    argv += ["--input", str(camera_clip), "--no-realtime", "--max-frames", "6"]
    argv += ["--vcam", "--vcam-backend", "y4m", "--vcam-device", str(vcam_file)]
    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"virtual camera {vcam_file} (y4m)" in result.stdout
    written = read_video(vcam_file)
    camera = read_video(camera_clip)[0]
    assert written and all(frame.shape == (128, 128, 3) for frame in written)
    whale = reference_output(bundle, camera, **WHALE)
    fox = reference_output(bundle, camera, **FOX)
    assert all(
        distance(frame, whale) * 2 < distance(frame, fox) for frame in written
    )  # yuv420p costs ~8
    # close the loop: the virtual camera's picture is the browser's camera, streamed to the server
    page = open_page(launch(vcam_file), f"{server_url}?autostart=1")
    wait_for_frames(page, 3)
    seen_by_browser = snapshot(page, "input")
    assert seen_by_browser.shape == (128, 128, 3) and distance(seen_by_browser, written[0]) < 8
    output = snapshot(page, "output")
    fox_of_vcam = reference_output(bundle, written[0], **FOX)
    assert distance(output, fox_of_vcam) * 2 < distance(
        output, reference_output(bundle, written[0], **WHALE)
    )

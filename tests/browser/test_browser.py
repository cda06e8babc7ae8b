"""Headless Chromium against a real ``livediff serve``: the page streams its camera through the model.

Chromium's fake camera plays a Y4M clip the test writes. Everything runs inside a loopback-only
network namespace (run directly, the module contributes one test that re-runs it under
``unshare --net``). Needs Debian's ``chromium`` and the ``playwright`` package (never
``playwright install``).
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from browser_testing import (
    BROWSER_MARKS,
    PHONE,
    in_first_screen,
    no_horizontal_scroll,
    open_page,
    snapshot,
    wait_for_frames,
)

from helpers.streams_testing import (
    FOX,
    NEEDS_NETNS,
    REPO,
    WHALE,
    distance,
    export_visible_tiny,
    netns_module_runner,
    read_video,
    reference_output,
)
from livediff.models.bundle import ModelBundle
from livediff.models.loading import ModelSpec, load_model

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytestmark = BROWSER_MARKS
test_in_loopback_netns = netns_module_runner(__file__)

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


@contextlib.contextmanager
def running_server(model_dir: Path, config_file: Path, log_file: Path) -> Iterator[str]:
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
    stderr = open(log_file, "w")  # noqa: SIM115 (closed at teardown)
    server = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        assert server.stdout is not None
        line = server.stdout.readline()  # blocks until the server is up, or '' if it died
        assert "listening on" in line, (
            f"livediff serve did not start: {line!r}\n{log_file.read_text()[-3000:]}"
        )
        yield line.rsplit(" ", 1)[1].strip()
    finally:
        server.terminate()
        assert server.wait(timeout=60) == 0, log_file.read_text()[-3000:]
        stderr.close()


@pytest.fixture(scope="module")
def server_url(model_dir: Path, config_file: Path, workdir: Path) -> Iterator[str]:
    with running_server(model_dir, config_file, workdir / "serve.log") as url:
        yield url


def server_with(
    model_dir: Path, folder: Path, config_text: str
) -> contextlib.AbstractContextManager[str]:
    config = folder / "livediff.toml"
    config.write_text(config_text)
    return running_server(model_dir, config, folder / "serve.log")


def next_output(page: Page) -> np.ndarray:
    """The output once at least one more frame has been decoded."""
    decoded = page.evaluate("window.livediff.framesDecoded")
    wait_for_frames(page, decoded)
    return snapshot(page, "output")


def wait_for_prompt(page: Page, references: dict[str, np.ndarray], wanted: str) -> None:
    """Three outputs in a row nearer ``references[wanted]`` than the other reference."""
    seen = []
    for _ in range(40):
        image = next_output(page)
        seen.append(min(references, key=lambda name: distance(image, references[name])))
        if seen[-3:] == [wanted] * 3:
            return
    raise AssertionError(f"the output never settled on {wanted}: {seen}")


STAT_CELLS = "[...document.querySelectorAll('#stats td')].map((td) => td.textContent)"


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
    wait_for_prompt(page, references, "whale")


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


@NEEDS_NETNS
def test_first_visit_says_what_to_do(launch: Any, server_url: str, camera_clip: Path) -> None:
    page = open_page(launch(camera_clip), server_url, viewport=PHONE)
    assert "press Start" in page.locator("#hint").text_content() and in_first_screen(page, "#hint")
    assert page.locator("textarea[name=prompt]").get_attribute("placeholder")
    captions = page.locator(".frame .overlay")
    assert captions.count() == 2 and all(captions.nth(i).is_visible() for i in range(2))
    assert "camera" in captions.nth(0).text_content()
    assert page.evaluate("window.livediff.state") == "idle" and no_horizontal_scroll(page)
    icon = page.locator("link[rel=icon]")
    assert icon.get_attribute("type") == "image/svg+xml"
    for url in (
        page.evaluate("document.querySelector('link[rel=icon]').href"),
        server_url + "favicon.ico",
    ):
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.status == 200, url
            assert response.headers["Content-Type"].startswith("image/svg+xml"), url
            assert b"<svg" in response.read(), url


@NEEDS_NETNS
def test_a_refused_value_reverts_to_the_server_value(
    launch: Any, server_url: str, camera_clip: Path
) -> None:
    page = open_page(launch(camera_clip), f"{server_url}?autostart=1")
    wait_for_frames(page, 1)
    guidance, seed = page.locator("[name=guidance_scale]"), page.locator("[name=seed]")
    assert seed.input_value() == "11"  # the form shows what the server runs ([params] seed)
    guidance.fill("99")  # out of range (at most 30): the server refuses it
    guidance.press("Enter")
    page.wait_for_function("window.livediff.fieldErrors.guidance_scale", timeout=10_000)
    assert guidance.input_value() == "1"  # back to the server's value
    assert "guidance_scale=99" in page.locator("#error-guidance_scale").text_content()
    seed.fill("-5")
    seed.press("Enter")
    page.wait_for_function("window.livediff.fieldErrors.seed", timeout=10_000)
    assert seed.input_value() == "11"
    replies = page.evaluate("window.livediff.replies")
    assert [(r.get("field"), r.get("current")) for r in replies] == [
        ("guidance_scale", {"guidance_scale": 1.0}),
        ("seed", {"seed": 11}),
    ]
    # each error once: beside its field and in errors[], not in the banner too
    errors = page.evaluate("window.livediff.errors")
    assert len(errors) == 2 and errors[0].startswith("guidance_scale=99") and "seed=-5" in errors[1]
    assert page.locator(".field-error:not(:empty)").count() == 2
    assert page.locator("#banner").is_hidden()
    assert page.locator("#message").text_content() == ""
    # stopped, a bad value is caught in the page and never reaches the next offer
    page.click("#stop")
    guidance.fill("50")
    guidance.press("Enter")
    assert guidance.input_value() == "1" and "guidance_scale" in page.evaluate(
        "window.livediff.fieldErrors.guidance_scale"
    )
    session = page.evaluate("window.livediff.session")
    page.click("#start")
    wait_for_frames(page, 1)  # the form holds valid values: no 400
    assert page.evaluate("window.livediff.session") not in (None, session)
    # a value the server takes clears the field's error
    guidance.fill("1.5")
    guidance.press("Enter")
    page.wait_for_function("!window.livediff.fieldErrors.guidance_scale", timeout=10_000)
    assert page.evaluate("window.livediff.replies.at(-1)")["ok"] is True
    assert page.locator("#error-guidance_scale").text_content() == ""
    assert page.evaluate("window.livediff.state") == "connected"


@NEEDS_NETNS
def test_enter_applies_a_field(
    launch: Any, server_url: str, camera_clip: Path, bundle: ModelBundle
) -> None:
    camera = read_video(camera_clip)[0]
    references = {
        "fox": reference_output(bundle, camera, **FOX),
        "whale": reference_output(bundle, camera, **WHALE),
    }
    page = open_page(launch(camera_clip), f"{server_url}?autostart=1")
    wait_for_frames(page, 1)
    prompt, seed = page.locator("[name=prompt]"), page.locator("[name=seed]")
    assert prompt.input_value() == "a red fox"  # filled from the offer's answer
    prompt.fill(str(WHALE["prompt"]))
    prompt.press("Enter")  # applies; no new line
    seed.fill(str(WHALE["seed"]))
    seed.press("Enter")
    page.wait_for_function("window.livediff.replies.length >= 2", timeout=10_000)
    page.click("h1")  # leaving the fields (a change event) applies nothing more
    page.wait_for_timeout(500)
    assert page.evaluate("window.livediff.replies") == [
        {"ok": True, "id": 1},
        {"ok": True, "id": 2},
    ]
    assert prompt.input_value() == WHALE["prompt"]
    assert page.evaluate("window.livediff.errors") == []
    wait_for_prompt(page, references, "whale")
    prompt.press("Shift+Enter")  # a new line, not applied
    page.wait_for_timeout(300)
    assert prompt.input_value() == f"{WHALE['prompt']}\n"
    assert len(page.evaluate("window.livediff.replies")) == 2


@NEEDS_NETNS
def test_stop_clears_the_stats(launch: Any, server_url: str, camera_clip: Path) -> None:
    page = open_page(launch(camera_clip), f"{server_url}?autostart=1")
    wait_for_frames(page, 1)
    page.wait_for_function(f"{STAT_CELLS}.every((text) => text !== '–')", timeout=30_000)
    assert page.locator(".frame.live").count() == 2  # the captions over the videos are gone
    page.click("#stop")
    assert page.evaluate(STAT_CELLS) == ["–"] * 9
    page.wait_for_timeout(1500)  # and nothing of the stopped session comes back
    assert page.evaluate(STAT_CELLS) == ["–"] * 9
    assert page.evaluate("[window.livediff.state, window.livediff.serverStats]") == [
        "stopped",
        None,
    ]
    assert page.locator(".frame.live").count() == 0 and page.locator(".overlay").nth(1).is_visible()


@NEEDS_NETNS
def test_a_full_server_is_retried_after_retry_after(
    launch: Any, model_dir: Path, camera_clip: Path, tmp_path: Path
) -> None:
    config = CONFIG_TOML.replace("[runtime]\n", "[runtime]\nmax_sessions = 1\n")
    with server_with(model_dir, tmp_path, config) as url:
        browser = launch(camera_clip)
        first = open_page(browser, f"{url}?autostart=1")
        wait_for_frames(first, 1)
        phone = open_page(browser, f"{url}?autostart=1", viewport=PHONE)
        phone.wait_for_function("window.livediff.retry", timeout=30_000)
        refused_at = time.monotonic()
        retry = phone.evaluate("window.livediff.retry")
        assert retry["delay_s"] == 5 and "capacity" in retry["error"]  # the server's Retry-After
        assert phone.evaluate("window.livediff.state") == "retrying"
        assert in_first_screen(phone, "#banner") and no_horizontal_scroll(phone)
        assert "retrying in" in phone.locator("#banner").text_content()
        assert phone.locator("#banner-cancel").is_visible()
        assert phone.evaluate(STAT_CELLS) == ["–"] * 9
        phone.wait_for_function("window.livediff.retry && window.livediff.retry.attempt >= 2")
        assert time.monotonic() - refused_at > 4  # not before Retry-After
        assert len(phone.evaluate("window.livediff.errors")) == 1  # once, however many refusals
        first.click("#stop")
        wait_for_frames(phone, 1)  # connects by itself, with no click
        assert (
            phone.locator("#banner").is_hidden() and phone.evaluate("window.livediff.retry") is None
        )
        assert len(phone.evaluate("window.livediff.errors")) == 1


@NEEDS_NETNS
def test_a_degraded_server_says_so(
    launch: Any, model_dir: Path, camera_clip: Path, tmp_path: Path
) -> None:
    """Every frame misses a 1 ms deadline: the degrade controller cuts the resolution, then
    refuses sessions, and the page says so (and retries the refused one)."""
    config = CONFIG_TOML.replace("deadline_ms = 600000", "deadline_ms = 1").replace(
        "enabled = false", "enabled = true\nwindow_s = 0.2\ndegrade_after = 1"
    )
    with server_with(model_dir, tmp_path, config) as url:
        browser = launch(camera_clip)
        page = open_page(browser, f"{url}?autostart=1", viewport=PHONE)
        page.wait_for_function(
            "window.livediff.notice && window.livediff.notice.includes('new sessions are refused')",
            timeout=60_000,
        )
        notice = page.locator("#notice").text_content()
        assert "at 64×64 instead of 128×128" in notice and "overloaded: " in notice, notice
        assert in_first_screen(page, "#notice") and no_horizontal_scroll(page)
        other = open_page(browser, f"{url}?autostart=1", viewport=PHONE)
        other.wait_for_function("window.livediff.retry", timeout=30_000)
        assert "overloaded" in other.evaluate("window.livediff.retry.error")
        assert in_first_screen(other, "#banner")
        other.click("#banner-cancel")  # gives up
        assert other.evaluate("[window.livediff.state, window.livediff.retry]") == ["stopped", None]
        assert other.locator("#banner").is_hidden()
        page.click("#stop")
        assert (
            page.locator("#notice").is_hidden() and page.evaluate("window.livediff.notice") is None
        )

"""Fixtures of the browser tests: the fake camera's clip and headless Chromiums that play it
(the recipe's flags: browser_testing.CHROMIUM_FLAGS)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from browser_testing import CHROMIUM, CHROMIUM_FLAGS, sync_playwright

from helpers.streams_testing import pattern, write_y4m

if TYPE_CHECKING:
    from playwright.sync_api import Browser


@pytest.fixture(scope="module")
def camera_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fake camera's clip: one test pattern, 320×240, 15 frames."""
    folder = tmp_path_factory.mktemp("camera")
    return write_y4m(folder / "camera.y4m", [pattern(320, 240, seed=5)] * 15)


@pytest.fixture
def launch() -> Iterator[Callable[[Path], Browser]]:
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


@pytest.fixture
def browser(launch: Callable[[Path], Browser], camera_clip: Path) -> Browser:
    """A headless Chromium whose camera plays ``camera_clip``."""
    return launch(camera_clip)

"""What the browser tests share: the Chromium recipe (its flags, the marks that skip without it)
and the page helpers (open a page, wait for frames, press keys, read the output).

The fixtures that use them (a fake-camera clip, a headless Chromium) are in ``conftest.py``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

try:
    from playwright.sync_api import Browser, Locator, Page, sync_playwright
except ImportError:  # pragma: no cover
    sync_playwright = None  # type: ignore[assignment]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
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
# every browser module's pytestmark: browser tests, skipped without Chromium or playwright
BROWSER_MARKS = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(), reason="needs Chromium: apt-get install -y chromium"
    ),
    pytest.mark.skipif(
        sync_playwright is None, reason="needs the playwright package (pip install playwright)"
    ),
]
PHONE = {"width": 390, "height": 844}
FOX_QUERY = "prompt=a+red+fox&seed=11"
# the page has the server's ControlNet list (and bank capacity), or has said why not
LISTED = "window.livediff.controlnets !== null || document.querySelector('#controlnet-note').textContent.includes('could not')"


def open_page(browser: Browser, url: str, *, listed: bool = False, **options: Any) -> Page:
    """A new page at ``url`` (its console printed); ``listed``: once it has the server's lists."""
    page = browser.new_page(**options)
    page.on("console", lambda message: print("console:", message.text))
    page.goto(url)
    if listed:
        page.wait_for_function(LISTED, timeout=30_000)
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


def in_first_screen(page: Page, selector: str) -> bool:
    """``selector`` is visible within the viewport as loaded (no scrolling)."""
    box = page.locator(selector).bounding_box()
    viewport = page.viewport_size
    assert viewport is not None
    return (
        page.locator(selector).is_visible()
        and box is not None
        and box["y"] >= 0
        and box["y"] + box["height"] <= viewport["height"]
    )


def no_horizontal_scroll(page: Page) -> bool:
    return bool(
        page.evaluate(
            "document.documentElement.scrollWidth <= document.documentElement.clientWidth"
        )
    )


def press(control: Locator, key: str, times: int = 1) -> None:
    control.focus()
    for _ in range(times):
        control.press(key)


def open_listed_page(browser: Browser, url: str, **options: Any) -> Page:
    """:func:`open_page` once the page has the server's lists (the panels are built)."""
    return open_page(browser, url, listed=True, **options)

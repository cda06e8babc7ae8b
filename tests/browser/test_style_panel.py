"""The page's Style image group in headless Chromium, against servers with and without an
IP-Adapter (a random-weights adapter with a tiny image encoder, built by the test).

The recipe is test_controlnet_panel.py's (browser_testing's Chromium flags, a fake camera
playing a Y4M clip, every test inside a loopback-only network namespace, the server in this
process on its own loop in a thread), so the test reads what each session runs from the engine
itself. The page uploads the image as ``b"LDIM"`` + the file on the data channel.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import pytest
from browser_testing import (
    BROWSER_MARKS,
    FOX_QUERY,
    PHONE,
    no_horizontal_scroll,
    open_listed_page,
    press,
    wait_for_frames,
)
from PIL import Image
from reliability.reliability_testing import ThreadedServer

from helpers.streams_testing import NEEDS_NETNS, netns_module_runner, visible_tiny_bundle
from livediff.models.bundle import ModelBundle
from livediff.models.ip_adapter_loading import load_ip_adapter
from livediff.models.ip_adapter_spec import IPAdapterSpec
from livediff.streams.server_config import ServerConfig

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

pytestmark = BROWSER_MARKS
test_in_loopback_netns = netns_module_runner(__file__)

CONFIG = ServerConfig(host_addresses=("127.0.0.1",), stats_interval_s=0.25)
MESSAGE_BYTES = 256 * 1024  # the data channel's message size with aiortc (sctp.maxMessageSize)


def png(width: int, height: int, seed: int) -> bytes:
    pixels = np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def styled() -> ModelBundle:
    bundle = visible_tiny_bundle()
    adapter = load_ip_adapter(IPAdapterSpec("random", variant="plus", seed=3), bundle)
    return bundle.with_ip_adapter(adapter)


@pytest.fixture
def styled_server(styled: ModelBundle) -> Iterator[ThreadedServer]:
    """One per test: two servers restricted to loopback ICE cannot run at once, and the last
    test runs another."""
    with ThreadedServer(styled, CONFIG) as server:
        yield server


def session_values(server: ThreadedServer, session: str) -> tuple[str | None, float]:
    """``(ip_image, ip_scale)`` of the engine's session ``session``."""
    return server.call(
        lambda: (
            server.engine.sessions[session].params.ip_image,
            server.engine.sessions[session].params.ip_scale,
        )
    )


def drop_file(page: Page, data: bytes, name: str, kind: str = "image/png") -> None:
    """Drop a file on the drop zone, as a file dragged from the desktop is dropped."""
    page.evaluate(
        """([bytes, name, kind]) => {
          const files = new DataTransfer();
          files.items.add(new File([new Uint8Array(bytes)], name, {type: kind}));
          const zone = document.querySelector('#style-drop');
          zone.dispatchEvent(new DragEvent('dragover', {dataTransfer: files, bubbles: true, cancelable: true}));
          zone.dispatchEvent(new DragEvent('drop', {dataTransfer: files, bubbles: true, cancelable: true}));
        }""",
        [list(data), name, kind],
    )


def pick_file(page: Page, data: bytes, name: str, kind: str = "image/png") -> None:
    """Choose a file with the group's file picker."""
    page.set_input_files("#style-file", files=[{"name": name, "mimeType": kind, "buffer": data}])


def wait_for_key(page: Page, key: str | None) -> None:
    """Until the page's mirror of what the server runs has ``ip_image`` at ``key``."""
    wanted = "null" if key is None else f"'{key}'"
    page.wait_for_function(f"window.livediff.params.ip_image === {wanted}", timeout=60_000)


def wait_for_error(page: Page) -> str:
    page.wait_for_function("window.livediff.fieldErrors.ip_image", timeout=60_000)
    return page.locator("#style #error-ip_image").text_content() or ""


def thumbnail(page: Page) -> str | None:
    """The thumbnail's image address, None while hidden."""
    thumb = page.locator("#style-thumb")
    return thumb.get_attribute("src") if thumb.is_visible() else None


@NEEDS_NETNS
def test_a_dropped_png_styles_the_session_and_the_scale_follows_the_slider(
    browser: Browser, styled_server: ThreadedServer, styled: ModelBundle
) -> None:
    page = open_listed_page(browser, f"{styled_server.base}/?autostart=1&{FOX_QUERY}")
    group = page.locator("#style")
    assert group.locator("legend").text_content() == "Style image"
    assert "drop a style image here" in (page.locator("#style-drop").text_content() or "")
    assert thumbnail(page) is None and page.locator("#style-clear").is_hidden()
    scale = page.locator("#style [name=ip_scale]")
    assert [scale.get_attribute(a) for a in ("min", "max", "step")] == ["0", "2", "0.05"]
    wait_for_frames(page, 1)
    session = page.evaluate("window.livediff.session")
    assert session_values(styled_server, session) == (None, 1.0)

    style = png(40, 48, seed=5)
    assert styled.image_prompts is not None
    key = styled.image_prompts.cache_key(style)
    drop_file(page, style, "painting.png")
    wait_for_key(page, key)
    assert session_values(styled_server, session) == (key, 1.0)
    assert (thumbnail(page) or "").startswith("blob:")
    assert page.locator("#style-thumb").get_attribute("alt") == "style image: painting.png"
    assert page.locator("#style-note").text_content() == f"in use: painting.png ({key[:12]}…)"
    assert page.locator("#message").text_content() == "applied: ip_image"
    page.wait_for_function(  # and the frames run with it
        f"window.livediff.framesDecoded > {page.evaluate('window.livediff.framesDecoded') + 2}",
        timeout=60_000,
    )
    assert (
        styled_server.call(
            lambda: styled_server.engine.sessions[session].core.stream.params.ip_image
        )
        == key
    )

    press(scale, "ArrowLeft", 4)  # one message once the keys settle
    page.wait_for_function("window.livediff.params.ip_scale === 0.8", timeout=30_000)
    assert page.locator("#ip_scale-value").text_content() == "0.8"
    assert session_values(styled_server, session) == (key, 0.8)

    # a new session (Stop, Start) starts with the group's image (sent again) and scale
    page.click("#stop")
    page.click("#start")
    wait_for_frames(page, 1)
    second = page.evaluate("window.livediff.session")
    page.wait_for_function(
        f"window.livediff.replies.some(r => r.ip_image === '{key}') && "
        f"window.livediff.replies.filter(r => r.ip_image).length === 2",
        timeout=60_000,
    )
    assert second != session and session_values(styled_server, second) == (key, 0.8)

    page.click("#style-clear")  # none again
    wait_for_key(page, None)
    assert session_values(styled_server, second) == (None, 0.8)
    assert thumbnail(page) is None and page.locator("#style-clear").is_hidden()
    assert page.evaluate("[window.livediff.errors, window.livediff.state]") == [[], "connected"]


@NEEDS_NETNS
def test_a_bad_file_shows_the_error_and_the_session_keeps_its_image(
    browser: Browser, styled_server: ThreadedServer, styled: ModelBundle
) -> None:
    page = open_listed_page(browser, f"{styled_server.base}/?autostart=1&{FOX_QUERY}")
    wait_for_frames(page, 1)
    session = page.evaluate("window.livediff.session")
    style = png(40, 48, seed=6)
    assert styled.image_prompts is not None
    key = styled.image_prompts.cache_key(style)
    pick_file(page, style, "first.png")  # the file picker
    wait_for_key(page, key)
    kept = thumbnail(page)
    assert kept is not None and session_values(styled_server, session) == (key, 1.0)

    # the server cannot decode it: its error beside the group, the thumbnail goes back
    drop_file(page, b"this is not an image", "notes.png")
    error = wait_for_error(page)
    assert "does not decode" in error
    assert page.locator("#style.invalid").count() == 1 and page.locator("#banner").is_hidden()
    reply = page.evaluate("window.livediff.replies.at(-1)")
    assert reply["field"] == "ip_image" and "does not decode" in reply["error"]
    assert thumbnail(page) == kept
    assert page.locator("#style-note").text_content() == "in use: first.png"
    assert session_values(styled_server, session) == (key, 1.0)

    # over the channel's message size and unreadable: refused by the page, nothing is sent
    replies = len(page.evaluate("window.livediff.replies"))
    drop_file(page, b"\x89PNG not really" * 20_000, "huge.png")
    page.wait_for_function(
        "(window.livediff.fieldErrors.ip_image || '').includes('huge.png')", timeout=30_000
    )
    assert "cannot read it as an image" in page.locator("#error-ip_image").text_content()
    assert thumbnail(page) == kept and session_values(styled_server, session) == (key, 1.0)
    assert len(page.evaluate("window.livediff.replies")) == replies

    # over the message size but an image: the page sends a smaller JPEG of it
    big = png(320, 320, seed=7)
    assert len(big) > MESSAGE_BYTES
    drop_file(page, big, "photo.png")
    page.wait_for_function(
        f"window.livediff.params.ip_image && window.livediff.params.ip_image !== '{key}'",
        timeout=60_000,
    )
    shrunk = page.evaluate("window.livediff.params.ip_image")
    assert session_values(styled_server, session) == (shrunk, 1.0)
    assert page.locator("#error-ip_image").text_content() == ""
    assert page.evaluate("window.livediff.fieldErrors") == {}
    assert (page.locator("#style-note").text_content() or "").startswith("in use: photo.png")
    assert page.evaluate("window.livediff.state") == "connected"


@pytest.fixture
def plain_server() -> Iterator[ThreadedServer]:
    with ThreadedServer(visible_tiny_bundle(), CONFIG) as server:
        yield server


@NEEDS_NETNS
def test_a_server_without_an_ip_adapter_refuses_the_image(
    browser: Browser, plain_server: ThreadedServer
) -> None:
    page = open_listed_page(
        browser, f"{plain_server.base}/?autostart=1&{FOX_QUERY}&ip_scale=0.6", viewport=PHONE
    )
    wait_for_frames(page, 1)
    session = page.evaluate("window.livediff.session")
    drop_file(page, png(40, 48, seed=5), "painting.png")
    error = wait_for_error(page)
    assert "runs no IP-Adapter" in error and "--ip-adapter" in error
    assert thumbnail(page) is None and page.locator("#banner").is_hidden()
    assert no_horizontal_scroll(page)
    assert session_values(plain_server, session) == (None, 0.6)  # from ?ip_scale=
    assert page.locator("#style [name=ip_scale]").input_value() == "0.6"
    assert page.evaluate("window.livediff.state") == "connected"

"""The page's control image upload (a ControlNet row fed ``client``) in headless Chromium.

The recipe is test_controlnet_panel.py's (browser_testing's Chromium flags, a fake camera
playing a Y4M clip, every test inside a loopback-only network namespace, the server in this
process on its own loop in a thread), so the test reads the session's control input from the
engine itself. The page sends ``b"LDCN"`` + the name's length + the net's name + the file on
the data channel, shows the answer beside the row, and sends the image again to a new session.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
from browser_testing import BROWSER_MARKS, FOX_QUERY, open_listed_page, wait_for_frames
from PIL import Image
from reliability.reliability_testing import ThreadedServer

from helpers.client_control_testing import drawn, fitted_reference, png
from helpers.streams_testing import NEEDS_NETNS, netns_module_runner, visible_tiny_bundle
from livediff.models.control_uses import ControlNetSpec
from livediff.models.controlnet_loading import load_controlnet
from livediff.streams.server_config import ServerConfig

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Locator, Page

pytestmark = BROWSER_MARKS
test_in_loopback_netns = netns_module_runner(__file__)

WAITING = "waiting for a control image"


@pytest.fixture(scope="module")
def controlled_server() -> Iterator[ThreadedServer]:
    bundle = visible_tiny_bundle()
    net = load_controlnet(ControlNetSpec("random", name="edges", seed=1), bundle)
    config = ServerConfig(host_addresses=("127.0.0.1",), stats_interval_s=0.25)
    with ThreadedServer(bundle.with_controlnets([net]), config) as server:
        yield server


def edges_row(page: Page) -> Locator:
    return page.locator(".controlnet[data-net=edges]")


def control_input(server: ThreadedServer, session: str) -> tuple[list[str], torch.Tensor | None]:
    """(the nets the session waits for, the control image the engine holds for net 0)."""

    def read() -> tuple[list[str], torch.Tensor | None]:
        image = server.engine.sessions[session].core.plan.control_images.get(0)
        return server.engine.awaiting_control_images(session), image

    return server.call(read)


def model_side(server: ThreadedServer, session: str) -> int:
    return int(server.call(lambda: server.engine.sessions[session].core.plan.config.height))


def drop_file(page: Page, data: bytes, name: str, kind: str = "image/png") -> None:
    """Drop a file on the row's drop zone, as a file dragged from the desktop is dropped."""
    page.evaluate(
        """([bytes, name, kind]) => {
          const files = new DataTransfer();
          files.items.add(new File([new Uint8Array(bytes)], name, {type: kind}));
          const zone = document.querySelector('.controlnet[data-net=edges] [data-role=client-drop]');
          zone.dispatchEvent(new DragEvent('dragover', {dataTransfer: files, bubbles: true, cancelable: true}));
          zone.dispatchEvent(new DragEvent('drop', {dataTransfer: files, bubbles: true, cancelable: true}));
        }""",
        [list(data), name, kind],
    )


def wait_for_note(page: Page, text: str) -> None:
    page.wait_for_function(
        """(text) => (document.querySelector('.controlnet[data-net=edges] [data-role=client-note]')
          .textContent || '').includes(text)""",
        arg=text,
        timeout=60_000,
    )


def pick_client(page: Page) -> str:
    """Turn the edges net on, fed ``client``; returns the session, once the server runs it."""
    wait_for_frames(page, 1)
    row = edges_row(page)
    assert row.locator("[data-role=client]").is_hidden()  # off, and canny: no drop zone
    row.locator("[data-role=enabled]").check()
    assert row.locator("[data-role=client]").is_hidden()
    row.locator("[data-role=preprocessor]").select_option("client")
    assert row.locator("[data-role=client-drop]").is_visible()
    page.wait_for_function(
        "window.livediff.params.controlnets.some(u => u.preprocessor === 'client')",
        timeout=30_000,
    )
    return str(page.evaluate("window.livediff.session"))


@NEEDS_NETNS
def test_a_dropped_png_becomes_the_nets_control_input_and_follows_a_new_session(
    browser: Browser, controlled_server: ThreadedServer
) -> None:
    page = open_listed_page(browser, f"{controlled_server.base}/?autostart=1&{FOX_QUERY}")
    session = pick_client(page)
    wait_for_note(page, WAITING)  # the server listed the net in awaiting_control_images
    assert page.evaluate("window.livediff.awaiting") == ["edges"]
    assert control_input(controlled_server, session) == (["edges"], None)

    image = drawn(4)
    drop_file(page, png(image), "pose.png")
    wait_for_note(page, "in use: pose.png")
    assert page.evaluate("window.livediff.awaiting") == []
    waiting, held = control_input(controlled_server, session)
    side = model_side(controlled_server, session)
    assert waiting == [] and held is not None
    torch.testing.assert_close(held[0].float().cpu(), fitted_reference(image, side))
    assert page.evaluate("window.livediff.replies.at(-1)") == {
        "ok": True,
        "control_image": "edges",
    }

    # Stop, Start: the new session gets the last image again, without the user
    page.click("#stop")
    wait_for_note(page, "pose.png is sent when the session starts")
    page.click("#start")
    wait_for_frames(page, 1)
    second = str(page.evaluate("window.livediff.session"))
    assert second != session
    wait_for_note(page, "in use: pose.png")
    waiting, held = control_input(controlled_server, second)
    assert waiting == [] and held is not None
    torch.testing.assert_close(held[0].float().cpu(), fitted_reference(image, side))
    assert page.evaluate("[window.livediff.errors, window.livediff.state]") == [[], "connected"]


@NEEDS_NETNS
def test_a_bad_file_shows_the_servers_error_and_the_session_keeps_its_image(
    browser: Browser, controlled_server: ThreadedServer
) -> None:
    page = open_listed_page(browser, f"{controlled_server.base}/?autostart=1&{FOX_QUERY}")
    session = pick_client(page)
    drop_file(page, b"this is no image", "notes.png")  # the browser sends it as it is
    page.wait_for_function(
        "document.querySelector('.controlnet[data-net=edges] [data-role=client-error]').textContent",
        timeout=60_000,
    )
    error = edges_row(page).locator("[data-role=client-error]").text_content() or ""
    assert "does not decode" in error
    assert control_input(controlled_server, session) == (["edges"], None)
    wait_for_note(page, WAITING)  # still waiting: the refusal changed nothing
    assert page.evaluate("window.livediff.replies.at(-1)")["field"] == "control_image"

    image = drawn(5)
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    drop_file(page, out.getvalue(), "good.png")
    wait_for_note(page, "in use: good.png")
    assert edges_row(page).locator("[data-role=client-error]").text_content() == ""
    drop_file(page, b"still no image", "again.png")
    page.wait_for_function(
        "window.livediff.replies.filter(r => r.field === 'control_image').length === 2",
        timeout=60_000,
    )
    waiting, held = control_input(controlled_server, session)
    assert waiting == [] and held is not None  # the good image stays
    wait_for_note(page, "in use: good.png")  # the refused pick is forgotten: good.png is kept
    side = model_side(controlled_server, session)
    torch.testing.assert_close(held[0].float().cpu(), fitted_reference(image, side))
    assert np.asarray(image).shape == (80, 100, 3)
    assert page.evaluate("window.livediff.state") == "connected"

    # a file over the data channel's message size goes as a smaller JPEG the browser makes
    ramp = np.linspace(0, 220, 600)[None, :, None] + np.zeros((600, 1, 3))
    grain = np.random.default_rng(6).integers(0, 32, (600, 600, 3))
    noise = (ramp + grain).astype(np.uint8)  # a ramp under grain: hard to compress
    big = png(noise)
    assert len(big) > 256 * 1024  # aiortc's sctp.maxMessageSize
    drop_file(page, big, "noise.png")
    wait_for_note(page, "in use: noise.png")
    waiting, held = control_input(controlled_server, session)
    assert waiting == [] and held is not None
    sent = fitted_reference(noise, side)  # through a JPEG: close on average, not equal
    assert float((held[0].float().cpu() - sent).abs().mean()) < 0.05
    assert float((held[0].float().cpu() - fitted_reference(image, side)).abs().mean()) > 0.2


@NEEDS_NETNS
def test_the_preview_checkbox_shows_what_the_net_took_beside_its_row(
    browser: Browser, controlled_server: ThreadedServer
) -> None:
    page = open_listed_page(
        browser, f"{controlled_server.base}/?autostart=1&{FOX_QUERY}&controlnets=edges:1:canny"
    )
    wait_for_frames(page, 1)
    session = str(page.evaluate("window.livediff.session"))
    preview = edges_row(page).locator("[data-role=preview]")
    assert preview.is_hidden() and page.evaluate("window.livediff.previews") == {}
    assert page.locator("#controlnet-preview").is_visible()
    page.check("#controlnet-preview")
    page.wait_for_function("(window.livediff.previews.edges || 0) >= 2", timeout=60_000)
    page.wait_for_function(
        "document.querySelector('.controlnet[data-net=edges] [data-role=preview]').complete",
        timeout=30_000,
    )
    assert preview.is_visible() and (preview.get_attribute("src") or "").startswith("blob:")
    shown = preview.evaluate(
        """img => {
          const canvas = document.createElement('canvas');
          canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
          const g = canvas.getContext('2d');
          g.drawImage(img, 0, 0);
          const data = g.getImageData(0, 0, canvas.width, canvas.height).data;
          let bright = 0, dark = 0;
          for (let i = 0; i < data.length; i += 4) { if (data[i] > 200) bright++; else if (data[i] < 50) dark++; }
          return {width: img.naturalWidth, height: img.naturalHeight, bright, dark};
        }"""
    )
    side = model_side(controlled_server, session)
    assert (shown["width"], shown["height"]) == (side, side)  # the net's input, at model size
    assert shown["bright"] > 0 and shown["dark"] > shown["bright"]  # white canny edges on black

    page.uncheck("#controlnet-preview")
    assert preview.is_hidden()
    page.wait_for_function(
        "window.livediff.replies.filter(r => r.ok && r.id !== undefined).length >= 2",
        timeout=30_000,
    )
    assert page.evaluate("[window.livediff.errors, window.livediff.state]") == [[], "connected"]

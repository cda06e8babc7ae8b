"""The page's LoRA panel in headless Chromium, against a server with a per-session LoRA library.

The recipe is test_controlnet_panel.py's (browser_testing's Chromium flags, a fake camera
playing a Y4M clip, every test inside a loopback-only network namespace, the server in this
process on its own loop in a thread), so the test reads what each session runs from the engine
itself. The LoRA files are real ``.safetensors`` files written by :mod:`helpers.lora_testing`.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
from collections.abc import Coroutine, Iterator
from typing import TYPE_CHECKING, Any

import pytest
from browser_testing import (
    BROWSER_MARKS,
    FOX_QUERY,
    PHONE,
    no_horizontal_scroll,
    open_page,
    press,
    wait_for_frames,
)
from reliability.reliability_testing import ThreadedServer

from helpers.lora_testing import random_lora, save_kohya, save_peft
from helpers.streams_testing import NEEDS_NETNS, netns_module_runner, visible_tiny_bundle
from livediff.models.bundle import ModelBundle
from livediff.models.lora_library import LoraLibrary
from livediff.models.lora_store import LoraCapacity
from livediff.streams.server_config import ServerConfig

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Locator, Page

pytestmark = BROWSER_MARKS
test_in_loopback_netns = netns_module_runner(__file__)

TOKEN = "a-token-of-32-characters-0123456"
NAMES = ["ink", "pastel", "moss"]  # in slot order, as GET /loras lists them
NO_LIBRARY = "no LoRA library loaded"
# the page has the server's LoRA list, or has said why not
LISTED = "window.livediff.loras !== null || document.querySelector('#lora-note').textContent.includes('could not')"


@pytest.fixture(scope="module")
def bundle() -> ModelBundle:
    return visible_tiny_bundle()


@pytest.fixture(scope="module")
def lora_files(bundle: ModelBundle, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("loras")
    unet = bundle.unet
    return {
        "ink": str(save_peft(random_lora(unet, 8, 11), folder / "ink.safetensors", alpha=8.0)),
        "pastel": str(save_kohya(random_lora(unet, 4, 12, every=2), folder / "pastel.safetensors")),
        "moss": str(save_peft(random_lora(unet, 4, 13), folder / "moss.safetensors", alpha=4.0)),
    }


@pytest.fixture(scope="module")
def library_bundle(bundle: ModelBundle, lora_files: dict[str, str]) -> ModelBundle:
    """The visible tiny model on its own UNet copy, with ink, pastel and moss loaded; a session
    combines up to 2."""
    own = dataclasses.replace(bundle, unet=copy.deepcopy(bundle.unet))
    library = LoraLibrary.attach(own.unet, LoraCapacity(max_loras=4, max_rank=16, slots_per_row=2))
    for name in NAMES:
        library.load(name, lora_files[name])
    return own.with_loras(library)


@pytest.fixture
def library_server(library_bundle: ModelBundle) -> Iterator[ThreadedServer]:
    """One per test (a test unloads a LoRA; two servers restricted to loopback ICE cannot run at
    once, and the last test runs another)."""
    config = ServerConfig(host_addresses=("127.0.0.1",), stats_interval_s=0.25)
    with ThreadedServer(library_bundle, config) as server:
        yield server


def open_listed(browser: Browser, url: str, **options: Any) -> Page:
    page = open_page(browser, url, **options)
    page.wait_for_function(LISTED, timeout=30_000)
    return page


def server_uses(server: ThreadedServer, session: str) -> list[dict[str, Any]]:
    """The LoRAs the engine's session ``session`` runs, as the protocol writes them."""
    return server.call(
        lambda: [use.as_json() for use in server.engine.sessions[session].params.loras]
    )


def wait_for_server_value(page: Page, condition: str) -> None:
    """Until the page's mirror of the server's ``loras`` meets ``condition`` (``uses``)."""
    page.wait_for_function(f"(uses => {condition})(window.livediff.params.loras)", timeout=30_000)


def on_server(server: ThreadedServer, call: Coroutine[Any, Any, Any]) -> Any:
    """Await ``call`` on the server's loop (a LoRA load or unload, as POST/DELETE /loras do)."""
    return asyncio.run_coroutine_threadsafe(call, server.loop).result(timeout=60)


def row(page: Page, name: str) -> Locator:
    return page.locator(f".lora[data-lora={name}]")


def use_box(page: Page, name: str) -> Locator:
    return row(page, name).locator("[data-role=enabled]")


@NEEDS_NETNS
def test_the_panel_lists_the_library_and_its_changes_reach_the_session(
    browser: Browser, library_server: ThreadedServer
) -> None:
    page = open_listed(browser, f"{library_server.base}/?autostart=1&{FOX_QUERY}")
    assert [lora["name"] for lora in page.evaluate("window.livediff.loras")] == NAMES
    assert page.evaluate("window.livediff.loraCapacity.slots_per_row") == 2
    assert page.locator("#loras legend").text_content() == "LoRA"
    assert page.locator("#lora-note").text_content() == "up to 2 per session"
    assert row(page, "ink").locator("label.use").text_content().strip() == "use ink (rank 8)"
    scale = row(page, "ink").locator("[data-role=scale]")
    assert [scale.get_attribute(a) for a in ("min", "max", "step")] == ["-2", "2", "0.05"]
    assert scale.is_hidden()  # off: its scale is out of the way
    wait_for_frames(page, 1)
    session = page.evaluate("window.livediff.session")
    assert server_uses(library_server, session) == []

    use_box(page, "ink").check()
    wait_for_server_value(page, "uses.length === 1")
    assert server_uses(library_server, session) == [{"name": "ink", "scale": 1.0}]
    assert page.locator("#message").text_content() == "applied: loras"
    press(scale, "ArrowLeft", 6)  # one message once the keys settle
    wait_for_server_value(page, "uses[0].scale === 0.7")
    assert row(page, "ink").locator("output").text_content() == "0.7"

    use_box(page, "pastel").check()  # the second of two: the third waits
    wait_for_server_value(page, "uses.length === 2")
    assert server_uses(library_server, session) == [
        {"name": "ink", "scale": 0.7},
        {"name": "pastel", "scale": 1.0},
    ]
    assert use_box(page, "moss").is_disabled()
    use_box(page, "ink").uncheck()
    wait_for_server_value(page, "uses.length === 1")
    assert use_box(page, "moss").is_enabled()
    use_box(page, "moss").check()
    wait_for_server_value(page, "uses.length === 2")
    chosen = [{"name": "pastel", "scale": 1.0}, {"name": "moss", "scale": 1.0}]
    assert server_uses(library_server, session) == chosen
    wait_for_frames(page, page.evaluate("window.livediff.framesDecoded") + 2)  # it still runs

    # a new session (Stop, Start) starts with what the panel shows: the offer carries it
    page.click("#stop")
    page.click("#start")
    wait_for_frames(page, 1)
    second = page.evaluate("window.livediff.session")
    assert second != session and server_uses(library_server, second) == chosen
    assert page.evaluate("[window.livediff.errors, window.livediff.state]") == [[], "connected"]


@NEEDS_NETNS
def test_a_refused_choice_is_shown_beside_the_panel_and_reverts(
    browser: Browser, library_server: ThreadedServer, lora_files: dict[str, str]
) -> None:
    page = open_listed(browser, f"{library_server.base}/?autostart=1&{FOX_QUERY}&loras=ink:0.5")
    wait_for_frames(page, 1)
    session = page.evaluate("window.livediff.session")
    running = [{"name": "ink", "scale": 0.5}]
    assert server_uses(library_server, session) == running  # from ?loras=
    assert use_box(page, "ink").is_checked()
    assert row(page, "ink").locator("[data-role=scale]").input_value() == "0.5"

    # a third LoRA, forced through the page's own limit: the server refuses, the panel goes back
    use_box(page, "pastel").check()
    wait_for_server_value(page, "uses.length === 2")
    use_box(page, "moss").evaluate("box => { box.disabled = false; }")
    use_box(page, "moss").check()
    page.wait_for_function("window.livediff.fieldErrors.loras", timeout=30_000)
    assert "combines up to 2" in page.locator("#error-loras").text_content()
    assert not use_box(page, "moss").is_checked() and use_box(page, "moss").is_disabled()
    assert page.locator("#loras.invalid").count() == 1 and page.locator("#banner").is_hidden()
    two = [*running, {"name": "pastel", "scale": 1.0}]
    reply = page.evaluate("window.livediff.replies.at(-1)")
    assert reply["field"] == "loras" and reply["current"] == {"loras": two}
    assert server_uses(library_server, session) == two

    # a LoRA unloaded from the server after the page listed it
    use_box(page, "pastel").uncheck()
    wait_for_server_value(page, "uses.length === 1")
    on_server(library_server, library_server.engine.unload_lora("moss"))
    try:
        use_box(page, "moss").check()
        page.wait_for_function(
            "(window.livediff.fieldErrors.loras || '').includes('moss')", timeout=30_000
        )
    finally:  # the library is the module's: the next tests list moss again
        on_server(library_server, library_server.engine.load_lora("moss", lora_files["moss"]))
    assert "unknown LoRA 'moss'" in page.locator("#error-loras").text_content()
    assert not use_box(page, "moss").is_checked()
    assert server_uses(library_server, session) == running
    assert len(page.evaluate("window.livediff.errors")) == 2

    # a value the server takes clears the error
    press(row(page, "ink").locator("[data-role=scale]"), "ArrowRight")
    wait_for_server_value(page, "uses[0].scale === 0.55")
    assert page.locator("#error-loras").text_content() == ""
    assert page.evaluate("window.livediff.fieldErrors") == {}
    assert page.evaluate("window.livediff.state") == "connected"


@NEEDS_NETNS
def test_a_choice_refused_at_start_is_shown_beside_the_panel(
    browser: Browser, library_server: ThreadedServer
) -> None:
    page = open_listed(browser, f"{library_server.base}/?autostart=1&loras=ghost:0.5")
    page.wait_for_function("window.livediff.state === 'error'", timeout=60_000)
    assert "unknown LoRA 'ghost'" in page.locator("#error-loras").text_content()
    assert page.locator("#banner").is_hidden()
    assert not any(use_box(page, name).is_checked() for name in NAMES)  # the server's default
    page.click("#start")  # the refused choice is not sent again
    wait_for_frames(page, 1)
    assert server_uses(library_server, page.evaluate("window.livediff.session")) == []


@NEEDS_NETNS
def test_without_a_library_the_panel_says_so(browser: Browser) -> None:
    with ThreadedServer(visible_tiny_bundle(), ServerConfig(token=TOKEN)) as server:
        page = open_listed(browser, f"{server.base}/?token={TOKEN}", viewport=PHONE)
        assert page.evaluate("[window.livediff.loras, window.livediff.loraCapacity]") == [[], None]
        note = page.locator("#lora-note")
        assert note.is_visible() and NO_LIBRARY in (note.text_content() or "")
        assert page.locator(".lora").count() == 0 and no_horizontal_scroll(page)
        # without the token the list is refused, and the panel says why
        refused = open_listed(browser, f"{server.base}/")
        assert "could not be listed" in (refused.locator("#lora-note").text_content() or "")
        assert refused.evaluate("window.livediff.loras") is None

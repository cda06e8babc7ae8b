"""The page's ControlNet panel in headless Chromium, against a server with a random-weights net.

The recipe is test_browser.py's (its Chromium flags, a fake camera playing a Y4M clip, every
test inside a loopback-only network namespace). The server runs in this process, on its own
loop in a thread, so the test reads what each session runs from the engine itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

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
from reliability.reliability_testing import ThreadedServer

from helpers.streams_testing import NEEDS_NETNS, netns_module_runner, visible_tiny_bundle
from livediff.models.bundle import ModelBundle
from livediff.models.control_uses import ControlNetSpec
from livediff.models.controlnet_loading import load_controlnet
from livediff.streams.server_config import ServerConfig

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Locator, Page

pytestmark = BROWSER_MARKS
test_in_loopback_netns = netns_module_runner(__file__)

TOKEN = "a-token-of-32-characters-0123456"
CANNY_DEFAULTS = {"low": 100, "high": 200, "sigma": 1}
EDGES_LISTED = {
    "name": "edges",
    "preprocessors": ["canny", "passthrough", "previous_output", "client"],
    "default": "canny",
}


@pytest.fixture(scope="module")
def bundle() -> ModelBundle:
    return visible_tiny_bundle()


@pytest.fixture(scope="module")
def controlled_server(bundle: ModelBundle) -> Iterator[ThreadedServer]:
    net = load_controlnet(ControlNetSpec("random", name="edges", seed=1), bundle)
    config = ServerConfig(host_addresses=("127.0.0.1",), stats_interval_s=0.25)
    with ThreadedServer(bundle.with_controlnets([net]), config) as server:
        yield server


def server_uses(server: ThreadedServer, session: str) -> list[dict[str, Any]]:
    """What the engine's session ``session`` runs, as the protocol writes it."""
    return server.call(
        lambda: [use.as_json() for use in server.engine.sessions[session].params.controlnets]
    )


def wait_for_server_value(page: Page, condition: str) -> None:
    """Until the page's mirror of the server's ``controlnets`` meets ``condition`` (``uses``)."""
    page.wait_for_function(
        f"(uses => {condition})(window.livediff.params.controlnets)", timeout=30_000
    )


def edges_row(page: Page) -> Locator:
    return page.locator(".controlnet[data-net=edges]")


@NEEDS_NETNS
def test_the_panel_lists_the_net_and_its_changes_reach_the_session(
    browser: Browser, controlled_server: ThreadedServer
) -> None:
    page = open_listed_page(browser, f"{controlled_server.base}/?autostart=1&{FOX_QUERY}")
    assert page.evaluate("window.livediff.controlnets") == [EDGES_LISTED]
    assert "ControlNet" in page.locator("#controlnets legend").text_content()
    assert "camera" in page.locator("#controlnets .panel-hint").text_content()
    assert page.locator("#controlnet-note").is_hidden()
    row = edges_row(page)
    assert row.locator("label.use").text_content().strip() == "use edges"
    select = row.locator("[data-role=preprocessor]")
    assert select.locator("option").evaluate_all("options => options.map(o => o.value)") == [
        "canny",
        "passthrough",
        "previous_output",
        "client",
    ]
    assert select.input_value() == "canny"  # the server's default for this net
    scale = row.locator("[data-role=scale]")
    assert scale.get_attribute("min") == "0" and scale.get_attribute("max") == "2"
    assert scale.get_attribute("step") == "0.05"
    assert scale.is_disabled() and scale.is_hidden()  # off: its settings are out of the way
    wait_for_frames(page, 1)
    session = page.evaluate("window.livediff.session")
    assert server_uses(controlled_server, session) == []

    row.locator("[data-role=enabled]").check()
    wait_for_server_value(page, "uses.length === 1")
    assert scale.is_visible() and row.locator("[data-role=canny]").is_visible()  # canny's own
    canny_defaults = {"controlnet": "edges", "preprocessor": "canny", "params": CANNY_DEFAULTS}
    assert server_uses(controlled_server, session) == [{**canny_defaults, "scale": 1.0}]
    assert page.locator("#message").text_content() == "applied: controlnets"

    press(scale, "ArrowRight", 10)  # one message once the keys settle
    wait_for_server_value(page, "uses[0].scale === 1.5")
    assert row.locator("label:has([data-role=scale]) output").text_content() == "1.5"
    assert server_uses(controlled_server, session) == [{**canny_defaults, "scale": 1.5}]

    ranges = row.locator("[data-role=canny] input").evaluate_all(
        "inputs => inputs.map(i => [i.dataset.role, i.min, i.max, i.step])"
    )
    assert ranges == [
        ["low", "0", "255", "1"],
        ["high", "0", "255", "1"],
        ["sigma", "0", "3", "0.1"],
    ]
    press(row.locator("[data-role=low]"), "ArrowLeft", 20)
    press(row.locator("[data-role=high]"), "ArrowLeft", 10)
    press(row.locator("[data-role=sigma]"), "ArrowRight", 5)
    wait_for_server_value(page, "uses[0].params.sigma === 1.5")
    canny = {"low": 80, "high": 190, "sigma": 1.5}
    assert server_uses(controlled_server, session) == [
        {"controlnet": "edges", "preprocessor": "canny", "params": canny, "scale": 1.5}
    ]

    select.select_option("passthrough")  # a preprocessor without parameters
    wait_for_server_value(page, "uses[0].preprocessor === 'passthrough'")
    assert row.locator("[data-role=canny]").is_hidden()
    passthrough = {"controlnet": "edges", "preprocessor": "passthrough", "scale": 1.5}
    assert server_uses(controlled_server, session) == [passthrough]

    # a new session (Stop, Start) starts with what the panel shows: the offer carries it
    page.click("#stop")
    page.click("#start")
    wait_for_frames(page, 1)
    second = page.evaluate("window.livediff.session")
    assert second != session and server_uses(controlled_server, second) == [passthrough]
    assert row.locator("[data-role=enabled]").is_checked()

    row.locator("[data-role=enabled]").uncheck()
    wait_for_server_value(page, "uses.length === 0")
    assert server_uses(controlled_server, second) == []
    assert page.evaluate("[window.livediff.errors, window.livediff.state]") == [[], "connected"]


@NEEDS_NETNS
def test_a_refused_choice_is_shown_beside_the_panel_and_reverts(
    browser: Browser, controlled_server: ThreadedServer
) -> None:
    page = open_listed_page(
        browser, f"{controlled_server.base}/?autostart=1&{FOX_QUERY}&controlnets=edges:0.5"
    )
    wait_for_frames(page, 1)
    session = page.evaluate("window.livediff.session")
    row = edges_row(page)
    running = [{"controlnet": "edges", "scale": 0.5}]  # its preprocessor: the net's default
    assert server_uses(controlled_server, session) == running  # from ?controlnets=
    assert row.locator("[data-role=enabled]").is_checked()
    assert row.locator("[data-role=scale]").input_value() == "0.5"

    # canny's low threshold above its high one: the server refuses, the slider goes back
    low = row.locator("[data-role=low]")
    press(low, "End")
    page.wait_for_function("window.livediff.fieldErrors.controlnets", timeout=30_000)
    assert "must be below high" in page.locator("#error-controlnets").text_content()
    assert low.input_value() == "100"
    assert row.locator("label:has([data-role=low]) output").text_content() == "100"
    assert page.locator("#controlnets.invalid").count() == 1 and page.locator("#banner").is_hidden()
    reply = page.evaluate("window.livediff.replies.at(-1)")
    assert reply["field"] == "controlnets" and reply["current"] == {"controlnets": running}
    assert server_uses(controlled_server, session) == running

    # a preprocessor the server does not run, forced through the page's own select
    select = row.locator("[data-role=preprocessor]")
    select.evaluate("s => s.add(new Option('depth', 'depth'))")
    select.select_option("depth")
    page.wait_for_function(
        "(window.livediff.fieldErrors.controlnets || '').includes('depth')", timeout=30_000
    )
    assert "network is not loaded" in page.locator("#error-controlnets").text_content()
    assert select.input_value() == "canny" and row.locator("[data-role=canny]").is_visible()
    assert server_uses(controlled_server, session) == running
    assert len(page.evaluate("window.livediff.errors")) == 2

    # a value the server takes clears the error
    press(row.locator("[data-role=scale]"), "ArrowRight")
    wait_for_server_value(page, "uses[0].scale === 0.55")
    assert page.locator("#error-controlnets").text_content() == ""
    assert page.evaluate("window.livediff.fieldErrors") == {}
    assert page.evaluate("window.livediff.state") == "connected"


@NEEDS_NETNS
def test_a_choice_refused_at_start_is_shown_beside_the_panel(
    browser: Browser, controlled_server: ThreadedServer
) -> None:
    page = open_listed_page(
        browser, f"{controlled_server.base}/?autostart=1&controlnets=edges:1:depth"
    )
    page.wait_for_function("window.livediff.state === 'error'", timeout=60_000)
    assert "depth preprocessor" in page.locator("#error-controlnets").text_content()
    assert page.locator("#banner").is_hidden()
    assert not edges_row(page).locator("[data-role=enabled]").is_checked()  # the server's default
    page.click("#start")  # the refused choice is not sent again
    wait_for_frames(page, 1)
    assert server_uses(controlled_server, page.evaluate("window.livediff.session")) == []


@NEEDS_NETNS
def test_without_controlnets_the_panel_says_so(browser: Browser) -> None:
    with ThreadedServer(visible_tiny_bundle(), ServerConfig(token=TOKEN)) as server:
        page = open_listed_page(browser, f"{server.base}/?token={TOKEN}", viewport=PHONE)
        assert page.evaluate("window.livediff.controlnets") == []
        note = page.locator("#controlnet-note")
        assert note.is_visible() and "no ControlNets loaded" in note.text_content()
        assert page.locator(".controlnet").count() == 0 and no_horizontal_scroll(page)
        assert page.locator("#controlnet-preview").is_hidden()  # nothing to preview
        # without the token the list is refused, and the panel says why
        refused = open_listed_page(browser, f"{server.base}/")
        assert "could not be listed" in refused.locator("#controlnet-note").text_content()
        assert refused.evaluate("window.livediff.controlnets") is None

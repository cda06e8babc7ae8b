"""The page's Consistency group in headless Chromium, against servers with and without a bank.

The recipe is test_controlnet_panel.py's (test_browser.py's Chromium flags, a fake camera playing
a Y4M clip, every test inside a loopback-only network namespace, the server in this process on
its own loop in a thread), so the test reads what each session runs from the engine itself.
"""

from __future__ import annotations

import copy
import dataclasses
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

from helpers.streams_testing import (
    NEEDS_NETNS,
    netns_module_runner,
    visible_tiny_bundle,
)
from livediff.streams.server_config import ServerConfig

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Locator, Page

pytestmark = BROWSER_MARKS
test_in_loopback_netns = netns_module_runner(__file__)

KEYS = (
    "feature_bank",
    "bank_interval",
    "feature_fusion",
    "fusion_threshold",
    "latent_feedback",
    "scene_cut",
)
DEFAULTS = {
    "feature_bank": 0,
    "bank_interval": 4,
    "feature_fusion": 0.8,
    "fusion_threshold": 0.98,
    "latent_feedback": 0,
    "scene_cut": 0.5,
}
SLIDERS = ("feature_fusion", "fusion_threshold", "latent_feedback", "scene_cut")
NO_BANK = "this server runs no feature bank (start it with --feature-bank-frames N)"
CONFIG = ServerConfig(host_addresses=("127.0.0.1",), stats_interval_s=0.25)


@pytest.fixture
def banked_server() -> Iterator[ThreadedServer]:
    """A server whose sessions may keep up to 2 frames in a feature bank (one per test: two
    servers restricted to loopback ICE cannot run at once, and the last test runs another)."""
    bundle = visible_tiny_bundle()
    banked = dataclasses.replace(bundle, unet=copy.deepcopy(bundle.unet)).with_feature_bank(
        frames=2, rows=16
    )
    with ThreadedServer(banked, CONFIG) as server:
        yield server


def server_values(server: ThreadedServer, session: str) -> dict[str, Any]:
    """The Consistency parameters the engine's session ``session`` runs."""
    return server.call(
        lambda: {key: getattr(server.engine.sessions[session].params, key) for key in KEYS}
    )


def wait_for_server_value(page: Page, key: str, value: float) -> None:
    """Until the page's mirror of what the server runs has ``key`` at ``value``."""
    page.wait_for_function(f"window.livediff.params.{key} === {value}", timeout=30_000)


def field(page: Page, key: str) -> Locator:
    return page.locator(f"#consistency [name={key}]")


def shown_value(page: Page, key: str) -> str:
    return page.locator(f"#{key}-value").text_content() or ""


@NEEDS_NETNS
def test_the_group_explains_itself_and_its_changes_reach_the_session(
    browser: Browser, banked_server: ThreadedServer
) -> None:
    page = open_listed_page(browser, f"{banked_server.base}/?autostart=1&{FOX_QUERY}")
    assert page.evaluate("window.livediff.featureBankFrames") == 2
    group = page.locator("#consistency")
    assert group.locator("legend").text_content() == "Consistency"
    hint = group.locator(".panel-hint").text_content() or ""
    assert "reduces flicker: each frame also looks at the last few frames" in hint.lower()
    assert page.locator("#consistency-note").is_hidden()
    bank = field(page, "feature_bank")
    options = bank.locator("option").evaluate_all(
        "options => options.map(o => [o.value, o.disabled])"
    )  # more frames than this server keeps cannot be chosen
    assert options == [["0", False], ["1", False], ["2", False], ["3", True], ["4", True]]
    ranges = group.locator("input[type=range]").evaluate_all(
        "inputs => inputs.map(i => [i.name, i.min, i.max, i.step, i.disabled])"
    )
    assert ranges == [
        ["feature_fusion", "0", "1", "0.05", False],
        ["fusion_threshold", "0.8", "1", "0.005", False],
        ["latent_feedback", "0", "0.95", "0.05", False],
        ["scene_cut", "0", "1", "0.05", False],
    ]
    interval = field(page, "bank_interval")
    assert [interval.get_attribute(a) for a in ("type", "min", "max", "step")] == [
        "number",
        "1",
        "60",
        "1",
    ]
    wait_for_frames(page, 1)
    session = page.evaluate("window.livediff.session")
    assert server_values(banked_server, session) == DEFAULTS
    assert [shown_value(page, k) for k in SLIDERS] == ["0.8", "0.98", "0", "0.5"]
    assert interval.input_value() == "4"

    bank.select_option("2")
    wait_for_server_value(page, "feature_bank", 2)
    assert server_values(banked_server, session)["feature_bank"] == 2
    assert page.locator("#message").text_content() == "applied: feature_bank"

    press(field(page, "feature_fusion"), "ArrowLeft", 4)  # one message once the keys settle
    wait_for_server_value(page, "feature_fusion", 0.6)
    assert shown_value(page, "feature_fusion") == "0.6"
    press(field(page, "fusion_threshold"), "ArrowRight", 2)
    wait_for_server_value(page, "fusion_threshold", 0.99)
    assert shown_value(page, "fusion_threshold") == "0.99"
    press(field(page, "latent_feedback"), "ArrowRight", 6)
    wait_for_server_value(page, "latent_feedback", 0.3)
    assert shown_value(page, "latent_feedback") == "0.3"
    interval.fill("2")
    interval.press("Enter")
    wait_for_server_value(page, "bank_interval", 2)
    press(field(page, "scene_cut"), "ArrowLeft", 2)
    wait_for_server_value(page, "scene_cut", 0.4)
    assert shown_value(page, "scene_cut") == "0.4"
    chosen = {
        "feature_bank": 2,
        "bank_interval": 2,
        "feature_fusion": 0.6,
        "fusion_threshold": 0.99,
        "latent_feedback": 0.3,
        "scene_cut": 0.4,
    }
    assert server_values(banked_server, session) == chosen
    wait_for_frames(page, page.evaluate("window.livediff.framesDecoded") + 2)  # it still runs

    # a new session (Stop, Start) starts with what the group shows: the offer carries it
    page.click("#stop")
    page.click("#start")
    wait_for_frames(page, 1)
    second = page.evaluate("window.livediff.session")
    assert second != session and server_values(banked_server, second) == chosen
    assert page.evaluate("[window.livediff.errors, window.livediff.state]") == [[], "connected"]


@NEEDS_NETNS
def test_a_refused_value_is_shown_in_the_group_and_reverts(
    browser: Browser, banked_server: ThreadedServer
) -> None:
    page = open_listed_page(
        browser, f"{banked_server.base}/?autostart=1&{FOX_QUERY}&feature_bank=1"
    )
    wait_for_frames(page, 1)
    session = page.evaluate("window.livediff.session")
    assert server_values(banked_server, session)["feature_bank"] == 1  # from ?feature_bank=
    bank = field(page, "feature_bank")
    assert bank.input_value() == "1"

    # more frames than the server keeps, forced through the page's own select
    bank.evaluate("s => { s.options[4].disabled = false; }")
    bank.select_option("4")
    page.wait_for_function("window.livediff.fieldErrors.feature_bank", timeout=30_000)
    error = page.locator("#consistency #error-feature_bank")  # inside the group, by the select
    assert "keeps at most 2 frames" in (error.text_content() or "")
    assert bank.input_value() == "1"  # back to what the session runs
    assert page.locator("#consistency label.invalid [name=feature_bank]").count() == 1
    assert page.locator("#banner").is_hidden()
    reply = page.evaluate("window.livediff.replies.at(-1)")
    assert reply["field"] == "feature_bank" and reply["current"] == {"feature_bank": 1}
    assert server_values(banked_server, session)["feature_bank"] == 1

    # a value the server takes clears the error
    bank.select_option("2")
    wait_for_server_value(page, "feature_bank", 2)
    assert error.text_content() == ""

    # a bank interval out of range (at most 60), sent as typed: refused, the field goes back
    interval = field(page, "bank_interval")
    interval.fill("99")
    interval.press("Enter")
    page.wait_for_function("window.livediff.fieldErrors.bank_interval", timeout=30_000)
    text = page.locator("#consistency #error-bank_interval").text_content() or ""
    assert text.startswith("bank_interval=99")
    assert interval.input_value() == "4" and page.locator("#banner").is_hidden()
    assert server_values(banked_server, session)["bank_interval"] == 4
    interval.fill("8")
    interval.press("Enter")
    wait_for_server_value(page, "bank_interval", 8)
    assert page.evaluate("window.livediff.fieldErrors") == {}
    assert server_values(banked_server, session)["feature_bank"] == 2
    assert page.evaluate("window.livediff.state") == "connected"


@NEEDS_NETNS
def test_a_value_refused_at_start_is_shown_in_the_group(
    browser: Browser, banked_server: ThreadedServer
) -> None:
    page = open_listed_page(browser, f"{banked_server.base}/?autostart=1&feature_bank=4")
    page.wait_for_function("window.livediff.state === 'error'", timeout=60_000)
    error = page.locator("#consistency #error-feature_bank").text_content() or ""
    assert "keeps at most 2 frames" in error
    assert page.locator("#banner").is_hidden()
    assert field(page, "feature_bank").input_value() == "0"  # the server's default
    page.click("#start")  # the refused value is not sent again
    wait_for_frames(page, 1)
    session = page.evaluate("window.livediff.session")
    assert server_values(banked_server, session) == DEFAULTS


@NEEDS_NETNS
def test_without_a_bank_the_group_says_so_and_feedback_still_works(browser: Browser) -> None:
    with ThreadedServer(visible_tiny_bundle(), CONFIG) as server:
        page = open_listed_page(browser, f"{server.base}/?autostart=1&{FOX_QUERY}", viewport=PHONE)
        assert page.evaluate("window.livediff.featureBankFrames") == 0
        note = page.locator("#consistency-note")
        assert note.is_visible() and note.text_content() == NO_BANK
        for key in ("feature_bank", "bank_interval", "feature_fusion", "fusion_threshold"):
            assert field(page, key).is_disabled(), key
        assert field(page, "scene_cut").is_enabled()  # it restarts latent feedback too
        feedback = field(page, "latent_feedback")
        assert feedback.is_enabled() and no_horizontal_scroll(page)
        wait_for_frames(page, 1)
        session = page.evaluate("window.livediff.session")
        press(feedback, "ArrowRight", 2)
        wait_for_server_value(page, "latent_feedback", 0.1)
        assert server_values(server, session) == {**DEFAULTS, "latent_feedback": 0.1}
        assert page.evaluate("[window.livediff.errors, window.livediff.state]") == [[], "connected"]

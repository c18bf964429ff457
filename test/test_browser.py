"""The demo page in real headless Chromium: both transports decode, speak, and look right."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page

from websocket_service.config import Settings

from .live_server import live_server

# screenshots go to a temporary folder unless SCREENSHOT_DIR names one (e.g. docs/)
SHOTS = Path(os.environ.get("SCREENSHOT_DIR") or tempfile.mkdtemp(prefix="shots-"))


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    settings = Settings(avatars_dir=tmp_path_factory.mktemp("avatars"),
                        rtc_host_addresses=["127.0.0.1"])
    with live_server(settings) as url:
        yield url


def _stats(page: Page) -> dict[str, Any]:
    return page.evaluate("window.__stats")


def _wait(page: Page, cond: str, timeout: float) -> dict[str, Any]:
    page.wait_for_function(cond, timeout=timeout * 1000)
    return _stats(page)


def _run(page: Page, base_url: str, transport: str, counter: str, shot: str) -> dict[str, Any]:
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(base_url + "/")
    page.check(f"input[name=transport][value={transport}]")
    page.click("#connect")
    _wait(page, f"window.__stats.{counter} > 50", 15)
    assert page.locator("#actions button[data-action=nod]").count() == 1
    page.click("#speak")
    st = _wait(page, "window.__stats.speakingSeen > 0 && window.__stats.g2gMs.length > 0", 15)
    shown = page.evaluate(f"window.__stats.{counter}")  # a mouthful of speech (25 frames) ...
    _wait(page, f"window.__stats.{counter} >= {shown + 25}", 10)  # ... for the screenshot
    page.screenshot(path=str(SHOTS / shot))
    page.click("#actions button[data-action=nod]")  # ACTION over the page's transport
    st = _wait(page, "window.__stats.actionSeen > 0", 10)
    page.click("#disconnect")
    assert not errors, errors
    assert not st["errors"], st["errors"]
    assert st["ttffMs"] is not None and st["ttffMs"] > 0
    return st


def test_webrtc_mode(browser: Browser, base_url: str) -> None:
    page = browser.new_page(viewport={"width": 1100, "height": 760})
    st = _run(page, base_url, "webrtc", "webrtcFramesDecoded", "screenshot_webrtc.png")
    assert st["transport"] == "webrtc" and st["webrtcFramesDecoded"] > 50
    page.close()


def test_websocket_webcodecs_mode(browser: Browser, base_url: str) -> None:
    page = browser.new_page(viewport={"width": 1100, "height": 760})
    st = _run(page, base_url, "ws", "wsFramesDecoded", "screenshot_ws.png")
    assert st["transport"] == "ws" and st["wsFramesDecoded"] > 50
    assert min(st["g2gMs"]) > 0
    page.close()


def test_page_is_phone_friendly(browser: Browser, base_url: str) -> None:
    page = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True)
    page.goto(base_url + "/")
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"horizontal scroll on a phone: {width}px"
    assert page.locator("#connect").is_visible()
    page.close()


@pytest.mark.parametrize("transport", ["webrtc", "ws"])
def test_microphone_drives_the_lips(browser: Browser, base_url: str, transport: str) -> None:
    """Chromium's fake capture device (a periodic beep) through the page's mic button."""
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(base_url + "/")
    page.check(f"input[name=transport][value={transport}]")
    page.click("#connect")
    counter = "webrtcFramesDecoded" if transport == "webrtc" else "wsFramesDecoded"
    _wait(page, f"window.__stats.{counter} > 10", 15)
    assert _stats(page)["speakingSeen"] == 0  # nothing said yet
    page.click("#mic")
    st = _wait(page, "window.__stats.speakingSeen > 0", 20)
    page.click("#mic")
    page.click("#disconnect")
    assert not errors and not st["errors"], (errors, st["errors"])
    page.close()

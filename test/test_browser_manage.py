"""The demo page's avatar panel in headless Chromium: status, picker, upload with progress."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page

from websocket_service.config import Settings

from .live_server import live_server
from .support import face_photo, face_video, wait_job

TOKEN = "page-token"  # the page must send it on every call, the upload included
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    media = tmp_path_factory.mktemp("media")
    face_photo(media / "astro.png")
    settings = Settings(avatars_dir=tmp_path_factory.mktemp("avatars"), media_dir=media,
                        rtc_host_addresses=["127.0.0.1"], auth_token=TOKEN, default_width=256,
                        default_height=256)
    with live_server(settings) as url:
        # one avatar prepared on the server beforehand, for the picker
        r = httpx.post(f"{url}/api/webrtc/avatar/prepare", headers=AUTH,
                       params={"avatar_id": "astro", "video_path": "astro.png"})
        assert r.status_code == 202, r.text
        with httpx.Client(base_url=url, headers=AUTH) as http:
            job = wait_job(http, r.json()["status_url"])
        assert job["status"] == "done", job
        yield url


def _open(browser: Browser, base_url: str) -> tuple[Page, list[str]]:
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{base_url}/?token={TOKEN}")
    page.wait_for_function("window.__manage.status !== null && window.__manage.avatars.length > 0",
                           timeout=15_000)
    return page, errors


def _session_on(page: Page, base_url: str, transport: str = "webrtc") -> dict[str, Any]:
    """Connect, wait for decoded video, and return the session the page opened."""
    page.check(f"input[name=transport][value={transport}]")
    page.click("#connect")
    counter = "webrtcFramesDecoded" if transport == "webrtc" else "wsFramesDecoded"
    page.wait_for_function(f"window.__stats.{counter} > 25", timeout=20_000)
    sid = page.evaluate("window.__stats.sessionId")
    session = httpx.get(f"{base_url}/sessions/{sid}", headers=AUTH).json()
    page.click("#disconnect")
    return session


@pytest.mark.parametrize("transport", ["webrtc", "ws"])
def test_status_and_the_picker_start_a_session_on_a_prepared_avatar(browser: Browser,
                                                                     base_url: str,
                                                                     transport: str) -> None:
    page, errors = _open(browser, base_url)
    assert page.text_content("#engineStatus").startswith("engine geometric · loaded")
    assert page.is_hidden("#demoMode")
    options = page.eval_on_selector_all("#avatar option", "os => os.map(o => o.value)")
    assert {"astro", "default"} <= set(options)
    page.select_option("#avatar", "astro")
    session = _session_on(page, base_url, transport)
    assert session["avatar"] == "astro"
    assert session["transport"] == ("webrtc" if transport == "webrtc" else "websocket")
    assert not errors and not page.evaluate("window.__stats.errors")
    page.close()


@pytest.mark.parametrize("name", ["my face.png", "clip.mp4"])
def test_upload_shows_progress_and_the_new_avatar_streams(browser: Browser, base_url: str,
                                                          tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    face_photo(path) if name.endswith(".png") else face_video(path)
    avatar_id = "my-face" if name.endswith(".png") else "clip"
    page, errors = _open(browser, base_url)
    assert page.is_disabled("#upload")
    page.set_input_files("#file", str(path))
    page.click("#upload")
    page.wait_for_function(f"document.getElementById('avatar').value === {avatar_id!r}",
                           timeout=60_000)
    manage = page.evaluate("window.__manage")
    assert manage["job"]["status"] == "done" and manage["job"]["avatar_id"] == avatar_id
    steps = manage["progress"]
    assert steps == sorted(steps) and steps[-1] == 100 and len(steps) >= 2, steps
    assert page.eval_on_selector("#progress", "p => p.value") == 100
    assert page.text_content("#progressText") == "ready"
    assert avatar_id in manage["status"]["loaded_avatars"]
    session = _session_on(page, base_url)
    assert session["avatar"] == avatar_id
    assert not errors and not page.evaluate("window.__stats.errors")
    page.close()


def test_the_panel_fits_a_phone(browser: Browser, base_url: str) -> None:
    page = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True)
    page.goto(f"{base_url}/?token={TOKEN}")
    page.wait_for_function("window.__manage.status !== null", timeout=15_000)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    assert page.locator("#upload").is_visible() and page.locator("#avatar").is_visible()
    page.close()

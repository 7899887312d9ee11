"""The page in a real browser: headless Chromium (Debian's) driven by Playwright."""

from __future__ import annotations

import pytest
from wsclient import Client

from tools.daemon import REPO, Daemon

pytestmark = pytest.mark.browser

WAIT_MS = 30_000  # generous: a deadline costs nothing when the page is quick


@pytest.fixture
def page(browser, chatd: Daemon):
    """The seed-style plain page (/plain.html) on a phone-sized screen."""
    context = browser.new_context(viewport={"width": 390, "height": 740})  # a phone
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    pg.goto(f"http://127.0.0.1:{chatd.port}/plain.html")
    yield pg
    context.close()
    assert errors == []


def wait_line(pg, text: str) -> None:
    """Wait for a log line that is exactly ``text`` (locators: no eval under the page's CSP)."""
    pg.locator("#log > div").get_by_text(text, exact=True).first.wait_for(timeout=WAIT_MS)


def log_lines(pg) -> list[str]:
    return pg.locator("#log > div").all_text_contents()


def test_connect_send_and_see_own_message(page, chatd: Daemon) -> None:
    assert page.input_value("#host") == "127.0.0.1"
    assert page.input_value("#port") == str(chatd.port)
    assert page.is_disabled("#send")
    page.click("#connect")
    page.wait_for_selector('#state[data-state="open"]', timeout=WAIT_MS)
    other = Client(chatd.port, "/")
    page.fill("#text", "hello from the page")
    page.press("#text", "Enter")  # Enter sends
    line = other.recv()
    assert isinstance(line, str)
    assert line.startswith("ID") and line.endswith(": hello from the page")
    wait_line(page, line)
    assert page.input_value("#text") == ""
    other.send("hi page")
    wait_line(page, f"ID{other.local_port}: hi page")
    page.screenshot(path=str(screenshot("page-chat.png")))
    other.close()
    page.click("#connect")  # now "Disconnect"
    page.wait_for_selector('#state[data-state="closed"]', timeout=WAIT_MS)
    assert page.is_disabled("#text")


def test_html_payload_shown_as_text_never_run(page, chatd: Daemon) -> None:
    page.click("#connect")
    page.wait_for_selector('#state[data-state="open"]', timeout=WAIT_MS)
    evil = Client(chatd.port, "/")
    payload = '<img src=x onerror="window.pwned=1"><script>window.pwned=2</script><b>bold</b>'
    evil.send(payload)
    expected = f"ID{evil.local_port}: {payload}"
    wait_line(page, expected)
    assert page.evaluate("window.pwned") is None
    assert page.locator("#log img, #log script, #log b").count() == 0
    evil.close()


def test_relay_room_from_the_page(page, chatd: Daemon) -> None:
    page.fill("#room", "lounge")
    page.click("#connect")
    page.wait_for_selector('#state[data-state="open"]', timeout=WAIT_MS)
    peer = Client(chatd.port, "/relay/lounge")
    peer.send(b"\x00\x01\x02")
    peer.send("text in the room")
    wait_line(page, "text in the room")
    assert "[binary, 3 bytes]" in log_lines(page)
    page.fill("#text", "from page to room")
    page.click("#send")
    assert peer.recv() == b"\x00\x01\x02"  # the sender gets its own messages too
    assert peer.recv() == "text in the room"
    assert peer.recv() == "from page to room"
    peer.close()


def test_server_going_away_is_shown(browser, daemon) -> None:
    d = daemon()
    pg = browser.new_page()
    pg.goto(f"http://127.0.0.1:{d.port}/plain.html")
    pg.click("#connect")
    pg.wait_for_selector('#state[data-state="open"]', timeout=WAIT_MS)
    d.stop()
    pg.wait_for_selector('#state[data-state="closed"]', timeout=WAIT_MS)
    pg.locator("#log > div").filter(has_text="disconnected").first.wait_for(timeout=WAIT_MS)
    assert any(line.startswith("disconnected") for line in log_lines(pg))
    pg.close()


def screenshot(name: str):
    out = REPO / "reports" / "screenshots"
    out.mkdir(parents=True, exist_ok=True)
    return out / name

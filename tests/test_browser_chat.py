"""The chat page (chatd.v1) in headless Chromium: what a person would do with it."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator

import pytest
from v1client import V1

from tools.daemon import REPO, Daemon

pytestmark = pytest.mark.browser

WAIT_MS = 30_000  # generous: a deadline costs nothing when the page is quick
PHONE = (390, 780)
DESKTOP = (1280, 800)


def eventually(read: Callable[[], object], want: object, what: str, timeout: float = 30.0) -> None:
    """Poll ``read()`` (bounded) until it equals ``want``; fail with the last value seen."""
    deadline = time.monotonic() + timeout
    got = read()
    while got != want and time.monotonic() < deadline:
        time.sleep(0.05)
        got = read()
    assert got == want, f"{what}: not within {timeout}s; last seen {got!r}"


class Person:
    """One browser context (its own storage): a person at a phone-sized screen."""

    def __init__(
        self,
        browser,
        port: int,
        path: str = "/",
        size: tuple[int, int] = PHONE,
        locale: str | None = None,
    ) -> None:
        self.port = port
        self.path = path
        extra = {"locale": locale} if locale else {}
        self.context = browser.new_context(viewport={"width": size[0], "height": size[1]}, **extra)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on(
            "console",
            lambda m: (
                self.errors.append(m.text)
                if m.type == "error" and "WebSocket connection" not in m.text
                else None
            ),
        )
        self.open()

    def open(self) -> None:
        self.page.goto(f"http://127.0.0.1:{self.port}{self.path}")

    def join(self, nick: str, room: str = "lobby") -> None:
        self.page.fill("#nick", nick)
        self.page.fill("#room", room)
        self.page.press("#room", "Enter")
        self.wait_open()

    def wait_open(self, timeout: float = WAIT_MS) -> None:
        self.page.wait_for_selector('#state[data-state="open"]', timeout=timeout)

    def join_another(self, room: str) -> None:
        """Join one more room from the join form (unfolded first on a phone)."""
        if not self.page.is_visible("#join-form"):
            self.page.click("#show-join")
        self.page.fill("#room", room)
        self.page.press("#room", "Enter")
        self.page.wait_for_selector(
            f'#rooms button.room[aria-current="true"][data-room="{room}"]', timeout=WAIT_MS
        )
        self.wait_open()

    def room_button(self, room: str):
        return self.page.locator(f'#rooms button.room[data-room="{room}"]')

    def say(self, text: str) -> None:
        self.page.fill("#text", text)
        self.page.press("#text", "Enter")

    def wait_text(self, text: str, timeout: float = WAIT_MS) -> None:
        self.page.locator("#log .msg .text").get_by_text(text, exact=True).first.wait_for(
            timeout=timeout
        )

    def texts(self) -> list[str]:
        return self.page.locator("#log .msg .text").all_text_contents()

    def members(self) -> list[str]:
        return self.page.locator("#members li").all_text_contents()

    def wait_texts(self, want: list[str]) -> None:
        """Wait until the log shows exactly ``want``, in order."""
        eventually(self.texts, want, "messages shown")

    def wait_members(self, want: list[str]) -> None:
        """Wait until the member list is exactly ``want`` (in any order)."""
        eventually(lambda: sorted(self.members()), sorted(want), "members shown")

    def close(self) -> None:
        self.context.close()
        assert self.errors == []


@pytest.fixture
def people(browser, chatd: Daemon) -> Iterator[list[Person]]:
    made: list[Person] = []

    def make(port: int = chatd.port, **kw) -> Person:
        p = Person(browser, port, **kw)
        made.append(p)
        return p

    yield make  # type: ignore[misc]
    for p in made:
        p.close()


def shot(person: Person, name: str) -> None:
    out = REPO / "reports" / "screenshots"
    out.mkdir(parents=True, exist_ok=True)
    person.page.screenshot(path=str(out / name))


def test_two_people_chat_and_see_each_other(people) -> None:
    alice, bob = people(), people()
    alice.join("alice", "tea")
    bob.join("bob", "tea")
    alice.wait_members(["alice", "bob"])
    bob.wait_members(["alice", "bob"])
    alice.say("hello bob")
    bob.wait_text("hello bob")
    alice.wait_text("hello bob")
    mine = alice.page.locator("#log .msg.mine .text").all_text_contents()
    assert mine == ["hello bob"]  # one's own messages are marked
    assert bob.page.locator("#log .msg.mine").count() == 0
    bob.say("hi alice 你好")
    alice.wait_text("hi alice 你好")
    assert alice.page.locator("#log .msg time").first.text_content()  # timestamps shown
    shot(alice, "chat-alice.png")
    bob.page.click("#leave")
    alice.page.locator("#log .sys").get_by_text("bob left", exact=True).wait_for(timeout=WAIT_MS)
    alice.wait_members(["alice"])


def test_reload_shows_the_history(people) -> None:
    carol = people()
    carol.join("carol", "reload-room")
    for i in range(3):
        carol.say(f"before reload {i}")
    carol.wait_text("before reload 2")
    carol.open()  # a reload: nick and room are remembered, the history comes with "joined"
    carol.wait_open()
    carol.wait_texts([f"before reload {i}" for i in range(3)])


def test_html_is_shown_as_text_and_never_runs(people, chatd: Daemon) -> None:
    dave = people()
    dave.join("dave", "xss")
    evil = V1(chatd.port, "mallory")
    evil.join("xss")
    payload = '<img src=x onerror="window.pwned=1"><script>window.pwned=2</script><b>b</b>'
    evil.say("xss", payload)
    dave.wait_text(payload)
    assert dave.page.evaluate("window.pwned") is None
    assert dave.page.locator("#log img, #log script, #log b").count() == 0
    evil.close()


def test_nick_taken_is_explained(people) -> None:
    from playwright.sync_api import expect

    a, b = people(), people()
    a.join("erin", "names")
    b.page.fill("#nick", "Erin")
    b.page.fill("#room", "names")
    b.page.press("#room", "Enter")
    expect(b.page.locator("#notice")).to_be_visible(timeout=WAIT_MS)
    expect(b.page.locator("#notice")).to_contain_text("already in names", timeout=WAIT_MS)
    b.page.wait_for_selector('#state[data-state="closed"]', timeout=WAIT_MS)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_restart_under_an_open_page_reconnects_and_shows_missed_messages_once(
    people, tmp_path
) -> None:
    port = free_port()
    d = Daemon("--port", str(port), cwd=str(tmp_path))
    try:
        frank = people(port)
        frank.join("frank", "restart")
        other = V1(port, "grace")
        other.join("restart")
        other.say("restart", "before the restart")
        frank.wait_text("before the restart")
        d.stop()
        frank.page.wait_for_selector('#state[data-state="reconnecting"]', timeout=WAIT_MS)
        d = Daemon("--port", str(port), cwd=str(tmp_path))
        other = V1(port, "grace")  # quick, before the page's backoff brings it back
        other.join("restart")
        for i in range(3):
            other.say("restart", f"while you were away {i}")
        frank.wait_open(timeout=60_000)
        frank.wait_text("while you were away 2")
        other.say("restart", "after the reconnect")
        frank.wait_text("after the reconnect")
        frank.wait_texts(
            [
                "before the restart",
                "while you were away 0",
                "while you were away 1",
                "while you were away 2",
                "after the reconnect",
            ]
        )
        shot(frank, "chat-after-restart.png")
        other.close()
    finally:
        d.stop()


def test_a_history_bigger_than_a_frame_limit_is_shown_whole(people, daemon) -> None:
    """1.5 MiB of history comes as joined and history pages; all of it is shown, once."""
    d = daemon("--ping-interval", "0", "--rate", "1000", "--rate-burst", "1000",
               "--join-history", "150")  # fmt: skip
    writer = V1(d.port, "hana")
    writer.join("long-history")
    for i in range(150):
        writer.say("long-history", f"{i:03d} " + "y" * 10_000)
        writer.next("message")
    ivan = people(d.port)
    ivan.join("ivan", "long-history")
    writer.say("long-history", "live after the pages")
    ivan.wait_text("live after the pages")
    texts = ivan.texts()
    assert [t[:3] for t in texts[:-1]] == [f"{i:03d}" for i in range(150)]
    assert texts[-1] == "live after the pages"
    writer.close()


def test_a_sign_in_link_with_a_token_joins_under_the_tokens_name(browser, daemon) -> None:
    import jwt

    secret = "a-secret-of-at-least-32-bytes-for-the-page"
    d = daemon("--ping-interval", "0", "--auth", "token", "--jwt-key", secret)

    def link(sub: str, name: str, rooms: dict[str, str], exp: float) -> str:
        claims = {"sub": sub, "name": name, "rooms": rooms, "exp": exp}
        return f"#token={jwt.encode(claims, secret, algorithm='HS256')}"

    alice = Person(
        browser, d.port, "/" + link("alice", "Alice", {"lobby": "rw"}, time.time() + 600)
    )
    alice.wait_open()
    assert alice.page.text_content("#state") == "Alice in lobby"
    assert alice.page.evaluate("location.hash") == ""  # the token left the address bar
    assert not alice.page.is_visible("#nick")
    alice.say("signed in")
    alice.wait_text("signed in")
    # A reader's link: joins, but may not send; an expired link says so in words.
    reader = Person(browser, d.port, "/" + link("rob", "Rob", {"lobby": "r"}, time.time() + 600))
    reader.wait_open()
    reader.wait_text("signed in")
    reader.say("may I?")
    reader.page.locator("#log .sys").get_by_text("no right to send", exact=False).wait_for(
        timeout=WAIT_MS
    )
    late = Person(browser, d.port, "/" + link("eve", "Eve", {"lobby": "rw"}, time.time() - 3600))
    late.page.locator("#notice").get_by_text("no longer valid", exact=False).wait_for(
        timeout=WAIT_MS
    )
    for p in (alice, reader, late):
        assert p.errors == [], p.errors
        p.close()


def test_scrolling_to_the_top_loads_older_messages_in_order(people, daemon) -> None:
    d = daemon("--ping-interval", "0", "--rate", "1000", "--rate-burst", "1000")
    writer = V1(d.port, "olga")
    writer.join("older")
    for i in range(120):
        writer.say("older", f"m{i:03d}")
        writer.next("message")
    reader = people(d.port)
    reader.join("paul", "older")
    eventually(lambda: len(reader.texts()), 50, "the join's 50 latest")
    for shown in (100, 120):  # two pages of up to 50 older ones, the last one short
        reader.page.evaluate("document.getElementById('log').scrollTop = 0")
        reader.page.evaluate("document.getElementById('log').dispatchEvent(new Event('scroll'))")
        eventually(lambda: len(reader.texts()), shown, "older messages above")
    assert reader.texts() == [f"m{i:03d}" for i in range(120)]
    writer.say("older", "live")  # and the live end still works
    reader.wait_text("live")
    writer.close()


def test_typing_is_shown_to_the_other_person(people) -> None:
    quinn, rosa = people(), people()
    quinn.join("quinn", "typing-room")
    rosa.join("rosa", "typing-room")
    quinn.page.type("#text", "hel")  # typing, not sent
    rosa.page.locator("#typing").get_by_text("quinn is typing…", exact=True).wait_for(
        timeout=WAIT_MS
    )
    assert quinn.page.text_content("#typing") == ""  # not to oneself
    quinn.page.press("#text", "Enter")
    rosa.wait_text("hel")
    eventually(lambda: rosa.page.text_content("#typing"), "", "typing gone with the message")


def test_edit_react_and_delete_on_the_page(people) -> None:
    alice, bob = people(), people()
    alice.join("alice", "edit-room")
    bob.join("bob", "edit-room")
    alice.say("helo")
    bob.wait_text("helo")
    mine = alice.page.locator("#log .msg.mine").first
    mine.click()  # (a tap shows a message's actions on a phone)
    mine.get_by_role("button", name="edit").click()
    alice.page.fill("#log .msg.mine input.edit", "hello")
    alice.page.press("#log .msg.mine input.edit", "Enter")
    bob.wait_texts(["hello"])
    theirs = bob.page.locator("#log .msg").first
    assert theirs.locator(".edited").text_content() == "(edited)"
    assert theirs.get_by_role("button", name="edit").count() == 0  # not bob's to edit
    theirs.click()
    theirs.get_by_role("button", name="react 👍").click()
    chip = mine.locator(".reactions button")
    eventually(lambda: chip.all_text_contents(), ["👍 1"], "bob's reaction shown to alice")
    chip.first.click()  # alice joins it
    eventually(lambda: theirs.locator(".reactions button").all_text_contents(), ["👍 2"], "two")
    shot(bob, "chat-edit-react.png")
    bob.open()  # a reload: the history shows it as it is now
    bob.wait_open()
    bob.wait_texts(["hello"])
    theirs = bob.page.locator("#log .msg").first
    eventually(lambda: theirs.locator(".reactions button").all_text_contents(), ["👍 2"], "")
    alice.page.once("dialog", lambda d: d.accept())
    mine.click()
    mine.get_by_role("button", name="delete").click()
    bob.wait_texts(["message deleted"])
    alice.wait_texts(["message deleted"])
    assert theirs.locator(".reactions button").count() == 0


def test_unread_messages_show_as_a_badge_and_in_the_title_until_read(people) -> None:
    alice, bob = people(), people()
    # Bob's tab can be hidden at will (headless Chromium is always "visible").
    bob.page.add_init_script(
        "window.__hidden = true;"
        "Object.defineProperty(document, 'hidden', {get: () => window.__hidden});"
    )
    alice.join("alice", "badge-room")
    bob.open()
    bob.join("bob", "badge-room")
    alice.say("one")
    alice.say("two")
    bob.wait_texts(["one", "two"])
    badge = bob.page.locator("#unread")
    eventually(lambda: badge.text_content(), "2 new", "the badge counts what came hidden")
    assert bob.page.title() == "(2) chatd"
    bob.open()  # a reload, still hidden: the count comes from the server (joined.unread)
    bob.wait_open()
    eventually(lambda: badge.text_content(), "2 new", "the badge after a reload")
    bob.page.evaluate(
        "window.__hidden = false; document.dispatchEvent(new Event('visibilitychange'))"
    )
    eventually(lambda: badge.is_hidden(), True, "read once shown: the badge goes")
    assert bob.page.title() == "chatd"
    alice.say("three")  # seen as it comes, in a visible tab: no badge
    bob.wait_texts(["one", "two", "three"])
    assert badge.is_hidden()


def test_embedding_the_page_in_a_frame_is_refused_unless_allowed(browser, daemon, tmp_path) -> None:
    # The application's own page (a --static page whose CSP lets it frame http: pages)
    # frames two chatd pages: one allows that application's origin, one allows none.
    (tmp_path / "index.html").write_text("<!doctype html><title>app</title>")
    app = daemon("--static", str(tmp_path), "--page-csp", "default-src 'self'; frame-src http:")
    app_origin = f"http://127.0.0.1:{app.port}"
    allowing = daemon("--frame-ancestor", app_origin)
    refusing = daemon()
    (tmp_path / "embed.html").write_text(
        "<!doctype html><title>embed</title>"
        f'<iframe name="yes" src="http://127.0.0.1:{allowing.port}/"></iframe>'
        f'<iframe name="no" src="http://127.0.0.1:{refusing.port}/"></iframe>'
    )
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(f"{app_origin}/embed.html")
        page.frame_locator('iframe[name="yes"]').locator("#join").wait_for(timeout=WAIT_MS)
        refused = page.frame(name="no")
        assert refused is not None
        eventually(lambda: refused.url.startswith("chrome-error://"), True, "the framing refused")
    finally:
        context.close()


def test_two_rooms_at_once_with_an_unread_badge_on_the_room_not_shown(people, chatd) -> None:
    alice = people()
    alice.join("alice", "tea2")
    alice.join_another("coffee2")
    assert alice.page.locator("#rooms .name").all_text_contents() == ["tea2", "coffee2"]
    bob = V1(chatd.port, "bob")
    bob.join("tea2")
    bob.join("coffee2")
    bob.say("tea2", "in tea while you look at coffee")
    bob.say("coffee2", "in coffee")
    alice.wait_texts(["in coffee"])  # the log shows the room selected, only
    badge = alice.room_button("tea2").locator(".badge")
    eventually(lambda: badge.all_text_contents(), ["1"], "the unread badge of tea")
    assert alice.room_button("coffee2").locator(".badge").count() == 0
    assert alice.page.text_content("#unread") == "1 new"
    assert alice.page.title() == "(1) chatd"
    shot(alice, "page-phone-two-rooms.png")
    alice.room_button("tea2").click()
    alice.wait_texts(["in tea while you look at coffee"])
    assert alice.page.text_content("#state") == "alice in tea2"
    eventually(lambda: badge.count(), 0, "read once shown: the badge goes")
    eventually(lambda: alice.page.title(), "chatd", "the title without a count")
    # Leaving one room keeps the other: the log shows what is left.
    alice.page.click("#leave")
    eventually(lambda: alice.page.locator("#rooms .name").all_text_contents(), ["coffee2"], "rooms")
    alice.wait_texts(["in coffee"])
    alice.wait_open()
    alice.say("still here")
    alice.wait_text("still here")
    bob.close()


def test_messages_are_grouped_by_sender_under_a_date(people, chatd) -> None:
    sam, tim = V1(chatd.port, "sam"), V1(chatd.port, "tim")
    sam.join("groups")
    tim.join("groups")
    for who, said in ((sam, "s1"), (sam, "s2"), (sam, "s3"), (tim, "t1"), (sam, "s4")):
        who.say("groups", said)
        while who.next()["type"] != "message":  # (presence frames come first)
            pass
    uma = people()
    uma.join("uma", "groups")
    uma.wait_texts(["s1", "s2", "s3", "t1", "s4"])
    msgs = uma.page.locator("#log .msg")
    conts = [("cont" in (c or "")) for c in msgs.evaluate_all("ns => ns.map(n => n.className)")]
    assert conts == [False, True, True, False, False]  # one name per run of a sender
    visible_names = [msgs.nth(i).locator(".from").is_visible() for i in range(msgs.count())]
    assert visible_names == [True, False, False, True, True]
    assert uma.page.locator("#log .day").all_text_contents() == ["Today"]
    # The same history seen "tomorrow": under a "Yesterday" line.
    later = people()
    later.page.clock.set_fixed_time(time.time() + 86_400)
    later.open()
    later.join("vera", "groups")
    later.wait_texts(["s1", "s2", "s3", "t1", "s4"])
    assert later.page.locator("#log .day").all_text_contents() == ["Yesterday"]
    sam.close()
    tim.close()


def test_links_are_clickable_and_safe_and_html_stays_text(people, chatd) -> None:
    wes = people()
    wes.join("wes", "links")
    other = V1(chatd.port, "xena")
    other.join("links")
    said = "see https://example.com/a?b=1&c=<2>, <b>bold</b> javascript:alert(1) http://x.test."
    other.say("links", said)
    wes.wait_text(said)  # the text is whole: links are in it, not instead of it
    links = wes.page.locator("#log .msg .text a")
    assert links.count() == 2
    got = links.evaluate_all(
        "as => as.map(a => [a.getAttribute('href'), a.textContent, a.target, a.rel])"
    )
    assert got == [
        ["https://example.com/a?b=1&c=", "https://example.com/a?b=1&c=", "_blank",
         "noopener noreferrer"],
        ["http://x.test/", "http://x.test", "_blank", "noopener noreferrer"],
    ]  # fmt: skip
    assert wes.page.locator("#log b, #log script, #log img").count() == 0
    other.close()


def test_the_page_speaks_chinese_when_the_browser_prefers_it(people) -> None:
    yan = people(locale="zh-CN")
    assert yan.page.get_attribute("html", "lang") == "zh-CN"
    assert yan.page.text_content("#send") == "发送"
    assert yan.page.text_content("#join") == "加入"
    assert yan.page.text_content("#state") == "未连接"
    yan.join("yan", "茶".encode().hex())
    room = "茶".encode().hex()
    assert yan.page.text_content("#state") == f"yan 在 {room}"
    yan.say("你好")
    yan.wait_text("你好")
    assert yan.page.text_content("#leave") == "离开"
    shot(yan, "page-phone-zh.png")
    # and English otherwise: one language on the page
    en = people(locale="en-US")
    assert en.page.text_content("#send") == "Send"
    assert en.page.text_content("#join") == "Join"


def test_reconnecting_is_said_in_words_counting_down(people, tmp_path) -> None:
    import re

    port = free_port()
    d = Daemon("--port", str(port), cwd=str(tmp_path))
    try:
        zoe = people(port)
        zoe.join("zoe", "countdown")
        zoe.say("before")
        zoe.wait_text("before")
        d.stop()
        zoe.page.wait_for_selector('#state[data-state="reconnecting"]', timeout=WAIT_MS)
        said = re.compile(r"reconnecting in (\d+) s…")

        def seconds() -> int:
            m = said.fullmatch(zoe.page.text_content("#state") or "")
            return int(m.group(1)) if m else 0

        # The backoff grows while the daemon is away: wait for a delay of 2 s or more...
        eventually(lambda: seconds() >= 2, True, "a delay of a few seconds")
        n = seconds()
        shot(zoe, "page-phone-reconnecting.png")
        # ...and see it count down, second by second.
        eventually(lambda: zoe.page.text_content("#state"), f"reconnecting in {n - 1} s…", "")
        shown = zoe.page.inner_text("main")
        assert "1006" not in shown and "1001" not in shown  # never a raw close code
        zoe.page.locator("#log .sys").get_by_text("connection lost", exact=False).wait_for(
            timeout=WAIT_MS
        )
        d = Daemon("--port", str(port), cwd=str(tmp_path))
        zoe.wait_open(timeout=60_000)
        assert zoe.page.text_content("#state") == "zoe in countdown"
    finally:
        d.stop()


def test_the_phone_layout_folds_the_join_form_once_joined(people) -> None:
    phone = people()
    assert phone.page.is_visible("#join-form")
    assert not phone.page.is_visible("#show-join")
    phone.join("ann", "fold")
    assert not phone.page.is_visible("#join-form")  # folded away once joined
    assert phone.page.is_visible("#show-join")
    shot(phone, "page-phone.png")
    phone.page.click("#show-join")
    assert phone.page.is_visible("#join-form")
    assert phone.page.get_attribute("#show-join", "aria-expanded") == "true"
    shot(phone, "page-phone-join-open.png")
    phone.join_another("fold2")
    assert not phone.page.is_visible("#join-form")  # and again after joining another
    desk = people(size=DESKTOP)
    desk.join("ben", "fold")
    assert desk.page.is_visible("#join-form")  # a desktop has room for it
    assert not desk.page.is_visible("#show-join")
    assert not desk.page.is_visible("a[href='plain.html']")  # not in the main header


def test_screenshots_of_a_conversation_at_desktop_and_phone_sizes(people, chatd) -> None:
    desk = people(size=DESKTOP)
    desk.join("alice", "lobby")
    desk.join_another("design")
    phone = people()
    phone.join("bob", "design")
    desk.say("Morning! The mock-ups are at https://example.com/mockups")
    phone.wait_text("Morning! The mock-ups are at https://example.com/mockups")
    desk.say("Tell me what you think.")
    phone.say("Looking now 👀")
    phone.say("The phone layout folds the join form away.")
    desk.wait_text("The phone layout folds the join form away.")
    msg = phone.page.locator("#log .msg").first
    msg.click()
    msg.get_by_role("button", name="react 👍").click()
    desk.page.locator("#log .msg .reactions button").first.wait_for(timeout=WAIT_MS)
    other = V1(chatd.port, "carol")
    other.join("lobby")
    other.say("lobby", "anyone for lunch?")
    eventually(
        lambda: desk.room_button("lobby").locator(".badge").all_text_contents(), ["1"], "badge"
    )
    phone.page.type("#text", "typing…", delay=400)  # (a typing is said every 2 s at most)
    desk.page.locator("#typing").get_by_text("bob is typing…").wait_for(timeout=WAIT_MS)
    shot(desk, "page-desktop.png")
    phone.page.fill("#text", "")
    shot(phone, "page-phone-conversation.png")
    other.close()

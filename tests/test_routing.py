"""The one routing decision (chatd.web.route), and both ways in agreeing on it.

``route`` is called directly for each outcome; then a real ``ChatdSite``
(``make_site``) is driven in process over a ``StringTransport``: each request
of a table is sent in one read (the fast path, ``Upgrades.route``, takes it
if it is a well-formed handshake ``route`` sends to a WebSocket endpoint)
and split over two reads (twisted.web and ``Root`` always), and both must
answer alike, with the status ``route`` decided. No daemon.
"""

from __future__ import annotations

import itertools

import pytest
from inproc import connect, turn
from rawhttp import handshake
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure

from chatd.config import Settings
from chatd.hub import InMemoryHub
from chatd.web import (
    BAD_ROOM_NAME,
    NO_SUCH_RELAY,
    NOT_WEBSOCKET,
    ORIGIN_REFUSED,
    OTHER,
    PLAIN,
    PLAIN_CHAT,
    REFUSED,
    RELAY,
    UPGRADE_REQUIRED,
    V1,
    V1_CHAT,
    ChatdSite,
    Origins,
    Route,
    make_site,
    route,
)

HOST = b"127.0.0.1:9000"
OWN = Origins(())


def head(upgrade: bool = True, origin: str | None = None, protocol: str | None = None) -> dict:
    headers = {b"host": HOST}
    if upgrade:
        headers[b"upgrade"] = b"websocket"
    if origin is not None:
        headers[b"origin"] = origin.encode()
    if protocol is not None:
        headers[b"sec-websocket-protocol"] = protocol.encode()
    return headers


# -- the function ----------------------------------------------------------------------


def test_each_outcome() -> None:
    assert route(b"/", head(), False, OWN) is PLAIN_CHAT
    assert route(b"/", head(protocol="x, chatd.v1"), False, OWN) is V1_CHAT
    assert route(b"/", head(protocol="chatd.v2"), False, OWN) is PLAIN_CHAT
    assert route(b"/relay/quotes", head(), False, OWN) == Route(RELAY, "quotes")
    assert route(b"/relay/a%40b", head(), False, OWN) == Route(RELAY, "a@b")
    assert route(b"/rel%61y/a", head(), False, OWN) == Route(RELAY, "a")  # segments decoded
    assert route(b"/relay/a%20b", head(), False, OWN) is BAD_ROOM_NAME
    assert route(b"/relay/..", head(), False, OWN) is BAD_ROOM_NAME
    assert route(b"/relay/a%2Fb", head(), False, OWN) is BAD_ROOM_NAME  # "/" is not a name's
    for path in (b"/relay", b"/relay/", b"/relay/a/b", b"/relay/a/", b"/relay//a"):
        assert route(path, head(), False, OWN) is NO_SUCH_RELAY, path
    assert route(b"/relay/r", head(upgrade=False), False, OWN) is UPGRADE_REQUIRED
    evil = head(origin="https://evil.example")
    assert route(b"/relay/r", evil, False, OWN) is ORIGIN_REFUSED
    assert route(b"/", evil, False, OWN) is ORIGIN_REFUSED
    for path in (b"/", b"/healthz", b"/metrics", b"/api/rooms", b"/plain.html", b"/x/relay/r"):
        assert route(path, head(upgrade=False), False, OWN) is NOT_WEBSOCKET, path
    assert route(b"/healthz", head(), False, OWN) is NOT_WEBSOCKET  # a handshake elsewhere
    for refusal, status in [
        (BAD_ROOM_NAME, 400),
        (ORIGIN_REFUSED, 403),
        (NO_SUCH_RELAY, 404),
        (UPGRADE_REQUIRED, 426),
    ]:
        assert refusal.kind is REFUSED and refusal.status == status and refusal.detail


def test_checks_come_in_the_order_they_always_did() -> None:
    """404 before 400 before 426 before 403 on /relay; on /, no Upgrade is the page."""
    nothing = head(upgrade=False, origin="https://evil.example")
    assert route(b"/relay/a/b", nothing, False, OWN) is NO_SUCH_RELAY
    assert route(b"/relay/a%20b", nothing, False, OWN) is BAD_ROOM_NAME
    assert route(b"/relay/r", nothing, False, OWN) is UPGRADE_REQUIRED
    assert route(b"/", nothing, False, OWN) is NOT_WEBSOCKET


def test_upgrade_header_as_twisted_web_reads_it() -> None:
    assert route(b"/", {b"upgrade": b" WebSocket "}, False, OWN) is PLAIN_CHAT
    assert route(b"/", {b"upgrade": b"h2c"}, False, OWN) is NOT_WEBSOCKET
    assert route(b"/", {b"upgrade": None}, False, OWN) is NOT_WEBSOCKET
    assert route(b"/relay/r", {b"upgrade": b"h2c"}, False, OWN) is UPGRADE_REQUIRED


def test_origin_scheme_host_and_lists() -> None:
    own_http = head(origin="http://127.0.0.1:9000")
    own_https = head(origin="https://127.0.0.1:9000")
    assert route(b"/", own_http, False, OWN) is PLAIN_CHAT
    assert route(b"/", own_http, True, OWN) is ORIGIN_REFUSED
    assert route(b"/", own_https, True, OWN) is PLAIN_CHAT
    assert route(b"/", own_https, False, OWN) is ORIGIN_REFUSED
    assert route(b"/", head(origin="null"), False, OWN) is ORIGIN_REFUSED
    listed = Origins(("https://app.example",))
    assert route(b"/relay/r", head(origin="https://app.example"), False, listed).kind is RELAY
    assert route(b"/relay/r", own_http, False, listed) is ORIGIN_REFUSED
    assert (
        route(b"/relay/r", head(origin="https://evil.example"), False, Origins(("*",))).kind
        is RELAY
    )


# -- both ways in, on a real site ------------------------------------------------------


@pytest.fixture(autouse=True)
def no_tls_channel_id(monkeypatch) -> None:
    """Autobahn asks a TLS transport for its channel ID; a StringTransport has none."""
    import autobahn.twisted.util
    import autobahn.twisted.websocket

    for module in (autobahn.twisted.util, autobahn.twisted.websocket):
        monkeypatch.setattr(module, "transport_channel_id", lambda *a: b"\0" * 32)


@pytest.fixture(scope="module")
def site() -> ChatdSite:
    return make_site(Settings(ping_interval=0), InMemoryHub())


def answer(site: ChatdSite, data: bytes, split: bool, secure: bool) -> bytes:
    """The response head the site writes for ``data`` (in one read, or split over two)."""
    transport = connect(site, secure=secure)
    try:
        if split:
            transport.protocol.dataReceived(data[:5])
            transport.protocol.dataReceived(data[5:])
        else:
            transport.protocol.dataReceived(data)
        # a file of the page is sent by a cooperator, on reactor turns
        turn(lambda: b"\r\n\r\n" in transport.value())
        written = transport.value()
    finally:
        transport.protocol.connectionLost(Failure(ConnectionDone()))
    got = written.partition(b"\r\n\r\n")[0]
    # twisted.web's Date is the clock's; nothing else may differ
    return b"\r\n".join(line for line in got.split(b"\r\n") if not line.startswith(b"Date: "))


PATHS = [
    "/",
    "/?since=3",
    "/relay/x",
    "/relay/a%40b?x=1",
    "/relay/",
    "/relay",
    "/relay/a/b",
    "/relay/a/",
    "/relay/..",
    "/relay/.",
    "/relay/a%20b",
    "/relay/a%2Fb",
    "/relay/%C3%A9",
    "/relay/" + "a" * 65,
    "/relay/a%00b",
    "/healthz",
    "/nonexistent",
]
VARIANTS = {
    "no upgrade": ((), False),
    "upgrade": ((), True),
    "v1": (("Sec-WebSocket-Protocol: other, chatd.v1",), True),
    "own http origin": (("Origin: http://127.0.0.1:9000",), True),
    "own https origin": (("Origin: https://127.0.0.1:9000",), True),
    "evil origin": (("Origin: https://evil.example",), True),
}


def request(path: str, extra: tuple[str, ...], upgrade: bool) -> bytes:
    data = handshake(path, *extra)
    if not upgrade:
        data = data.replace(b"Upgrade: websocket\r\n", b"")
    return data


@pytest.mark.parametrize("secure", [False, True], ids=["http", "https"])
@pytest.mark.parametrize(
    ("path", "variant"), list(itertools.product(PATHS, VARIANTS)), ids=lambda v: str(v)
)
def test_both_paths_agree(site: ChatdSite, path: str, variant: str, secure: bool) -> None:
    extra, upgrade = VARIANTS[variant]
    data = request(path, extra, upgrade)
    origins = site.upgrades.origins
    target = path.encode().partition(b"?")[0]
    headers = {b"host": HOST, b"upgrade": b"websocket" if upgrade else None}
    for line in extra:
        name, _, value = line.partition(": ")
        headers[name.lower().encode()] = value.encode()
    decided = route(target, headers, secure, origins)

    fast = answer(site, data, split=False, secure=secure)
    slow = answer(site, data, split=True, secure=secure)
    assert fast == slow, (fast, slow)

    status = int(fast.split(b" ", 2)[1])
    if decided.kind is REFUSED:
        assert status == decided.status
    elif decided.kind is OTHER:
        assert status == (404 if path == "/nonexistent" else 200)
    else:
        assert status == 101
        assert (b"\r\nSec-WebSocket-Protocol: chatd.v1" in fast) == (decided.kind is V1)
    # the fast path takes exactly the WebSocket outcomes (of the paths it looks at)
    taken = site.upgrades.route(data, secure) is not None
    assert taken == (decided.kind in (V1, PLAIN, RELAY)), decided


def test_table_covers_every_outcome(site: ChatdSite) -> None:
    seen = set()
    for path, variant in itertools.product(PATHS, VARIANTS):
        for secure in (False, True):
            extra, upgrade = VARIANTS[variant]
            headers = {b"host": HOST, b"upgrade": b"websocket" if upgrade else None}
            for line in extra:
                name, _, value = line.partition(": ")
                headers[name.lower().encode()] = value.encode()
            r = route(path.encode().partition(b"?")[0], headers, secure, site.upgrades.origins)
            seen.add(r.status if r.kind is REFUSED else r.kind)
    assert seen == {V1, PLAIN, RELAY, OTHER, 400, 403, 404, 426}


def test_percent_encoded_relay_and_double_slash_take_the_long_way(site: ChatdSite) -> None:
    """Paths ``route`` sends to an endpoint but the fast path never took: still twisted.web's."""
    for path in ("/rel%61y/x", "//"):
        data = handshake(path)
        assert site.upgrades.route(data) is None
        assert answer(site, data, split=False, secure=False) == answer(
            site, data, split=True, secure=False
        )
    assert answer(site, handshake("//"), split=True, secure=False).startswith(b"HTTP/1.1 101 ")

"""The one port: the page, WebSocket upgrades on "/" and "/relay/<room>".

Routing is by path, by the ``Upgrade`` header and by the offered subprotocol:
``GET /`` in a browser gets the page, a WebSocket handshake on ``/`` offering
``chatd.v1`` gets the JSON chat, any other handshake on ``/`` the seed's
plain chat; all on the same reactor and the same listening socket.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes, urlsplit

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory
from twisted.internet.protocol import Protocol
from twisted.protocols.policies import ProtocolWrapper
from twisted.web.pages import errorPage, forbidden, notFound
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site
from twisted.web.static import File

from chatd.api import PushAPI
from chatd.config import Settings
from chatd.fanout import Budget
from chatd.hub import Hub
from chatd.limits import valid_room_name
from chatd.ops import Health, ops_children
from chatd.protocols.base import ChatdFactory, Clients
from chatd.protocols.plain import PlainChat, PlainRenderer
from chatd.protocols.relay import Relay
from chatd.protocols.v1 import SUBPROTOCOL, V1Chat, V1Renderer
from chatd.stats import Stats

SECURITY_HEADERS = {
    b"X-Content-Type-Options": b"nosniff",
    b"X-Frame-Options": b"DENY",
    b"Referrer-Policy": b"no-referrer",
    # The page ships its own script and style; it may open a WebSocket to
    # whatever server the user types in, and nothing else.
    b"Content-Security-Policy": (
        b"default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; "
        b"frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
}


def is_upgrade(request: Request) -> bool:
    value = request.getHeader(b"upgrade")
    return value is not None and value.strip().lower() == b"websocket"


def offers(request: Request, subprotocol: bytes) -> bool:
    """Whether the handshake lists ``subprotocol`` in Sec-WebSocket-Protocol."""
    for header in request.requestHeaders.getRawHeaders(b"sec-websocket-protocol", []):
        if subprotocol in (p.strip() for p in header.split(b",")):
            return True
    return False


_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def _origin_key(origin: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an Origin such as https://example.com:8443."""
    try:
        parts = urlsplit(origin.strip().lower())
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme, 0)
    except ValueError:
        return None
    if not parts.scheme or not parts.hostname:
        return None
    return parts.scheme, parts.hostname, port


class Origins:
    """Which pages may open WebSockets here (cross-site WebSocket hijacking).

    A browser always sends Origin; other clients usually send none and are
    let in (they are not a browser acting for a user). With no list, only
    pages served from the host the client asked for (Host header) may
    connect; ``*`` allows any.
    """

    def __init__(self, allowed: tuple[str, ...]) -> None:
        self.any = "*" in allowed
        self.allowed = {k for k in map(_origin_key, allowed) if k is not None}

    def permit(self, request: Request) -> bool:
        return self.permit_values(request.getHeader(b"origin"), request.getHeader(b"host"))

    def permit_values(self, raw: bytes | None, host_header: bytes | None) -> bool:
        """``permit`` on the raw values of the Origin and Host headers."""
        if raw is None or self.any:
            return True
        key = _origin_key(raw.decode("latin-1"))
        if key is None:
            return False
        if self.allowed:
            return key in self.allowed
        host = (host_header or b"").decode("latin-1").strip().lower()
        target = _origin_key(f"{key[0]}://{host}")
        return target is not None and target[1:] == key[1:]


class Forbidden(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        request.setResponseCode(403)
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return b"403 Forbidden: this page's origin may not open WebSockets here\n"


class Page(File):
    """The page's directory: files only, no listings, nothing outside it."""

    root_dir: str = ""
    contentTypes = {
        **File.contentTypes,
        ".html": "text/html; charset=utf-8",
        ".js": "text/javascript; charset=utf-8",
        ".css": "text/css; charset=utf-8",
        ".txt": "text/plain; charset=utf-8",
        ".json": "application/json",
        ".svg": "image/svg+xml",
    }

    childNotFound = notFound()
    forbidden = forbidden()

    def directoryListing(self) -> IResource:
        return notFound()

    def createSimilarFile(self, path: str) -> File:
        child = super().createSimilarFile(path)
        child.root_dir = self.root_dir or os.path.realpath(self.path)
        return child

    def getChild(self, path: bytes, request: Request) -> IResource:
        child = super().getChild(path, request)
        root = self.root_dir or os.path.realpath(self.path)
        if isinstance(child, File):
            real = os.path.realpath(child.path)
            if real != root and not real.startswith(root + os.sep):
                return notFound()  # a symlink out of the page directory
        return child

    def render(self, request: Request) -> bytes | int:
        for name, value in SECURITY_HEADERS.items():
            request.setHeader(name, value)
        return super().render(request)


class UpgradeRequired(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        request.setResponseCode(426, b"Upgrade Required")
        request.setHeader(b"Upgrade", b"websocket")
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return b"426 Upgrade Required: this is a WebSocket endpoint\n"


class RelayRooms(Resource):
    """``/relay/<room>``: checks the name, then hands the upgrade to Autobahn."""

    def __init__(self, ws: IResource, origins: Origins) -> None:
        super().__init__()
        self.ws = ws
        self.origins = origins

    def getChildWithDefault(self, name: bytes, request: Request) -> IResource:
        if not name or request.postpath:
            return notFound("No Such Relay Room", "Relay rooms are at /relay/<room>.")
        if not valid_room_name(name.decode("utf-8", "replace")):
            return errorPage(
                400,
                "Bad Request",
                "A room name is 1-64 characters of A-Z a-z 0-9 . _ ~ : @ + -, not all dots.",
            )
        if not is_upgrade(request):
            return UpgradeRequired()
        if not self.origins.permit(request):
            return Forbidden()
        return self.ws

    def render(self, request: Request) -> bytes:
        return notFound("No Such Relay Room", "Relay rooms are at /relay/<room>.").render(request)


class Root(Resource):
    def __init__(
        self,
        page: Page,
        plain: IResource,
        v1: IResource,
        relay: IResource,
        origins: Origins,
        extra: dict[bytes, Resource],
    ) -> None:
        super().__init__()
        self.page = page
        self.plain = plain
        self.v1 = v1
        self.origins = origins
        self.relay = RelayRooms(relay, origins)
        self.extra = extra  # /healthz, /metrics, /api: whichever are served here

    def getChildWithDefault(self, path: bytes, request: Request) -> IResource:
        if path == b"relay":
            return self.relay
        if path == b"" and is_upgrade(request):
            if not self.origins.permit(request):
                return Forbidden()
            return self.v1 if offers(request, SUBPROTOCOL.encode()) else self.plain
        if path in self.extra:
            return self.extra[path]
        return self.page.getChildWithDefault(path, request)

    def render(self, request: Request) -> bytes | int:
        return self.page.render(request)


# -- the fast upgrade path ------------------------------------------------------

_TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+")
# Headers Autobahn and twisted.web allow once; a request repeating one takes the long way.
_SINGLE = frozenset(
    (
        b"upgrade",
        b"origin",
        b"host",
        b"sec-websocket-key",
        b"sec-websocket-version",
        b"sec-websocket-extensions",
    )
)
_NO_BODY = frozenset((b"content-length", b"transfer-encoding"))
_V1 = SUBPROTOCOL.encode()


class Upgrades:
    """Which WebSocket factory takes a handshake, decided from its raw bytes.

    Only the common, well-formed case is decided here: a complete ``GET``
    with one ``Upgrade: websocket`` header, for ``/`` or a valid
    ``/relay/<room>``, from an allowed origin. For it, twisted.web's parse
    and ``Request`` would only be thrown away (Autobahn parses the handshake
    again anyway). Everything else (other paths, a refused origin or room
    name, a body, repeated or odd headers, a request split over several
    reads) gets None and goes through twisted.web and ``Root``, which
    answer exactly as they always have (400, 403, 404, 426, the page...).
    """

    def __init__(
        self,
        plain: WebSocketServerFactory,
        v1: WebSocketServerFactory,
        relay: WebSocketServerFactory,
        origins: Origins,
    ) -> None:
        self.plain, self.v1, self.relay, self.origins = plain, v1, relay, origins

    def route(self, data: bytes) -> tuple[WebSocketServerFactory, bytes, dict[bytes, bytes]] | None:
        """(factory, request target, headers by lower-case name) of a handshake to take, or None."""
        if not data.startswith(b"GET /"):
            return None
        end = data.find(b"\r\n\r\n")
        if end < 0:
            return None
        lines = data[:end].split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or parts[2] != b"HTTP/1.1":
            return None
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or b"\n" in line or not _TOKEN.fullmatch(name):
                return None  # folded, malformed or bare-LF lines: twisted.web decides
            name = name.lower()
            value = value.strip()
            if name in headers:
                if name in _SINGLE:
                    return None
                headers[name] += b", " + value  # as Autobahn joins repeats
            else:
                headers[name] = value
        if headers.keys() & _NO_BODY:
            return None
        upgrade = headers.get(b"upgrade")
        if upgrade is None or upgrade.lower() != b"websocket":
            return None
        target = parts[1]
        if b"#" in target:
            return None
        path = target.partition(b"?")[0]
        if path == b"/":
            factory = (
                self.v1
                if _V1
                in (p.strip() for p in headers.get(b"sec-websocket-protocol", b"").split(b","))
                else self.plain
            )
        elif path.startswith(b"/relay/"):
            name = path[7:]
            if not name or b"/" in name:
                return None
            if not valid_room_name(unquote_to_bytes(name).decode("utf-8", "replace")):
                return None
            factory = self.relay
        else:
            return None
        if not self.origins.permit_values(headers.get(b"origin"), headers.get(b"host")):
            return None
        return factory, target, headers


def _hand_over(transport, protocol) -> None:
    """Make ``protocol`` the one ``transport`` delivers to (as WebSocketResource does)."""
    if isinstance(transport, ProtocolWrapper):  # TLS wraps the protocol
        transport.wrappedProtocol = protocol
    elif isinstance(getattr(transport, "protocol", None), ProtocolWrapper):
        transport.protocol.wrappedProtocol = protocol
    else:
        transport.protocol = protocol
    protocol.makeConnection(transport)


class FrontDoor(Protocol):
    """A new connection until its first bytes arrive.

    A WebSocket handshake that ``Upgrades`` recognises goes straight to its
    Autobahn protocol; anything else to an ordinary twisted.web channel,
    which then sees exactly the bytes it would have.
    """

    timer = None

    def __init__(self, site: ChatdSite, addr) -> None:
        self.site = site
        self.addr = addr

    def connectionMade(self) -> None:
        # twisted.web drops a connection that sends no request within its
        # timeout; so does the door, until the channel takes over.
        if self.site.timeOut:
            self.timer = self.site.reactor.callLater(self.site.timeOut, self._idle)

    def _idle(self) -> None:
        self.timer = None
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        route = self.site.upgrades.route(data) if self.site.upgrades else None
        protocol = None
        if route is not None:
            factory, target, headers = route
            protocol = factory.buildProtocol(self.addr)
            if protocol is not None:
                # what this door parsed, so the handshake is not parsed again
                protocol.parsed_request = (target, headers)
        if protocol is None:
            protocol = Site.buildProtocol(self.site, self.addr)
        transport, self.transport = self.transport, None
        _hand_over(transport, protocol)
        protocol.dataReceived(data)

    def connectionLost(self, reason) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class ChatdSite(Site):
    """The main port's factory: each connection starts at a ``FrontDoor``."""

    upgrades: Upgrades | None = None

    def buildProtocol(self, addr) -> FrontDoor:
        return FrontDoor(self, addr)


@dataclass
class Web:
    """What the daemon serves: the main site, and the ops site if it has its own endpoint."""

    site: Site
    ops: Site | None
    clients: Clients
    health: Health


def make_web(settings: Settings, hub: Hub, stats: Stats, health: Health) -> Web:
    hub.add_format("plain", PlainRenderer())
    hub.add_format("v1", V1Renderer())
    budget = Budget(settings.max_total_backlog)
    clients = Clients(stats)

    plain = ChatdFactory(PlainChat, hub, settings, settings.max_message_size, budget, clients)
    v1 = ChatdFactory(V1Chat, hub, settings, settings.max_message_size, budget, clients)
    relay = ChatdFactory(Relay, hub, settings, settings.relay_max_size, budget, clients)
    origins = Origins(settings.allowed_origins)

    page = Page(settings.static)
    page.root_dir = os.path.realpath(settings.static)
    ops = ops_children(health, stats, hub)
    extra: dict[bytes, Resource] = {b"api": PushAPI(hub, settings, stats)}
    ops_site = None
    if settings.metrics_endpoint:
        ops_root = Resource()
        for name, child in ops.items():
            ops_root.putChild(name, child)
        ops_site = Site(ops_root)
        ops_site.displayTracebacks = False
    else:
        extra.update(ops)
    root = Root(
        page,
        WebSocketResource(plain),
        WebSocketResource(v1),
        WebSocketResource(relay),
        origins,
        extra,
    )
    site = ChatdSite(root)
    site.upgrades = Upgrades(plain, v1, relay, origins)
    site.displayTracebacks = False
    return Web(site, ops_site, clients, health)


def make_site(settings: Settings, hub: Hub) -> Site:
    """The main site alone (for embedding and in-process tests)."""
    return make_web(settings, hub, Stats(), Health()).site

"""The one port: the page, WebSocket upgrades on "/" and "/relay/<room>".

Routing is by path, by the ``Upgrade`` header and by the offered subprotocol:
``GET /`` in a browser gets the page, a WebSocket handshake on ``/`` offering
``chatd.v1`` gets the JSON chat, any other handshake on ``/`` the seed's
plain chat; all on the same reactor and the same listening socket.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import urlsplit

from autobahn.twisted.resource import WebSocketResource
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
        raw = request.getHeader(b"origin")
        if raw is None or self.any:
            return True
        key = _origin_key(raw.decode("latin-1"))
        if key is None:
            return False
        if self.allowed:
            return key in self.allowed
        host = (request.getHeader(b"host") or b"").decode("latin-1").strip().lower()
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

    def factory(protocol, max_size: int) -> WebSocketResource:
        return WebSocketResource(ChatdFactory(protocol, hub, settings, max_size, budget, clients))

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
        factory(PlainChat, settings.max_message_size),
        factory(V1Chat, settings.max_message_size),
        factory(Relay, settings.relay_max_size),
        Origins(settings.allowed_origins),
        extra,
    )
    site = Site(root)
    site.displayTracebacks = False
    return Web(site, ops_site, clients, health)


def make_site(settings: Settings, hub: Hub) -> Site:
    """The main site alone (for embedding and in-process tests)."""
    return make_web(settings, hub, Stats(), Health()).site

"""The one port: the page, WebSocket upgrades on "/" and "/relay/<room>".

Routing is by path, by the ``Upgrade`` header and by the offered subprotocol:
``GET /`` in a browser gets the page, a WebSocket handshake on ``/`` offering
``chatd.v1`` gets the JSON chat, any other handshake on ``/`` the seed's
plain chat; all on the same reactor and the same listening socket.
"""

from __future__ import annotations

import os

from autobahn.twisted.resource import WebSocketResource
from twisted.web.pages import errorPage, forbidden, notFound
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site
from twisted.web.static import File

from chatd.config import Settings
from chatd.fanout import Budget
from chatd.hub import Hub
from chatd.limits import valid_room_name
from chatd.protocols.base import ChatdFactory
from chatd.protocols.plain import PlainChat, PlainRenderer
from chatd.protocols.relay import Relay
from chatd.protocols.v1 import SUBPROTOCOL, V1Chat, V1Renderer

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

    def __init__(self, ws: IResource) -> None:
        super().__init__()
        self.ws = ws

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
        return self.ws

    def render(self, request: Request) -> bytes:
        return notFound("No Such Relay Room", "Relay rooms are at /relay/<room>.").render(request)


class Root(Resource):
    def __init__(self, page: Page, plain: IResource, v1: IResource, relay: IResource) -> None:
        super().__init__()
        self.page = page
        self.plain = plain
        self.v1 = v1
        self.relay = RelayRooms(relay)

    def getChildWithDefault(self, path: bytes, request: Request) -> IResource:
        if path == b"relay":
            return self.relay
        if path == b"" and is_upgrade(request):
            return self.v1 if offers(request, SUBPROTOCOL.encode()) else self.plain
        return self.page.getChildWithDefault(path, request)

    def render(self, request: Request) -> bytes | int:
        return self.page.render(request)


def make_site(settings: Settings, hub: Hub) -> Site:
    hub.add_format("plain", PlainRenderer())
    hub.add_format("v1", V1Renderer())
    budget = Budget(settings.max_total_backlog)
    plain = ChatdFactory(PlainChat, hub, settings, settings.max_message_size, budget)
    v1 = ChatdFactory(V1Chat, hub, settings, settings.max_message_size, budget)
    relay = ChatdFactory(Relay, hub, settings, settings.relay_max_size, budget)
    page = Page(settings.static)
    page.root_dir = os.path.realpath(settings.static)
    site = Site(
        Root(page, WebSocketResource(plain), WebSocketResource(v1), WebSocketResource(relay))
    )
    site.displayTracebacks = False
    return site

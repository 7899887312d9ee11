"""The one port: the page, WebSocket upgrades on "/" and "/relay/<room>".

Where a request goes is decided in one place, ``route``: a pure function of
the path (percent-encoded, without the query), the ``Upgrade``, ``Origin``,
``Host`` and ``Sec-WebSocket-Protocol`` headers and whether the connection
is TLS, to a ``Route``: the JSON chat (a handshake on ``/`` offering
``chatd.v1``), the seed's plain chat (any other handshake on ``/``), a relay
room (a handshake on a valid ``/relay/<room>``), a refusal with its status
and message (400 bad room name, 403 origin, 404 no such relay path, 426
upgrade required), or ``NOT_WEBSOCKET``: the page (``GET /`` in a browser),
/healthz, /metrics, /api, served by twisted.web's resources. Both ways in
ask it: the fast upgrade path (``Upgrades.route``, on the raw bytes of a
complete handshake, which takes only the well-formed WebSocket outcomes and
leaves refusals and odd requests to twisted.web) and twisted.web's root
resource (``Root``, which answers every outcome). All on the same reactor
and the same listening socket.

Before any of that, the door (``Gate``, ``FrontDoor``, ``ChatdChannel``)
bounds what a client can hold without sending a request: connections still
waiting for a request head (``--max-pending``) and per address
(``--max-connections-per-ip``) are capped at accept, a request head must
arrive whole within ``--handshake-timeout`` (however slowly it trickles),
its size and header count are capped (431), and a body is refused on its
head (Content-Length, token, path) before any of it is read.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass
from typing import NamedTuple, cast
from typing import Protocol as Interface
from urllib.parse import unquote_to_bytes, urlsplit

from autobahn.twisted.resource import WebSocketResource
from twisted.internet.interfaces import IProtocol, ISSLTransport, ITCPTransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.pages import errorPage, forbidden, notFound
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site
from twisted.web.static import File

from chatd import limits
from chatd.api import PushAPI
from chatd.config import Settings
from chatd.fanout import Budget
from chatd.hub import Hub
from chatd.internals import HTTPChannelInternals, hand_over
from chatd.limits import valid_room_name
from chatd.ops import Health, ops_children
from chatd.protocols.base import ChatdFactory, Clients, Connection
from chatd.protocols.plain import PlainChat, PlainRenderer
from chatd.protocols.relay import Relay
from chatd.protocols.v1 import SUBPROTOCOL, V1Chat, V1Renderer
from chatd.sse import SSE
from chatd.stats import Stats

# The page ships its own script and style; it may open a WebSocket to whatever
# server the user types in, and nothing else (--page-csp replaces this).
PAGE_CSP = (
    "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'"
)


def page_headers(
    csp: str | None = None, frame_ancestors: tuple[str, ...] = ()
) -> dict[bytes, bytes]:
    """The headers of every file of the page: ``csp`` (None: ``PAGE_CSP``) with
    ``frame-ancestors`` (none unless some origins may embed the page; then no
    X-Frame-Options, which cannot name them)."""
    ancestors = " ".join(frame_ancestors) or "'none'"
    headers = {
        b"X-Content-Type-Options": b"nosniff",
        b"Referrer-Policy": b"no-referrer",
        b"Content-Security-Policy": f"{csp or PAGE_CSP}; frame-ancestors {ancestors}".encode(),
    }
    if not frame_ancestors:
        headers[b"X-Frame-Options"] = b"DENY"
    return headers


SECURITY_HEADERS = page_headers()  # the shipped page's, on its defaults


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
    pages served from the host the client asked for (Host header), with the
    scheme of this connection (https over TLS, else http), may connect;
    ``*`` allows any.
    """

    def __init__(self, allowed: tuple[str, ...]) -> None:
        self.any = "*" in allowed
        self.allowed = {k for k in map(_origin_key, allowed) if k is not None}

    def permit_values(
        self, raw: bytes | None, host_header: bytes | None, secure: bool = False
    ) -> bool:
        """Whether the Origin and Host headers' raw values may connect (``secure``: over TLS)."""
        if raw is None or self.any:
            return True
        key = _origin_key(raw.decode("latin-1"))
        if key is None:
            return False
        if self.allowed:
            return key in self.allowed
        host = (host_header or b"").decode("latin-1").strip().lower()
        target = _origin_key(f"{'https' if secure else 'http'}://{host}")
        return target == key


class Page(File):
    """The page's directory: files only, no listings, nothing outside it."""

    root_dir: str = ""
    headers: dict[bytes, bytes] = SECURITY_HEADERS
    contentTypes = {
        **File.contentTypes,
        ".html": "text/html; charset=utf-8",
        ".js": "text/javascript; charset=utf-8",
        ".css": "text/css; charset=utf-8",
        ".txt": "text/plain; charset=utf-8",
        ".json": "application/json",
        ".svg": "image/svg+xml",
    }

    # (File types these as its own deprecated defaults' classes; any IResource serves)
    childNotFound = notFound()  # type: ignore[assignment]
    forbidden = forbidden()  # type: ignore[assignment]

    def directoryListing(self) -> IResource:
        return notFound()

    def createSimilarFile(self, path: str) -> File:
        child = super().createSimilarFile(path)
        child.root_dir = self.root_dir or os.path.realpath(self.path)
        child.headers = self.headers
        return child

    def getChild(self, path: bytes, request: Request) -> IResource:
        if b"\x00" in path:
            return notFound()  # no file name has one (and os calls raise on it)
        child = super().getChild(path, request)
        root = self.root_dir or os.path.realpath(self.path)
        if isinstance(child, File):
            real = os.path.realpath(child.path)
            if real != root and not real.startswith(root + os.sep):
                return notFound()  # a symlink out of the page directory
        return child

    def render(self, request: Request) -> bytes | int:
        for name, value in self.headers.items():
            request.setHeader(name, value)
        return super().render(request)


# -- the routing decision --------------------------------------------------------


class Route(NamedTuple):
    """Where a request goes: a WebSocket endpoint, a refusal, or twisted.web's other resources.

    ``kind`` is one of ``V1``, ``PLAIN``, ``RELAY``, ``REFUSED``, ``OTHER``
    (compare with ``is``); ``room``: a relay room's name; ``status``,
    ``reason``, ``detail``: a refusal's HTTP status, reason phrase and message.
    """

    kind: str
    room: str = ""
    status: int = 0
    reason: str = ""
    detail: str = ""


V1, PLAIN, RELAY, REFUSED, OTHER = "v1", "plain", "relay", "refused", "other"
V1_CHAT = Route(V1)
PLAIN_CHAT = Route(PLAIN)
NOT_WEBSOCKET = Route(OTHER)  # the page, /healthz, /metrics, /api, /sse: twisted.web's resources
NO_SUCH_RELAY = Route(REFUSED, "", 404, "No Such Relay Room", "Relay rooms are at /relay/<room>.")
BAD_ROOM_NAME = Route(
    REFUSED,
    "",
    400,
    "Bad Request",
    limits.ROOM_NAME_RULE[0].upper() + limits.ROOM_NAME_RULE[1:] + ".",
)
UPGRADE_REQUIRED = Route(
    REFUSED, "", 426, "Upgrade Required", "426 Upgrade Required: this is a WebSocket endpoint"
)
ORIGIN_REFUSED = Route(
    REFUSED,
    "",
    403,
    "Forbidden",
    "403 Forbidden: this page's origin may not open WebSockets here",
)
_V1 = SUBPROTOCOL.encode()


class Headers(Interface):
    """Request headers by lower-case name: a dict, or ``RequestHead`` over a request."""

    def get(self, name: bytes, default: None = None, /) -> bytes | None: ...


def _is_websocket(upgrade: bytes | None) -> bool:
    return upgrade is not None and upgrade.strip().lower() == b"websocket"


def route(path: bytes, headers: Headers, secure: bool, origins: Origins) -> Route:
    """Where a request for ``path`` goes: the one routing decision of the main port.

    ``path``: the request target's path, still percent-encoded, without the
    query (twisted.web's ``Request.path``); it is cut into segments and each
    decoded as twisted.web does. ``headers``: lower-case name to value (None
    or absent: not sent) for ``upgrade``, ``origin``, ``host`` and
    ``sec-websocket-protocol`` (repeats joined with ", "; for the others the
    last one); ``secure``: the connection is TLS. Checks come in the order
    twisted.web's resources always made them: for ``/relay...``, the path's
    shape (404), the room name (400), the Upgrade header (426), the origin
    (403); for a handshake on ``/``, the origin (403), then the subprotocol.
    Everything else (including ``/`` without Upgrade) is ``NOT_WEBSOCKET``.
    """
    first, slash, rest = path[1:].partition(b"/")
    if b"%" in first:
        first = unquote_to_bytes(first)
    if first == b"relay":
        raw, more, _ = rest.partition(b"/")
        if not slash or not raw or more:
            return NO_SUCH_RELAY
        name = unquote_to_bytes(raw).decode("utf-8", "replace")
        if not valid_room_name(name):
            return BAD_ROOM_NAME
        if not _is_websocket(headers.get(b"upgrade")):
            return UPGRADE_REQUIRED
        if not origins.permit_values(headers.get(b"origin"), headers.get(b"host"), secure):
            return ORIGIN_REFUSED
        return Route(RELAY, name)
    if first or not _is_websocket(headers.get(b"upgrade")):
        return NOT_WEBSOCKET
    if not origins.permit_values(headers.get(b"origin"), headers.get(b"host"), secure):
        return ORIGIN_REFUSED
    offered = headers.get(b"sec-websocket-protocol")
    if offered and _V1 in (p.strip() for p in offered.split(b",")):
        return V1_CHAT
    return PLAIN_CHAT


class RequestHead:
    """The headers ``route`` reads, from a twisted.web ``Request``, read when asked."""

    __slots__ = ("request",)

    def __init__(self, request: Request) -> None:
        self.request = request

    def get(self, name: bytes, default: None = None, /) -> bytes | None:
        values = self.request.requestHeaders.getRawHeaders(name)
        if not values:
            return default
        if name == b"sec-websocket-protocol":
            return b", ".join(values)
        return values[-1]  # as Request.getHeader


def route_request(request: Request, origins: Origins) -> Route:
    """``route`` for a request twisted.web has parsed."""
    return route(request.path, RequestHead(request), request.isSecure(), origins)


class Refusal(Resource):
    """A plain-text refusal (403, 426) of a ``Route``."""

    isLeaf = True

    def __init__(self, refusal: Route) -> None:
        super().__init__()
        self.refusal = refusal

    def render(self, request: Request) -> bytes:
        refusal = self.refusal
        request.setResponseCode(refusal.status, refusal.reason.encode())
        if refusal.status == 426:
            request.setHeader(b"Upgrade", b"websocket")
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return refusal.detail.encode() + b"\n"


def refusal_page(refusal: Route) -> IResource:
    """The resource answering a refusal: an HTML error page (400, 404) or plain text (403, 426)."""
    if refusal.status in (400, 404):
        return errorPage(refusal.status, refusal.reason, refusal.detail)
    return Refusal(refusal)


class Root(Resource):
    """The main port's resources, chosen by ``route``."""

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
        self.origins = origins
        self.endpoints = {V1: v1, PLAIN: plain, RELAY: relay}
        self.refusals = {
            r: refusal_page(r)
            for r in (NO_SUCH_RELAY, BAD_ROOM_NAME, UPGRADE_REQUIRED, ORIGIN_REFUSED)
        }
        self.extra = extra  # /healthz, /metrics, /api: whichever are served here

    def getChildWithDefault(self, path: bytes, request: Request) -> IResource:
        where = route_request(request, self.origins)
        if where.kind is OTHER:
            if path in self.extra:
                return self.extra[path]
            return self.page.getChildWithDefault(path, request)
        if where.kind is REFUSED:
            return self.refusals[where]
        return self.endpoints[where.kind]

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


class Upgrades:
    """Which WebSocket factory takes a handshake, decided from its raw bytes.

    Only the common, well-formed case is decided here: a complete ``GET``
    with one ``Upgrade: websocket`` header, for ``/`` or a valid
    ``/relay/<room>``, from an allowed origin. For it, twisted.web's parse
    and ``Request`` would only be thrown away (Autobahn parses the handshake
    again anyway). Where it goes is ``route``'s decision, as for ``Root``.
    Everything else (other paths, a refusal from ``route``, a body, repeated
    or odd headers, a request split over several reads) gets None and goes
    through twisted.web and ``Root``, which answer exactly as they always
    have (400, 403, 404, 426, the page...).
    """

    def __init__(
        self,
        plain: ChatdFactory,
        v1: ChatdFactory,
        relay: ChatdFactory,
        origins: Origins,
    ) -> None:
        self.plain, self.v1, self.relay, self.origins = plain, v1, relay, origins

    def route(
        self, data: bytes, secure: bool = False
    ) -> tuple[ChatdFactory, bytes, dict[bytes, bytes]] | None:
        """(factory, request target, headers by lower-case name) of a handshake to take, or None.

        ``secure``: the connection is TLS (for the origin check).
        """
        if not data.startswith(b"GET /"):
            return None
        end = data.find(b"\r\n\r\n")
        if end < 0 or end > limits.MAX_HEAD_SIZE:
            return None  # twisted.web answers an oversized head (431)
        lines = data[:end].split(b"\r\n")
        if len(lines) > limits.MAX_HEADERS + 1:
            return None
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
        if path != b"/" and not path.startswith(b"/relay/"):
            return None  # the rest (and "/rel%61y/...", "//") as it always went: twisted.web
        kind = route(path, headers, secure, self.origins).kind
        if kind is RELAY:
            factory = self.relay
        elif kind is PLAIN:
            factory = self.plain
        elif kind is V1:
            factory = self.v1
        else:
            return None  # a refusal: twisted.web answers it
        return factory, target, headers


class Gate:
    """Who gets in, and how long a connection may take to send a request head.

    ``arm`` starts a deadline for a whole request head: it is not reset by
    bytes that trickle in, only ``disarm`` (the head is complete, or the
    connection gone) stops it; when it fires, the connection is dropped.
    ``admit`` runs at accept. With ``--max-pending`` connections already
    waiting for a head, the one that has waited longest is dropped to make
    room: a flood of silent or trickling connections cannot shut new
    clients out, it only shortens its own connections' lives. Past
    ``--max-connections-per-ip`` from the new connection's address, the new
    one is dropped. Both are counted in ``stats.refused``.
    """

    def __init__(self, settings: Settings, stats: Stats, reactor) -> None:
        self.timeout = settings.handshake_timeout
        self.max_pending = settings.max_pending
        self.per_ip_cap = settings.max_connections_per_ip
        self.per_ip: Counter[str] = Counter()  # open connections by address, with a cap only
        self.waiting: dict = {}  # transport -> its head deadline, oldest first
        self.stats = stats
        self.reactor = reactor

    def admit(self, addr) -> bool:
        if self.per_ip_cap:
            host = getattr(addr, "host", None)
            if host is not None:
                if self.per_ip[host] >= self.per_ip_cap:
                    self.stats.refused["per_ip"] += 1
                    return False
                self.per_ip[host] += 1
        if len(self.waiting) >= self.max_pending:
            oldest = next(iter(self.waiting))
            self.disarm(oldest)
            self.stats.refused["pending"] += 1
            oldest.abortConnection()
        return True

    def release(self, transport) -> None:
        """The connection ``transport`` carried is gone (called once per admitted one)."""
        if self.per_ip_cap and transport is not None:
            host = getattr(transport.getPeer(), "host", None)
            if host is not None and self.per_ip[host] > 0:
                self.per_ip[host] -= 1
                if not self.per_ip[host]:
                    del self.per_ip[host]

    def arm(self, transport):
        """Start ``transport``'s head deadline; the transport is the handle for ``disarm``."""
        self.disarm(transport)
        self.waiting[transport] = self.reactor.callLater(self.timeout, self._expired, transport)
        self.stats.pending = len(self.waiting)
        return transport

    def disarm(self, handle) -> None:
        call = self.waiting.pop(handle, None)
        if call is not None:
            call.cancel()
            self.stats.pending = len(self.waiting)

    def _expired(self, transport) -> None:
        del self.waiting[transport]
        self.stats.pending = len(self.waiting)
        self.stats.head_timeouts += 1
        transport.abortConnection()


class _Refused(Protocol):
    """A connection over a cap: dropped as soon as it is made."""

    def makeConnection(self, transport) -> None:
        transport.abortConnection()


_HEAD_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"Content-Length: 0\r\nConnection: close\r\n\r\n"
)


class ChatdRequest(Request):
    """A request whose body may be refused on its head, or cut at its limit."""

    channel: ChatdChannel
    body_limit = 0  # a chunked body is cut once it passes this many bytes
    body_seen = 0

    def handleContentChunk(self, data: bytes) -> None:
        if self.body_limit:
            room = self.body_limit + 1 - self.body_seen
            self.body_seen += len(data)
            if self.body_seen > self.body_limit:
                # Over the limit: keep one byte too many (the API answers 413)
                # and have the channel stop reading and close after the answer.
                self.channel.persistent = False
                self.channel.cut_body = True
                self.channel.linger_on_close = True
                data = data[: max(room, 0)]
        if data:
            super().handleContentChunk(data)


class ChatdChannel(HTTPChannelInternals):
    """twisted.web's HTTP/1.1 channel, with chatd's bounds on what comes before a response.

    - a request head must be whole within ``--handshake-timeout`` of the
      connection's start (the door's deadline carries over) or of the end
      of the previous response: a deadline, not an idle timer;
    - at most ``MAX_HEAD_SIZE`` bytes and ``MAX_HEADERS`` headers: else 431
      and close;
    - a body is judged on the head: on a path that takes none (anything
      but the push API's POSTs), on a push API request that will be refused
      (no or wrong token, no such path, ...) or with a Content-Length over
      its limit, the request gets its usual answer without the body being
      read, then the connection closes; a chunked body is cut (413) once it
      passes the limit. After these answers and a 431, what the client still
      sends is read and dropped for up to ``LINGER`` seconds and
      ``LINGER_BYTES`` before closing (a lingering close): closing with
      unread data would reset the connection, and a client still sending
      could lose the answer.
    """

    LINGER = 1.0
    LINGER_BYTES = 1024 * 1024

    maxHeaders = limits.MAX_HEADERS
    totalHeadersSize = limits.MAX_HEAD_SIZE
    MAX_LENGTH = limits.MAX_HEAD_SIZE
    site: ChatdSite  # set by Site.buildProtocol
    head_call = None  # the deadline of the request head being waited for
    cut_body = False  # a chunked body passed its limit
    linger_on_close = False  # the client may still be sending: drain before closing
    _refusing = False  # this request's body is not read
    _lost = False
    _lingering = False
    _linger_left = 0
    _linger_call = None

    def _disarm(self) -> None:
        call, self.head_call = self.head_call, None
        self.site.gate.disarm(call)

    def _head_too_large(self) -> None:
        self._disarm()
        assert self.transport is not None  # connected
        self.transport.write(_HEAD_TOO_LARGE)
        self.linger_on_close = True
        self.loseConnection()

    def lineLengthExceeded(self, line: bytes) -> None:
        self._head_too_large()

    def lineReceived(self, line: bytes) -> None:
        if self._lingering:
            return  # the rest of a head already answered
        if self.head_size() + len(line) > self.totalHeadersSize:
            self._head_too_large()
            return
        super().lineReceived(line)

    def headerReceived(self, line: bytes) -> bool:
        if self.header_count() >= self.maxHeaders:
            self._head_too_large()
            return False
        return super().headerReceived(line)

    def allHeadersReceived(self) -> None:
        self._disarm()
        request = self.requests[-1]
        self._refusing = False
        if self.length != 0:  # a Content-Length over 0, or chunked (None)
            limit = self.site.body_limit(*self.request_line(), request)
            if self.length is None and limit:
                request.body_limit = limit
            elif self.length is None or self.length > limit:
                # Answer on the head alone; the body is never read.
                self.length = 0
                self.stop_body()
                self._refusing = True
                self.linger_on_close = True
        super().allHeadersReceived()
        if self._refusing:
            self.persistent = False
            request.responseHeaders.setRawHeaders(b"Connection", [b"close"])

    def may_continue(self) -> bool:
        return not self._refusing

    def loseConnection(self) -> None:
        if self.linger_on_close and not self._lost and not self._lingering:
            self._linger()
            return
        super().loseConnection()

    def _linger(self) -> None:
        self._lingering = True
        self._linger_left = self.LINGER_BYTES
        transport = self.transport
        producer = self.network_producer()
        producer.unregisterProducer()
        producer.resumeProducing()  # reading on, even if paused for a pipeline
        half_close = getattr(transport, "loseWriteConnection", None)
        if half_close is not None and not _is_secure(transport):
            half_close()  # the client sees the end of the answer now
        self._linger_call = self.callLater(self.LINGER, self._end_linger)

    def _end_linger(self) -> None:
        self._linger_call = None
        assert self.transport is not None  # connectionLost cancels the call
        self.transport.loseConnection()

    def _drop(self, data: bytes) -> None:
        self._linger_left -= len(data)
        if self._linger_left < 0 and self._linger_call is not None:
            self._linger_call.cancel()
            self._linger_call = None
            cast(ITCPTransport, self.transport).abortConnection()  # TCP or TLS

    def dataReceived(self, data: bytes) -> None:
        if self._lingering:
            self._drop(data)
        else:
            super().dataReceived(data)

    def rawDataReceived(self, data: bytes) -> None:
        if self._lingering:
            self._drop(data)
            return
        super().rawDataReceived(data)
        if self.cut_body and self.decoding_body():
            # A chunked body passed its limit: stop decoding, answer now.
            self.cut_body = False
            self.stop_body()
            self.allContentReceived()

    def requestDone(self, request) -> None:
        if self.persistent and not self._lost:
            # Waiting for the next request head: the same deadline.
            self.head_call = self.site.gate.arm(self.transport)
        super().requestDone(request)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = True
        self._disarm()
        if self._linger_call is not None:
            self._linger_call.cancel()
            self._linger_call = None
        self.site.gate.release(self.transport)
        super().connectionLost(reason)


def _is_secure(transport) -> bool:
    return ISSLTransport(transport, None) is not None


class FrontDoor(Protocol):
    """A new connection until its first bytes arrive.

    A WebSocket handshake that ``Upgrades`` recognises goes straight to its
    Autobahn protocol; anything else to a ``ChatdChannel``, which then sees
    exactly the bytes it would have, and inherits the deadline for the
    request head (armed here, at accept).
    """

    timer = None

    def __init__(self, site: ChatdSite, addr) -> None:
        self.site = site
        self.addr = addr

    def connectionMade(self) -> None:
        self.timer = self.site.gate.arm(self.transport)

    def dataReceived(self, data: bytes) -> None:
        timer, self.timer = self.timer, None
        upgrades = self.site.upgrades
        route = upgrades.route(data, _is_secure(self.transport)) if upgrades else None
        protocol: IProtocol | None = None
        if route is not None:
            factory, target, headers = route
            connection = cast("Connection | None", factory.buildProtocol(self.addr))
            if connection is not None:
                # what this door parsed, so the handshake is not parsed again
                connection.parsed_request = (target, headers)
                # The head is whole; Autobahn's own timeout covers the upgrade.
                self.site.gate.disarm(timer)
                protocol = connection
        if protocol is None:
            channel = cast(ChatdChannel, Site.buildProtocol(self.site, self.addr))
            channel.head_call = timer
            protocol = channel
        transport, self.transport = self.transport, None
        hand_over(transport, protocol)
        protocol.dataReceived(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        timer, self.timer = self.timer, None
        self.site.gate.disarm(timer)
        self.site.gate.release(self.transport)


LOG_FIELD_MAX = 200  # characters of a request's URI, Referer or User-Agent in the access log


def _log_field(value: bytes | str | None) -> str:
    """A client-chosen field for the access log: escaped, quoted safely, and cut short."""
    if value is None:
        return "-"
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    cut = len(text) > LOG_FIELD_MAX
    text = text[:LOG_FIELD_MAX].encode("unicode_escape").decode("ascii").replace('"', '\\"')
    return text + "..." if cut else text


_TOKEN_IN_QUERY = re.compile(rb"([?&]token=)[^&#]*")


def redact(uri: bytes) -> bytes:
    """The URI with any ``token=`` query value replaced: tokens never reach a log."""
    if b"token=" not in uri:
        return uri
    return _TOKEN_IN_QUERY.sub(rb"\1REDACTED", uri)


def access_log_line(timestamp: str, request: Request) -> str:
    """twisted.web's combined log format, with every client-chosen field cut to
    LOG_FIELD_MAX characters: a client must not decide how much chatd logs
    (one kept-alive connection with 8 KiB URIs wrote 14 MB/s of log before)."""
    addr = request.getClientAddress()
    return '"{}" - - {} "{} {} {}" {} {} "{}" "{}"'.format(
        _log_field(getattr(addr, "host", "-")),
        timestamp,
        _log_field(request.method),
        _log_field(redact(request.uri)),
        _log_field(request.clientproto),
        request.code,
        request.sentLength or "-",
        _log_field(request.getHeader(b"referer")),
        _log_field(request.getHeader(b"user-agent")),
    )


class ChatdSite(Site):
    """The main port's factory: each connection starts at a ``FrontDoor``."""

    upgrades: Upgrades | None = None
    api: PushAPI | None = None
    gate: Gate
    # (Twisted types ``protocol`` and what buildProtocol returns as its
    # HTTP/1.1-or-2 channel wrapper; here a connection starts at a FrontDoor, or
    # _Refused, and the door builds a ChatdChannel, HTTP/1.1 only, when it needs one)
    protocol = ChatdChannel  # type: ignore[assignment]
    requestFactory = ChatdRequest

    def buildProtocol(self, addr) -> Protocol:  # type: ignore[override]
        if not self.gate.admit(addr):
            return _Refused()
        return FrontDoor(self, addr)

    def body_limit(self, method: bytes, target: bytes, request: Request) -> int:
        """Bytes of body a request may send, judged on its head alone (0: none)."""
        path = target.partition(b"?")[0]
        if not path.startswith(b"/api/") or self.api is None:
            return 0  # the page, /healthz, /metrics, upgrades: no body
        postpath = [unquote_to_bytes(p) for p in path[5:].split(b"/")]
        return self.api.body_limit(method, postpath, request)


@dataclass
class Web:
    """What the daemon serves: the main site, and the ops site if it has its own endpoint."""

    site: ChatdSite
    ops: ChatdSite | None
    clients: Clients
    health: Health


def make_web(settings: Settings, hub: Hub, stats: Stats, health: Health) -> Web:
    hub.add_format("plain", PlainRenderer())
    hub.add_format("v1", V1Renderer())
    budget = Budget(settings.max_total_backlog)
    inbound = Budget(settings.max_total_inbound)
    clients = Clients(stats)

    plain = ChatdFactory(PlainChat, hub, settings, settings.max_message_size, budget, clients)
    v1 = ChatdFactory(V1Chat, hub, settings, settings.max_message_size, budget, clients)
    relay = ChatdFactory(Relay, hub, settings, settings.relay_max_size, budget, clients)
    hub.kick_listeners.append(
        lambda user: clients.close_user(user, limits.CLOSE_FORBIDDEN, "closed by the server")
    )
    hub.resume_listeners.append(
        lambda secret, user: V1Chat.hand_over(clients.resumable, secret, user)
    )
    policy = settings.auth_policy()
    for factory in (plain, v1, relay):
        factory.inbound = inbound
        factory.policy = policy
    origins = Origins(settings.allowed_origins)

    page = Page(settings.static)
    page.root_dir = os.path.realpath(settings.static)
    page.headers = page_headers(settings.page_csp, settings.frame_ancestors)
    ops = ops_children(health, stats, hub)
    from twisted.internet import reactor

    api = PushAPI(hub, settings, stats)
    sse = SSE(hub, settings, stats, policy, budget, origin_ok=origins.permit_values)
    extra: dict[bytes, Resource] = {b"api": api, b"sse": sse}
    ops_site = None
    if settings.metrics_endpoint:
        ops_root = Resource()
        for name, child in ops.items():
            ops_root.putChild(name, child)
        # The same door as the main port (its own counts: operators' scrapes
        # are not clients), so a metrics port is no easier to hold open.
        ops_site = ChatdSite(
            ops_root,
            timeout=settings.handshake_timeout,
            parsePOSTFormSubmission=False,
            logFormatter=access_log_line,
        )
        ops_site.gate = Gate(settings, Stats(), reactor)
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
    site = ChatdSite(
        root,
        timeout=settings.handshake_timeout,
        parsePOSTFormSubmission=False,
        logFormatter=access_log_line,
    )
    site.upgrades = Upgrades(plain, v1, relay, origins)
    site.api = api
    site.gate = Gate(settings, stats, reactor)
    for factory in (plain, v1, relay):
        factory.gate = site.gate
    site.displayTracebacks = False
    return Web(site, ops_site, clients, health)


def make_site(settings: Settings, hub: Hub) -> Site:
    """The main site alone (for embedding and in-process tests)."""
    return make_web(settings, hub, Stats(), Health()).site

"""What every chatd WebSocket connection shares: limits, backpressure, closing, accounting.

A connection owns one ``fanout.Link`` (its outgoing side) from onOpen until
its close handshake starts. Subclasses say what to do when the link opens
(``attach``), when a message arrives (``received``), and when the link goes
(``detach``); ``detach`` runs exactly once, as soon as chatd sends or
receives a close or the TCP connection is lost, so a closing client is
never written to again.
"""

from __future__ import annotations

import json
import time
from collections import deque
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, cast
from urllib.parse import parse_qs

from autobahn.exception import Disconnected
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.protocol import TrafficStats, WebSocketProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from autobahn.websocket.utf8validator import Utf8Validator
from twisted.internet import defer
from twisted.internet.interfaces import IConsumer
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from chatd import fanout, limits
from chatd.auth import NO_AUTH, AuthError, Identity, Policy, bearer
from chatd.config import Settings
from chatd.deflate import Deflate, acceptor, plain_offer
from chatd.fanout import Budget, Link
from chatd.hub import Hub
from chatd.internals import (
    HANDSHAKE_PRIVATE,
    ServerInternals,
    direct_socket,
    is_same_origin,
    options_as_class_attributes,
    url_to_origin,
    write,
)
from chatd.logs import ConnectionLog
from chatd.stats import Stats

if TYPE_CHECKING:
    from chatd.web import Gate

_log = ConnectionLog("chatd.connection")
_log_failure = Logger(namespace="chatd.connection")


class _MadeOnFirstUse:
    """A class attribute that gives each instance its own value the first time it is read."""

    def __init__(self, make) -> None:
        self.make = make
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: object, owner: type | None = None) -> Any:
        if obj is None:
            return self
        value = obj.__dict__[self.name] = self.make()
        return value


# What only the opening handshake needs; an open connection drops them
# (their class defaults below show through).
_HANDSHAKE_ONLY = frozenset(
    (
        "http_request_data",
        "http_response_data",
        "http_status_line",
        "http_headers",
        "http_request_params",
        "http_request_uri",
        "http_request_path",
        "http_request_host",
        "websocket_origin",
        "websocket_protocols",
        "websocket_extensions",
        "websocket_extensions_in_use",  # (it holds Autobahn's PerMessageDeflate)
        "parsed_request",
        *HANDSHAKE_PRIVATE,
    )
)
_KEY_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+/")


class Clients:
    """Every open WebSocket connection of the server, for counts and shutdown."""

    def __init__(self, stats: Stats) -> None:
        self.live: set[Connection] = set()
        self.stats = stats
        # chatd.v1 sessions by resume secret (ChatSession.resume_secret), while open
        self.resumable: dict[str, Connection] = {}
        self._emptied: list[defer.Deferred] = []

    def add(self, c: Connection) -> None:
        self.live.add(c)
        self.stats.connections[c.kind] += 1
        self.stats.connections_total[c.kind] += 1

    def remove(self, c: Connection) -> None:
        if c in self.live:
            self.live.discard(c)
            self.stats.connections[c.kind] -= 1
            if not self.live:
                waiting, self._emptied = self._emptied, []
                for d in waiting:
                    d.callback(None)

    def close_user(self, user: str, code: int, reason: str) -> int:
        """Close every connection of ``user`` (a token's sub) here; how many.

        A scan of the live connections: for an operator's action, not a hot path.
        """
        mine = [c for c in self.live if c.user() == user]
        for c in mine:
            c.fail(code, reason)
        return len(mine)

    def close_all(self, code: int, reason: str, timeout: float, clock) -> defer.Deferred:
        """Close every connection with ``code``; fires when all are gone.

        Connections that have not finished closing after ``timeout`` seconds
        are dropped.
        """
        if not self.live:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._emptied.append(d)
        for c in list(self.live):
            c.fail(code, reason)

        def drop_stragglers() -> None:
            for c in list(self.live):
                c.dropConnection(abort=True)

        call = clock.callLater(timeout, drop_stragglers)
        d.addBoth(lambda r: (call.active() and call.cancel(), r)[1])
        return d


class Refused(ConnectionDeny):
    """An upgrade refused for who the client is (401) or what it may not do (403),
    answered with a JSON body: ``{"error": ..., "reason": ..., "message": ...}``."""

    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(code, message)
        self.word = reason


def _token(request: ConnectionRequest) -> str | None:
    """A token from ``?token=`` (browsers cannot set headers on a WebSocket) or
    ``Authorization: Bearer``."""
    values = request.params.get("token") if request.params else None
    if values:
        return str(values[0])
    return bearer(request.headers.get("authorization"))


class Connection(ServerInternals):
    factory: ChatdFactory
    kind: ClassVar[str] = "?"
    link: Link | None = None
    opened_at = 0.0
    identity: Identity | None = None  # who the upgrade's token says the client is

    def user(self) -> str | None:
        """The sub of this connection's token, if it has one."""
        return self.identity.sub if self.identity is not None else None

    def identify(self, request: ConnectionRequest, required: bool) -> Identity | None:
        """The identity of the upgrade's token, if it has one (``Refused`` 401 if it is
        bad, or missing where ``required``); None without one (or with --auth none)."""
        policy = self.factory.policy
        if not policy.enabled:
            return None
        token = _token(request)
        if token is None:
            if required:
                raise Refused(401, "missing", "a token is required (docs/AUTH.md)")
            return None
        try:
            identity = policy.verify(token)
        except AuthError as e:
            self.factory.stats.auth_refused[e.reason] += 1
            raise Refused(401, e.reason, str(e)) from None
        self.identity = identity
        return identity

    def failHandshake(self, reason: str, code: int = 400, responseHeaders: Any = None) -> None:
        if code not in (401, 403):
            super().failHandshake(reason, code, responseHeaders)
            return
        word = getattr(self, "_refused_word", "")
        body = json.dumps(
            {
                "error": "unauthorized" if code == 401 else "forbidden",
                "reason": word,
                "message": reason,
            }
        ).encode()
        head = [
            f"HTTP/1.1 {code} {'Unauthorized' if code == 401 else 'Forbidden'}",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
            "Connection: close",
        ]
        if code == 401:
            head.append('WWW-Authenticate: Bearer realm="chatd"')
        self.wasNotCleanReason = reason
        self.sendData(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        self.dropConnection(abort=False)

    # -- idle memory -------------------------------------------------------
    # Autobahn gives every connection ~35 attributes holding their starting
    # values, a TrafficStats, a deque and a Utf8Validator, and keeps the whole
    # opening handshake (request, headers, response) for the connection's
    # life. Here the starting values are class attributes (an instance gets
    # its own only when one changes), the deque and the validator are made
    # on first use, the traffic counters are shared (nobody reads them), and
    # the handshake is dropped once the connection is open: about half the
    # memory of an idle connection (the figures are in the message of commit
    # 8a6feb5, which made the change; python -m bench.memprobe shows what is
    # left). (Autobahn's private starting values, and how the
    # options become class attributes, are in chatd.internals.) Autobahn's types
    # for these are inferred from the values the handshake gives them (str,
    # Timings, dict, list), though it starts them at None too: Any here.
    trackedTimings: Any = None
    trafficStats = TrafficStats()  # shared by all connections, never read
    state = WebSocketProtocol.STATE_CONNECTING
    send_state = WebSocketProtocol.SEND_STATE_GROUND
    data = b""
    send_queue: Any = ()  # a deque once a send is chopped or synchronous (see sendData)
    triggered = False
    utf8validator = _MadeOnFirstUse(Utf8Validator)
    wasMaxFramePayloadSizeExceeded = False
    wasMaxMessagePayloadSizeExceeded = False
    closedByMe = False
    failedByMe = False
    droppedByMe = False
    wasClean = False
    wasNotCleanReason: Any = None
    wasServerConnectionDropTimeout = False
    wasOpenHandshakeTimeout = False
    wasCloseHandshakeTimeout = False
    wasServingFlashSocketPolicyFile = False
    localCloseCode = None
    localCloseReason = None
    remoteCloseCode = None
    remoteCloseReason = None
    openHandshakeTimeoutCall = None
    closeHandshakeTimeoutCall = None
    autoPingTimeoutCall = None
    autoPingPending = None
    autoPingPendingCall = None
    autoPingPendingSeq = 0
    autoPingPendingSent = None
    http_request_data: Any = None
    http_response_data: Any = None
    http_status_line: Any = None
    http_headers: Any = MappingProxyType({})
    http_request_params: Any = MappingProxyType({})
    http_request_uri: Any = None
    http_request_path: Any = None
    http_request_host: Any = None
    websocket_origin: Any = None
    websocket_protocols: Any = ()
    websocket_extensions: Any = ()
    websocket_extensions_in_use: Any = ()
    # (request target, {lower-case name: value}) when chatd.web parsed the handshake
    parsed_request: tuple[bytes, dict[bytes, bytes]] | None = None

    def processHandshake(self) -> None:
        """Autobahn's processHandshake, on the headers chatd.web already parsed.

        For an ordinary handshake this does what Autobahn's does (the same
        checks, the same attributes, onConnect, then Autobahn's own
        succeedHandshake) without parsing the request a second time or going
        through a Deferred. A Sec-WebSocket-Extensions header is taken when it
        is one plain permessage-deflate offer (``chatd.deflate.plain_offer``:
        what browsers send), parsed as Autobahn parses it; Autobahn's
        succeedHandshake then negotiates it, on either path. Anything it does
        not take on (any other extensions header, an odd Host, version or key,
        or any check that fails, so that the refusal is Autobahn's own) goes
        to Autobahn's.
        """
        parsed = self.parsed_request
        end = self.data.find(b"\r\n\r\n")
        if parsed is None or end < 0 or not self._take_handshake(parsed, end):
            self.parsed_request = None
            super().processHandshake()

    def _take_handshake(self, parsed: tuple[bytes, dict[bytes, bytes]], end: int) -> bool:
        target, raw = parsed
        extensions: list[Any] = []
        if b"sec-websocket-extensions" in raw:
            offer = plain_offer(raw[b"sec-websocket-extensions"])
            if offer is None:
                return False  # anything but one plain permessage-deflate offer
            extensions = offer
        if (
            self.trustXForwardedFor
            or self.maxConnections > 0
            or self.factory.externalPort
            or raw.get(b"sec-websocket-version") != b"13"
            or 13 not in self.versions
        ):
            return False
        connection = raw.get(b"connection", b"")
        if not any(c.strip().lower() == b"upgrade" for c in connection.split(b",")):
            return False
        key = raw.get(b"sec-websocket-key", b"")
        if len(key) != 24 or key[-2:] != b"==" or not _KEY_CHARS.issuperset(key[:-2]):
            return False
        host_b = raw.get(b"host")
        if host_b is None:
            return False
        host = host_b.decode("latin-1")
        if ":" in host and not host.endswith("]"):
            host, port = host.rsplit(":", 1)
            try:
                int(port.strip())
            except ValueError:
                return False
        protocols = []
        if b"sec-websocket-protocol" in raw:
            protocols = [
                p.strip() for p in raw[b"sec-websocket-protocol"].decode("latin-1").split(",")
            ]
            if len(set(protocols)) != len(protocols):
                return False
        origin = ""
        if b"origin" in raw:
            origin = raw[b"origin"].decode("latin-1")
            try:
                origin_tuple = url_to_origin(origin)
            except ValueError:
                return False
            if not (origin_tuple == "null" and self.factory.allowNullOrigin) and not (
                is_same_origin(
                    origin_tuple,
                    "https" if self.factory.isSecure else "http",
                    self.factory.externalPort or self.factory.port,
                    self.allowedOriginsPatterns,
                )
            ):
                return False
        uri = target.decode("latin-1")
        path, _, query = uri.partition("?")
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in raw.items()}
        # What Autobahn's processHandshake leaves on the connection.
        self.http_status_line = f"GET {uri} HTTP/1.1"
        self.http_headers = headers
        self.http_request_uri = uri
        self.http_request_path = path
        self.http_request_params = parse_qs(query) if query else {}
        self.http_request_host = host
        self.websocket_version = 13
        self.websocket_protocols = protocols
        self.websocket_origin = origin
        self.websocket_extensions = extensions  # succeedHandshake negotiates from it
        self.data = self.data[end + 4 :]
        self.set_key(key.decode("ascii"))
        request = ConnectionRequest(
            self.peer,
            headers,
            host,
            path,
            self.http_request_params,
            13,
            origin,
            protocols,
            extensions,
        )
        try:
            accepted = self.onConnect(request)
        except Refused as e:
            self._refused_word = e.word
            self.failHandshake(e.reason, e.code)
            return True
        except ConnectionDeny as e:
            self.failHandshake(e.reason, e.code)
            return True
        except Exception as e:
            _log_failure.failure("Unexpected exception in onConnect")
            self.failHandshake(f"Internal server error: {e}", ConnectionDeny.INTERNAL_SERVER_ERROR)
            return True
        if isinstance(accepted, defer.Deferred):
            accepted.addCallbacks(self.succeedHandshake, self._deny)
        else:
            self.succeedHandshake(accepted)
        return True

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        gate = self.factory.gate
        if gate is not None:
            gate.release(self.transport)

    def _deny(self, failure) -> None:
        if isinstance(failure.value, ConnectionDeny):
            self.failHandshake(failure.value.reason, failure.value.code)
        else:
            self.failHandshake(
                f"Internal server error: {failure.value}", ConnectionDeny.INTERNAL_SERVER_ERROR
            )

    def _forget_handshake(self) -> None:
        # A new dict: the old one keeps the size it grew to during the handshake.
        self.__dict__ = {k: v for k, v in self.__dict__.items() if k not in _HANDSHAKE_ONLY}

    # -- lifecycle -------------------------------------------------------
    def onOpen(self) -> None:
        self._forget_handshake()
        pmc = self.compressor
        compressing = pmc is not None
        shared_bits = 0  # a deflated frame shared with others (chatd.deflate)
        if pmc is not None:
            mine = Deflate.of(pmc)
            self.use_compressor(mine)
            if mine.shared:
                shared_bits = mine.bits
        transport = self.transport
        assert transport is not None  # connected
        self.link = Link(
            transport,
            self.factory.settings.max_backlog,
            self._dropped,
            self.sendMessage if compressing else None,
            self.factory.budget,
            shared_bits,
        )
        # After the upgrade the transport still has twisted.web's HTTPChannel
        # as its producer; from now on the link is, so the transport tells
        # it when the client stops reading.
        consumer = cast(IConsumer, transport)  # a TCP or TLS transport is one
        consumer.unregisterProducer()
        consumer.registerProducer(self.link, True)
        self.opened_at = time.monotonic()
        self.factory.clients.add(self)
        deflate = " (permessage-deflate)" if compressing else ""
        _log.info(
            f"open {self.kind} {self.peer}{deflate}",
            kind=self.kind,
            peer=self.peer,
            deflate=deflate,
        )
        self.attach()

    def sendCloseFrame(self, code=None, reasonUtf8=None, isReply=False) -> None:
        self._detach()
        super().sendCloseFrame(code=code, reasonUtf8=reasonUtf8, isReply=isReply)

    def onClose(self, wasClean: bool, code, reason) -> None:
        self._detach()
        self._release_inbound()
        if self.opened_at:
            self.factory.clients.remove(self)
            # Why it closed: the code we sent if we closed first (even if the
            # client never answered), the client's otherwise; 1006 for none.
            code = self.localCloseCode if self.closedByMe else self.remoteCloseCode
            if code is None:  # 1005: a close frame without a code; 1006: none at all
                code = 1005 if wasClean and not self.closedByMe else 1006
            # A client picks any of 2000 application codes (3000-4999): counted
            # as 3xxx / 4xxx, so clients cannot grow the metric's label set.
            label = str(code)
            if not self.closedByMe and code >= 3000:
                label = f"{code // 1000}xxx"
            self.factory.stats.close_codes[label] += 1
            duration = time.monotonic() - self.opened_at
            _log.info(
                f"close {self.kind} {self.peer} after {duration:.1f}s code={code}",
                kind=self.kind,
                peer=self.peer,
                duration=duration,
                code=code,
            )
            self.opened_at = 0.0

    def _detach(self) -> None:
        link = self.link
        if link is not None:
            self.link = None
            link.flush()  # what was queued for it goes out before the close frame
            link.close()
            self.detach(link)

    def sendMessage(
        self,
        payload: bytes,
        isBinary: bool = False,
        fragmentSize: int | None = None,
        sync: bool = False,
        doNotCompress: bool = False,
    ) -> None:
        """Autobahn's sendMessage, less its size check, which is for what comes *in*.

        Autobahn refuses (raises, and chatd's callers dropped silently) an
        outgoing message over ``maxMessagePayloadSize``, which chatd sets to
        its incoming limit (``--max-message-size``); what chatd sends has no
        such limit (a ``message`` of 16 KiB of text can render to more than
        64 KiB of JSON). One frame, deflated when the connection negotiated
        it (``chatd.deflate.Deflate.frame``: by the process's shared
        compressor, or with context takeover the connection's own), handed
        to ``sendData`` like every other byte.
        """
        if fragmentSize is not None or sync or self.trackedTimings or self.autoFragmentSize:
            super().sendMessage(payload, isBinary, fragmentSize, sync, doNotCompress)
            return
        if self.state != WebSocketProtocol.STATE_OPEN:
            raise Disconnected("Attempt to send on a closed protocol")
        pmc = self.compressor
        if pmc is not None and not doNotCompress:
            self.sendData(pmc.frame(payload, isBinary))
        else:
            self.sendData(fanout.encode_frame(payload, isBinary))

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        """Every frame of this connection: behind the fan-out's queue when it has one.

        Every byte counts against ``--max-backlog`` once the transport has
        paused the link, whatever produced it (replies, pongs, ...): a client
        that stops reading is closed (1008) however it keeps the server
        writing. The close frame itself goes out after the link is detached,
        so it is never counted (nor refused).
        """
        link = self.link
        if link is not None and link.stalled:
            if not link.open:  # given up on (by broadcast): its close is on the way
                return
            reason = link.charge(len(data))
            if reason is not None:
                self._dropped(reason)
                return
        if sync or chopsize or self.send_queue or self.logOctets:
            if type(self.send_queue) is tuple:
                self.send_queue = deque()  # Autobahn queues these
            super().sendData(data, sync, chopsize)
        elif link is None or not link.queue(data):
            # The handshake's answer, and frames while nothing is queued: as
            # Autobahn would (transport.write), but to the socket at once when
            # the transport holds nothing (no epoll_ctl, no extra reactor turn).
            transport = self.transport
            write(transport, direct_socket(transport), data)

    # -- receiving -------------------------------------------------------
    frames = 0  # data frames of the message being received

    def onMessageBegin(self, isBinary: bool) -> None:
        self.frames = 0
        super().onMessageBegin(isBinary)

    def onMessageFrameBegin(self, length: int) -> None:
        """Each data frame: at most MAX_MESSAGE_FRAMES, and one more per FRAGMENT_BYTES of data
        (empty frames cost too; a big message in small fragments is fine)."""
        self.frames += 1
        if (
            self.frames > limits.MAX_MESSAGE_FRAMES
            and self.frames
            > limits.MAX_MESSAGE_FRAMES
            + (self.message_data_total_length + length) // limits.FRAGMENT_BYTES
        ):
            if not self.failedByMe:
                self.fail(
                    limits.CLOSE_MESSAGE_TOO_BIG,
                    "too many frames for the data in one message",
                )
            elif self.frames > 2 * limits.MAX_MESSAGE_FRAMES:
                self.dropConnection(abort=True)  # still sending, instead of closing
            return
        super().onMessageFrameBegin(length)

    inbound = 0  # bytes of the message being received, in the factory's inbound budget

    def onMessageFrameData(self, payload: bytes) -> None:
        """Message data as it arrives (inflated): counted against the inbound budget.

        The whole message is held until its last frame; over all clients that
        is bounded by ``--max-total-inbound``, so the start of a big (or
        highly compressed) message that never ends cannot pile up.
        """
        if self.failedByMe:
            return
        n = len(payload)
        budget = self.factory.inbound
        budget.total += n
        self.inbound += n
        if budget.total > budget.limit:
            self._release_inbound()
            self.fail(limits.CLOSE_TRY_AGAIN_LATER, "server busy: too many messages arriving")
            return
        super().onMessageFrameData(payload)

    def onMessageEnd(self) -> None:
        try:
            super().onMessageEnd()
        finally:
            self._release_inbound()

    def _release_inbound(self) -> None:
        if self.inbound:
            self.factory.inbound.total -= self.inbound
            self.inbound = 0

    pings: limits.TokenBucket | None = None  # made at the first ping

    def onPing(self, payload: bytes) -> None:
        """Pongs for pings within the ping rate; none past it; a flood closes (1008)."""
        now = time.monotonic()
        bucket = self.pings
        if bucket is None:
            bucket = self.pings = limits.TokenBucket(
                limits.PING_RATE, limits.PING_BURST, limits.PING_FLOOD, now
            )
        verdict = bucket.take(now)
        if verdict == limits.TokenBucket.OK:
            super().onPing(payload)
        elif verdict == limits.TokenBucket.FLOOD:
            self.fail(limits.CLOSE_POLICY_VIOLATION, "ping flood")

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        stats = self.factory.stats
        stats.messages_in[self.kind] += 1
        stats.bytes_in[self.kind] += len(payload)
        if self.link is not None:
            self.received(payload, isBinary)

    # -- for subclasses ---------------------------------------------------
    def attach(self) -> None:
        """The connection is open: join rooms with ``self.link``."""

    def detach(self, link: Link) -> None:
        """The connection is closing: leave every room ``link`` joined."""

    def received(self, payload: bytes, isBinary: bool) -> None:
        """One whole message from the client, while the connection is open."""

    @property
    def hub(self) -> Hub:
        return self.factory.hub

    def _dropped(self, reason: str) -> None:
        self.factory.stats.dropped[reason] += 1
        if reason == "backlog":
            self.fail(
                limits.CLOSE_POLICY_VIOLATION,
                f"slow consumer: more than {self.factory.settings.max_backlog} bytes unread",
            )
        elif reason == "overload":
            self.fail(limits.CLOSE_TRY_AGAIN_LATER, "server overloaded: too much unread")
        else:
            self.dropConnection(abort=True)


class ChatdFactory(WebSocketServerFactory):
    """One per kind of endpoint; holds the hub that holds the clients."""

    gate: Gate | None = None  # told when a connection it admitted is gone
    inbound = fanout.UNLIMITED  # messages being received, over all factories (make_web)

    def __init__(
        self,
        protocol: type[Connection],
        hub: Hub,
        settings: Settings,
        max_size: int,
        budget: Budget,
        clients: Clients,
    ) -> None:
        super().__init__()
        self.protocol = protocol
        self.hub = hub
        self.settings = settings
        self.policy: Policy = NO_AUTH
        self.budget = budget
        self.clients = clients
        self.stats = clients.stats
        accept = None
        if settings.compression:
            accept = acceptor(settings.compression_context_takeover, max_size)

        self.setProtocolOptions(
            maxMessagePayloadSize=max_size,
            maxFramePayloadSize=max_size,
            # Protocol errors get their close code (1002, 1007, ...), not a drop.
            failByDrop=False,
            webStatus=False,
            autoPingInterval=settings.ping_interval,
            autoPingTimeout=settings.ping_timeout if settings.ping_interval else 0,
            openHandshakeTimeout=settings.handshake_timeout,
            closeHandshakeTimeout=limits.CLOSE_HANDSHAKE_TIMEOUT,
            perMessageCompressionAccept=accept,
        )
        # A subclass carrying the options as class attributes saves each
        # connection ~40 dictionary entries (chatd.internals, reach 3).
        options = options_as_class_attributes(self, protocol)
        self.protocol = cast(
            type[WebSocketServerProtocol], type(protocol.__name__, (protocol,), options)
        )

"""Every place chatd reaches into Twisted's or Autobahn's private names, and why.

Nothing else in chatd reads, writes, overrides or imports a private name
(``_name``) of Twisted or Autobahn, or patches one of their modules: it
goes through this module. ``tests/test_internals.py`` checks every
assumption listed here against the installed libraries and measures that
the fast paths are really taken, so an upgrade that breaks one fails there,
loudly, rather than making chatd silently slow or wrong.

Checked against Twisted 26.10.0 and Autobahn 26.10.2 (the versions in the
shared venv). Both use calendar versions, ``YY.MM.patch``, with no
semantic "major": any release may change a private name. ``requirements.txt``
(which ``setup.py`` reads) therefore allows ``twisted[tls]>=24.7,<27`` and
``autobahn[twisted]>=24.4,<27``. The upper bound is the next calendar
year of both (27.x), the nearest thing to a "next major" a calendar version
has: it lets in this year's fixes, and a 27.x must pass
``pytest tests/test_internals.py`` before the bound moves. (Autobahn is at
26.x too, so ``<26`` would refuse the version in use.) The lower bounds are
unchanged; the reaches below were checked on 26.10 only, and on an older
release in the range the canary tests are what says whether they hold.

The reaches, by where they are used:

1. The direct socket write (``DIRECT_WRITE_OK``, ``direct_socket``,
   ``write``; ``chatd.fanout.Link.flush`` and ``Link.drain``,
   ``chatd.protocols.base.Connection.sendData``). When a
   ``twisted.internet.tcp.Connection`` holds nothing unsent
   (``_tempDataBuffer`` empty, ``offset >= len(dataBuffer)``, ``connected``,
   not ``disconnecting``), the frames of a reactor turn go straight to its
   ``socket`` with one ``send``; only what the kernel does not take goes
   through ``transport.write``. Why not ``transport.write``: it buffers,
   registers the socket for writability (``epoll_ctl``), waits a reactor
   turn, writes and unregisters (another ``epoll_ctl``): two more system
   calls and a pass through its write path per connection and turn, on
   the fan-out's hot path. Behaviour is the same: the bytes go out in
   order, and Twisted's buffer, producer and close logic see everything
   that was not sent. ``Link.flush`` keeps an inline copy of ``write`` (a
   function call per connection and turn is measurable there); it is
   guarded by the link's ``sock``, which ``direct_socket`` gives only when
   ``DIRECT_WRITE_OK``. That flag is computed once, at import, by probing
   a real ``tcp.Connection`` over a socket pair: it buffers in
   ``_tempDataBuffer`` on ``write``, ``doWrite`` empties it and sends, the
   check above tells "nothing waiting" from "something waiting", and
   ``loseConnection`` sets ``disconnecting``. If any of that fails,
   ``DIRECT_WRITE_PROBLEM`` says what, every write goes through
   ``transport.write`` (correct, only slower), and the canary test fails.
   TLS transports (``twisted.protocols.tls``, and ``tcp.Connection`` after
   ``startTLS``, whose ``TLS`` is true) never get a socket.

2. Lazy debug fields (``autobahn.websocket.protocol.hltype``/``hlval`` and
   ``autobahn.twisted.websocket.hltype``/``hlval``, module globals replaced
   at import). Autobahn colours names and values for its debug log lines
   eagerly, on every read (``WebSocketServerProtocol.dataReceived``),
   connect, handshake and close, whether or not debug logging is on.
   Setting Autobahn's log level does not help: the arguments are computed
   before ``log.debug`` is called (a no-op at the default level). Measured
   on the dev machine (timeit, the three fields of ``dataReceived``): 1.4 µs
   eager, 0.8 µs lazy, 0.24 µs for three empty calls; so about 0.65 µs per
   read and a few µs per connection. Small: if this reach ever breaks, drop
   it rather than repair it. The replacements return a stand-in that
   computes the text only when formatted (``format``, ``str``, ``repr``
   all return a ``str``). They are safe only because Autobahn uses these
   results nowhere but as fields of a ``self.log.<level>(...)`` call; the
   canary test parses both modules and fails if that stops being true.
   (chatd used to replace
   ``pformat`` too; that made ``str(Timings())`` raise TypeError, as
   ``Timings.__str__`` returns ``pformat``'s result. It is no longer
   patched: its one per-connection use, the options dump of
   ``_connectionMade``, is skipped by ``ServerInternals._connectionMade``.)

3. The handshake fast path and idle memory (``ServerInternals``, the base
   of ``chatd.protocols.base.Connection``; ``options_as_class_attributes``
   for ``ChatdFactory``; ``is_same_origin``, ``url_to_origin``).
   ``WebSocketServerProtocol._connectionMade`` is overridden: Autobahn's
   copies every option in ``CONFIG_ATTRS`` (29 for a server) from the
   factory onto each connection and pretty-prints them for a debug line
   (the ``pformat`` alone: 0.14-0.25 ms per connection, timeit on the dev
   machine with chatd's and a default factory); chatd's factory makes the options
   class attributes of a per-factory subclass, so the override only starts
   the open-handshake timer on the factory's ``_batched_timer`` (as
   Autobahn's does: one reactor timer per bucket, not per connection) and
   counts the connection. Starting values of ~35 per-connection attributes
   are class attributes of ``chatd.protocols.base.Connection``; they mirror
   what Autobahn's ``_connectionMade`` sets (the canary test parses it and
   fails if one is missing). ``processHandshake`` (chatd's
   override, in ``base.py``) checks an Origin with Autobahn's own
   ``_url_to_origin``/``_is_same_origin`` (so the answer is the one
   Autobahn would give) and leaves the key where ``succeedHandshake``
   reads it (``set_key``: ``_wskey``). A browser's permessage-deflate
   offer is handed to ``succeedHandshake`` as Autobahn's processHandshake
   hands it: in ``websocket_extensions``, shaped as its private
   ``_parseExtensionsHeader`` shapes it (``chatd.deflate.plain_offer``);
   tests/test_deflate.py checks that parse and that both paths give the
   same answer. Once open, the connection forgets
   its handshake attributes, ``_wskey`` among them (``HANDSHAKE_PRIVATE``).
   ``compressor`` reads ``_perMessageCompress`` (the negotiated
   permessage-deflate, if any), and ``use_compressor`` replaces it, once
   the connection is open, with ``chatd.deflate.Deflate``: Autobahn makes
   its own ``PerMessageDeflate`` from a registry keyed by the extension's
   name (``PERMESSAGE_COMPRESSION_EXTENSION``), for clients and servers
   alike, so there is no public way to have it make chatd's. Autobahn's
   frame parser then calls ``start_decompress_message``,
   ``decompress_message_data(data, max_output_len=...)`` and
   ``end_decompress_message`` on chatd's object, and its ``sendMessage``
   (with fragments) the three ``*_compress_message`` methods; the canary
   test checks those calls are still there and that a compressed message
   still arrives through the replacement. ``fail`` calls ``_fail_connection``,
   the only way to close with any RFC 6455 code (``sendClose`` takes only
   1000 and 3000-4999). ``hand_over`` makes a protocol built after the
   first read the one a transport delivers to, as Autobahn's
   ``WebSocketResource`` does (``transport.protocol``, or
   ``wrappedProtocol`` under TLS): the door (``chatd.web.FrontDoor``)
   decides between Autobahn and twisted.web on the first bytes.

4. twisted.web's HTTP channel (``HTTPChannelInternals``, the base of
   ``chatd.web.ChatdChannel``). The door's caps need what twisted.web keeps
   privately: the head's size and header count so far
   (``_receivedHeaderSize``, ``_receivedHeaderCount``: 431 at chatd's own
   caps, answered and lingered rather than twisted.web's 400), the request
   line (``_command``, ``_path``: to judge a body on the head), the body
   decoder (``_transferDecoder``: dropped to refuse a body unread, or to
   cut a chunked body at its limit), the network producer
   (``_networkProducer``: to keep reading while lingering after an
   answer), and ``_send100Continue`` (no ``100 Continue`` for a body that
   will not be read). No public API gives any of these.

5. Log time stamps (``twisted.logger._file.formatTime``, replaced at
   import by ``chatd.logs._format_time``). twistd's text observer looks
   ``formatTime`` up in that module for every line; building the time
   zone and datetime is about a fifth of a log line's cost, and the text
   changes once a second. A public alternative, a text observer of chatd's
   own (``ILogObserver`` on the application, as ``--log-format json``
   does), would bypass twistd's ``--logfile``, ``--syslog`` and log
   rotation.

Not private by name, but Autobahn's internal state all the same (used in
``chatd.protocols.base``, checked by the canary tests where a change would
not fail at once): ``processHandshake``, ``succeedHandshake`` and
``failHandshake`` (overridden or called), the unparsed input ``data``, the
send queue ``send_queue`` and ``logOctets`` (``Connection.sendData``), and
``CONFIG_ATTRS``; and of Twisted's ``tcp.Connection``, its ``protocol``
(``hand_over``).

Replaced by public APIs: start-up failures of the listening port
(``chatd.tap.ListeningService`` used ``StreamServerEndpointService``'s
``_raiseSynchronously`` and ``_waitingForPort``; it is now a plain
``Service`` that calls ``endpoint.listen`` itself and raises at once if
the returned Deferred has already failed), and ``pformat`` (above).
"""

from __future__ import annotations

import ast
import inspect
import socket
from types import FunctionType
from typing import Any

import autobahn.twisted.websocket as _ab_twisted
import autobahn.websocket.protocol as _ab_protocol
import twisted.logger._file as _twisted_logger_file
from autobahn.twisted.websocket import WebSocketServerProtocol
from autobahn.util import hltype as _hltype
from autobahn.util import hlval as _hlval
from twisted.internet import tcp
from twisted.protocols.policies import ProtocolWrapper
from twisted.web.http import HTTPChannel

# -- 1. the direct socket write ---------------------------------------------------


def _probe_direct_write() -> str | None:
    """None if a tcp.Connection keeps its buffer as ``write`` assumes; else what differs."""

    class _Reactor:  # only what a FileDescriptor asks of its reactor here
        def addWriter(self, _):
            pass

        removeWriter = addReader = removeReader = addWriter

    a, b = socket.socketpair()
    try:
        # (no protocol, and a stand-in reactor: the probe only writes to the buffer)
        t = tcp.Connection(a, None, _Reactor())  # type: ignore[arg-type]
        if t.socket is not a or t.TLS is not False:
            return "tcp.Connection has no plain socket, or TLS is not False"
        t.connected = 1
        if not (
            t._tempDataBuffer == []
            and isinstance(t.dataBuffer, bytes)
            and isinstance(t.offset, int)
            and not t.disconnecting
        ):
            return "a new tcp.Connection's buffer is not (_tempDataBuffer, dataBuffer, offset)"
        if not _nothing_waiting(t):
            return "an empty tcp.Connection looks busy"
        t.write(b"probe")
        if _nothing_waiting(t):
            return "tcp.Connection.write does not buffer in _tempDataBuffer"
        t.doWrite()
        if not _nothing_waiting(t) or b.recv(16) != b"probe":
            return "tcp.Connection.doWrite does not empty the buffer to the socket"
        t.loseConnection()
        if not t.disconnecting:
            return "tcp.Connection.loseConnection does not set disconnecting"
        return None
    except Exception as e:  # anything unexpected: no direct writes
        return f"probe failed: {e!r}"
    finally:
        a.close()
        b.close()


def _nothing_waiting(t: Any) -> bool:
    # The test Link.flush and write make (less connected/disconnecting).
    return not t._tempDataBuffer and t.offset >= len(t.dataBuffer)


DIRECT_WRITE_PROBLEM = _probe_direct_write()
DIRECT_WRITE_OK = DIRECT_WRITE_PROBLEM is None


def direct_socket(transport: object) -> socket.socket | None:
    """The socket of a plain Twisted TCP transport, whose buffer we can see; else None.

    TLS and other wrapped transports must encrypt or frame what they send,
    so they always get ``transport.write``; so does everything when the
    import-time probe failed (``DIRECT_WRITE_OK`` false).
    """
    # Only Twisted's own TCP connection: a TLS wrapper (twisted.protocols.tls)
    # forwards unknown attributes to the TCP transport under it, socket included.
    if not DIRECT_WRITE_OK or not isinstance(transport, tcp.Connection):
        return None
    sock = getattr(transport, "socket", None)
    if (
        isinstance(sock, socket.socket)
        and getattr(transport, "TLS", None) is False  # startTLS encrypts inside the transport
        and isinstance(getattr(transport, "_tempDataBuffer", None), list)
        and isinstance(getattr(transport, "dataBuffer", None), bytes)
        and isinstance(getattr(transport, "offset", None), int)
    ):
        return sock
    return None


def write(transport: Any, sock: socket.socket | None, data: bytes) -> None:
    """``transport.write(data)``, but straight to ``sock`` (from ``direct_socket``) when
    nothing is waiting in the transport's buffer: one ``send``, no ``epoll_ctl``.

    ``chatd.fanout.Link.flush`` has an inline copy of this body: keep both the same.
    """
    t = transport
    if (
        sock is not None
        and not t._tempDataBuffer
        and t.offset >= len(t.dataBuffer)
        and t.connected
        and not t.disconnecting
    ):
        try:
            sent = sock.send(data)
        except OSError:  # would block, or broken: the transport finds out which
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    t.write(data)


# -- 2. lazy debug fields ---------------------------------------------------------


class LazyText:
    """``fn(*args)`` as text, computed only if a log line is actually formatted."""

    __slots__ = ("args", "fn")

    def __init__(self, fn, args: tuple) -> None:
        self.fn = fn
        self.args = args

    def __format__(self, spec: str) -> str:
        return format(str(self.fn(*self.args)), spec)

    def __str__(self) -> str:
        return str(self.fn(*self.args))

    __repr__ = __str__


def lazy_hltype(obj: Any) -> LazyText:
    """``autobahn.util.hltype(obj)``, formatted only if logged."""
    return LazyText(_hltype, (obj,))


def lazy_hlval(val: Any, color: str = "white", bold: bool = True) -> LazyText:
    """``autobahn.util.hlval(val, color, bold)``, formatted only if logged."""
    return LazyText(_hlval, (val, color, bold))


LAZY_MODULES = (_ab_protocol, _ab_twisted)  # Autobahn modules whose hltype/hlval are lazy
LAZY_NAMES = ("hltype", "hlval")
for _module in LAZY_MODULES:  # (a bare ModuleType to mypy: it knows no names in it)
    _module.hltype = lazy_hltype  # type: ignore[attr-defined]
    _module.hlval = lazy_hlval  # type: ignore[attr-defined]


def lazy_uses_outside_log_calls(module, source: str | None = None) -> list[str]:
    """Each call of hltype/hlval in ``module`` (or ``source``) that is not a field of a
    ``.log.<level>()`` call, as ``module:line``: where a stand-in would not be a str in time."""
    tree = ast.parse(source if source is not None else inspect.getsource(module))
    fields: set[int] = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Attribute)
            and node.func.value.attr == "log"
        ):
            fields.update(id(k.value) for k in node.keywords)
    return [
        f"{module.__name__}:{node.lineno}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in LAZY_NAMES
        and id(node) not in fields
    ]


# -- 3. the handshake fast path, idle memory ---------------------------------------

is_same_origin = _ab_protocol._is_same_origin
url_to_origin = _ab_protocol._url_to_origin
# What only the opening handshake needs, of Autobahn's private attributes.
HANDSHAKE_PRIVATE = ("_wskey",)


class ServerInternals(WebSocketServerProtocol):
    """What ``chatd.protocols.base.Connection`` needs of Autobahn's protocol internals."""

    _options_in_class = False  # set by options_as_class_attributes
    _perMessageCompress = None
    _wskey: Any = None  # Autobahn's type is inferred from its handshake value (str)

    # Options Autobahn copies from the factory (here class attributes:
    # options_as_class_attributes) and declares nowhere; those chatd reads.
    openHandshakeTimeout: float
    trustXForwardedFor: int
    maxConnections: int
    versions: list[int]
    allowedOriginsPatterns: list[Any]
    autoFragmentSize: int
    logOctets: bool

    def _connectionMade(self) -> None:
        """Autobahn's WebSocketServerProtocol._connectionMade, less the per-connection state.

        Autobahn's also copies each option the protocol class lacks from the
        factory and pretty-prints all of them for a debug line; with the
        options as class attributes there is nothing to copy.
        """
        if not self._options_in_class:
            super()._connectionMade()
            return
        if self.trackTimings:
            self.setTrackTimings(True)
        if self.openHandshakeTimeout > 0:
            self.openHandshakeTimeoutCall = self.factory._batched_timer.call_later(
                self.openHandshakeTimeout, self.onOpenHandshakeTimeout
            )
        self.factory.countConnections += 1

    @property
    def compressor(self):
        """The negotiated permessage-deflate (Autobahn's PerMessageDeflate until
        ``use_compressor``, chatd.deflate.Deflate from then), or None."""
        return self._perMessageCompress

    def use_compressor(self, pmc: Any) -> None:
        """Make ``pmc`` the connection's permessage-deflate, in place of Autobahn's."""
        self._perMessageCompress = pmc

    def set_key(self, key: str) -> None:
        """The client's Sec-WebSocket-Key, where ``succeedHandshake`` reads it."""
        self._wskey = key

    def fail(self, code: int, reason: str) -> None:
        """Close with any RFC 6455 code (sendClose only takes 1000 and 3000-4999)."""
        self._fail_connection(code, reason)


def options_as_class_attributes(
    factory: Any, protocol: type[WebSocketServerProtocol]
) -> dict[str, Any]:
    """The factory's protocol options as class attributes for a subclass of ``protocol``.

    Autobahn copies every option from the factory onto each connection
    unless the protocol class already has it. (Functions become
    staticmethods, or the instance would bind itself.)
    """
    options = {
        a: staticmethod(v) if isinstance(v, FunctionType) else v
        for a in protocol.CONFIG_ATTRS
        for v in (getattr(factory, a),)
    }
    options["_options_in_class"] = True
    return options


def hand_over(transport: Any, protocol: Any) -> None:
    """Make ``protocol`` the one ``transport`` delivers to (as WebSocketResource does)."""
    if isinstance(transport, ProtocolWrapper):  # TLS wraps the protocol
        transport.wrappedProtocol = protocol
    elif isinstance(getattr(transport, "protocol", None), ProtocolWrapper):
        transport.protocol.wrappedProtocol = protocol
    else:
        transport.protocol = protocol
    protocol.makeConnection(transport)


# -- 4. twisted.web's HTTP channel -------------------------------------------------


class HTTPChannelInternals(HTTPChannel):
    """What ``chatd.web.ChatdChannel`` needs of HTTPChannel's private state."""

    def head_size(self) -> int:
        """Bytes of the request head received so far."""
        return self._receivedHeaderSize

    def header_count(self) -> int:
        """Header lines of the request head received so far."""
        return self._receivedHeaderCount

    def request_line(self) -> tuple[bytes, bytes]:
        """(method, target) of the request whose head is being read."""
        return self._command, self._path

    def decoding_body(self) -> bool:
        """Whether a request body is being read."""
        return self._transferDecoder is not None

    def stop_body(self) -> None:
        """Read no more of the request's body: what follows is not decoded as body."""
        self._transferDecoder = None

    def network_producer(self):
        """The producer that pauses and resumes reading from the transport."""
        return self._networkProducer

    def may_continue(self) -> bool:
        """Whether ``Expect: 100-continue`` gets its 100 (a subclass may refuse)."""
        return True

    def _send100Continue(self) -> None:
        if self.may_continue():
            super()._send100Continue()


# -- 5. log time stamps -----------------------------------------------------------


def patch_log_time(format_time) -> None:
    """Make twistd's text observer stamp lines with ``format_time``."""
    _twisted_logger_file.formatTime = format_time

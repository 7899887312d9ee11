"""Canaries for chatd.internals: what chatd assumes of Twisted's and Autobahn's internals.

Each test fails loudly when an upgrade breaks an assumption: a private name
gone or changed, a fast path no longer taken (measured on real loopback
connections, in process, with the site the daemon serves), or Autobahn's
own objects no longer printing.
"""

from __future__ import annotations

import ast
import inspect
import io
import os
import pprint
import re
import sys
import textwrap

import autobahn.websocket.protocol as ab_protocol
import pytest
import pytest_twisted
import twisted.logger._file as twisted_logger_file
from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from twisted.application.service import MultiService
from twisted.internet import abstract, defer, reactor, ssl, task, tcp
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent, textFileLogObserver
from twisted.web.http import HTTPChannel
from twisted.web.server import Request, Site

import chatd.web
from chatd import internals, logs
from chatd.config import Settings
from chatd.hub import InMemoryHub
from chatd.protocols import base
from chatd.protocols.plain import PlainChat
from chatd.protocols.relay import Relay
from chatd.protocols.v1 import V1Chat
from chatd.tap import ChatdService, ListeningService
from chatd.web import ChatdChannel, ChatdRequest, ChatdSite, make_site

# -- every private name still there, with the expected type ------------------------


def _source(obj) -> str:
    return inspect.getsource(obj)


def test_direct_write_probe_passes() -> None:
    assert internals.DIRECT_WRITE_OK, internals.DIRECT_WRITE_PROBLEM


def test_twisted_transport_buffer_names() -> None:
    fd = abstract.FileDescriptor
    assert fd.dataBuffer == b"" and fd.offset == 0
    assert fd.connected == 0 and fd.disconnecting == 0
    assert issubclass(tcp.Connection, fd) and tcp.Connection.TLS is False
    assert "self._tempDataBuffer" in _source(fd.__init__)
    assert "self._tempDataBuffer.append(data)" in _source(fd.write)


def test_autobahn_private_names() -> None:
    assert callable(ab_protocol._is_same_origin) and callable(ab_protocol._url_to_origin)
    assert internals.is_same_origin is ab_protocol._is_same_origin
    assert internals.url_to_origin is ab_protocol._url_to_origin
    # the origin helpers still answer as chatd's fast path expects
    origin = ab_protocol._url_to_origin("http://127.0.0.1:9000")
    patterns = WebSocketServerFactory().allowedOriginsPatterns  # the default: any
    assert ab_protocol._is_same_origin(origin, "http", 9000, patterns)
    assert ab_protocol._url_to_origin("null") == "null"
    server = WebSocketServerProtocol
    assert inspect.isfunction(server._connectionMade)
    assert inspect.isfunction(ab_protocol.WebSocketProtocol._connectionMade)
    assert "self.CONFIG_ATTRS" in _source(ab_protocol.WebSocketProtocol._connectionMade)
    assert inspect.isfunction(ab_protocol.WebSocketProtocol._fail_connection)
    assert "self._wskey" in _source(server.succeedHandshake)
    assert "self._wskey = " in _source(server.processHandshake)
    assert "self._perMessageCompress = " in _source(ab_protocol.WebSocketServerProtocol)
    assert "self._perMessageCompress" in _source(ab_protocol.WebSocketProtocol.sendMessage)
    for name in ("processHandshake", "succeedHandshake", "failHandshake", "sendData"):
        assert inspect.isfunction(getattr(server, name)), name
    attrs = server.CONFIG_ATTRS
    assert attrs and all(isinstance(a, str) for a in attrs)
    assert "logOctets" in attrs and "autoFragmentSize" in attrs
    send = _source(ab_protocol.WebSocketProtocol.sendData)
    assert "self.send_queue" in send and "self.logOctets" in send
    assert "self.data" in _source(ab_protocol.WebSocketServerProtocol.processHandshake)
    factory = WebSocketServerFactory()
    assert callable(factory._batched_timer.call_later)


def test_autobahn_calls_the_compressor_chatd_puts_in_its_place() -> None:
    """Reach 3, use_compressor: Autobahn makes its own PerMessageDeflate from its registry
    (so chatd replaces it once open), and calls on ``_perMessageCompress`` only the
    methods chatd.deflate.Deflate has. (tests/test_deflate.py sends compressed messages
    through the replacement.)"""
    from autobahn.websocket.compress import PERMESSAGE_COMPRESSION_EXTENSION, PerMessageDeflate

    from chatd.deflate import Deflate

    assert PERMESSAGE_COMPRESSION_EXTENSION["permessage-deflate"]["PMCE"] is PerMessageDeflate
    assert "create_from_offer_accept" in _source(ab_protocol.WebSocketServerProtocol)
    source = _source(ab_protocol.WebSocketProtocol)
    called = set(re.findall(r"self\._perMessageCompress\.(\w+)", source))
    assert called == {
        "EXTENSION_NAME",
        "start_decompress_message",
        "decompress_message_data",
        "end_decompress_message",
        "start_compress_message",
        "compress_message_data",
        "end_compress_message",
    }, called
    assert all(hasattr(Deflate, name) for name in called)
    assert "max_output_len=max_output_len" in source
    # what Deflate.of reads of Autobahn's object
    pmc = PerMessageDeflate(True, True, True, 12, 0, None, 1000)
    d = Deflate.of(pmc)
    assert (d.shared, d.bits, d.client_bits, d.max_message_size) == (True, 12, 15, 1000)


def test_factory_options_are_class_attributes() -> None:
    hub = InMemoryHub()
    site = make_site(Settings(ping_interval=0), hub)
    factory = site.upgrades.relay
    proto = factory.protocol
    assert proto._options_in_class is True
    for a in proto.CONFIG_ATTRS:
        assert a in vars(proto), a
    built = factory.buildProtocol(None)
    assert not set(vars(built)) & set(proto.CONFIG_ATTRS)


def test_connection_has_every_starting_value_autobahn_sets() -> None:
    """chatd's _connectionMade sets none of Autobahn's per-connection starting values:
    each must be a class attribute of chatd's protocols (a new one would be missing)."""
    client_only = {"serverConnectionDropTimeoutCall"}  # set only when not factory.isServer
    site = make_site(Settings(ping_interval=0), InMemoryHub())
    stored: set[str] = set()
    for made in (
        ab_protocol.WebSocketProtocol._connectionMade,
        ab_protocol.WebSocketServerProtocol._connectionMade,
    ):
        tree = ast.parse(textwrap.dedent(_source(made)))
        stored |= {
            n.attr
            for n in ast.walk(tree)
            if isinstance(n, ast.Attribute)
            and isinstance(n.ctx, ast.Store)
            and isinstance(n.value, ast.Name)
            and n.value.id == "self"
        }
    assert len(stored) > 20  # the parse found them
    for factory in (site.upgrades.plain, site.upgrades.v1, site.upgrades.relay):
        missing = stored - client_only - set(dir(factory.protocol))
        assert not missing, (factory.protocol.__name__, missing)


def test_twisted_web_channel_private_names() -> None:
    assert HTTPChannel._receivedHeaderSize == 0 and HTTPChannel._receivedHeaderCount == 0
    assert inspect.isfunction(HTTPChannel._send100Continue)
    channel = HTTPChannel()
    channel.makeConnection(StringTransport())
    assert channel._transferDecoder is None
    assert channel._networkProducer is not None
    line = _source(HTTPChannel.lineReceived)
    assert "self._command = " in line and "self._path = " in line
    assert "self._transferDecoder = " in _source(HTTPChannel)
    assert "self._transferDecoder.dataReceived" in _source(HTTPChannel.rawDataReceived)
    assert "_send100Continue()" in _source(HTTPChannel)


def test_chatd_names_do_not_collide_with_the_libraries() -> None:
    """chatd's own private names on library subclasses must not shadow library ones:
    only the deliberate overrides listed in chatd.internals may."""
    deliberate = {"_connectionMade", "_perMessageCompress", "_wskey", "_send100Continue"}
    cases = [
        (
            (internals.ServerInternals, base.Connection, PlainChat, V1Chat, Relay),
            WebSocketServerProtocol,
        ),
        ((internals.HTTPChannelInternals, ChatdChannel), HTTPChannel),
        ((ChatdRequest,), Request),
        ((ChatdSite,), Site),
        ((ListeningService, ChatdService), MultiService),
    ]
    for classes, library in cases:
        modules = {sys.modules[k.__module__] for k in library.__mro__ if k is not object}
        source = "".join(_source(m) for m in modules)
        for cls in classes:
            for name in vars(cls):
                if not name.startswith("_") or name.startswith("__"):
                    continue
                used = hasattr(library, name) or re.search(rf"\bself\.{name}\b", source)
                if used:
                    assert name in deliberate, f"{cls.__name__}.{name} shadows {library}"


# -- lazy debug fields: Autobahn's objects still print -------------------------------


def test_autobahn_objects_print() -> None:
    assert ab_protocol.pformat is pprint.pformat  # not patched
    timings = ab_protocol.Timings()
    timings.track("x")
    assert isinstance(str(timings), str) and "'x'" in str(timings)


def test_lazy_fields_are_strings_wherever_autobahn_uses_them() -> None:
    for module in internals.LAZY_MODULES:
        assert module.hltype is internals.lazy_hltype
        assert module.hlval is internals.lazy_hlval
        assert internals.lazy_uses_outside_log_calls(module) == []
    # the check finds a use outside a log call
    src = "def f(self):\n    self.log.debug('{a}', a=hltype(f))\n    x = hlval(1)\n"
    assert internals.lazy_uses_outside_log_calls(ab_protocol, src) == [
        "autobahn.websocket.protocol:3"
    ]
    value = internals.lazy_hlval(42)
    real = internals._hlval(42)
    assert str(value) == real and repr(value) == real
    assert f"{value}" == real and "{v}".format(v=value) == real  # noqa: UP032
    assert formatEvent({"log_format": "{v}", "v": value}) == real
    assert isinstance(str(internals.lazy_hltype(test_autobahn_objects_print)), str)


# -- log time stamps --------------------------------------------------------------


def test_text_log_observer_uses_the_cached_time_stamp(monkeypatch) -> None:
    assert twisted_logger_file.formatTime is logs._format_time
    calls = []

    def counting(*args, **kwargs):
        calls.append(args)
        return logs._format_time(*args, **kwargs)

    monkeypatch.setattr(twisted_logger_file, "formatTime", counting)
    out = io.StringIO()
    textFileLogObserver(out)({"log_format": "hi", "log_time": 1.0, "log_system": "-"})
    assert calls and out.getvalue().endswith("hi\n")


# -- the fast paths, measured on real loopback connections --------------------------


class Recorder(WebSocketClientProtocol):
    def onOpen(self) -> None:
        self.factory.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.received.append(payload)
        if len(self.factory.received) == self.factory.expect:
            self.factory.all_received.callback(self.factory.received)

    def onClose(self, wasClean: bool, code, reason) -> None:
        if not self.factory.closed.called:
            self.factory.closed.callback(code)


def _client(url: str, expect: int) -> WebSocketClientFactory:
    f = WebSocketClientFactory(url)
    f.protocol = Recorder
    f.opened, f.all_received, f.received, f.expect = defer.Deferred(), defer.Deferred(), [], expect
    f.closed = defer.Deferred()
    return f


def until(condition, timeout: float = 10.0):
    """A Deferred that fires once ``condition()`` is true (checked each reactor turn, bounded)."""
    done: defer.Deferred = defer.Deferred()

    def check() -> None:
        if condition():
            loop.stop()
            done.callback(None)

    loop = task.LoopingCall(check)
    loop.start(0.005)
    return done.addTimeout(timeout, reactor, onTimeoutCancel=lambda *a: loop.stop())


class Spied:
    """What the server did: routes, handshakes taken, channels built, transport writes."""

    def __init__(self, monkeypatch, site) -> None:
        self.routes: list = []
        self.taken: list = []
        self.channels = 0
        self.writes = 0
        self.start_writing = 0
        route = site.upgrades.route

        def spy_route(data, secure=False):
            r = route(data, secure)
            self.routes.append(r)
            return r

        site.upgrades.route = spy_route
        take = base.Connection._take_handshake

        def spy_take(conn, parsed, end):
            self.count_writes(conn.transport)
            ok = take(conn, parsed, end)
            self.taken.append((conn, parsed, ok))
            return ok

        monkeypatch.setattr(base.Connection, "_take_handshake", spy_take)
        real_site = chatd.web.Site

        class SpySite:
            @staticmethod
            def buildProtocol(site, addr):
                self.channels += 1
                return real_site.buildProtocol(site, addr)

        monkeypatch.setattr(chatd.web, "Site", SpySite)

    def count_writes(self, transport) -> None:
        write, start = transport.write, getattr(transport, "startWriting", None)

        def counted_write(data):
            self.writes += 1
            return write(data)

        transport.write = counted_write
        if start is not None:

            def counted_start():
                self.start_writing += 1
                return start()

            transport.startWriting = counted_start


@pytest.fixture
def tcp_site(monkeypatch):
    site = make_site(Settings(ping_interval=0), InMemoryHub())
    spied = Spied(monkeypatch, site)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    yield port.getHost().port, spied
    port.stopListening()


@pytest_twisted.inlineCallbacks
def test_tcp_handshake_takes_the_fast_path_and_writes_to_the_socket(tcp_site):
    port, spied = tcp_site
    n = 5
    f = _client(f"ws://127.0.0.1:{port}/relay/canary", n)
    reactor.connectTCP("127.0.0.1", port, f)
    client = yield f.opened
    # the door routed it to the relay factory; Autobahn got the parsed head
    assert len(spied.routes) == 1 and spied.routes[0] is not None
    assert spied.routes[0][1] == b"/relay/canary"
    (conn, parsed, ok), *_ = spied.taken
    assert ok and parsed[0] == b"/relay/canary" and b"sec-websocket-key" in parsed[1]
    assert spied.channels == 0  # twisted.web never saw it
    assert isinstance(conn.transport, tcp.Connection)
    assert conn.link is not None and conn.link.sock is conn.transport.socket
    # fan-out: the relay echoes to its sender, through Link.flush's inline write
    for i in range(n):
        client.sendMessage(b"m%d" % i, isBinary=True)
    got = yield f.all_received
    assert got == [b"m%d" % i for i in range(n)]
    # the 101 and every frame went straight to the socket: no transport.write, no epoll_ctl
    assert spied.writes == 0, spied.writes
    assert spied.start_writing == 0, spied.start_writing
    client.sendClose()
    assert (yield f.closed.addTimeout(10, reactor)) == 1000  # the server answered the close


@pytest_twisted.inlineCallbacks
def test_a_split_head_goes_through_twisted_web(tcp_site):
    port, spied = tcp_site
    got = defer.Deferred()

    class Split(Protocol):
        buf = b""

        def connectionMade(self) -> None:
            self.transport.write(b"GET /relay/split HTTP/1.1\r\nHost: x\r\n")
            # the rest once the server has read the first part (so two reads, for certain)
            until(lambda: spied.routes).addCallback(lambda _: self.transport.write(_REST))

        def dataReceived(self, data: bytes) -> None:
            self.buf += data
            if b"\r\n\r\n" in self.buf and not got.called:
                got.callback(self.buf)
                self.transport.loseConnection()

    cf = ClientFactory()
    cf.protocol = Split
    reactor.connectTCP("127.0.0.1", port, cf)
    head = yield got
    assert head.startswith(b"HTTP/1.1 101 ")
    assert spied.routes == [None] and spied.channels == 1


_REST = (
    b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


@pytest.fixture
def tls_site(monkeypatch):
    import twisted.test

    with open(os.path.join(os.path.dirname(twisted.test.__file__), "server.pem"), "rb") as f:
        cert = ssl.PrivateCertificate.loadPEM(f.read())
    site = make_site(Settings(ping_interval=0), InMemoryHub())
    spied = Spied(monkeypatch, site)
    port = reactor.listenSSL(0, site, cert.options(), interface="127.0.0.1")
    yield port.getHost().port, spied
    port.stopListening()


@pytest_twisted.inlineCallbacks
def test_tls_never_writes_to_the_socket(tls_site):
    port, spied = tls_site
    n = 3
    f = _client(f"wss://127.0.0.1:{port}/relay/tls", n)
    reactor.connectSSL("127.0.0.1", port, f, ssl.CertificateOptions())
    client = yield f.opened
    (conn, _, ok), *_ = spied.taken
    assert ok and spied.channels == 0  # the fast upgrade path works over TLS too
    assert not isinstance(conn.transport, tcp.Connection)
    assert internals.direct_socket(conn.transport) is None
    assert conn.link is not None and conn.link.sock is None
    for i in range(n):
        client.sendMessage(b"t%d" % i, isBinary=True)
    got = yield f.all_received
    assert got == [b"t%d" % i for i in range(n)]
    assert spied.writes >= 2  # the 101 and the frames: all through TLS
    client.sendClose()
    assert (yield f.closed.addTimeout(10, reactor)) == 1000  # the server answered the close

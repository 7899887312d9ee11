"""A real ChatdSite driven in process: no daemon, no socket, no sleeps.

``connect`` gives a site a connection over a ``StringTransport`` (one the
site takes for TCP, or for TLS); what the test writes with
``t.protocol.dataReceived`` arrives in exactly those reads, so "in one
read" and "split over two" are certain, not up to the kernel. ``turn``
runs the reactor's due calls (fan-out and file sends are scheduled) until
what the test waits for is written. ``Site`` serves the tests' own blocking
clients (tests/wsclient.py, tests/v1client.py) over a ``Socket`` made of
such a connection, so a test of the protocol reads as it does against the
daemon, without one.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from v1client import V1
from wsclient import Client
from zope.interface import implementer

from chatd.tap import Options, makeService
from chatd.web import ChatdSite


class TCPStringTransport(StringTransport):
    """A StringTransport that, like a TCP transport, lets go of no producer quietly."""

    def unregisterProducer(self) -> None:
        self.producer = None

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass


@implementer(ISSLTransport)
class TLSStringTransport(TCPStringTransport):
    """One the site takes for TLS (as ``_is_secure`` and ``Request.isSecure`` see it)."""

    def getPeerCertificate(self):
        return None


def connect(
    site: ChatdSite, host: str = "127.0.0.2", port: int = 40000, secure: bool = False
) -> StringTransport:
    """A new connection to ``site`` from ``host``; ``t.protocol`` is whoever reads it now."""
    addr = IPv4Address("TCP", host, port)
    proto = site.buildProtocol(addr)
    transport = (TLSStringTransport if secure else TCPStringTransport)(peerAddress=addr)
    transport.protocol = proto  # as a real transport has it (the door replaces it)
    proto.makeConnection(transport)
    return transport


def turn(done: Callable[[], bool], turns: int = 10) -> bool:
    """Run the reactor's due calls until ``done()`` (at most ``turns`` rounds)."""
    for _ in range(turns):
        if done():
            return True
        reactor.runUntilCurrent()
    return done()


class Socket:
    """Enough of a connected socket for wsclient.Client, over ``connect``: no kernel, no port.

    ``sendall`` is one read of the site's; ``recv`` turns the reactor until the site
    has written something (or closed), and raises TimeoutError if it has not:
    in process nothing more can come, so a test that waits for what it asserts
    fails at once instead of after a timeout.
    """

    _ports = itertools.count(40000)

    def __init__(self, site: ChatdSite, host: str = "127.0.0.2") -> None:
        self.host, self.port = host, next(self._ports)
        self.t = connect(site, host, self.port)
        self.lost = False

    def settimeout(self, timeout: float | None) -> None:
        pass

    def setsockopt(self, *args: object) -> None:
        pass

    def getsockname(self) -> tuple[str, int]:
        return self.host, self.port

    def sendall(self, data: bytes) -> None:
        if self.lost or self.t.disconnected:
            raise BrokenPipeError("in process: the site closed the connection")
        self.t.protocol.dataReceived(data)

    def recv(self, n: int) -> bytes:
        if self.lost:
            return b""
        turn(lambda: bool(self.t.value()) or self.t.disconnecting, turns=50)
        data = self.t.value()
        if data:
            self.t.clear()
            self.t.io.write(data[n:])
            return data[:n]
        if self.t.disconnecting:
            self.close()  # the site closed it: the client sees the end of the stream
            return b""
        raise TimeoutError("in process: the site has written nothing more")

    def close(self) -> None:
        if not self.lost:
            self.lost = True
            self.t.loseConnection()
            self.t.protocol.connectionLost(Failure(ConnectionDone()))


class Site:
    """The site ``twistd chatd ARGS`` would serve (``Options``, ``makeService``: the same hub,
    history and settings), in process and never started, with clients over ``Socket``.

    Unless ARGS say otherwise: ``--db :memory:`` and ``--ping-interval 0``.
    """

    def __init__(self, *args: str) -> None:
        defaults = {"--db": ":memory:", "--ping-interval": "0"}
        given = {a.split("=")[0] for a in args}
        extra = [x for k, v in defaults.items() if k not in given for x in (k, v)]
        options = Options()
        options.parseOptions([*args, *extra])
        self.service = makeService(options)
        self.site = self.service.web.site

    def client(self, path: str = "/", host: str = "127.0.0.2", **kw: Any) -> Client:
        return Client(0, path, sock=Socket(self.site, host), **kw)  # type: ignore[arg-type]

    def v1(self, nick: str | None = None, host: str = "127.0.0.2", **kw: Any) -> V1:
        return V1(0, nick, sock=Socket(self.site, host), **kw)

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        """One HTTP/1.0 request (the site closes after its answer): status, headers, body."""
        t = connect(self.site)
        lines = [f"{method} {path} HTTP/1.0", "Host: 127.0.0.1"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        if body is not None:
            lines.append(f"Content-Length: {len(body)}")
        t.protocol.dataReceived(("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b""))

        def answered() -> bool:  # closed, or as long as it said (a refusal may linger)
            head, sep, data = t.value().partition(b"\r\n\r\n")
            length = re.search(rb"\r\nContent-Length: (\d+)\r\n", head + b"\r\n")
            return t.disconnecting or bool(sep and length and len(data) >= int(length[1]))

        assert turn(answered, turns=50), t.value()
        head, _, data = t.value().partition(b"\r\n\r\n")
        t.protocol.connectionLost(Failure(ConnectionDone()))
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        fields = dict(line.split(": ", 1) for line in header_lines)
        return int(status_line.split(" ", 2)[1]), fields, data


def text_frames(transport: StringTransport) -> list[Any]:
    """The JSON text frames written to ``transport`` so far, and clear it (unmasked
    server frames, each payload under 64 KiB)."""
    import json

    data, frames = transport.value(), []
    transport.clear()
    while data:
        assert data[0] == 0x81 and data[1] <= 126
        start, size = 2, data[1]
        if size == 126:
            start, size = 4, int.from_bytes(data[2:4], "big")
        frames.append(json.loads(data[start : start + size]))
        data = data[start + size :]
    return frames

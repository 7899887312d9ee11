"""A real ChatdSite driven in process: no daemon, no socket, no sleeps.

``connect`` gives a site a connection over a ``StringTransport`` (one the
site takes for TCP, or for TLS); what the test writes with
``t.protocol.dataReceived`` arrives in exactly those reads, so "in one
read" and "split over two" are certain, not up to the kernel. ``turn``
runs the reactor's due calls (fan-out and file sends are scheduled) until
what the test waits for is written.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.testing import StringTransport
from zope.interface import implementer

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


def connect(site: ChatdSite, host: str = "127.0.0.2", secure: bool = False) -> StringTransport:
    """A new connection to ``site`` from ``host``; ``t.protocol`` is whoever reads it now."""
    addr = IPv4Address("TCP", host, 40000)
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

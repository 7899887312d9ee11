"""``twistd chatd``: command-line options and the service they make."""

from __future__ import annotations

import sqlite3

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import endpoints
from twisted.logger import Logger
from twisted.python import usage

from chatd import __version__
from chatd.config import PAGE_DIR, ConfigError, Settings
from chatd.history import History
from chatd.hub import Hub, InMemoryHub
from chatd.web import make_site

_log = Logger()
_defaults = Settings()


def _size(text: str) -> int:
    """Bytes, with an optional K/M/G suffix (binary units): 64K, 16M."""
    units = {"K": 1024, "M": 1024**2, "G": 1024**3}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    factor = units.get(text[-1:], 1)
    if factor != 1:
        text = text[:-1]
    return int(text) * factor


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "chatd: WebSocket chat and message push. The page and the chat are on "
        "'/', relay rooms on '/relay/<room>', all on one port."
    )
    optParameters = [
        ["port", "p", _defaults.port, "TCP port to listen on.", int],
        ["interface", "i", _defaults.interface, "Address to listen on."],
        [
            "endpoint",
            "e",
            None,
            "A Twisted strports description to listen on (overrides --port and "
            "--interface), e.g. tcp:9000:interface=0.0.0.0 or "
            "ssl:9443:privateKey=key.pem:certKey=cert.pem.",
        ],
        ["static", None, PAGE_DIR, "Directory of the page served on '/' (needs index.html)."],
        [
            "max-message-size",
            None,
            _defaults.max_message_size,
            "Largest chat message on '/', in bytes (K/M suffixes); larger: close 1009.",
            _size,
        ],
        [
            "relay-max-size",
            None,
            _defaults.relay_max_size,
            "Largest relay message, in bytes (K/M suffixes); larger: close 1009.",
            _size,
        ],
        [
            "max-backlog",
            None,
            _defaults.max_backlog,
            "Unsent bytes allowed to queue for a client that stopped reading; past it: close 1008.",
            _size,
        ],
        [
            "listen-backlog",
            None,
            _defaults.listen_backlog,
            "The kernel's queue of connections not yet accepted.",
            int,
        ],
        [
            "ping-interval",
            None,
            _defaults.ping_interval,
            "Seconds between WebSocket pings to each idle client (0: none).",
            float,
        ],
        [
            "ping-timeout",
            None,
            _defaults.ping_timeout,
            "Seconds to wait for a pong before dropping the client.",
            float,
        ],
        [
            "max-total-backlog",
            None,
            _defaults.max_total_backlog,
            "Unsent bytes over all slow clients; past it the server is overloaded "
            "and a client that is behind is closed with 1013.",
            _size,
        ],
        [
            "db",
            None,
            _defaults.db,
            "SQLite file for chat history (relative to the working directory), "
            "or :memory: to keep none across restarts.",
        ],
        [
            "db-sync",
            None,
            _defaults.db_sync,
            "normal: survive a crash of chatd; full: also a power loss (an fsync per batch).",
        ],
        [
            "history-size",
            None,
            _defaults.history_size,
            "Chat messages kept per room, for history and 'since' recovery (0: none).",
            int,
        ],
        [
            "join-history",
            None,
            _defaults.join_history,
            "Messages sent with 'joined' when a client gives no 'since'.",
            int,
        ],
        [
            "max-text",
            None,
            _defaults.max_text,
            "Largest chat message text, in bytes of UTF-8 (chatd.v1: error too_long).",
            _size,
        ],
        ["rate", None, _defaults.rate, "Chat messages per second per connection.", float],
        ["rate-burst", None, _defaults.rate_burst, "... and how many at once.", int],
        [
            "rate-flood",
            None,
            _defaults.rate_flood,
            "Messages refused for rate before the connection is closed (1008).",
            int,
        ],
    ]
    optFlags = [["no-compression", None, "Decline permessage-deflate."]]

    def opt_version(self) -> None:
        print(f"chatd {__version__}")
        raise SystemExit(0)

    def postOptions(self) -> None:
        try:
            settings = Settings(
                port=self["port"],
                interface=self["interface"],
                endpoint=self["endpoint"],
                static=self["static"],
                max_message_size=self["max-message-size"],
                relay_max_size=self["relay-max-size"],
                max_backlog=self["max-backlog"],
                listen_backlog=self["listen-backlog"],
                ping_interval=self["ping-interval"],
                ping_timeout=self["ping-timeout"],
                compression=not self["no-compression"],
                max_total_backlog=self["max-total-backlog"],
                db=self["db"],
                db_sync=self["db-sync"],
                history_size=self["history-size"],
                join_history=self["join-history"],
                max_text=self["max-text"],
                rate=self["rate"],
                rate_burst=self["rate-burst"],
                rate_flood=self["rate-flood"],
            )
            settings.check()
            # Parse (without binding) so a bad description fails here.
            from twisted.internet import reactor

            endpoints.serverFromString(reactor, settings.endpoint_description())
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        except (ValueError, TypeError, KeyError) as e:
            raise usage.UsageError(f"endpoint: {e}") from None
        self.settings = settings


class ListeningService(StreamServerEndpointService):
    """Says where it listens, so operators (and tests using port 0) know."""

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._waitingForPort.addCallback(self._listening)

    def _listening(self, port):
        address = port.getHost()
        host = getattr(address, "host", address)
        _log.info(
            "chatd {version} listening on {host}:{port}",
            version=__version__,
            host=host,
            port=getattr(address, "port", ""),
        )
        return port


class HubService(service.Service):
    """Closes the hub (commits pending history) when the daemon stops."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    def stopService(self):
        super().stopService()
        self.hub.close()


def makeService(options: Options) -> service.IService:
    from twisted.internet import reactor

    settings: Settings = options.settings
    try:
        history = History(settings.db, settings.history_size, settings.db_sync)
    except sqlite3.Error as e:
        raise SystemExit(f"chatd: cannot open the history database {settings.db!r}: {e}") from None
    hub = InMemoryHub(history, join_history=settings.join_history)
    top = service.MultiService()
    # Started first, stopped last: pending history is committed after the
    # listener has stopped accepting and every client has been closed.
    HubService(hub).setServiceParent(top)
    endpoint = endpoints.serverFromString(reactor, settings.endpoint_description())
    listener = ListeningService(endpoint, make_site(settings, hub))
    listener._raiseSynchronously = True  # a bind error stops twistd at start-up
    listener.setServiceParent(top)
    return top


__all__ = ["Options", "makeService"]

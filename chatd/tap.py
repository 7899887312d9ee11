"""``twistd chatd``: command-line options and the service they make."""

from __future__ import annotations

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import endpoints
from twisted.logger import Logger
from twisted.python import usage

from chatd import __version__
from chatd.config import PAGE_DIR, ConfigError, Settings
from chatd.hub import InMemoryHub
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


def makeService(options: Options) -> service.IService:
    from twisted.internet import reactor

    settings: Settings = options.settings
    hub = InMemoryHub()
    top = service.MultiService()
    endpoint = endpoints.serverFromString(reactor, settings.endpoint_description())
    listener = ListeningService(endpoint, make_site(settings, hub))
    listener._raiseSynchronously = True  # a bind error stops twistd at start-up
    listener.setServiceParent(top)
    return top


__all__ = ["Options", "makeService"]

"""``twistd chatd``: command-line options and the service they make."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import sqlite3
import sys
from typing import Any, NoReturn

from twisted.application import service
from twisted.internet import defer, endpoints
from twisted.internet.error import CannotListenError
from twisted.logger import ILogObserver, Logger
from twisted.python import usage

from chatd import __version__, limits
from chatd.config import ConfigError, Settings, format_size, from_mapping, load_file
from chatd.history import History
from chatd.hub import Hub, InMemoryHub
from chatd.logs import JsonLines
from chatd.ops import Health
from chatd.stats import Stats
from chatd.web import Web, make_web

_log = Logger()
_d = Settings()


def fail(message: str) -> NoReturn:
    """A start-up error: one line on stderr, exit code 2, no traceback."""
    line = f"chatd: error: {message}\n".encode("utf-8", "replace")
    os.write(2, line)  # fd 2 itself: once twistd logs, sys.stderr is a log file object
    raise SystemExit(2)


# (option, short, help). The setting is the option with "-" as "_"; the
# default shown is the Settings default (None means: not given, so a config
# file or the default decides).
_PARAMETERS = [
    ("port", "p", f"TCP port to listen on (0: any free port). [default: {_d.port}]"),
    ("interface", "i", f"Address to listen on. [default: {_d.interface}]"),
    (
        "endpoint",
        "e",
        "A Twisted strports description to listen on, overriding --port and "
        "--interface: tcp:9000:interface=0.0.0.0, ssl:9443:privateKey=key.pem:certKey=cert.pem, "
        "systemd:domain=INET:index=0.",
    ),
    ("static", None, "Directory of the page served on '/' (needs index.html)."),
    (
        "max-message-size",
        None,
        "Largest message on '/', bytes (K/M suffixes); larger: close "
        f"1009. [default: {format_size(_d.max_message_size)}]",
    ),
    (
        "relay-max-size",
        None,
        f"Largest relay message; larger: close 1009. [default: {format_size(_d.relay_max_size)}]",
    ),
    (
        "max-backlog",
        None,
        "Unsent bytes allowed for a client that stopped reading; past it: "
        f"close 1008. [default: {format_size(_d.max_backlog)}]",
    ),
    (
        "max-total-backlog",
        None,
        "Unsent bytes over all slow clients; past it a client that is "
        f"behind gets close 1013. [default: {format_size(_d.max_total_backlog)}]",
    ),
    (
        "max-total-inbound",
        None,
        "Bytes of messages being received (partly arrived or inflated) over all "
        "clients; past it the client adding to them gets close 1013. "
        f"[default: {format_size(_d.max_total_inbound)}]",
    ),
    (
        "listen-backlog",
        None,
        f"The kernel's queue of connections not yet accepted. [default: {_d.listen_backlog}]",
    ),
    (
        "ping-interval",
        None,
        f"Seconds between pings to each client (0: none). [default: {_d.ping_interval}]",
    ),
    ("ping-timeout", None, f"Seconds to wait for a pong. [default: {_d.ping_timeout}]"),
    (
        "db",
        None,
        "SQLite file for chat history, or :memory:. [default: chatd.sqlite3 in the "
        "working directory]",
    ),
    (
        "db-sync",
        None,
        "normal: history survives a crash of chatd; full: also a power loss. "
        f"[default: {_d.db_sync}]",
    ),
    ("history-size", None, f"Chat messages kept per room (0: none). [default: {_d.history_size}]"),
    (
        "join-history",
        None,
        f"Messages sent with 'joined' when no 'since' is given. [default: {_d.join_history}]",
    ),
    ("max-text", None, f"Longest chat text, bytes of UTF-8. [default: {format_size(_d.max_text)}]"),
    ("rate", None, f"Chat frames per second per connection. [default: {_d.rate}]"),
    ("rate-burst", None, f"... and at once. [default: {_d.rate_burst}]"),
    ("rate-flood", None, f"Frames refused for rate before close 1008. [default: {_d.rate_flood}]"),
    (
        "api-token",
        None,
        "Bearer token of the HTTP push API (or CHATD_API_TOKEN); the API is off without one.",
    ),
    (
        "metrics-endpoint",
        None,
        "Serve /healthz and /metrics on this strports endpoint only "
        "(e.g. tcp:9100:interface=127.0.0.1) instead of the main port.",
    ),
    ("log-format", None, "text, or json: one JSON object per line. [default: text]"),
    (
        "shutdown-timeout",
        None,
        f"Seconds clients get to finish closing on SIGTERM. [default: {_d.shutdown_timeout}]",
    ),
    (
        "redis",
        None,
        "redis://[[user]:password@]host[:port][/db]: run as one node of a cluster sharing "
        "rooms, presence and history in Redis (docs/SCALING.md). Without it: one process, "
        "history in --db.",
    ),
    (
        "cluster-ttl",
        None,
        "Seconds after which a silent cluster node's members are removed. "
        f"[default: {_d.cluster_ttl}]",
    ),
    (
        "handshake-timeout",
        None,
        "Seconds a connection gets to send a whole request head (and finish the "
        "WebSocket upgrade); an idle HTTP connection is closed as late. "
        f"[default: {_d.handshake_timeout}]",
    ),
    (
        "max-pending",
        None,
        "Connections waiting for a request head, at most; past it the one waiting "
        "longest is dropped. "
        f"[default: {_d.max_pending}]",
    ),
    (
        "max-connections-per-ip",
        None,
        "Connections from one IP address, at most (0: no cap; behind a proxy every "
        f"client has its address). [default: {_d.max_connections_per_ip}]",
    ),
]


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "chatd: WebSocket chat and message push. The page, the chat (plain and "
        "chatd.v1) and relay rooms (/relay/<room>) are all on one port. Settings "
        "come from --config (TOML), then CHATD_API_TOKEN, then these options."
    )
    optParameters = [
        ["config", "c", None, "A TOML file of settings (see etc/chatd.toml)."],
        *([name, short, None, doc] for name, short, doc in _PARAMETERS),
    ]
    optFlags = [["no-compression", None, "Decline permessage-deflate."]]

    def __init__(self) -> None:
        super().__init__()
        self["allowed-origin"] = []

    def opt_allowed_origin(self, origin: str) -> None:
        """A page origin (scheme://host[:port]) that may open WebSockets, or * for any.
        Repeatable. [default: the page's own host]"""
        self["allowed-origin"].append(origin)

    def opt_version(self) -> None:
        print(f"chatd {__version__}")
        raise SystemExit(0)

    def parseOptions(self, options=None) -> None:
        """Any wrong option or setting: one line naming it, exit 2 (not twistd's usage dump)."""
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            fail(f"{e} (twistd chatd --help lists the options)")

    def label(self, key: str) -> str:
        """A setting as the user gave it: ``--port``, ``port in chatd.toml``, or ``--port``."""
        return self.sources.get(key, "--" + key.replace("_", "-"))

    def relabel(self, message: str) -> str:
        """A check's message starts with the setting's key: name it as the user gave it."""
        key = message.split(" ", 1)[0]
        source = self.sources.get(key, "")
        if source.startswith("--"):
            return source + message[len(key) :]
        if source == "CHATD_API_TOKEN":
            return f"{source}: {message}"
        if source:
            return f"{source.replace(f'{key} in ', 'config ', 1)}: {message}"
        return message

    def postOptions(self) -> None:
        self.sources: dict[str, str] = {}
        try:
            settings = Settings()
            if self["config"]:
                values = load_file(self["config"])
                settings = from_mapping(values, f"config {self['config']}: ")
                self.sources.update({k: f"{k} in {self['config']}" for k in values})
            if os.environ.get("CHATD_API_TOKEN"):
                env = {"api_token": os.environ["CHATD_API_TOKEN"]}
                settings = from_mapping(env, "CHATD_API_TOKEN: ", settings)
                self.sources["api_token"] = "CHATD_API_TOKEN"
            given: dict[str, Any] = {
                name.replace("-", "_"): self[name]
                for name, _, _ in _PARAMETERS
                if self[name] is not None
            }
            if self["no-compression"]:
                given["compression"] = False
            if self["allowed-origin"]:
                given["allowed_origins"] = self["allowed-origin"]
            settings = from_mapping(
                given, "", settings, label=lambda key: "--" + key.replace("_", "-")
            )
            self.sources.update({k: "--" + k.replace("_", "-") for k in given})
            settings.check()
        except ConfigError as e:
            raise usage.UsageError(self.relabel(str(e))) from None
        if settings.endpoint and self.sources.keys() & {"port", "interface"}:
            both = " and ".join(self.label(k) for k in ("port", "interface") if k in self.sources)
            raise usage.UsageError(
                f"{self.label('endpoint')} replaces {both}: give one or the other "
                "(e.g. --endpoint tcp:9000:interface=0.0.0.0)"
            )
        # Parse (without binding) so a bad description, or a TLS key or
        # certificate that cannot be read, fails here.
        from twisted.internet import reactor

        for key, desc in (
            ("endpoint", settings.endpoint),
            ("metrics_endpoint", settings.metrics_endpoint),
        ):
            if not desc:
                continue
            try:
                endpoints.serverFromString(reactor, desc)
            except OSError as e:
                what = f"cannot read {e.filename}" if e.filename else "cannot be used"
                raise usage.UsageError(
                    f"{self.label(key)} {desc!r}: {what}: {e.strerror or e}"
                ) from None
            except Exception as e:  # strports raises ValueError, KeyError, SSL errors...
                if isinstance(e, IndexError) and desc.startswith("systemd:"):
                    raise usage.UsageError(
                        f"{self.label(key)} {desc!r}: no such socket from systemd (LISTEN_FDS): "
                        "start chatd through its socket unit (etc/chatd.socket), or use --port"
                    ) from None
                raise usage.UsageError(
                    f"{self.label(key)} {desc!r} is not a valid endpoint: {e}"
                ) from None
        self.settings = settings


_LISTEN_HINTS = {
    errno.EADDRINUSE: "another program (another chatd?) has this port: choose another with {port}",
    errno.EADDRNOTAVAIL: "no interface of this machine has this address: check {interface}",
    errno.EACCES: "ports below 1024 need privileges: use a higher {port} or systemd's socket unit",
}


class ListeningService(service.Service):
    """Listens on an endpoint, fails start-up at once if it cannot, and says where it listens.

    Twisted's StreamServerEndpointService only raises a bind error at
    start-up through a private switch; this calls ``endpoint.listen``
    itself (all public API): a failure that is already known when
    ``privilegedStartService`` returns (every strports endpoint binds at
    once) stops twistd with one line, one that comes later is logged.
    """

    def __init__(self, endpoint, factory, what: str, labels: dict[str, str]) -> None:
        self.endpoint = endpoint
        self.factory = factory
        self.what = what
        self.labels = labels  # how the user named port, interface and endpoint
        self.listening: defer.Deferred | None = None  # fires with the port

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        failed: list = []
        try:
            d = self.endpoint.listen(self.factory)
        except Exception as e:  # an endpoint that raises rather than failing its Deferred
            d = defer.fail(e)
        d.addCallbacks(self._listening, failed.append)
        self.listening = d
        if failed:
            self.listening = defer.succeed(None)
            e = failed[0].value
            if isinstance(e, CannotListenError):
                raise StartFailed(self.listen_error(e))
            if isinstance(e, OSError):  # e.g. a systemd: endpoint without a socket from systemd
                raise StartFailed(f"{self.labels['endpoint']}: {e.strerror or e}")
            failed[0].raiseException()
        d.addErrback(self._failed_later)

    def _failed_later(self, failure):
        if not failure.check(defer.CancelledError):
            _log.failure("chatd {what}: cannot listen", failure, what=self.what)

    def startService(self) -> None:
        super().startService()
        if self.listening is None:
            self.privilegedStartService()

    def stopService(self):
        super().stopService()
        d, self.listening = self.listening, None
        if d is None:
            return None
        d.cancel()
        return d.addCallback(lambda port: port.stopListening() if port is not None else None)

    def listen_error(self, e: CannotListenError) -> str:
        err = e.socketError
        code = getattr(err, "errno", None)
        reason = getattr(err, "strerror", None) or str(err)
        where = f"{e.interface or '*'}:{e.port}"
        hint = _LISTEN_HINTS.get(code) if isinstance(code, int) else None
        if isinstance(err, socket.gaierror):  # a name, not an address
            hint = "the interface must be an IP address of this machine: check {interface}"
        text = f"cannot listen on {where} ({self.what}): {reason}"
        if hint:
            text += "; " + hint.format(**self.labels)
        return text

    def _listening(self, port):
        address = port.getHost()
        _log.info(
            "chatd {version} {what} listening on {host}:{port}",
            version=__version__,
            what=self.what,
            host=getattr(address, "host", address),
            port=getattr(address, "port", ""),
        )
        return port


class ChatdService(service.MultiService):
    """The daemon: listeners, the hub, and an orderly stop.

    On SIGTERM (or any reactor stop): /healthz turns 503, the main listener
    stops accepting, what was accepted is committed and delivered, every
    client gets close 1001 and up to --shutdown-timeout to answer, then the
    history database is closed, a separate metrics listener last, and twistd
    exits 0.
    """

    def __init__(
        self,
        settings: Settings,
        hub: Hub,
        web: Web,
        labels: dict[str, str] | None = None,
        created: tuple[str, ...] = (),
    ) -> None:
        super().__init__()
        self.settings, self.hub, self.web = settings, hub, web
        self.labels = labels or {k: "--" + k for k in ("port", "interface", "endpoint")}
        self.created = created  # files this start made (the database): gone if it fails
        self.listeners: list[ListeningService] = []
        self.ops_listeners: list[ListeningService] = []

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except StartFailed as e:
            self._undo()
            fail(str(e))

    def _undo(self) -> None:
        """A start that failed leaves nothing behind: no database file it created."""
        try:
            close = self.hub.close()
        except Exception:  # we are failing already; the line says why
            close = None
        if isinstance(close, defer.Deferred):
            close.addErrback(lambda _: None)
        for path in self.created:
            for name in (path, path + "-wal", path + "-shm", path + "-journal"):
                with contextlib.suppress(OSError):
                    os.unlink(name)

    def setServiceParent(self, parent) -> None:
        if self.settings.log_format == "json" and hasattr(parent, "setComponent"):
            # twistd asks the application for its observer when logging starts.
            parent.setComponent(ILogObserver, JsonLines(sys.stdout))
        super().setServiceParent(parent)

    def listen(self, description: str, factory, what: str) -> None:
        from twisted.internet import reactor

        labels = self.labels
        if what == "metrics":
            m = labels.get("metrics_endpoint", "--metrics-endpoint")
            labels = {"port": m, "interface": m, "endpoint": m}
        s = ListeningService(
            endpoints.serverFromString(reactor, description), factory, what, labels
        )
        s.setServiceParent(self)
        (self.ops_listeners if what == "metrics" else self.listeners).append(s)

    def startService(self) -> None:
        super().startService()
        from twisted.internet import reactor

        # Twisted's own SIGTERM handler makes twistd exit with the signal;
        # a graceful stop is a success, so stop the reactor ourselves.
        reactor.callWhenRunning(
            signal.signal, signal.SIGTERM, lambda *_: reactor.callFromThread(reactor.stop)
        )

    @defer.inlineCallbacks
    def stopService(self):
        from twisted.internet import reactor

        service.Service.stopService(self)
        self.web.health.stopping = True
        _log.info("chatd stopping: closing {n} connections", n=len(self.web.clients.live))
        yield defer.gatherResults([defer.maybeDeferred(s.stopService) for s in self.listeners])
        self.hub.flush()
        yield self.web.clients.close_all(
            limits.CLOSE_GOING_AWAY,
            "server shutting down",
            self.settings.shutdown_timeout,
            reactor,
        )
        yield defer.maybeDeferred(self.hub.close)
        _log.info("chatd stopped")


def _cluster_hub(settings: Settings, stats: Stats, health: Health) -> Hub:
    """A node of a cluster: rooms, presence and history in Redis (chatd.cluster)."""
    from chatd.cluster import RedisHub

    def state(up: bool) -> None:
        if up:
            health.problems.pop("redis", None)
        else:
            health.problems["redis"] = "unreachable; chat sends and joins refused"

    state(False)  # until connected
    hub = RedisHub(
        settings.redis,  # type: ignore[arg-type]
        retention=settings.history_size,
        join_history=settings.join_history,
        ttl=settings.cluster_ttl,
        stats=stats,
        on_state=state,
    )
    from twisted.internet import reactor

    reactor.callWhenRunning(hub.start)
    return hub


class StartFailed(Exception):
    """The daemon cannot start (a port it cannot bind, ...); the message is for the operator."""


def makeService(options: Options) -> service.IService:
    settings: Settings = options.settings
    stats, health = Stats(), Health()
    hub: Hub
    created: tuple[str, ...] = ()
    if settings.redis:
        hub = _cluster_hub(settings, stats, health)
    else:
        if settings.db != ":memory:" and not os.path.exists(settings.db):
            created = (settings.db,)
        try:
            history = History(settings.db, settings.history_size, settings.db_sync)
        except sqlite3.Error as e:
            fail(f"{options.label('db')}: cannot open the history database {settings.db!r}: {e}")
        hub = InMemoryHub(history, join_history=settings.join_history, stats=stats)
    web = make_web(settings, hub, stats, health)
    labels = {k: options.label(k) for k in ("port", "interface", "endpoint", "metrics_endpoint")}
    if settings.endpoint:
        labels["port"] = labels["interface"] = labels["endpoint"]
    top = ChatdService(settings, hub, web, labels, created)
    # The metrics listener first: if either cannot bind, the main port was never open.
    if web.ops is not None and settings.metrics_endpoint:
        top.listen(settings.metrics_endpoint, web.ops, "metrics")
    top.listen(settings.endpoint_description(), web.site, "web")
    return top


__all__ = ["Options", "makeService"]

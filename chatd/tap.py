"""``twistd chatd``: command-line options and the service they make.

The options, their short forms and their ``--help`` text are made from
chatd.config.SETTINGS (one declaration per setting); only ``--config`` and
``--version`` are declared here.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import sqlite3
import sys
from typing import Any, NoReturn, cast

from twisted.application import service
from twisted.internet import defer, endpoints
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import ILogObserver, Logger
from twisted.python import usage

from chatd import __version__, limits
from chatd.config import (
    BY_NAME,
    SETTINGS,
    ConfigError,
    Setting,
    Settings,
    from_mapping,
    load_file,
)
from chatd.history import History
from chatd.hub import Hub, InMemoryHub
from chatd.logs import JsonLines
from chatd.ops import Health
from chatd.stats import Stats
from chatd.web import Web, make_web
from chatd.webhooks import Webhooks

_log = Logger()

# Secrets that may come from the environment (not a unit file or a command line).
ENV_SETTINGS = (
    ("CHATD_API_TOKEN", "api_token"),
    ("CHATD_JWT_KEY", "jwt_key"),
    ("CHATD_WEBHOOK_SECRET", "webhook_secret"),
)


def fail(message: str) -> NoReturn:
    """A start-up error: one line on stderr, exit code 2, no traceback."""
    line = f"chatd: error: {message}\n".encode("utf-8", "replace")
    os.write(2, line)  # fd 2 itself: once twistd logs, sys.stderr is a log file object
    raise SystemExit(2)


def _appender(setting: Setting):
    """The handler of a repeatable option (a list setting): each use adds a value."""

    def opt(self: Options, value: str) -> None:
        self[setting.option].append(value)

    opt.__doc__ = setting.option_help
    return opt


def _option(key: str) -> str:
    """A setting's command-line option, without the dashes."""
    setting = BY_NAME.get(key)
    return setting.option if setting else key.replace("_", "-")


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "chatd: WebSocket chat and message push. The page, the chat (plain and "
        "chatd.v1) and relay rooms (/relay/<room>) are all on one port. Settings "
        "come from --config (TOML), then CHATD_API_TOKEN, CHATD_JWT_KEY and "
        "CHATD_WEBHOOK_SECRET, then these options."
    )
    # From chatd.config.SETTINGS: a value option per setting, a flag for a
    # flag setting, a repeatable option (an opt_ method, below) for a list.
    optParameters = [
        ["config", "c", None, "A TOML file of settings (see etc/chatd.toml)."],
        *(
            [s.option, s.short, None, s.option_help]
            for s in SETTINGS
            if s.kind not in ("flag", "list")
        ),
    ]
    optFlags = [[s.option, s.short, s.option_help] for s in SETTINGS if s.kind == "flag"]

    def __init__(self) -> None:
        super().__init__()
        for s in SETTINGS:
            if s.kind == "list":
                self[s.option] = []

    def opt_version(self) -> None:
        """Print chatd's version and exit (twistd --version prints Twisted's)."""
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
        return self.sources.get(key, "--" + _option(key))

    def relabel(self, message: str) -> str:
        """A check's message starts with the setting's key: name it as the user gave it."""
        key = message.split(" ", 1)[0].removesuffix(":")
        source = self.sources.get(key, "")
        if source.startswith("--"):
            return source + message[len(key) :]
        if source in dict(ENV_SETTINGS):
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
            for var, key in ENV_SETTINGS:
                if os.environ.get(var):
                    settings = from_mapping({key: os.environ[var]}, f"{var}: ", settings)
                    self.sources[key] = var
            given: dict[str, Any] = {}
            for s in SETTINGS:
                value = self[s.option]
                if s.kind == "flag":
                    if value:  # a flag option sets the opposite of the default
                        given[s.name] = not s.default
                elif s.kind == "list":
                    if value:
                        given[s.name] = value
                elif value is not None:  # "" too: given, though empty
                    given[s.name] = value
            settings = from_mapping(given, "", settings, label=lambda key: "--" + _option(key))
            self.sources.update({k: "--" + _option(k) for k in given})
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


for _s in SETTINGS:
    if _s.kind == "list":
        setattr(Options, "opt_" + _s.option.replace("-", "_"), _appender(_s))
del _s


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
        except Exception as exc:  # an endpoint that raises rather than failing its Deferred
            d = defer.fail(exc)
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
        webhooks: Webhooks | None = None,
    ) -> None:
        super().__init__()
        self.settings, self.hub, self.web = settings, hub, web
        self.webhooks = webhooks  # stopped after the hub (its last events), a few seconds
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
        threads = cast(IReactorFromThreads, reactor)  # every reactor is one
        reactor.callWhenRunning(
            signal.signal, signal.SIGTERM, lambda *_: threads.callFromThread(reactor.stop)
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
        if self.webhooks is not None:
            yield self.webhooks.stopService()
        _log.info("chatd stopped")


def _cluster_hub(settings: Settings, stats: Stats, health: Health) -> Hub:
    """A node of a cluster: the hub over a broker with ids, history and presence in Redis."""
    from chatd.cluster import RedisBroker

    def state(up: bool) -> None:
        if up:
            health.problems.pop("redis", None)
        else:
            health.problems["redis"] = "unreachable; chat sends and joins refused"

    state(False)  # until connected
    assert settings.redis is not None  # called for --redis only
    broker = RedisBroker(
        settings.redis,
        retention=settings.history_size,
        ttl=settings.cluster_ttl,
        stats=stats,
        on_state=state,
    )
    broker.dedupe_ms = int(settings.dedupe_window * 1000)
    broker.ttl_ms = int(settings.history_ttl * 1000)
    hub = Hub(broker, settings.join_history, stats, presence_debounce=settings.presence_debounce)
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
        history.dedupe_ms = int(settings.dedupe_window * 1000)
        history.ttl_ms = int(settings.history_ttl * 1000)
        hub = InMemoryHub(
            history,
            join_history=settings.join_history,
            stats=stats,
            presence_debounce=settings.presence_debounce,
        )
    webhooks = None
    if settings.webhook_url:
        assert settings.webhook_secret is not None  # Settings.check
        webhooks = Webhooks(
            settings.webhook_url,
            settings.webhook_secret,
            rooms=settings.webhook_rooms,
            queue=settings.webhook_queue,
            timeout=settings.webhook_timeout,
            stats=stats,
        )
        # Before any connection: the hub tracks users only while someone listens.
        hub.user_listeners.append(webhooks.user)
        hub.message_listeners.append(webhooks.message)
    web = make_web(settings, hub, stats, health)
    labels = {k: options.label(k) for k in ("port", "interface", "endpoint", "metrics_endpoint")}
    if settings.endpoint:
        labels["port"] = labels["interface"] = labels["endpoint"]
    top = ChatdService(settings, hub, web, labels, created, webhooks)
    # The metrics listener first: if either cannot bind, the main port was never open.
    if web.ops is not None and settings.metrics_endpoint:
        top.listen(settings.metrics_endpoint, web.ops, "metrics")
    top.listen(settings.endpoint_description(), web.site, "web")
    return top


__all__ = ["Options", "makeService"]

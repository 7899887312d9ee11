"""Redis connections of a cluster node: commands, pub/sub, reconnects, scripts.

Two connections, each a txredisapi protocol kept up by Twisted's
``ClientService`` (exponential backoff from 0.2 s to 2 s, plus jitter): one for commands
and Lua scripts, pipelined; one subscribed to the channels of the rooms this
node holds members of. Both are PINGed every 2 s; one whose PING has gone
unanswered for 10 s is aborted, so a hung Redis or a half-open connection
counts as down. (Not a per-command timeout: behind a burst of pipelined
commands a late reply is not a dead server.)

With ``hiredis`` installed, txredisapi parses replies in C and hands every
complete reply of a read over at once; its pure-Python parser delivers one
bulk reply per reactor turn, which made each message its own write to every
member.
The connection knows nothing of chat (``chatd.cluster.RedisBroker`` does,
on top of it). It says when Redis is up or down, runs
scripts (EVALSHA, falling back to EVAL), and keeps the wanted channels
subscribed across reconnects, telling the caller each time one is
confirmed, since messages published before that are not seen here.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import txredisapi
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import defer, endpoints, task
from twisted.internet.interfaces import IProtocol
from twisted.internet.protocol import Factory
from twisted.logger import Logger

_log = Logger()

KEEPALIVE = 2.0  # seconds between PINGs on each connection
DEAD_AFTER = 10.0  # seconds a PING may go unanswered before the connection is aborted


class RedisDown(Exception):
    """Redis is not connected (or the connection went away during the call)."""


@dataclass(frozen=True, slots=True)
class RedisURL:
    host: str
    port: int
    db: int | None
    username: str | None
    password: str | None

    def __str__(self) -> str:  # never the password
        return f"redis://{self.host}:{self.port}/{self.db or 0}"


def parse_url(url: str) -> RedisURL:
    """``redis://[[user]:password@]host[:port][/db]``; ValueError saying what is wrong."""
    parts = urlsplit(url)
    if parts.scheme != "redis":
        raise ValueError("must be a redis://host[:port][/db] URL")
    try:
        port = parts.port or 6379
    except ValueError:
        raise ValueError("has a bad port") from None
    if not parts.hostname:
        raise ValueError("has no host")
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise ValueError("has a database that is not a number")
    return RedisURL(
        parts.hostname,
        port,
        int(path) if path else None,
        unquote(parts.username) if parts.username else None,
        unquote(parts.password) if parts.password else None,
    )


class _Factory(Factory):
    """Builds txredisapi protocols that return bytes, as chatd wants them."""

    noisy = False

    def __init__(
        self, protocol: type, url: RedisURL, reply_timeout: float | None, broker: RedisConnection
    ) -> None:
        self.protocol = protocol
        self.url, self.reply_timeout, self.broker = url, reply_timeout, broker

    def buildProtocol(self, addr):
        p = self.protocol(
            charset=None,
            replyTimeout=self.reply_timeout,
            password=self.url.password,
            dbid=self.url.db,
            convertNumbers=False,
            username=self.url.username,
        )
        p.factory = self
        p.broker = self.broker  # ClientService hands out a proxy; set it on the real one
        return p

    # txredisapi calls these when AUTH or SELECT fails.
    def stopTrying(self) -> None:
        _log.error("redis: authentication or database selection failed")

    def connectionError(self, why: str) -> None:
        _log.error("redis: {why}", why=why)


class _Subscriber(txredisapi.SubscriberProtocol):
    broker: RedisConnection | None = None

    def messageReceived(self, pattern, channel, message) -> None:
        broker = self.broker
        if broker is not None and broker.subscriber is not None:
            broker.on_message(channel, message)


class RedisConnection:
    """One node's link to Redis. ``up`` is True while both connections are."""

    def __init__(
        self,
        url: str,
        on_message: Callable[[bytes, bytes], None],
        on_subscribed: Callable[[bytes], None],
        on_channels_lost: Callable[[], None],
        on_state: Callable[[bool], None],
        reactor=None,
        name: str = "chatd",
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.url = parse_url(url)
        if getattr(txredisapi, "hiredis", None) is None:
            _log.warn("redis: hiredis is not installed; replies are parsed slowly")
        self.on_message, self.on_subscribed, self.on_state = on_message, on_subscribed, on_state
        self.on_channels_lost = on_channels_lost
        self.reactor = reactor
        self.name = name  # CLIENT SETNAME: <name>:cmd and <name>:sub, for CLIENT LIST
        self.commands: txredisapi.RedisProtocol | None = None
        self.subscriber: _Subscriber | None = None
        self.channels: dict[bytes, int] = {}  # wanted -> which subscribe call counts
        self._calls = 0
        self.up = False
        self.reconnects = 0
        self.calls_failed = 0
        self._ever_up = False
        self._scripts: dict[str, tuple[str, bytes]] = {}  # name -> sha1, source
        endpoint = endpoints.HostnameEndpoint(reactor, self.url.host, self.url.port, timeout=5)
        policy = backoffPolicy(initialDelay=0.2, maxDelay=2.0, factor=2.0)
        self._services = [
            ClientService(
                endpoint,
                _Factory(txredisapi.RedisProtocol, self.url, None, self),
                retryPolicy=policy,
                prepareConnection=self._commands_ready,
            ),
            ClientService(
                endpoint,
                _Factory(_Subscriber, self.url, None, self),
                retryPolicy=policy,
                prepareConnection=self._subscriber_ready,
            ),
        ]

        self.stopping = False
        self._pings: dict[object, float] = {}  # protocol -> when its PING went out
        self._keepalive = task.LoopingCall(self._ping)
        self._keepalive.clock = reactor

    # -- life ---------------------------------------------------------------
    def start(self) -> None:
        for s in self._services:
            s.startService()
        self._keepalive.start(KEEPALIVE, now=False)

    def stop(self) -> defer.Deferred:
        self.stopping = True
        self.channels.clear()
        if self._keepalive.running:
            self._keepalive.stop()
        return defer.gatherResults([s.stopService() for s in self._services], consumeErrors=True)

    def _ping(self) -> None:
        now = self.reactor.seconds()
        for p in (self.commands, self.subscriber):
            if p is None:
                continue
            sent = self._pings.get(p)
            if sent is not None:
                if now - sent > DEAD_AFTER:
                    _log.warn("redis: no answer to PING in {s:.0f} s; reconnecting", s=now - sent)
                    self._pings.pop(p, None)
                    p.transport.abortConnection()
                continue
            self._pings[p] = now
            try:
                d = p.execute_command("PING")
            except txredisapi.ConnectionError:
                self._pings.pop(p, None)
                continue
            d.addBoth(lambda _, p=p: self._pings.pop(p, None))

    def _named(self, p, suffix: str) -> defer.Deferred:
        d = p.whenConnected()
        return d.addCallback(
            lambda _: p.execute_command("CLIENT", "SETNAME", f"{self.name}:{suffix}")
        )

    def _commands_ready(self, p) -> defer.Deferred:
        def ready(_):
            self.commands = p
            # (whenDisconnected fires with the protocol, not ClientService's proxy of it)
            p.whenDisconnected().addCallback(lambda _: self._commands_lost(p))
            self._update()

        # Every script is loaded before the connection counts as up: an EVALSHA
        # that met NOSCRIPT would be sent again as EVAL after the commands
        # pipelined behind it, and run after them (a leave after the next join).
        return self._named(p, "cmd").addCallback(lambda _: self._load_scripts(p)).addCallback(ready)

    def _load_scripts(self, p: Any) -> defer.Deferred[list[object]]:
        return defer.gatherResults(
            [p.execute_command("SCRIPT", "LOAD", body) for _, body in self._scripts.values()],
            consumeErrors=True,
        )

    def _subscriber_ready(self, proxy: IProtocol) -> defer.Deferred:
        # (ClientService hands over a proxy of the _Subscriber its _Factory built)
        p = cast(_Subscriber, proxy)

        def ready(_):
            self.subscriber = p
            p.whenDisconnected().addCallback(lambda _: self._subscriber_lost(p))
            for channel in sorted(self.channels):
                self._subscribe(channel)
            self._update()

        return self._named(p, "sub").addCallback(ready)

    def _commands_lost(self, p) -> None:
        if self.stopping:
            return
        _log.warn("redis: the command connection was lost")
        if self.commands is p:
            self.commands = None
            self._update()

    def _subscriber_lost(self, p: _Subscriber) -> None:
        if self.stopping:
            return
        _log.warn("redis: the pub/sub connection was lost")
        if self.subscriber is p:
            self.subscriber = None
            self.on_channels_lost()
            self._update()

    def _update(self) -> None:
        up = self.commands is not None and self.subscriber is not None
        if up == self.up:
            return
        self.up = up
        if up:
            if self._ever_up:
                self.reconnects += 1
            self._ever_up = True
            _log.info("redis {url} connected", url=str(self.url))
        else:
            _log.warn("redis {url} unreachable; reconnecting", url=str(self.url))
        self.on_state(up)

    # -- commands -------------------------------------------------------------
    def call(self, *args: object) -> defer.Deferred:
        """One command; fails with RedisDown if Redis is not connected."""
        p = self.commands
        if p is None:
            return defer.fail(RedisDown("redis is not connected"))
        try:
            d = p.execute_command(*args)
        except txredisapi.ConnectionError as e:
            return defer.fail(RedisDown(str(e)))
        return d.addErrback(self._failed)

    def _failed(self, failure):
        self.calls_failed += 1
        if failure.check(txredisapi.ConnectionError):  # includes TimeoutError
            raise RedisDown(failure.getErrorMessage())
        return failure

    def add_script(self, name: str, source: str) -> None:
        body = source.encode()
        self._scripts[name] = (hashlib.sha1(body).hexdigest(), body)

    def script(self, name: str, keys: Sequence[object], args: Sequence[object]) -> defer.Deferred:
        """Run a script added with ``add_script``; loaded into Redis on first use."""
        sha, body = self._scripts[name]
        d = self.call("EVALSHA", sha, len(keys), *keys, *args)

        def noscript(failure):
            failure.trap(txredisapi.ResponseError)
            if not str(failure.value).startswith("NOSCRIPT"):
                return failure
            return self.call("EVAL", body, len(keys), *keys, *args)

        return d.addErrback(noscript)

    def publish(self, channel: bytes, payload: bytes) -> None:
        """Fire and forget (relay rooms): lost while Redis is down."""
        self.call("PUBLISH", channel, payload).addErrback(lambda f: None)

    # -- subscriptions ------------------------------------------------------
    def subscribe(self, channel: bytes) -> None:
        """Keep ``channel`` subscribed; ``on_subscribed`` says when it is, each time."""
        if channel in self.channels:
            return
        self.channels[channel] = 0
        if self.subscriber is not None:
            self._subscribe(channel)

    def unsubscribe(self, channel: bytes) -> None:
        if channel not in self.channels:
            return
        del self.channels[channel]
        p = self.subscriber
        if p is not None:
            with contextlib.suppress(txredisapi.ConnectionError):
                p.unsubscribe([channel]).addErrback(lambda f: None)

    def _subscribe(self, channel: bytes) -> None:
        p = self.subscriber
        assert p is not None
        self._calls += 1
        call = self.channels[channel] = self._calls

        def confirmed(_):
            # Only the newest SUBSCRIBE counts: an UNSUBSCRIBE may sit between.
            if self.channels.get(channel) == call and self.subscriber is p:
                self.on_subscribed(channel)

        with contextlib.suppress(txredisapi.ConnectionError):  # lost: resubscribed later
            p.subscribe([channel]).addCallbacks(confirmed, lambda f: None)

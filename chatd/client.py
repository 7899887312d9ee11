"""chatd.client: an asyncio client for chatd.v1 (docs/PROTOCOL.md) on ``websockets``.

For back ends, bots and tests. Install it with ``pip install chatd[client]``
(or just ``websockets>=12`` beside chatd); the daemon never imports it.

::

    import asyncio
    from chatd.client import Client

    async def main() -> None:
        async with Client("ws://127.0.0.1:9000/", nick="bot") as c:
            await c.join("tea")
            await c.send("tea", "hello")
            async for ev in c.events():
                if ev["type"] == "message" and ev["text"] == "!ping":
                    await c.send(ev["room"], "pong")

    asyncio.run(main())

What it does for you (docs/CLIENT.md has the details):

- **Requests are awaitables**, matched to their answers by ``ref``:
  ``join`` returns the ``joined`` frame with every history page merged into
  ``history``; ``send`` (and ``edit``, ``delete``, ``react``, ``unreact``)
  return the stored ``message``; ``history`` returns the ``history`` frame.
  An ``error`` answering a request raises :class:`ChatdError`.
- **Reconnects** by itself when the connection drops, after an exponential
  backoff with jitter (``backoff_initial`` doubling up to ``backoff_max``,
  each delay times a random 0.5-1), and **resumes**: the last ``welcome``'s
  ``resume`` secret goes in the next ``hello``, every room is joined again
  with ``since`` (the last id seen) and ``epoch``, and the messages missed
  meanwhile come as ``message`` events, in order, once.
- **Sends exactly once**: every ``send`` carries a ``cid``; one whose answer
  did not come before the drop is sent again on the next connection and the
  server answers it with the message it stored the first time.
- **Filters duplicates**: a ``message`` whose id was seen already in its room
  (and epoch) is not passed on.
- **Refreshes tokens**: with ``token_refresh``, a new token is asked for
  ``refresh_margin`` seconds before the connection's ``exp`` and sent as a
  ``refresh`` (the server closes with 4001 25 s after ``exp`` without one),
  and again after a 4001.
- **Events** (``message``, ``presence``, ``typing``, ``read``, ``reset``,
  ``joined``, ``error``, ``state``) come as dicts from ``async for ev in
  client.events()`` and/or callbacks registered with ``client.on(type, fn)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import json
import logging
import random
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, WebSocketException
from websockets.typing import Subprotocol

__all__ = ["ChatdError", "Client", "ClientClosed", "Disconnected", "Event", "Events"]

log = logging.getLogger("chatd.client")

Event = dict[str, Any]
"""A frame from the server (``message``, ``presence``, ...) or a ``state`` change."""

TokenSource = Callable[[], str | Awaitable[str]]
Callback = Callable[[Event], Awaitable[None] | None]

SUBPROTOCOL = Subprotocol("chatd.v1")
HELLO_REFUSED = "hello refused: "
CLOSE_RESUMED = 4000  # a newer connection took this session over
CLOSE_UNAUTHORIZED = 4001  # bad or expired token
# Codes of an error answering a request that are worth trying again later.
TRANSIENT = frozenset({"rate_limited", "unavailable"})
# Requests that are sent again on the next connection when their answer did not come.
RETRIED = frozenset({"send", "history"})


class ChatdError(Exception):
    """The server answered a request with ``error``: ``code``, ``message`` and the ``frame``."""

    def __init__(self, frame: Event) -> None:
        self.frame = frame
        self.code: str = str(frame.get("code"))
        self.message: str = str(frame.get("message", ""))
        super().__init__(f"{self.code}: {self.message}")


class Disconnected(Exception):
    """The connection dropped before an ``edit``, ``delete``, ``react`` or ``unreact`` was
    answered: it may or may not have taken effect (these are not retried)."""


class ClientClosed(Exception):
    """The client is closed (by :meth:`Client.close`, by a fatal error, or because a newer
    connection took its session over: close 4000); ``reason`` says which."""


@dataclass
class _Room:
    """What the client knows of a room it is in (or wants to be in)."""

    name: str
    epoch: str | None = None
    last_id: int = 0  # the highest id seen in ``epoch``
    synced: bool = False  # last_id means something: re-join with since
    waiters: list[asyncio.Future[Event]] = field(default_factory=list)
    retries: int = 0


@dataclass
class _Request:
    kind: str  # the frame's type
    frame: dict[str, Any]
    future: asyncio.Future[Event]
    room: str | None = None
    tries: int = 0


class Client:
    """A chatd.v1 connection that stays up: see the module's documentation.

    ``url`` is the daemon's WebSocket URL (``ws://127.0.0.1:9000/``). Give a
    ``nick``, or a ``token`` (docs/AUTH.md), or a ``token_refresh`` callable
    (plain or async, no arguments) that returns a fresh token: it is called
    for the first token when ``token`` is None, ``refresh_margin`` seconds
    before each token's expiry, and after the server refused a token.
    """

    def __init__(
        self,
        url: str,
        *,
        nick: str | None = None,
        token: str | None = None,
        token_refresh: TokenSource | None = None,
        refresh_margin: float = 60.0,
        backoff_initial: float = 0.5,
        backoff_max: float = 10.0,
        open_timeout: float = 10.0,
        ping_interval: float | None = 20.0,
        reconnect: bool = True,
        max_send_tries: int = 5,
    ) -> None:
        if nick is None and token is None and token_refresh is None:
            raise ValueError("give a nick, a token or a token_refresh callable")
        self.url = url
        self.nick = nick
        self._token = token
        self._token_refresh = token_refresh
        self.refresh_margin = refresh_margin
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.open_timeout = open_timeout
        self.ping_interval = ping_interval
        self.reconnect = reconnect
        self.max_send_tries = max_send_tries
        # what the server said
        self.user: str | None = None
        self.exp: float | None = None
        self.session: str | None = None
        self.state = "idle"  # connecting, connected, reconnecting, closed
        self.connections = 0  # welcomes so far
        self.close_reason: str | None = None
        self._resume: str | None = None
        self._rooms: dict[str, _Room] = {}
        self._pending: dict[str, _Request] = {}
        self._refs = itertools.count(1)
        self._ref_prefix = secrets.token_hex(4) + "-"
        self._ws: ClientConnection | None = None
        self._ready = False  # welcomed, rooms re-joined and pending requests sent
        self._welcome: asyncio.Future[Event] | None = None
        self._hello_ref: str | None = None
        self._paging: tuple[Event, _Request | None] | None = None  # a joined waiting for pages
        self._subscribers: list[asyncio.Queue[Event | None]] = []
        self._callbacks: dict[str, list[Callback]] = {}
        self._task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._connected: asyncio.Event | None = None
        self._wake: asyncio.Event | None = None
        self._closing = False

    # -- life ---------------------------------------------------------------
    async def connect(self, timeout: float | None = None) -> Client:
        """Start, and wait until the first connection is welcomed (retrying meanwhile).

        Raises :class:`ClientClosed` when the client gave up (a bad nick, a refused
        token without ``token_refresh``), ``TimeoutError`` past ``timeout``.
        """
        if self._task is None:
            self._connected = asyncio.Event()
            self._wake = asyncio.Event()
            self._task = asyncio.create_task(self._run(), name="chatd.client")
        assert self._connected is not None
        await asyncio.wait_for(self._connected.wait(), timeout)
        if self.state == "closed":
            raise ClientClosed(self.close_reason or "closed")
        return self

    async def close(self) -> None:
        """Close the connection (1000) and stop; pending requests raise :class:`ClientClosed`."""
        if self._closing:
            if self._task is not None:
                await asyncio.shield(self._task)
            return
        self._closing = True
        self.close_reason = self.close_reason or "closed by the client"
        if self._wake is not None:
            self._wake.set()
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(Exception):
                await ws.close()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), self.open_timeout)
            except (TimeoutError, asyncio.CancelledError):
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        self._finish()

    async def __aenter__(self) -> Client:
        return await self.connect()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- events -------------------------------------------------------------
    def on(self, kind: str, callback: Callback) -> None:
        """Call ``callback(event)`` (plain or async) for every event of ``kind`` ("*": all)."""
        self._callbacks.setdefault(kind, []).append(callback)

    def events(self, kinds: Iterable[str] | None = None) -> Events:
        """Every event from this call on (or those of ``kinds``), until the client is closed.

        ``async for ev in client.events(): ...``; or keep the stream and ``await
        stream.next(timeout)``. Each call is a stream of its own (unbounded:
        read it, or :meth:`Events.close` it).
        """
        return Events(self, None if kinds is None else set(kinds))

    def _emit(self, ev: Event) -> None:
        for q in self._subscribers:
            q.put_nowait(ev)
        for kind in (ev["type"], "*"):
            for cb in self._callbacks.get(kind, ()):
                try:
                    result = cb(ev)
                    if inspect.isawaitable(result):
                        self._spawn(_guarded(result))
                except Exception:
                    log.exception("chatd.client: a %s callback failed", kind)

    def _set_state(self, state: str, **info: Any) -> None:
        self.state = state
        self._emit({"type": "state", "state": state, **info})

    # -- requests -----------------------------------------------------------
    async def join(self, room: str, since: int | None = None, epoch: str | None = None) -> Event:
        """Join ``room`` (again on every reconnect, until :meth:`leave`); the ``joined`` frame.

        Its ``history`` holds every page of the join. With ``since`` (and the
        ``epoch`` it counts in: ids you kept from an earlier run), the messages
        after it also come as ``message`` events, as after a reconnect.
        """
        r = self._rooms.get(room)
        if r is None:
            r = self._rooms[room] = _Room(room)
        if since is not None:
            r.last_id, r.epoch, r.synced = since, epoch, True
        fut: asyncio.Future[Event] = asyncio.get_running_loop().create_future()
        r.waiters.append(fut)
        if self._ready:
            self._send_join(r)
        self._check_open()
        return await fut

    async def leave(self, room: str) -> Event:
        """Leave ``room`` (it is not joined again on reconnects); the ``left`` frame."""
        r = self._rooms.pop(room, None)
        if r is not None:
            for w in r.waiters:
                if not w.done():
                    w.set_exception(ClientClosed(f"left {room}"))
        if not self._ready:
            return {"type": "left", "room": room}  # the next connection will not join it
        return await self._request("leave", room=room)

    async def send(self, room: str, text: str, cid: str | None = None) -> Event:
        """Send ``text`` to ``room``; the stored ``message`` (with its ``id``).

        Sent again after a reconnect (and after ``rate_limited`` or
        ``unavailable``) with the same ``cid`` until answered: stored once.
        """
        return await self._request("send", room=room, text=text, cid=cid or secrets.token_hex(8))

    async def history(
        self,
        room: str,
        before: int | None = None,
        after: int | None = None,
        limit: int | None = None,
    ) -> Event:
        """A page of ``room``'s kept history: the ``history`` frame (``messages``, ``more``)."""
        pairs = (("before", before), ("after", after), ("limit", limit))
        extra = {k: v for k, v in pairs if v is not None}
        return await self._request("history", room=room, **extra)

    async def edit(self, room: str, id: int, text: str) -> Event:
        """Edit one's own message ``id``; the ``edit`` event (a ``message``)."""
        return await self._request("edit", room=room, id=id, text=text)

    async def delete(self, room: str, id: int) -> Event:
        """Delete one's own message ``id``; the ``delete`` event (a ``message``)."""
        return await self._request("delete", room=room, id=id)

    async def react(self, room: str, id: int, emoji: str) -> Event:
        """React to message ``id`` with ``emoji``; the ``react`` event (a ``message``)."""
        return await self._request("react", room=room, id=id, emoji=emoji)

    async def unreact(self, room: str, id: int, emoji: str) -> Event:
        """Take a reaction back; the ``unreact`` event (a ``message``)."""
        return await self._request("unreact", room=room, id=id, emoji=emoji)

    async def typing(self, room: str) -> None:
        """Say the user is typing in ``room`` (no answer; dropped while disconnected)."""
        await self._fire({"type": "typing", "room": room})

    async def read(self, room: str, id: int) -> None:
        """Move the read marker in ``room`` up to ``id`` (no answer; dropped while disconnected)."""
        await self._fire({"type": "read", "room": room, "id": id})

    def last_id(self, room: str) -> int:
        """The highest message id seen in ``room`` (in its current epoch)."""
        r = self._rooms.get(room)
        return r.last_id if r is not None else 0

    def epoch(self, room: str) -> str | None:
        """The epoch ``room``'s ids count in, once known."""
        r = self._rooms.get(room)
        return r.epoch if r is not None else None

    async def _fire(self, frame: dict[str, Any]) -> None:
        self._check_open()
        ws = self._ws
        if ws is not None and self._ready:
            with contextlib.suppress(ConnectionClosed):
                await ws.send(json.dumps(frame))

    def _check_open(self) -> None:
        if self.state == "closed":
            raise ClientClosed(self.close_reason or "closed")

    def _ref(self) -> str:
        return f"{self._ref_prefix}{next(self._refs)}"

    async def _request(self, kind: str, **fields: Any) -> Event:
        self._check_open()
        ref = self._ref()
        frame = {"type": kind, **fields, "ref": ref}
        fut: asyncio.Future[Event] = asyncio.get_running_loop().create_future()
        req = _Request(kind, frame, fut, room=fields.get("room"))
        self._pending[ref] = req
        if self._ready:
            await self._transmit(req)
        return await fut

    async def _transmit(self, req: _Request) -> None:
        ws = self._ws
        if ws is None:
            return  # stays pending: sent on the next connection (or failed then)
        req.tries += 1
        with contextlib.suppress(ConnectionClosed):
            await ws.send(json.dumps(req.frame))

    def _send_join(self, r: _Room) -> None:
        frame: dict[str, Any] = {"type": "join", "room": r.name, "ref": self._ref()}
        if r.synced:
            frame["since"] = r.last_id
            if r.epoch is not None:
                frame["epoch"] = r.epoch
        fut: asyncio.Future[Event] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(_consume)
        req = _Request("join", frame, fut, room=r.name)
        self._pending[frame["ref"]] = req
        self._spawn(self._transmit(req))

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- the connection loop ------------------------------------------------
    def _delay(self, attempt: int) -> float:
        base: float = min(self.backoff_max, self.backoff_initial * 2.0**attempt)
        return base * random.uniform(0.5, 1.0)

    async def _run(self) -> None:
        attempt = 0
        try:
            while not self._closing:
                self._set_state("connecting" if self.connections == 0 else "reconnecting")
                welcomed, code, reason = await self._connection()
                if self._closing:
                    break
                fatal = self._fatal(code, reason)
                if fatal is not None or not self.reconnect:
                    self.close_reason = fatal or f"connection closed ({code})"
                    break
                attempt = 0 if welcomed else attempt + 1
                delay = self._delay(attempt)
                self._set_state("waiting", delay=delay, code=code, reason=reason)
                assert self._wake is not None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)
        except Exception as e:  # a bug: stop rather than spin
            log.exception("chatd.client: the connection loop failed")
            self.close_reason = f"client error: {e!r}"
        finally:
            self._finish()

    def _fatal(self, code: int | None, reason: str) -> str | None:
        """Why not to reconnect after a connection ended with ``code``, or None."""
        if code == CLOSE_RESUMED:
            return "another connection took this session over (4000)"
        if code == CLOSE_UNAUTHORIZED and self._token_refresh is None:
            return f"unauthorized (4001): {reason}"
        if code == CLOSE_UNAUTHORIZED:
            self._token = None  # ask for a new one
        if reason.startswith(HELLO_REFUSED + "unauthorized"):
            if self._token_refresh is None:
                return reason
            self._token = None
        elif reason.startswith(HELLO_REFUSED):
            return reason  # a bad nick, say: trying again changes nothing
        return None

    async def _fresh_token(self) -> str | None:
        if self._token is None and self._token_refresh is not None:
            got = self._token_refresh()
            self._token = got if isinstance(got, str) else await got
        return self._token

    async def _connection(self) -> tuple[bool, int | None, str]:
        """One connection, from the handshake until it ends: (welcomed, close code, reason)."""
        try:
            token = await self._fresh_token()
            ws = await connect(
                self.url,
                subprotocols=[SUBPROTOCOL],
                open_timeout=self.open_timeout,
                ping_interval=self.ping_interval,
                proxy=None,
                max_size=16 * 2**20,
            )
        except (OSError, TimeoutError, WebSocketException) as e:
            return False, None, f"connect failed: {e!r}"
        except Exception as e:
            log.warning("chatd.client: no token: %r", e)
            return False, None, f"token_refresh failed: {e!r}"
        self._ws = ws
        loop = asyncio.get_running_loop()
        self._welcome = loop.create_future()
        reader = asyncio.create_task(self._read(ws))
        refresher: asyncio.Task[None] | None = None
        welcomed = False
        reason = ""
        try:
            self._hello_ref = self._ref()
            hello: dict[str, Any] = {"type": "hello", "ref": self._hello_ref}
            if token is not None:
                hello["token"] = token
            else:
                hello["nick"] = self.nick
            if self._resume is not None:
                hello["resume"] = self._resume
            await ws.send(json.dumps(hello))
            waited: list[asyncio.Future[Any]] = [self._welcome, reader]
            done, _ = await asyncio.wait(
                waited,
                timeout=self.open_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if self._welcome in done and self._welcome.exception() is None:
                welcomed = True
                self._on_welcome(self._welcome.result())
                if self.exp is not None and self._token_refresh is not None:
                    refresher = asyncio.create_task(self._refresh_loop())
                # No await from here to _ready: a request made meanwhile is in the flush
                # or is sent at once, never neither.
                for r in list(self._rooms.values()):
                    self._send_join(r)
                for req in list(self._pending.values()):
                    if req.kind != "join":
                        self._spawn(self._transmit(req))
                self._ready = True
                self.connections += 1
                self._set_state("connected", resumed=self._welcome.result().get("resumed", False))
                assert self._connected is not None
                self._connected.set()
            elif self._welcome in done:
                err = self._welcome.exception()
                reason = f"{HELLO_REFUSED}{err}"
                await ws.close()
            elif reader not in done:
                reason = "no welcome"
                await ws.close()
            await reader
        except ConnectionClosed:
            pass
        finally:
            self._ready = False
            self._ws = None
            self._paging = None
            for t in (reader, refresher):
                if t is not None and not t.done():
                    t.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await t
            self._dropped()
        code = ws.close_code
        if not reason:
            reason = ws.close_reason or ""
        return welcomed, code, reason

    def _on_welcome(self, w: Event) -> None:
        self._resume = w.get("resume")
        self.session = w.get("session")
        self.nick = w.get("nick", self.nick)
        self.user = w.get("user")
        self.exp = w.get("exp")

    def _dropped(self) -> None:
        """The connection is gone: decide about every request it had not answered."""
        for ref, req in list(self._pending.items()):
            if req.kind in RETRIED and req.tries < self.max_send_tries:
                continue  # sent again on the next connection
            del self._pending[ref]
            if req.future.done():
                continue
            if req.kind == "join":
                req.future.cancel()  # the room is joined again on the next connection
            elif req.kind == "leave":
                req.future.set_result({"type": "left", "room": req.room, "ref": ref})
            elif req.kind == "refresh":
                req.future.cancel()
            else:
                req.future.set_exception(Disconnected(f"{req.kind} not answered"))

    async def _refresh_loop(self) -> None:
        while True:
            assert self.exp is not None
            wait = self.exp - self.refresh_margin - time.time()
            await asyncio.sleep(max(wait, 1.0))
            try:
                self._token = None
                token = await self._fresh_token()
                got = await asyncio.wait_for(self._request("refresh", token=token), 30)
                self.exp = got.get("exp", self.exp)
            except ChatdError as e:
                log.warning("chatd.client: refresh refused: %s", e)
                return  # the server closes with 4001: reconnect with another token
            except Exception as e:
                log.warning("chatd.client: refresh failed, trying again: %r", e)
                await asyncio.sleep(5)

    def _finish(self) -> None:
        if self.state == "closed":
            return
        reason = self.close_reason or "closed"
        for req in self._pending.values():
            if not req.future.done():
                req.future.set_exception(ClientClosed(reason))
        self._pending.clear()
        for r in self._rooms.values():
            for w in r.waiters:
                if not w.done():
                    w.set_exception(ClientClosed(reason))
            r.waiters.clear()
        for t in list(self._tasks):
            t.cancel()
        self._set_state("closed", reason=reason)
        for q in self._subscribers:
            q.put_nowait(None)
        if self._connected is not None:
            self._connected.set()

    # -- frames from the server -------------------------------------------
    async def _read(self, ws: ClientConnection) -> None:
        async for data in ws:
            try:
                frame = json.loads(data)
            except ValueError:
                log.warning("chatd.client: not JSON: %r", data[:100])
                continue
            if not isinstance(frame, dict):
                continue
            try:
                self._dispatch(frame)
            except Exception:  # a frame this client did not expect: not a reason to drop
                log.exception("chatd.client: could not handle %r", frame.get("type"))

    def _dispatch(self, f: Event) -> None:
        kind = f.get("type")
        ref = f.get("ref")
        req = self._pending.get(ref) if isinstance(ref, str) else None
        if kind == "welcome" or (kind == "error" and ref is not None and ref == self._hello_ref):
            if self._welcome is not None and not self._welcome.done():
                if kind == "welcome":
                    self._welcome.set_result(f)
                else:
                    self._welcome.set_exception(ChatdError(f))
            return
        if self._paging is not None and kind == "history" and ref is None:
            joined, jreq = self._paging
            if f.get("room") == joined["room"]:
                joined["history"].extend(f.get("messages", []))
                if not f.get("more"):
                    self._paging = None
                    self._joined(joined, jreq)
                return
        if kind == "joined":
            if f.pop("more", False):
                self._paging = (f, req)
            else:
                self._joined(f, req)
            return
        if kind == "error" and req is not None:
            self._error(f, req)
            return
        if req is not None and kind in ("message", "history", "left", "refreshed"):
            del self._pending[req.frame["ref"]]
            if not req.future.done():
                req.future.set_result(f)
        if kind == "message":
            self._message(f)
        elif kind == "reset":
            r = self._rooms.get(f.get("room", ""))
            if r is not None:
                r.epoch, r.last_id, r.synced = f.get("epoch"), int(f.get("last_id", 0)), True
            self._emit(f)
        elif kind in ("presence", "typing", "read", "error"):
            self._emit(f)

    def _message(self, m: Event) -> None:
        r = self._rooms.get(m.get("room", ""))
        mid = m.get("id")
        if r is None or not isinstance(mid, int):
            self._emit(m)
            return
        if r.synced and mid <= r.last_id:
            return  # seen already in this epoch
        r.last_id, r.synced = mid, True
        self._emit(m)

    def _joined(self, f: Event, req: _Request | None) -> None:
        if req is not None:
            self._pending.pop(f.get("ref", ""), None)
            if not req.future.done():
                req.future.set_result(f)
        r = self._rooms.get(f.get("room", ""))
        if r is None:
            return  # left meanwhile
        replay = r.synced and not f.get("reset") and f.get("reason") != "unknown_id"
        rejoin = r.synced
        if f.get("reset") or f.get("reason") == "unknown_id" or not r.synced:
            r.last_id = 0
        r.epoch = f.get("epoch")
        r.retries = 0
        if f.get("reset"):
            self._emit({"type": "reset", "room": r.name, "epoch": r.epoch, "last_id": 0})
        # The joined event first (recovered, reason: whether what follows is whole),
        # then the messages missed, as message events, each once and in order.
        self._emit({**f, "rejoin": rejoin})
        history = f.get("history", [])
        if replay:
            for m in history:
                self._message(m)
        else:
            ids = [m["id"] for m in history if isinstance(m.get("id"), int)]
            r.last_id = max([r.last_id, *ids])
        r.last_id = max(r.last_id, int(f.get("last_id") or 0))
        r.synced = True
        waiters, r.waiters = r.waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(f)

    def _error(self, f: Event, req: _Request) -> None:
        ref = f["ref"]
        code = f.get("code")
        room = self._rooms.get(req.room or "")
        if req.kind == "join":
            del self._pending[ref]
            if room is None:
                return
            if (code in TRANSIENT or (code == "nick_taken" and room.synced)) and room.retries < 5:
                room.retries += 1
                self._spawn(self._later(self._delay(room.retries), self._rejoin, room.name))
                return
            del self._rooms[room.name]
            for w in room.waiters:
                if not w.done():
                    w.set_exception(ChatdError(f))
            self._emit(f)
            return
        if code in TRANSIENT and req.kind in RETRIED and req.tries < self.max_send_tries:
            self._spawn(self._later(self._delay(req.tries), self._retransmit, ref))
            return
        del self._pending[ref]
        if not req.future.done():
            req.future.set_exception(ChatdError(f))

    async def _later(self, delay: float, fn: Callable[[str], None], arg: str) -> None:
        await asyncio.sleep(delay)
        fn(arg)

    def _rejoin(self, room: str) -> None:
        r = self._rooms.get(room)
        if r is not None and self._ready:
            self._send_join(r)

    def _retransmit(self, ref: str) -> None:
        req = self._pending.get(ref)
        if req is not None and self._ready:
            self._spawn(self._transmit(req))


class Events:
    """A stream of a client's events (:meth:`Client.events`): an async iterator."""

    def __init__(self, client: Client, kinds: set[str] | None) -> None:
        self._client = client
        self._kinds = kinds
        self._queue: asyncio.Queue[Event | None] = asyncio.Queue()
        self._ended = client.state == "closed"
        if not self._ended:
            client._subscribers.append(self._queue)

    def __aiter__(self) -> Events:
        return self

    async def __anext__(self) -> Event:
        while not self._ended:
            ev = await self._queue.get()
            if ev is None:
                self.close()
                break
            if self._kinds is None or ev["type"] in self._kinds:
                return ev
        raise StopAsyncIteration

    async def next(self, timeout: float | None = None) -> Event:
        """The next event, within ``timeout`` seconds (``TimeoutError``); ``ClientClosed`` at
        the end."""
        try:
            return await asyncio.wait_for(self.__anext__(), timeout)
        except StopAsyncIteration:
            raise ClientClosed(self._client.close_reason or "closed") from None

    def close(self) -> None:
        """Stop receiving events."""
        self._ended = True
        with contextlib.suppress(ValueError):
            self._client._subscribers.remove(self._queue)


async def _guarded(aw: Awaitable[None]) -> None:
    try:
        await aw
    except Exception:
        log.exception("chatd.client: an async callback failed")


def _consume(fut: asyncio.Future[Event]) -> None:
    """Retrieve an internal future's outcome so that asyncio does not warn about it."""
    if not fut.cancelled():
        fut.exception()

"""Several chatd nodes as one chat, over Redis (``--redis URL``): the cluster hub.

``RedisHub`` has the ``Hub`` methods of ``InMemoryHub``; docs/SCALING.md
says what Redis holds. How it stays exact:

- **One order.** A chat message gets its id, is stored and is published by
  one Lua script (INCR, XADD, PUBLISH). Redis runs scripts one at a time, so
  every node receives a room's messages in id order, and a message is in
  Redis before any node delivers it: an acknowledged message (the sender
  sees it come back) survives any node dying.
- **Joins meet the live stream exactly.** A node subscribes to the room's
  channel first; once Redis confirms it, the join script records the member,
  reads history and member list, and publishes a marker (the presence
  ``join``). Events before the marker are in the snapshot; the ones after it
  are held for the joiner until the script's reply is here, then sent
  after ``joined``. No ids are compared; presence is covered too.
- **History is read a page at a time.** The join script reads the first
  page of a ``since`` replay; ``_StreamCursor`` reads the rest with XRANGE
  as the client takes the pages. A replay that the stream's trimming
  overtakes fails (the connection is dropped) rather than skip messages.
- **Gaps are filled.** When the pub/sub connection comes back, each room's
  messages after the last id delivered here are read from the stream
  before the live ones (held meanwhile), so nothing is lost or doubled.
- **Epochs: data loss is detected, not papered over.** Each room's history
  has an epoch, a random id the post script creates with the room's first id
  (or when its counter is gone) and publishes with every message. If Redis
  loses a room's data, the next post starts a new epoch at id 1; a node that
  sees a message of another epoch than the one it knows reads the new
  epoch's stream from its start, tells its live members (a ``Reset`` event),
  then delivers: nothing is dropped as "already seen", so every send is
  answered, and no id means two texts within one epoch.
- **Dead nodes expire.** Each node scores itself in a sorted set every
  ``ttl/4`` seconds; any node's heartbeat script removes the members of
  nodes silent for ``ttl`` and publishes their ``leave``. A node that finds
  itself removed (it was cut off, or Redis lost its data) writes back its
  live members, as it does after every reconnect.
- **Relay rooms** are best effort across nodes, as a relay is: delivered here
  at once, published for the other nodes while Redis is up.

While Redis is unreachable: chat sends and joins get ``unavailable``, relay
rooms keep working on this node, /healthz says ``degraded``, and the broker
reconnects with backoff; everything resumes by itself.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field

from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from chatd import limits
from chatd.broker import Broker, BrokerDown
from chatd.fanout import OUTBOX, Link, Outbox
from chatd.history import PAGE_BYTES, PAGE_ROWS, Message, Ref, new_epoch
from chatd.hub import Joined, Local, Member, NickTaken, Renderer, Reset, Unavailable
from chatd.stats import Stats

# an event held for a joiner, with its renders by format (hub.Local.send_to)
_Held = tuple[Message | Reset | tuple[str, str, str], dict[str, bytes | None]]

_log = Logger()
_tail = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode

CLOSE_TIMEOUT = 5.0  # seconds a stopping node waits for Redis before it goes anyway
NODES = "chatd:nodes"  # sorted set: node id -> last heartbeat, ms (Redis clock)


def chat_base(room: str) -> str:
    """Every key of a chat room starts so; the {room} hash tag keeps them together."""
    return f"chatd:c:{{{room}}}"


def relay_channel(room: str) -> bytes:
    return f"chatd:r:{{{room}}}".encode()


# Member values in a room's hash are "<limits.nick_key(nick) or ''>\n<nick>": the
# Lua side frees the nick without knowing Unicode case rules.
_PURGE = r"""
local function purge(node, keep)
  local rooms_key = 'chatd:node:' .. node
  local prefix = node .. '.'
  local n = 0
  for _, room in ipairs(redis.call('SMEMBERS', rooms_key)) do
    local base = 'chatd:c:{' .. room .. '}'
    local all = redis.call('HGETALL', base .. ':m')
    for i = 1, #all, 2 do
      local mid, v = all[i], all[i + 1]
      if string.sub(mid, 1, #prefix) == prefix and not (keep and keep[mid]) then
        redis.call('HDEL', base .. ':m', mid)
        local key = string.sub(v, 1, string.find(v, '\n', 1, true) - 1)
        if key ~= '' and redis.call('HGET', base .. ':k', key) == mid then
          redis.call('HDEL', base .. ':k', key)
        end
        redis.call('PUBLISH', base, 'l ' .. mid .. ' ' .. v)
        n = n + 1
      end
    end
  end
  if not keep then redis.call('DEL', rooms_key) end
  return n
end
"""

SCRIPTS = {
    # KEYS: seq, log, epoch. ARGV: channel, retention, sender, text, JSON tail
    # (an object without its "{"), a new epoch in case the room needs one. The
    # epoch goes into the published JSON as "e".
    "post": r"""
local epoch = redis.call('GET', KEYS[3])
local id = redis.call('INCR', KEYS[1])
if not epoch or id == 1 then  -- the room's first id (or its counter was lost): a new epoch
  epoch = ARGV[6]
  redis.call('SET', KEYS[3], epoch)
end
local t = redis.call('TIME')
local ts = t[1] .. string.format('%03d', math.floor(tonumber(t[2]) / 1000))
if tonumber(ARGV[2]) > 0 then
  redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[2], id .. '-0', 'ts', ts, 'f', ARGV[3], 't', ARGV[4])
end
redis.call('PUBLISH', ARGV[1], 'm ' .. id .. ' ' .. ts .. ' {"e":"' .. epoch .. '",' .. ARGV[5])
return {id, ts}
""",
    # KEYS: members, nicks, node rooms, seq, log, epoch.
    # ARGV: member id, nick key, value, room, channel, 'since'|'recent'|'none', since,
    # count, the client's epoch or '', a new epoch for a room from before epochs, how
    # many entries at most after since (the rest is read in pages: _StreamCursor).
    # Returns {'ok', new, last, truncated, member values, entries, epoch or '', reset}.
    "join": r"""
local mid = ARGV[1]
if ARGV[2] ~= '' then
  local holder = redis.call('HGET', KEYS[2], ARGV[2])
  if holder and holder ~= mid then return {'taken'} end
  redis.call('HSET', KEYS[2], ARGV[2], mid)
end
local new = redis.call('HSET', KEYS[1], mid, ARGV[3])
redis.call('SADD', KEYS[3], ARGV[4])
if new == 1 then
  redis.call('PUBLISH', ARGV[5], 'j ' .. mid .. ' ' .. ARGV[3])
else
  redis.call('PUBLISH', ARGV[5], 'k ' .. mid)
end
local last = tonumber(redis.call('GET', KEYS[4]) or '0')
local epoch = redis.call('GET', KEYS[6])
if not epoch and last > 0 then  -- messages from before epochs: the room gets one now
  epoch = ARGV[10]
  redis.call('SET', KEYS[6], epoch)
end
epoch = epoch or ''
local mode, reset = ARGV[6], 0
if ARGV[9] ~= '' and ARGV[9] ~= epoch then  -- 'since' counts in another epoch
  reset = 1
  if mode == 'since' then mode = 'recent' end
end
local entries, truncated = {}, 0
if mode == 'since' then
  local since = tonumber(ARGV[7])
  if since < last then
    entries = redis.call('XRANGE', KEYS[5], '(' .. since .. '-0', '+', 'COUNT', ARGV[11])
    local first = last + 1
    if #entries > 0 then first = tonumber(string.match(entries[1][1], '^(%d+)')) end
    if first > since + 1 then truncated = 1 end
  end
elseif mode == 'none' then
  return {'ok', new, last, 0, {}, {}, epoch, reset}
elseif tonumber(ARGV[8]) > 0 then
  entries = redis.call('XREVRANGE', KEYS[5], '+', '-', 'COUNT', ARGV[8])
end
return {'ok', new, last, truncated, redis.call('HVALS', KEYS[1]), entries, epoch, reset}
""",
    # KEYS: epoch, log. ARGV: the epoch known here or '', the last id delivered here.
    # Returns {epoch or '', entries}: those after that id, or all if the epoch changed.
    "fill": r"""
local epoch = redis.call('GET', KEYS[1]) or ''
local from = '(' .. ARGV[2] .. '-0'
if ARGV[1] ~= '' and epoch ~= '' and epoch ~= ARGV[1] then from = '-' end
return {epoch, redis.call('XRANGE', KEYS[2], from, '+')}
""",
    # KEYS: members, nicks, node rooms. ARGV: member id, room, channel, '1' if the
    # node's last member of the room.
    "leave": r"""
if ARGV[4] == '1' then redis.call('SREM', KEYS[3], ARGV[2]) end
local v = redis.call('HGET', KEYS[1], ARGV[1])
if not v then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
local key = string.sub(v, 1, string.find(v, '\n', 1, true) - 1)
if key ~= '' and redis.call('HGET', KEYS[2], key) == ARGV[1] then
  redis.call('HDEL', KEYS[2], key)
end
redis.call('PUBLISH', ARGV[3], 'l ' .. ARGV[1] .. ' ' .. v)
return 1
""",
    # KEYS: nodes. ARGV: node, ttl in ms. Returns {known before, members reaped}.
    "heartbeat": _PURGE
    + r"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local known = redis.call('ZSCORE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[1], now, ARGV[1])
local reaped = 0
for _, node in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))) do
  reaped = reaped + purge(node, nil)
  redis.call('ZREM', KEYS[1], node)
end
if known then return {1, reaped} end
return {0, reaped}
""",
    # KEYS: nodes. ARGV: node, then (room, member id, value) for every live member
    # here. Makes Redis hold exactly these for this node. Returns {removed, added,
    # ids whose nick someone else took meanwhile}.
    "resync": _PURGE
    + r"""
local node = ARGV[1]
local keep, rooms = {}, {}
for i = 2, #ARGV, 3 do keep[ARGV[i + 1]] = true; rooms[ARGV[i]] = true end
local removed = purge(node, keep)
local rooms_key = 'chatd:node:' .. node
for _, room in ipairs(redis.call('SMEMBERS', rooms_key)) do
  if not rooms[room] then redis.call('SREM', rooms_key, room) end
end
local added, taken = 0, {}
for i = 2, #ARGV, 3 do
  local room, mid, v = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local base = 'chatd:c:{' .. room .. '}'
  local key = string.sub(v, 1, string.find(v, '\n', 1, true) - 1)
  local holder = key ~= '' and redis.call('HGET', base .. ':k', key)
  if holder and holder ~= mid then
    table.insert(taken, mid)
  else
    if key ~= '' then redis.call('HSET', base .. ':k', key, mid) end
    redis.call('SADD', rooms_key, room)
    if redis.call('HSET', base .. ':m', mid, v) == 1 then
      redis.call('PUBLISH', base, 'j ' .. mid .. ' ' .. v)
      added = added + 1
    end
  end
end
redis.call('ZADD', KEYS[1], 'XX', 'GT', 0, node)
return {removed, added, taken}
""",
    # KEYS: nodes. ARGV: node. A node leaving for good.
    "goodbye": _PURGE
    + r"""
local n = purge(ARGV[1], nil)
redis.call('ZREM', KEYS[1], ARGV[1])
return n
""",
}


@dataclass(eq=False, slots=True)
class _Joining:
    """A member between its join request and going live."""

    link: Link
    mid: str
    member: Member
    since: int | None
    snapshot: bool = True  # False: no member list and no history wanted
    epoch: str | None = None  # the epoch ``since`` counts in, if the client said
    d: defer.Deferred = field(default_factory=defer.Deferred)
    reply: list | None = None  # the join script's answer
    marked: bool = False  # its marker came through the room's channel
    held: list[_Held] = field(default_factory=list)  # what came after the marker
    cancelled: bool = False


@dataclass(eq=False, slots=True)
class _Room:
    """This node's view of one chat room (its live members are in ``Local``)."""

    name: str
    base: str
    mids: dict[Link, str] = field(default_factory=dict)  # live members here
    live: dict[str, Link] = field(default_factory=dict)  # the same, by member id
    joining: dict[Link, _Joining] = field(default_factory=dict)
    by_mid: dict[str, _Joining] = field(default_factory=dict)  # the same, by member id
    marked: dict[_Joining, None] = field(default_factory=dict)  # marker seen, reply not yet
    before_sub: list[_Joining] = field(default_factory=list)  # wait for SUBSCRIBE
    subscribed: bool = False
    last_id: int = 0  # every message up to here went to the live members
    epoch: str | None = None  # the history epoch last_id counts in (None: not known yet)
    filling: list | None = None  # events held while a gap is read from the stream
    gap: bool = False  # the channel was lost: read the stream when it is back

    def empty(self) -> bool:
        return not self.mids and not self.joining


def _message(room: str, entry: list) -> Message:
    """A Message from a stream entry ``[b"<id>-0", [field, value, ...]]``."""
    ident, flat = entry
    fields = dict(zip(flat[::2], flat[1::2], strict=True))
    return Message(
        room,
        int(ident.split(b"-", 1)[0]),
        int(fields[b"ts"]),
        fields[b"f"].decode(),
        fields[b"t"].decode(),
    )


def _ident_epoch(payload: bytes) -> tuple[int, str | None]:
    """The id and epoch of a published message ``m <id> <ts> <json>``."""
    _, ident, _, tail = payload.split(b" ", 3)
    return int(ident), json.loads(tail).get("e")


class _StreamCursor:
    """The rest of a ``since`` replay, read from the room's stream a page at a time.

    Redis trims the stream (MAXLEN) as messages come: if more than the
    retention were posted while a client was still reading its replay, what
    it had not read yet is gone, and the read fails (the connection is
    dropped; the client resumes with ``since`` and is told ``truncated``).
    """

    __slots__ = ("after", "broker", "key", "room", "rows", "until")

    def __init__(self, broker: Broker, key: str, room: str, after: int, until: int) -> None:
        self.broker, self.key, self.room = broker, key, room
        self.after, self.until = after, until
        self.rows = PAGE_ROWS

    def read(self) -> defer.Deferred:
        d = self.broker.call(
            "XRANGE", self.key, f"({self.after}-0", f"{self.until}-0", "COUNT", self.rows
        )
        return d.addCallback(self._got)

    def _got(self, entries: list) -> list[Message]:
        msgs = [_message(self.room, e) for e in entries]
        if not msgs or msgs[0].id != self.after + 1:
            raise Unavailable(f"history of {self.room} after {self.after} was trimmed")
        self.after = msgs[-1].id
        size = sum(len(m.text) for m in msgs) // len(msgs) + 100
        self.rows = max(4, min(1024, PAGE_BYTES // size + 1))
        return msgs


def _nick(value: bytes) -> str:
    return value.split(b"\n", 1)[1].decode()


class RedisHub:
    """A cluster node's rooms: local links in ``Local``, the rest in Redis."""

    def __init__(
        self,
        url: str,
        retention: int = limits.HISTORY_SIZE,
        join_history: int = limits.JOIN_HISTORY,
        ttl: float = limits.CLUSTER_TTL,
        stats: Stats | None = None,
        outbox: Outbox = OUTBOX,
        on_state=None,
        reactor=None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.stats = stats if stats is not None else Stats()
        self.local = Local(self.stats, outbox)
        self.retention, self.join_history, self.ttl = retention, join_history, ttl
        self.node = secrets.token_hex(6)
        self._node_b = self.node.encode()
        self._serial = 0
        self._rooms: dict[str, _Room] = {}
        self._by_channel: dict[bytes, _Room] = {}
        self._inflight: set[defer.Deferred] = set()
        self._on_state = on_state
        self.broker = Broker(
            url,
            self._received,
            self._subscribed,
            self._channels_lost,
            self._state,
            reactor,
            name=f"chatd:{self.node}",
        )
        for name, source in SCRIPTS.items():
            self.broker.add_script(name, source)
        self._beat = task.LoopingCall(self._heartbeat)
        self._beat.clock = reactor
        self.stats.redis_up = 0

    def start(self) -> None:
        _log.info("cluster node {node} using {url}", node=self.node, url=str(self.broker.url))
        self.broker.start()
        self._beat.start(max(0.25, self.ttl / 4), now=False)

    # -- relay rooms --------------------------------------------------------
    def join(self, room: str, link: Link) -> None:
        if self.local.relay_add(room, link):
            self.broker.subscribe(relay_channel(room))

    def leave(self, room: str, link: Link) -> None:
        if self.local.relay_remove(room, link):
            self.broker.unsubscribe(relay_channel(room))

    def publish(self, room: str, payload: bytes, binary: bool) -> int:
        n = self.local.relay_send(room, payload, binary)
        if self.broker.commands is not None:
            flag = b"b" if binary else b"t"
            self.broker.publish(relay_channel(room), self._node_b + flag + payload)
        return n

    # -- chat rooms ---------------------------------------------------------
    def add_format(self, name: str, renderer: Renderer) -> None:
        self.local.renderers[name] = renderer

    def chat_join(
        self,
        room: str,
        link: Link,
        nick: str,
        fmt: str,
        since: int | None = None,
        unique: bool = True,
        snapshot: bool = True,
        epoch: str | None = None,
    ) -> defer.Deferred:
        if not self.broker.up:
            return defer.fail(Unavailable("redis is unreachable"))
        r = self._room(room)
        mid = r.mids.get(link)
        if mid is not None:  # joined already: history again, nothing else changes
            j = _Joining(link, mid, Member(nick, fmt, unique), since, snapshot, epoch)
            d = self._run_join(r, j)
            d.addCallback(lambda reply: self._joined(r, reply))
            return d
        if link in r.joining:
            return defer.fail(Unavailable("a join of this room is in progress"))
        self._serial += 1
        j = _Joining(
            link, f"{self.node}.{self._serial}", Member(nick, fmt, unique), since, snapshot, epoch
        )
        r.joining[link] = j
        r.by_mid[j.mid] = j
        if r.subscribed:
            self._start_join(r, j)
        else:
            r.before_sub.append(j)
        return j.d

    def _room(self, name: str) -> _Room:
        r = self._rooms.get(name)
        if r is None:
            base = chat_base(name)
            r = self._rooms[name] = _Room(name, base)
            self._by_channel[base.encode()] = r
            self.broker.subscribe(base.encode())
        return r

    def _forget_if_empty(self, r: _Room) -> None:
        if r.empty() and self._rooms.get(r.name) is r:
            del self._rooms[r.name]
            del self._by_channel[r.base.encode()]
            self.broker.unsubscribe(r.base.encode())

    def _run_join(self, r: _Room, j: _Joining) -> defer.Deferred:
        m = j.member
        key = limits.nick_key(m.nick) if m.unique else ""
        if not j.snapshot:
            mode = "none"
        elif j.since is None:
            mode = "recent"
        else:
            mode = "since"
        return self._script(
            "join",
            [
                f"{r.base}:m",
                f"{r.base}:k",
                f"chatd:node:{self.node}",
                f"{r.base}:seq",
                f"{r.base}:log",
                f"{r.base}:epoch",
            ],
            [
                j.mid,
                key,
                f"{key}\n{m.nick}",
                r.name,
                r.base,
                mode,
                j.since or 0,
                min(self.join_history, self.retention),
                j.epoch or "",
                new_epoch(),
                PAGE_ROWS,
            ],
        )

    def _start_join(self, r: _Room, j: _Joining) -> None:
        def answered(reply: list) -> None:
            if j.cancelled:
                if reply[0] == b"ok":
                    self._leave_script(r, j.mid)
                return
            if reply[0] != b"ok":
                self._drop_join(r, j, NickTaken(j.member.nick))
                return
            j.reply = reply
            self._maybe_live(r, j)

        def failed(f: Failure) -> None:
            if not j.cancelled:
                self._drop_join(r, j, Unavailable(f.getErrorMessage()))

        self._run_join(r, j).addCallbacks(answered, failed)

    def _unjoin(self, r: _Room, j: _Joining) -> None:
        if r.joining.get(j.link) is j:
            del r.joining[j.link]
        r.by_mid.pop(j.mid, None)
        r.marked.pop(j, None)

    def _drop_join(self, r: _Room, j: _Joining, error: Exception) -> None:
        self._unjoin(r, j)
        self._forget_if_empty(r)
        j.d.errback(error)

    def _joined(self, r: _Room, reply: list) -> Joined:
        _, _, last, truncated, values, entries, epoch, reset = reply
        history = [_message(r.name, e) for e in entries]
        if history and history[0].id > history[-1].id:  # XREVRANGE
            history.reverse()
        last = int(last)
        more = None
        if history and history[-1].id < last:  # a since read stopped at its COUNT
            more = _StreamCursor(self.broker, f"{r.base}:log", r.name, history[-1].id, last)
        return Joined(
            r.name,
            [_nick(v) for v in values],
            history,
            last,
            bool(truncated),
            epoch.decode() or None,
            bool(reset),
            more,
        )

    def _maybe_live(self, r: _Room, j: _Joining) -> None:
        """Both the reply and the marker are here: send ``joined``, then what came after."""
        if j.reply is None or not j.marked or r.joining.get(j.link) is not j:
            return
        self._unjoin(r, j)
        joined = self._joined(r, j.reply)
        self.local.chat_add(r.name, j.link, j.member)
        r.mids[j.link] = j.mid
        r.live[j.mid] = j.link
        # (held messages went through _event, which already counted them in last_id;
        # a reply of another epoch is older than what the channel said since)
        if r.epoch is None:
            r.epoch = joined.epoch
        if joined.epoch == r.epoch:
            r.last_id = max(r.last_id, joined.last_id)
        j.d.callback(joined)  # the protocol answers, and may handle frames that waited
        if r.mids.get(j.link) == j.mid:  # (one of which may have left the room again)
            self.local.send_to(j.link, j.member.fmt, j.held)

    def chat_leave(self, room: str, link: Link) -> bool:
        r = self._rooms.get(room)
        if r is None:
            return False
        j = r.joining.get(link)
        if j is not None:
            self._unjoin(r, j)
            j.cancelled = True
            if j in r.before_sub:
                r.before_sub.remove(j)
            elif j.reply is not None:
                self._leave_script(r, j.mid)
            self._drop_join(r, j, Unavailable("left before the join completed"))
            return False
        mid = r.mids.pop(link, None)
        if mid is None:
            return False
        del r.live[mid]
        member = self.local.chat_remove(room, link)
        if member is not None:
            self.local.presence(room, member.nick, "leave")
        self._leave_script(r, mid)
        self._forget_if_empty(r)
        return True

    def _leave_script(self, r: _Room, mid: str) -> None:
        now = self._rooms.get(r.name)  # the room may have been forgotten and made anew
        last = "1" if now is None or now.empty() else "0"
        if self.broker.up:  # else the resync after the reconnect removes it
            self._script(
                "leave",
                [f"{r.base}:m", f"{r.base}:k", f"chatd:node:{self.node}"],
                [mid, r.name, r.base, last],
            ).addErrback(lambda f: None)

    def post(self, room: str, sender: str, text: str, ref: Ref = None) -> defer.Deferred:
        """Id, store and publish in Redis; every node (this one too) delivers from there."""
        if not self.broker.up:
            return defer.fail(Unavailable("redis is unreachable"))
        tail: dict[str, object] = {"f": sender, "t": text}
        if ref is not None:
            tail["r"] = ref
        base = chat_base(room)
        d = self._script(
            "post",
            [f"{base}:seq", f"{base}:log", f"{base}:epoch"],
            [base, self.retention, sender, text, _tail(tail)[1:], new_epoch()],
        )

        def stored(reply: list) -> Message:
            return Message(room, int(reply[0]), int(reply[1]), sender, text, ref)

        return d.addCallbacks(stored, self._unavailable)

    @staticmethod
    def _unavailable(f: Failure) -> None:
        raise Unavailable(f.getErrorMessage())

    def flush(self) -> None:
        """Nothing is batched here: every post goes to Redis at once."""

    def rooms(self) -> dict[str, int]:
        return self.local.counts()

    def room_counts(self) -> dict[str, int]:
        return self.local.room_counts()

    # -- from Redis ---------------------------------------------------------
    def _received(self, channel: bytes, payload: bytes) -> None:
        if channel.startswith(b"chatd:r:"):
            if payload[:12] != self._node_b:
                room = channel[9:-1].decode()
                self.local.relay_send(room, payload[13:], payload[12:13] == b"b")
            return
        r = self._by_channel.get(channel)
        if r is None:
            return
        self.stats.cluster_events[payload[:1].decode()] += 1
        if r.filling is not None:
            r.filling.append(payload)
        else:
            self._event(r, payload)

    def _event(self, r: _Room, payload: bytes) -> None:
        kind, mid_b, rest = ([*payload.split(b" ", 2), b""])[:3]
        if kind == b"m":
            ts, tail = rest.split(b" ", 1)
            obj = json.loads(tail)
            epoch = obj.get("e")  # (None from a node older than epochs)
            if epoch != r.epoch and epoch is not None:
                if r.epoch is not None:  # Redis lost the room: read the new epoch first
                    self._fill(r, [payload])
                    return
                r.epoch = epoch
            ident = int(mid_b)
            if ident <= r.last_id:
                return  # read from the stream while filling a gap
            self._deliver(r, Message(r.name, ident, int(ts), obj["f"], obj["t"], obj.get("r")))
            return
        mid = mid_b.decode()
        ours = mid.startswith(self.node)
        if r.marked and kind in (b"j", b"l") and not (ours and kind == b"l"):
            item: _Held = ((r.name, _nick(rest), "join" if kind == b"j" else "leave"), {})
            for marked in r.marked:
                marked.held.append(item)
        # The members here are told before a joiner of this node goes live, whether
        # the join script's reply came before its marker or not: the joiner never
        # gets its own join. (A member live here already, written back by a resync,
        # is news to no one here.)
        if kind == b"j" and mid not in r.live:
            self.local.presence(r.name, _nick(rest), "join")
        elif kind == b"l" and not ours:  # this node told its own members at once
            self.local.presence(r.name, _nick(rest), "leave")
        j = r.by_mid.get(mid)
        if j is not None and not j.marked:
            j.marked = True
            r.marked[j] = None
            self._maybe_live(r, j)

    def _deliver(self, r: _Room, msg: Message) -> None:
        r.last_id = msg.id
        if r.marked:
            item: _Held = (msg, {})  # rendered at most once per format for all joiners
            for j in r.marked:
                j.held.append(item)
        self.local.deliver(msg)

    def _subscribed(self, channel: bytes) -> None:
        r = self._by_channel.get(channel)
        if r is None:
            return
        r.subscribed = True
        waiting, r.before_sub = r.before_sub, []
        for j in waiting:
            self._start_join(r, j)
        if r.gap and r.mids:
            self._fill(r)
        elif r.gap:  # no one here needs what was missed; the next join tells anew
            r.gap, r.epoch, r.last_id = False, None, 0

    def _fill(self, r: _Room, held: list | None = None) -> None:
        """Deliver what was published while the channel was down, then the rest, in order.

        Also how a new epoch is met (``held`` is its first message seen live):
        ids start again, so the new epoch's stream is read from its start,
        after a ``Reset`` for the members.
        """
        if r.filling is not None:  # one is under way: read again once it is done
            r.filling.extend(held or ())
            r.gap = True
            return
        r.gap = False
        r.filling = held or []
        d = self._script("fill", [f"{r.base}:epoch", f"{r.base}:log"], [r.epoch or "", r.last_id])

        def read(reply: list) -> None:
            epoch, entries = reply[0].decode() or None, reply[1]
            held = r.filling or []
            live = [(p, *_ident_epoch(p)) for p in held if p[:2] == b"m "]
            if epoch is None:  # none in Redis (lost again since?): the channel's says
                epoch = next((e for _, _, e in live if e is not None), None)
            if any(e not in (epoch, None) for _, _, e in live):
                # Of an epoch Redis no longer has (or, if newer, met again when its
                # next message comes): never shown as this epoch's.
                stale = {p for p, _, e in live if e not in (epoch, None)}
                held[:] = [p for p in held if p not in stale]
                live = [x for x in live if x[0] not in stale]
            # The channel's copies come next, and with their refs (the stream
            # has none): read only what precedes the first of them.
            first = live[0][1] if live else None
            if first is not None:
                entries = [e for e in entries if int(e[0].split(b"-", 1)[0]) < first]
            if entries:
                first = _message(r.name, entries[0]).id
            if epoch is not None and epoch != r.epoch:
                if r.epoch is not None:
                    r.last_id = (first or 1) - 1
                    self._reset(r, Reset(r.name, epoch, r.last_id))
                r.epoch = epoch
            for e in entries:
                msg = _message(r.name, e)
                if msg.id > r.last_id:
                    self._deliver(r, msg)
                    self.stats.cluster_events["gap"] += 1

        def done(result: object) -> None:
            held, r.filling = r.filling or [], None
            failed = isinstance(result, Failure)
            if failed:  # read again when Redis is back; its messages are in the stream
                r.gap = True
                held = [p for p in held if p[:1] != b"m"]
            for i, payload in enumerate(held):
                if r.filling is not None:  # another epoch began meanwhile
                    r.filling.extend(held[i:])
                    return
                self._event(r, payload)
            if r.gap and not failed and r.subscribed:
                self._fill(r)

        d.addCallback(read).addBoth(done)

    def _reset(self, r: _Room, event: Reset) -> None:
        """The room's history starts again (Redis lost it): members forget the old ids."""
        _log.warn("cluster: room {room} has a new history epoch (Redis lost its data)", room=r.name)
        self.stats.cluster_events["reset"] += 1
        if r.marked:
            item: _Held = (event, {})
            for j in r.marked:
                j.held.append(item)
        self.local.reset(event)

    def _state(self, up: bool) -> None:
        self.stats.redis_up = int(up)
        if up:
            self._resync()
            self._heartbeat()
            for r in tuple(self._rooms.values()):  # a read that failed while Redis was away
                if r.gap and r.subscribed and r.mids:
                    self._fill(r)
        else:
            for r in tuple(self._rooms.values()):
                for j in tuple(r.joining.values()):  # their markers or replies may be lost
                    j.cancelled = True
                    self._drop_join(r, j, Unavailable("redis connection lost"))
                r.before_sub = []
        if self._on_state is not None:
            self._on_state(up)

    def _channels_lost(self) -> None:
        """The pub/sub connection is gone: what is published now must be read back later."""
        for r in self._rooms.values():
            r.subscribed = False
            r.gap = r.gap or bool(r.mids)

    # -- membership upkeep --------------------------------------------------
    def _heartbeat(self) -> None:
        if self.broker.commands is None:
            return

        def beat(reply: list) -> None:
            known, reaped = int(reply[0]), int(reply[1])
            self.stats.cluster_reaped += reaped
            if not known and any(r.mids for r in self._rooms.values()):
                _log.warn("cluster: this node had been given up for dead; re-registering")
                self._resync()

        self._script("heartbeat", [NODES], [self.node, int(self.ttl * 1000)]).addCallbacks(
            beat, lambda f: None
        )

    def _resync(self) -> None:
        args: list[object] = [self.node]
        for r in self._rooms.values():
            for link, mid in r.mids.items():
                member = self.local.chat[r.name].members[link]
                key = limits.nick_key(member.nick) if member.unique else ""
                args += [r.name, mid, f"{key}\n{member.nick}"]

        def done(reply: list) -> None:
            for mid in reply[2]:
                _log.warn("cluster: nick of member {mid} was taken during an outage", mid=mid)

        self._script("resync", [NODES], args).addCallbacks(done, lambda f: None)

    def _script(self, name: str, keys: list, args: list) -> defer.Deferred:
        d = self.broker.script(name, keys, args)
        self._inflight.add(d)

        def settled(result: object) -> object:
            self._inflight.discard(d)
            if isinstance(result, Failure) and not result.check(Unavailable):
                if not result.check(BrokerDown):
                    _log.failure("cluster: script {name} failed", result, name=name)
                return Failure(Unavailable(result.getErrorMessage()))
            return result

        return d.addBoth(settled)

    @defer.inlineCallbacks
    def close(self):
        """Wait for what is in flight, take this node's members out, disconnect."""
        if self._beat.running:
            self._beat.stop()
        try:
            if self._inflight:
                pending = defer.DeferredList(list(self._inflight), consumeErrors=True)
                yield pending.addTimeout(CLOSE_TIMEOUT, self.reactor)
            if self.broker.up:
                yield self._script("goodbye", [NODES], [self.node]).addTimeout(
                    CLOSE_TIMEOUT, self.reactor
                )
        except Exception:  # Redis is slow or gone: the others' reaper cleans up after us
            _log.warn("cluster: could not say goodbye; members expire after cluster_ttl")
        yield self.broker.stop()

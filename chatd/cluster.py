"""Several chatd nodes as one chat, over Redis (``--redis URL``): the cluster broker.

``RedisBroker`` is the ``chatd.broker.Broker`` of a cluster node: the hub
above it (chatd/hub.py) is the same as on one node, and this module only
stores, orders and publishes. docs/SCALING.md says what Redis holds. How
it keeps the broker contract:

- **One order.** A chat message gets its id, is stored and is published by
  one Lua script (INCR, XADD, PUBLISH). Redis runs scripts one at a time, so
  every node receives a room's messages in id order, and a message is in
  Redis before any node delivers it: an acknowledged message (the sender
  sees it come back) survives any node dying.
- **The join marker.** The join script records the member, reads history
  and member list, and publishes the member's marker (``j``, or ``k`` for
  one there already) in one step; the hub holds what comes after the
  marker until the reply is here.
- **Users are counted once.** A room's ``:u`` hash counts each token
  user's member ids, changed by the same script as the member (join,
  leave, expiry, resync): ``j`` is published for a user's first member id,
  ``l`` after its last, so every node says a user's presence once.
- **History is read a page at a time.** The join script reads the first
  page of a ``since`` replay; ``_StreamCursor`` reads the rest with XRANGE
  as the client takes the pages. A replay that the stream's trimming
  overtakes fails (the connection is dropped) rather than skip messages.
- **Gaps are filled.** When the pub/sub connection comes back, the hub
  reads each room's messages after the last id delivered here (the
  ``fill`` script, ``read_after``) before the live ones, so nothing is
  lost or doubled.
- **Epochs: data loss is detected, not papered over.** Each room's history
  has an epoch, a random id the post script creates with the room's first id
  (or when its counter is gone) and publishes with every message. If Redis
  loses a room's data, the next post starts a new epoch at id 1; the hub
  (chatd/hub.py) meets it with a ``Reset``: no id means two texts within one
  epoch.
- **Dead nodes expire.** Each node scores itself in a sorted set every
  ``ttl/4`` seconds; any node's heartbeat script removes the members of
  nodes silent for ``ttl`` and publishes their ``leave``. A node that finds
  itself removed (it was cut off, or Redis lost its data) writes back its
  live members, as it does after every reconnect.
- **Edits, deletes and reactions** go through the post script too, which
  checks their target and applies them in the same step. A stream entry
  cannot be changed, so what they change is kept in the room's overlay set
  (``:x``) and merged into every read; a delete writes the room's log again
  without the deleted text (the cost of one read and write of the kept log).
- **Relay rooms** are best effort across nodes, as a relay is: delivered here
  at once, published for the other nodes while Redis is up.

While Redis is unreachable: chat sends and joins get ``unavailable``, relay
rooms keep working on this node, /healthz says ``degraded``, and the connection
(chatd/redisconn.py) reconnects with backoff; everything resumes by itself.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Generator
from dataclasses import replace
from typing import Any

from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from chatd import limits
from chatd.broker import (
    BrokerEvents,
    Duplicate,
    Joined,
    NickTaken,
    Page,
    Unavailable,
    once_per_user,
)
from chatd.history import MAX_REACTIONS, PAGE_BYTES, PAGE_ROWS, Message, Ref, Refused, new_epoch
from chatd.redisconn import RedisConnection, RedisDown
from chatd.stats import Stats

_log = Logger()
_tail = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode

# Every node's channel: "k <user>" closes that user's connections; "r <json>" asks
# a node to hand a resumed session over, "R <json>" is its answer (``resume``).
CONTROL = b"chatd:ctl"
CLOSE_TIMEOUT = 5.0  # seconds a stopping node waits for Redis before it goes anyway
NODES = "chatd:nodes"  # sorted set: node id -> last heartbeat, ms (Redis clock)


def chat_base(room: str) -> str:
    """Every key of a chat room starts so; the {room} hash tag keeps them together."""
    return f"chatd:c:{{{room}}}"


def relay_channel(room: str) -> bytes:
    return f"chatd:r:{{{room}}}".encode()


# Member values in a room's hash are "<limits.nick_key(nick) or ''>\n<nick>\n<user>"
# (a user's token sub, or '' for an anonymous member; a value without the third
# part, from an older node, is anonymous): the Lua side frees the nick without
# knowing Unicode case rules. A room's users hash (":u") counts each user's
# member ids, so a user's presence is published once: "j" for its first member
# id, "l" after its last (the others get a marker "k", or nothing).
_MEMBERS = r"""
local function user_of(v)
  local a = string.find(v, '\n', 1, true)
  local b = string.find(v, '\n', a + 1, true)
  if b then return string.sub(v, b + 1) end
  return ''
end
-- A member id was added (with value v): whether that is news (its user's first).
local function counted_in(users, v)
  local u = user_of(v)
  if u == '' then return true end
  return redis.call('HINCRBY', users, u, 1) == 1
end
-- A member id was removed: whether that is news (its user's last).
local function counted_out(users, v)
  local u = user_of(v)
  if u == '' then return true end
  if redis.call('HINCRBY', users, u, -1) <= 0 then
    redis.call('HDEL', users, u)
    return true
  end
  return false
end
"""

_PURGE = (
    _MEMBERS
    + r"""
-- The token users whose last member id a purge removed: {room, member id, value}...
local gone = {}
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
        if counted_out(base .. ':u', v) then
          redis.call('PUBLISH', base, 'l ' .. mid .. ' ' .. v)
          if user_of(v) ~= '' then
            table.insert(gone, room); table.insert(gone, mid); table.insert(gone, v)
          end
        end
        n = n + 1
      end
    end
  end
  if not keep then redis.call('DEL', rooms_key) end
  return n
end
"""
)

# A room's overlays (":x"), a sorted set scored by message id: one JSON object per
# message changed since it was stored, {"i": id, "t": edited text, "ed": latest edit,
# "eds": [edits], "del": the delete, "r": {emoji: [who]}, "v": the latest event,
# "b": a deleted entry's fields}. A stream entry cannot be rewritten: an edit's
# text lives here; a delete writes the log again without the message and its
# edits (the text is gone: XDEL would only flag them; this costs a read and a
# write of the room's kept log, a millisecond or two for a thousand messages,
# once per delete) and keeps "b" here so the id still reads as a deleted
# message. Reads merge them (``_messages``).
_SPAN = r"""
-- Entries of log with lo < id < hi (hi '': no bound), oldest first or newest first
-- (rev), at most count (0: all); and the overlays of the same span.
local function span(log, x, lo, hi, count, rev)
  local a, b = '(' .. lo .. '-0', '+'
  if hi ~= '' then b = '(' .. hi .. '-0' end
  local es
  if rev then
    if count > 0 then es = redis.call('XREVRANGE', log, b, a, 'COUNT', count)
    else es = redis.call('XREVRANGE', log, b, a) end
  elseif count > 0 then es = redis.call('XRANGE', log, a, b, 'COUNT', count)
  else es = redis.call('XRANGE', log, a, b) end
  local olo, ohi = '(' .. lo, '+inf'
  if hi ~= '' then ohi = '(' .. hi end
  if count > 0 and #es == count then  -- (cut by the count: overlays up to the last entry)
    local edge = string.match(es[#es][1], '^(%d+)')
    if rev then olo = edge else ohi = edge end
  end
  return es, redis.call('ZRANGEBYSCORE', x, olo, ohi)
end
"""

SCRIPTS = {
    # KEYS: seq, log, epoch, overlays, and the send's idempotency key if it has one.
    # ARGV: channel, retention, sender, text, JSON tail (an object without its "{"), a
    # new epoch in case the room needs one, the sender's user or '', the dedupe window
    # in ms, the history's time to live in ms (0: none), the kind ('' for a message),
    # its target, '1' if only the target's author may, who reacts. The epoch goes
    # into the published JSON as "e". Returns {id, ts}, {'dup', id, entries} when
    # the key made message id already, or {'refused', code} (nothing done then).
    # With a time to live, the oldest entries past it go as new ones come (a few a
    # post), and a quiet room's whole log expires with its last message (ids go
    # on: seq and epoch stay).
    "post": r"""
if KEYS[5] then
  local made = redis.call('GET', KEYS[5])
  if made then return {'dup', made, redis.call('XRANGE', KEYS[2], made .. '-0', made .. '-0')} end
end
local kind, target, ov, base = ARGV[10], ARGV[11], nil, nil
if kind ~= '' then  -- an event about message target: check it, before anything is done
  local es = redis.call('XRANGE', KEYS[2], target .. '-0', target .. '-0')
  if not es[1] then return {'refused', 'not_found'} end
  base = {}
  local flat = es[1][2]
  for i = 1, #flat, 2 do base[flat[i]] = flat[i + 1] end
  if base.k then return {'refused', 'not_found'} end
  if ARGV[12] == '1' and ((base.u or '') ~= ARGV[7] or (ARGV[7] == '' and base.f ~= ARGV[3])) then
    return {'refused', 'forbidden'}
  end
  local old = redis.call('ZRANGEBYSCORE', KEYS[4], target, target)[1]
  if old then ov = cjson.decode(old) else ov = {i = tonumber(target)} end
  if kind == 'react' then
    ov.r = ov.r or {}
    if not ov.r[ARGV[4]] then
      local n = 0
      for _ in pairs(ov.r) do n = n + 1 end
      if n >= {max_reactions} then return {'refused', 'too_many'} end
    end
  end
end
local epoch = redis.call('GET', KEYS[3])
local id = redis.call('INCR', KEYS[1])
if not epoch or id == 1 then  -- the room's first id (or its counter was lost): a new epoch
  epoch = ARGV[6]
  redis.call('SET', KEYS[3], epoch)
end
local t = redis.call('TIME')
local ts = t[1] .. string.format('%03d', math.floor(tonumber(t[2]) / 1000))
if tonumber(ARGV[2]) > 0 then
  local fields = {'ts', ts, 'f', ARGV[3], 't', ARGV[4]}
  if ARGV[7] ~= '' then table.insert(fields, 'u'); table.insert(fields, ARGV[7]) end
  if kind ~= '' then
    for _, v in ipairs({'k', kind, 'g', target}) do table.insert(fields, v) end
    if kind == 'edit' then
      ov.t, ov.ed = ARGV[4], id
      ov.eds = ov.eds or {}
      table.insert(ov.eds, id)
    elseif kind == 'delete' then
      -- The text goes, the message's and its edits': XDEL only flags an entry (its
      -- bytes stay in the stream's node), so the log is written again without them.
      local drop = {[tonumber(target)] = true}
      for _, e in ipairs(ov.eds or {}) do drop[e] = true end
      local all = redis.call('XRANGE', KEYS[2], '-', '+')
      redis.call('DEL', KEYS[2])
      for _, e in ipairs(all) do
        local n = tonumber(string.match(e[1], '^(%d+)'))
        if not drop[n] then
          redis.call('XADD', KEYS[2], e[1], unpack(e[2]))
        elseif n ~= tonumber(target) then  -- one of its edits: the id stays, as an overlay
          local f = {}
          for i = 1, #e[2], 2 do f[e[2][i]] = e[2][i + 1] end
          redis.call('ZADD', KEYS[4], n, cjson.encode(
            {i = n, b = {ts = tonumber(f.ts), f = f.f, u = f.u, k = 'edit', g = tonumber(target)}}))
        end
      end
      ov = {i = ov.i, del = id, b = {ts = tonumber(base.ts), f = base.f, u = base.u}}
    elseif kind == 'react' then
      local who, l = ARGV[13], ov.r[ARGV[4]] or {}
      local seen = false
      for _, w in ipairs(l) do if w == who then seen = true end end
      if not seen then table.insert(l, who) end
      ov.r[ARGV[4]] = l
    elseif ov.r and ov.r[ARGV[4]] then  -- unreact
      local l = {}
      for _, w in ipairs(ov.r[ARGV[4]]) do if w ~= ARGV[13] then table.insert(l, w) end end
      if #l > 0 then ov.r[ARGV[4]] = l else ov.r[ARGV[4]] = nil end
    end
    ov.v = id
    redis.call('ZREMRANGEBYSCORE', KEYS[4], target, target)
    redis.call('ZADD', KEYS[4], target, cjson.encode(ov))
  end
  -- The last `retention` ids are kept (deleted ones among them, as overlays).
  local floor = id - tonumber(ARGV[2])
  redis.call('XADD', KEYS[2], 'MINID', math.max(floor + 1, 0), id .. '-0', unpack(fields))
  local ttl = tonumber(ARGV[9])
  if ttl > 0 then
    local cutoff = tonumber(ts) - ttl
    local keep = id .. '-0'
    for _, e in ipairs(redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 8)) do
      if tonumber(e[2][2]) >= cutoff then keep = e[1]; break end
    end
    redis.call('XTRIM', KEYS[2], 'MINID', keep)
    floor = math.max(floor, tonumber(string.match(keep, '^(%d+)')) - 1)
    redis.call('PEXPIRE', KEYS[2], ttl)
    redis.call('PEXPIRE', KEYS[4], ttl)
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', floor)  -- overlays of trimmed messages
end
redis.call('PUBLISH', ARGV[1], 'm ' .. id .. ' ' .. ts .. ' {"e":"' .. epoch .. '",' .. ARGV[5])
if KEYS[5] then redis.call('SET', KEYS[5], id, 'PX', ARGV[8]) end
return {id, ts}
""".replace("{max_reactions}", str(MAX_REACTIONS)),
    # KEYS: members, nicks, node rooms, seq, log, epoch, users, read markers, overlays.
    # ARGV: member id, nick key, value, room, channel, 'since'|'recent'|'none', since,
    # count, the client's epoch or '', a new epoch for a room from before epochs, how
    # many entries at most after since (the rest is read in pages: _StreamCursor),
    # whose read marker to give ('' for none), '1' for a silent listener (nothing
    # recorded: only its marker is published). Returns {'ok', new, last, truncated,
    # member values, entries, epoch or '', reset, read marker, overlays, unread}.
    "join": _MEMBERS
    + _SPAN
    + r"""
local mid, new = ARGV[1], 0
if ARGV[13] == '1' then  -- a listener, not a member: its marker only, nothing recorded
  redis.call('PUBLISH', ARGV[5], 'k ' .. mid)
else
  if ARGV[2] ~= '' then
    local holder = redis.call('HGET', KEYS[2], ARGV[2])
    if holder and holder ~= mid then return {'taken'} end
    redis.call('HSET', KEYS[2], ARGV[2], mid)
  end
  new = redis.call('HSET', KEYS[1], mid, ARGV[3])
  redis.call('SADD', KEYS[3], ARGV[4])
  if new == 1 and counted_in(KEYS[7], ARGV[3]) then
    redis.call('PUBLISH', ARGV[5], 'j ' .. mid .. ' ' .. ARGV[3])
  else
    redis.call('PUBLISH', ARGV[5], 'k ' .. mid)
  end
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
local entries, overlays, truncated = {}, {}, 0
local read, unread = 0, 0
if ARGV[12] ~= '' then
  read = tonumber(redis.call('HGET', KEYS[8], ARGV[12]) or '0')
  if read < last then  -- messages after it, not edits, deletes or reactions (O(unread))
    for _, e in ipairs(redis.call('XRANGE', KEYS[5], '(' .. read .. '-0', '+')) do
      local plain = true
      for i = 1, #e[2], 2 do if e[2][i] == 'k' then plain = false end end
      if plain then unread = unread + 1 end
    end
  end
end
if mode == 'since' then
  local since = tonumber(ARGV[7])
  if since < last then
    entries, overlays = span(KEYS[5], KEYS[9], since, '', tonumber(ARGV[11]), false)
    local first = last + 1
    if #entries > 0 then first = tonumber(string.match(entries[1][1], '^(%d+)')) end
    if #overlays > 0 then first = math.min(first, cjson.decode(overlays[1]).i) end
    if first > since + 1 then truncated = 1 end
  end
elseif mode == 'none' then
  return {'ok', new, last, 0, {}, {}, epoch, reset, read, {}, unread}
elseif tonumber(ARGV[8]) > 0 then
  entries, overlays = span(KEYS[5], KEYS[9], 0, '', tonumber(ARGV[8]), true)
end
return {'ok', new, last, truncated, redis.call('HVALS', KEYS[1]), entries, epoch, reset, read,
        overlays, unread}
""",
    # KEYS: read markers, seq. ARGV: reader, id, channel, the event's JSON tail
    # ([user, name] without its "]"). Returns the marker as it is now; publishes
    # 'r 0 [user, name, id]' when it moved.
    "read": r"""
local id = math.min(tonumber(ARGV[2]), tonumber(redis.call('GET', KEYS[2]) or '0'))
local now = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if id > now then
  redis.call('HSET', KEYS[1], ARGV[1], id)
  redis.call('PUBLISH', ARGV[3], 'r 0 ' .. ARGV[4] .. ',' .. id .. ']')
  return id
end
return now
""",
    # KEYS: epoch, log, overlays. ARGV: the epoch known here or '', the last id
    # delivered here. Returns {epoch or '', entries, overlays}: those after that id,
    # or all if the epoch changed.
    "fill": _SPAN
    + r"""
local epoch = redis.call('GET', KEYS[1]) or ''
local after = ARGV[2]
if ARGV[1] ~= '' and epoch ~= '' and epoch ~= ARGV[1] then after = 0 end
local entries, overlays = span(KEYS[2], KEYS[3], after, '', 0, false)
return {epoch, entries, overlays}
""",
    # KEYS: log, overlays, epoch. ARGV: after, before or '', count, '1' for the newest
    # first. Returns {entries, overlays, epoch or ''} (read_page and _StreamCursor).
    "span": _SPAN
    + r"""
local es, ovs = span(KEYS[1], KEYS[2], ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4] == '1')
return {es, ovs, redis.call('GET', KEYS[3]) or ''}
""",
    # KEYS: members, nicks, node rooms, users. ARGV: member id, room, channel, '1' if
    # the node's last member of the room.
    "leave": _MEMBERS
    + r"""
if ARGV[4] == '1' then redis.call('SREM', KEYS[3], ARGV[2]) end
local v = redis.call('HGET', KEYS[1], ARGV[1])
if not v then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
local key = string.sub(v, 1, string.find(v, '\n', 1, true) - 1)
if key ~= '' and redis.call('HGET', KEYS[2], key) == ARGV[1] then
  redis.call('HDEL', KEYS[2], key)
end
if counted_out(KEYS[4], v) then redis.call('PUBLISH', ARGV[3], 'l ' .. ARGV[1] .. ' ' .. v) end
return 1
""",
    # KEYS: nodes. ARGV: node, ttl in ms. Returns {known before, members reaped,
    # (room, member id, value) of each token user gone with them}.
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
if known then return {1, reaped, gone} end
return {0, reaped, gone}
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
      if counted_in(base .. ':u', v) then redis.call('PUBLISH', base, 'j ' .. mid .. ' ' .. v) end
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
        None,
        fields.get(b"u", b"").decode(),
        fields.get(b"k", b"").decode(),
        int(fields.get(b"g", 0)),
    )


def _messages(room: str, entries: list, overlays: list) -> list[Message]:
    """Messages as they are now, oldest first: stream entries (in either order) with
    their overlays applied, and deleted messages from theirs (see ``_SPAN``)."""
    msgs = [_message(room, e) for e in entries]
    if msgs and msgs[0].id > msgs[-1].id:  # (XREVRANGE)
        msgs.reverse()
    if not overlays:
        return msgs
    by_id = {m.id: m for m in msgs}
    for raw in overlays:
        ov = json.loads(raw)
        i = int(ov["i"])
        msg = by_id.get(i)
        if msg is None:
            b = ov.get("b")
            if b is None:
                continue  # (the overlay of an entry trimmed meanwhile)
            msg = Message(
                room,
                i,
                int(b["ts"]),
                b["f"],
                "",
                None,
                b.get("u", ""),
                b.get("k", ""),
                int(b.get("g", 0)),
            )
        by_id[i] = replace(
            msg,
            text="" if "del" in ov else ov.get("t", msg.text),
            edited=int(ov.get("ed", 0)),
            deleted=int(ov.get("del", 0)),
            updated=int(ov.get("v", 0)),
            reactions=ov.get("r") or None,
        )
    return [by_id[i] for i in sorted(by_id)]


class _StreamCursor:
    """The rest of a ``since`` replay, read from the room's stream a page at a time.

    Redis trims the stream (MINID) as messages come: if more than the
    retention were posted while a client was still reading its replay, what
    it had not read yet is gone, and the read fails (the connection is
    dropped; the client resumes with ``since`` and is told ``truncated``).
    """

    __slots__ = ("after", "base", "room", "rows", "script", "until")

    def __init__(
        self,
        script: Callable[[str, list[object], list[object]], defer.Deferred[Any]],
        room: str,
        after: int,
        until: int,
    ) -> None:
        self.script, self.base, self.room = script, chat_base(room), room
        self.after, self.until = after, until
        self.rows = PAGE_ROWS

    def read(self) -> defer.Deferred:
        base = self.base
        d = self.script(
            "span",
            [f"{base}:log", f"{base}:x", f"{base}:epoch"],
            [self.after, self.until + 1, self.rows, "0"],
        )
        return d.addCallback(self._got)

    def _got(self, reply: list) -> list[Message]:
        msgs = _messages(self.room, reply[0], reply[1])
        if not msgs or msgs[0].id != self.after + 1:
            raise Unavailable(f"history of {self.room} after {self.after} was trimmed")
        self.after = msgs[-1].id
        size = sum(len(m.text) for m in msgs) // len(msgs) + 100
        self.rows = max(4, min(1024, PAGE_BYTES // size + 1))
        return msgs


def _unavailable(f: Failure) -> Failure:
    return Failure(Unavailable(f.getErrorMessage()))


def _member(value: bytes) -> tuple[str, str]:
    """(nick, user) of a member value (see ``_MEMBERS``)."""
    _, nick, user = (*value.decode().split("\n", 2), "")[:3]
    return nick, user


def _value(nick: str, unique: bool, user: str) -> str:
    key = limits.nick_key(nick) if unique else ""
    return f"{key}\n{nick}\n{user}"


_KINDS = {b"j": "join", b"l": "leave", b"k": "mark"}
_REFUSALS = {  # (as chatd.history says them)
    "not_found": "no message {target} is kept in {room}",
    "forbidden": "message {target} of {room} is not yours",
    "too_many": f"message {{target}} has {MAX_REACTIONS} different reactions",
}


class RedisBroker:
    """The ``Broker`` of a cluster node: ids, history, presence and publication in Redis."""

    def __init__(
        self,
        url: str,
        retention: int = limits.HISTORY_SIZE,
        ttl: float = limits.CLUSTER_TTL,
        stats: Stats | None = None,
        on_state: Callable[[bool], None] | None = None,
        reactor: Any = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.stats = stats if stats is not None else Stats()
        self.retention, self.ttl = retention, ttl
        self.dedupe_ms = int(limits.DEDUPE_WINDOW * 1000)  # idempotency keys kept this long
        self.ttl_ms = 0  # messages older than this (ms) are dropped too (0: by count alone)
        self.node = secrets.token_hex(6)
        self._node_b = self.node.encode()
        self._by_channel: dict[bytes, str] = {}  # subscribed chat channels -> room
        self._inflight: set[defer.Deferred[Any]] = set()
        self._on_state = on_state
        self.events: BrokerEvents | None = None
        self._asks: dict[str, tuple[defer.Deferred[list[str] | None], Any]] = {}
        self._serial = 0
        self.conn = RedisConnection(
            url,
            self._received,
            self._subscribed,
            self._channels_lost,
            self._state,
            reactor,
            name=f"chatd:{self.node}",
        )
        for name, source in SCRIPTS.items():
            self.conn.add_script(name, source)
        self._beat = task.LoopingCall(self._heartbeat)
        self._beat.clock = reactor
        self.stats.redis_up = 0

    @property
    def up(self) -> bool:
        return self.conn.up

    def attach(self, events: BrokerEvents) -> None:
        self.events = events

    def start(self) -> None:
        _log.info("cluster node {node} using {url}", node=self.node, url=str(self.conn.url))
        self.conn.subscribe(CONTROL)
        self.conn.start()
        self._beat.start(max(0.25, self.ttl / 4), now=False)

    # -- the streams of chat rooms ------------------------------------------------
    def subscribe(self, room: str) -> None:
        channel = chat_base(room).encode()
        self._by_channel[channel] = room
        self.conn.subscribe(channel)

    def unsubscribe(self, room: str) -> None:
        channel = chat_base(room).encode()
        self._by_channel.pop(channel, None)
        self.conn.unsubscribe(channel)

    def publish(
        self,
        room: str,
        sender: str,
        text: str,
        ref: Ref = None,
        user: str = "",
        key: str = "",
        kind: str = "",
        target: int = 0,
        author: bool = False,
    ) -> defer.Deferred[Message]:
        """Id, store and publish in one script; every node (this one too) delivers from there."""
        if not self.conn.up:
            return defer.fail(Unavailable("redis is unreachable"))
        tail: dict[str, object] = {"f": sender, "t": text}
        if ref is not None:
            tail["r"] = ref
        if user:
            tail["u"] = user
        if kind:
            tail["k"], tail["g"] = kind, target
        base = chat_base(room)
        keys: list[object] = [f"{base}:seq", f"{base}:log", f"{base}:epoch", f"{base}:x"]
        if key:
            keys.append(f"{base}:send:{key}")
        d = self._script(
            "post",
            keys,
            [
                base,
                self.retention,
                sender,
                text,
                _tail(tail)[1:],
                new_epoch(),
                user,
                self.dedupe_ms,
                self.ttl_ms,
                kind,
                target,
                "1" if author else "0",
                user or sender,
            ],
        )

        def stored(reply: list[Any]) -> Message:
            if reply[0] == b"dup":
                made = int(reply[1])
                if reply[2]:
                    raise Duplicate(_message(room, reply[2][0]))
                raise Duplicate(Message(room, made, 0, "", ""))  # (retention dropped it)
            if reply[0] == b"refused":
                code = reply[1].decode()
                raise Refused(code, _REFUSALS[code].format(target=target, room=room))
            msg = Message(room, int(reply[0]), int(reply[1]), sender, text, ref, user)
            return replace(msg, kind=kind, target=target) if kind else msg

        return d.addCallback(stored)

    def flush(self) -> None:
        """Nothing is batched here: every post goes to Redis at once."""

    def read_after(
        self, room: str, epoch: str | None, after: int
    ) -> defer.Deferred[tuple[str | None, list[Message]]]:
        base = chat_base(room)
        d = self._script(
            "fill", [f"{base}:epoch", f"{base}:log", f"{base}:x"], [epoch or "", after]
        )

        def read(reply: list[Any]) -> tuple[str | None, list[Message]]:
            return reply[0].decode() or None, _messages(room, reply[1], reply[2])

        return d.addCallback(read)

    def read_page(
        self, room: str, after: int, before: int | None, limit: int, newest: bool
    ) -> defer.Deferred[Page]:
        """One script: XRANGE (or XREVRANGE) of the room's stream, their overlays, and
        the epoch the ids count in."""
        base = chat_base(room)
        d = self._script(
            "span",
            [f"{base}:log", f"{base}:x", f"{base}:epoch"],
            [after, before if before is not None else "", limit + 1, "1" if newest else "0"],
        )

        def read(reply: list[Any]) -> Page:
            msgs = _messages(room, reply[0], reply[1])
            more = len(msgs) > limit
            msgs = msgs[max(0, len(msgs) - limit) :] if newest else msgs[:limit]
            return Page(msgs, more, reply[2].decode() or None)

        return d.addCallback(read)

    # -- presence ---------------------------------------------------------------
    def join(
        self,
        room: str,
        mid: str,
        nick: str,
        unique: bool,
        since: int | None,
        snapshot: bool,
        count: int,
        epoch: str | None,
        user: str = "",
        reader: str = "",
        silent: bool = False,
    ) -> defer.Deferred[Joined]:
        key = limits.nick_key(nick) if unique else ""
        if not snapshot:
            mode = "none"
        elif since is None:
            mode = "recent"
        else:
            mode = "since"
        base = chat_base(room)
        d = self._script(
            "join",
            [
                f"{base}:m",
                f"{base}:k",
                f"chatd:node:{self.node}",
                f"{base}:seq",
                f"{base}:log",
                f"{base}:epoch",
                f"{base}:u",
                f"{base}:read",
                f"{base}:x",
            ],
            [
                mid,
                key,
                _value(nick, unique, user),
                room,
                base,
                mode,
                since or 0,
                min(count, self.retention),
                epoch or "",
                new_epoch(),
                PAGE_ROWS,
                reader,
                "1" if silent else "0",
            ],
        )

        def answered(reply: list[Any]) -> Joined:
            if reply[0] != b"ok":
                raise NickTaken(nick)
            return self._joined(room, reply)

        return d.addCallback(answered)

    def _joined(self, room: str, reply: list[Any]) -> Joined:
        _, _, last, truncated, values, entries, epoch, reset, read, overlays, unread = reply
        history = _messages(room, entries, overlays)
        last = int(last)
        more = None
        if history and history[-1].id < last:  # a since read stopped at its COUNT
            more = _StreamCursor(self._script, room, history[-1].id, last)
        return Joined(
            room,
            once_per_user(_member(v) for v in values),
            history,
            last,
            bool(truncated),
            epoch.decode() or None,
            bool(reset),
            more,
            int(read),
            int(unread),
        )

    def mark_read(
        self, room: str, reader: str, id: int, user: str, name: str
    ) -> defer.Deferred[int]:
        base = chat_base(room)
        d = self._script(
            "read",
            [f"{base}:read", f"{base}:seq"],
            [reader, id, base, _tail([user, name])[:-1]],
        )
        return d.addCallback(int)

    def leave(self, room: str, mid: str, last: bool) -> None:
        if self.conn.up:  # else the resync after the reconnect removes it
            base = chat_base(room)
            self._script(
                "leave",
                [f"{base}:m", f"{base}:k", f"chatd:node:{self.node}", f"{base}:u"],
                [mid, room, base, "1" if last else "0"],
            ).addErrback(lambda f: None)

    def members(self, room: str) -> defer.Deferred[list[str]]:
        d = self.conn.call("HVALS", f"{chat_base(room)}:m")
        return d.addCallbacks(
            lambda values: once_per_user(_member(v) for v in values), _unavailable
        )

    def kick(self, user: str) -> None:
        """Published to every node, this one included (the one path for all)."""
        self.conn.publish(CONTROL, b"k " + user.encode())

    def resume(self, node: str, secret: str, user: str) -> defer.Deferred[list[str] | None]:
        """Asked on the control channel; the node holding the session answers there."""
        if not self.conn.up:
            return defer.succeed(None)
        self._serial += 1
        ask = f"{self.node}.{self._serial}"
        d: defer.Deferred[list[str] | None] = defer.Deferred()
        timer = self.reactor.callLater(limits.RESUME_ASK_TIMEOUT, self._answered, ask, None)
        self._asks[ask] = (d, timer)
        self.conn.publish(CONTROL, b"r " + _tail([ask, node, secret, user]).encode())
        return d

    def _control(self, head: bytes, args: list[Any]) -> None:
        events = self.events
        assert events is not None
        if head == b"r ":
            ask, node, secret, user = args
            if node == self.node:  # the session is ours: close it, say its rooms
                # (its leaves go out on this connection before the answer does)
                rooms = events.resume(str(secret), str(user))
                self.conn.publish(CONTROL, b"R " + _tail([ask, rooms]).encode())
        else:
            ask, rooms = args
            if isinstance(rooms, list) and all(isinstance(r, str) for r in rooms):
                self._answered(str(ask), rooms)
            else:
                self._answered(str(ask), None)

    def _answered(self, ask: str, rooms: list[str] | None) -> None:
        pending = self._asks.pop(ask, None)
        if pending is None:
            return
        d, timer = pending
        if timer.active():
            timer.cancel()
        d.callback(rooms)

    def typing(self, room: str, user: str, name: str) -> None:
        """On the room's channel, so it reaches the nodes holding its members."""
        if self.conn.commands is not None:
            self.conn.publish(chat_base(room).encode(), b"t 0 " + _tail([user, name]).encode())

    # -- relay rooms --------------------------------------------------------
    def relay_subscribe(self, room: str) -> None:
        self.conn.subscribe(relay_channel(room))

    def relay_unsubscribe(self, room: str) -> None:
        self.conn.unsubscribe(relay_channel(room))

    def relay_publish(self, room: str, payload: bytes, binary: bool) -> None:
        if self.conn.commands is not None:
            flag = b"b" if binary else b"t"
            self.conn.publish(relay_channel(room), self._node_b + flag + payload)

    # -- from Redis ---------------------------------------------------------
    def _received(self, channel: bytes, payload: bytes) -> None:
        events = self.events
        assert events is not None
        if channel == CONTROL:
            head, body = payload[:2], payload[2:]
            if head == b"k ":
                events.kicked(body.decode())
            elif head in (b"r ", b"R "):
                try:
                    self._control(head, json.loads(body))
                except (ValueError, TypeError):
                    _log.warn("cluster: a malformed control message was ignored")
            return
        if channel.startswith(b"chatd:r:"):
            if payload[:12] != self._node_b:
                events.relay(channel[9:-1].decode(), payload[13:], payload[12:13] == b"b")
            return
        room = self._by_channel.get(channel)
        if room is None:
            return
        kind, mid_b, rest = ([*payload.split(b" ", 2), b""])[:3]
        self.stats.cluster_events[kind.decode()] += 1
        if kind == b"m":
            ts, tail = rest.split(b" ", 1)
            obj = json.loads(tail)
            msg = Message(
                room,
                int(mid_b),
                int(ts),
                obj["f"],
                obj["t"],
                obj.get("r"),
                obj.get("u", ""),
                obj.get("k", ""),
                obj.get("g", 0),
            )
            events.message(room, msg, obj.get("e"))  # (no "e" from a node older than epochs)
        elif kind == b"k":
            events.presence(room, mid_b.decode(), "", "mark", "")
        elif kind in _KINDS:
            nick, user = _member(rest)
            events.presence(room, mid_b.decode(), nick, _KINDS[kind], user)
        elif kind == b"t":
            user, name = json.loads(rest)
            events.typing(room, str(user), str(name))
        elif kind == b"r":
            user, name, id = json.loads(rest)
            events.read(room, str(user), str(name), int(id))

    def _subscribed(self, channel: bytes) -> None:
        room = self._by_channel.get(channel)
        if room is not None and self.events is not None:
            self.events.subscribed(room)

    def _channels_lost(self) -> None:
        if self.events is not None:
            self.events.channels_lost()

    def _state(self, up: bool) -> None:
        self.stats.redis_up = int(up)
        self.stats.redis_reconnects = self.conn.reconnects
        if up:
            self._resync()
            self._heartbeat()
        if self.events is not None:
            self.events.state(up)
        if self._on_state is not None:
            self._on_state(up)

    # -- membership upkeep --------------------------------------------------
    def _heartbeat(self) -> None:
        if self.conn.commands is None:
            return

        def beat(reply: list[Any]) -> None:
            known, reaped = int(reply[0]), int(reply[1])
            self.stats.cluster_reaped += reaped
            gone = reply[2]
            if self.events is not None:  # (this node reaped them: it alone says so)
                for i in range(0, len(gone), 3):
                    nick, user = _member(gone[i + 2])
                    self.events.expired(gone[i].decode(), gone[i + 1].decode(), nick, user)
            if not known and self.events is not None and any(self.events.live_members()):
                _log.warn("cluster: this node had been given up for dead; re-registering")
                self._resync()

        self._script("heartbeat", [NODES], [self.node, int(self.ttl * 1000)]).addCallbacks(
            beat, lambda f: None
        )

    def _resync(self) -> None:
        args: list[object] = [self.node]
        if self.events is not None:
            for room, mid, nick, unique, user in self.events.live_members():
                args += [room, mid, _value(nick, unique, user)]

        def done(reply: list[Any]) -> None:
            for mid in reply[2]:
                _log.warn("cluster: nick of member {mid} was taken during an outage", mid=mid)

        self._script("resync", [NODES], args).addCallbacks(done, lambda f: None)

    def _script(self, name: str, keys: list[object], args: list[object]) -> defer.Deferred[Any]:
        d = self.conn.script(name, keys, args)
        self._inflight.add(d)

        def settled(result: object) -> object:
            self._inflight.discard(d)
            if isinstance(result, Failure) and not result.check(Unavailable):
                if not result.check(RedisDown):
                    _log.failure("cluster: script {name} failed", result, name=name)
                return Failure(Unavailable(result.getErrorMessage()))
            return result

        return d.addBoth(settled)

    @defer.inlineCallbacks
    def close(self) -> Generator[defer.Deferred[Any], object, None]:
        """Wait for what is in flight, take this node's members out, disconnect."""
        if self._beat.running:
            self._beat.stop()
        for ask in tuple(self._asks):  # no answer now: those clients join afresh
            self._answered(ask, None)
        try:
            if self._inflight:
                pending = defer.DeferredList(list(self._inflight), consumeErrors=True)
                yield pending.addTimeout(CLOSE_TIMEOUT, self.reactor)
            if self.conn.up:
                yield self._script("goodbye", [NODES], [self.node]).addTimeout(
                    CLOSE_TIMEOUT, self.reactor
                )
        except Exception:  # Redis is slow or gone: the others' reaper cleans up after us
            _log.warn("cluster: could not say goodbye; members expire after cluster_ttl")
        yield self.conn.stop()

"""Chat history in SQLite: ids per room, retention, replay after an id.

Every accepted chat message is appended here before it is broadcast, so a
client that reconnects with ``since`` sees everything it missed, and a
restarted daemon keeps its history.

Cost on the reactor thread: appends are grouped per reactor turn (one
``commit`` per batch, WAL journal, ``synchronous=NORMAL``): tens of
microseconds for a message committed alone, a fraction of that in batches
(``python -m bench.chat`` measures it; bench/RESULTS-chat.md has the newest
run). A committed WAL write survives the process being killed;
``synchronous=NORMAL`` may lose the last transactions on power loss, which
``--db-sync full`` trades for an fsync per batch. Reads are bounded by the
retention, through the primary key.

Edits, deletes and reactions (``Message.kind``) are rows too, and change
their target's row in the same transaction (``append``): the current text,
``edited``, ``deleted``, ``updated``; reactions in table ``reactions``. A
deleted message's text is overwritten, and leaves the disk: ``secure_delete``
zeroes freed space, and a batch with a delete is checkpointed out of the WAL.

Each room's history has an **epoch**: a random id created with the room's
first id (table ``rooms``; a database made before epochs gets one for a room
that has messages on first use). Ids are only comparable within one epoch:
a database replaced or deleted starts its rooms at id 1 again under a new
epoch, so a client holding ids from the old one can tell (docs/PROTOCOL.md).
With ``retention`` 0 nothing is stored and ids restart with the process, so
the epoch lives in memory and is new each run too.

A send with an idempotency key (a client's ``cid``) records, in the same
transaction as the message, which message the key made (table ``sends``,
trimmed with the messages); ``sent`` finds it again within the dedupe
window, across restarts (in memory without storage). Read markers (table
``reads``) are one row per room and reader, only ever moved up.

A long replay is read in pages (``page`` and its ``Cursor``), as fast as
the client takes it, not all at once: a batch is sized to about a 64 KiB
page from the sizes of the previous one. While a cursor is open on a room,
trimming that room keeps what the cursor has still to read, so a slow
replay has no gap; the table then holds, for as long as the replay lasts,
up to the messages posted meanwhile beyond the retention.
"""

from __future__ import annotations

import contextlib
import secrets
import sqlite3
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    room TEXT NOT NULL,
    id INTEGER NOT NULL,
    ts INTEGER NOT NULL,          -- milliseconds since the epoch
    sender TEXT NOT NULL,
    text TEXT NOT NULL,
    user TEXT,                    -- the sender's token sub; NULL for anonymous senders
    kind TEXT,                    -- NULL for a message; 'edit', 'delete', 'react', 'unreact'
    target INTEGER,               -- the message an edit, delete or reaction is about
    edited INTEGER,               -- a message's latest edit (its id); its text is the edited one
    deleted INTEGER,              -- the delete that removed a message's text (its id)
    updated INTEGER,              -- the latest edit, delete or reaction applied to a message
    PRIMARY KEY (room, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS reactions (
    room TEXT NOT NULL,
    target INTEGER NOT NULL,      -- the message reacted to
    emoji TEXT NOT NULL,
    who TEXT NOT NULL,            -- the reacting user's sub, or an anonymous member's nick
    PRIMARY KEY (room, target, emoji, who)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rooms (
    room TEXT PRIMARY KEY,
    epoch TEXT NOT NULL           -- created with the room's first id
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS reads (
    room TEXT NOT NULL,
    who TEXT NOT NULL,            -- "@<sub>" for a token user, "~<nick key>" otherwise
    id INTEGER NOT NULL,          -- the last message it has read; never moves back
    PRIMARY KEY (room, who)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sends (
    room TEXT NOT NULL,
    key TEXT NOT NULL,            -- the sender's idempotency key (who, and the client's cid)
    id INTEGER NOT NULL,          -- the message it made
    ts INTEGER NOT NULL,          -- milliseconds since the epoch
    PRIMARY KEY (room, key)
) WITHOUT ROWID;
"""


def new_epoch() -> str:
    """A fresh epoch: 9 random bytes as 12 url-safe characters."""
    return secrets.token_urlsafe(9)


# Rooms whose last id and epoch are kept in memory, least recently used out:
# any client can name new rooms, so the cache must not grow with every name
# ever joined. An evicted room's values are read back from the database
# (with retention 0 there is none: the room's ids restart under a new epoch).
ROOM_CACHE = 10_000

PAGE_ROWS = 16  # rows of a first read (at most 256 KiB of text); later ones aim at PAGE_BYTES
PAGE_BYTES = 64 * 1024


# A client's tag for a request, echoed back: a string or an integer (chatd.session checks it).
Ref = str | int | None


# A message's reactions: emoji -> who reacted with it (a user's sub, an anonymous nick).
Reactions = dict[str, list[str]]

KINDS = ("edit", "delete", "react", "unreact")  # the events about an earlier message
MAX_REACTIONS = 20  # different emoji on one message


@dataclass(frozen=True, slots=True)
class Message:
    room: str
    id: int
    ts: int
    sender: str
    text: str  # an edit's new text, a reaction's emoji; "" for a delete and a deleted message
    ref: Ref = None
    user: str = ""  # the sender's token ``sub`` ("" for an anonymous sender or the back end)
    kind: str = ""  # "" for a message; one of KINDS for an event about ``target``
    target: int = 0
    edited: int = 0  # a message's latest edit (its id; 0: never edited), as read from storage
    deleted: int = 0  # the delete that removed a message's text (its id; 0: not deleted)
    updated: int = 0  # the latest event applied to a message (its id; 0: none)
    reactions: Reactions | None = field(default=None, compare=False)


class Refused(Exception):
    """An edit, delete or reaction that cannot be: ``code`` says why (``not_found``:
    no such message kept, or it was deleted; ``forbidden``: not the author's;
    ``too_many``: ``MAX_REACTIONS`` different emoji already)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


_COLUMNS = "id, ts, sender, text, user, kind, target, edited, deleted, updated"


class History:
    """One SQLite database; ``retention`` messages kept per room (0: none stored)."""

    def __init__(
        self, path: str, retention: int = 1000, sync: str = "normal", busy_timeout: float = 0.1
    ) -> None:
        self.path = path
        self.retention = retention
        # The database is chatd's alone; if something else locks it, fail fast
        # (the client gets "unavailable") rather than stall the reactor.
        self.db = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False, timeout=busy_timeout
        )
        if path != ":memory:":
            self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(f"PRAGMA synchronous={'FULL' if sync == 'full' else 'NORMAL'}")
        # A deleted message's text must leave the disk: freed space is zeroed, and a
        # batch with a delete is checkpointed out of the WAL (``commit``).
        self.db.execute("PRAGMA secure_delete=ON")
        self._scrub = False
        self.db.executescript(SCHEMA)
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(messages)")}
        for column in ("user", "kind", "target", "edited", "deleted", "updated"):
            if column not in columns:  # a database from before users (or before edits)
                kind = "TEXT" if column in ("user", "kind") else "INTEGER"
                self.db.execute(f"ALTER TABLE messages ADD COLUMN {column} {kind}")
        self._last: dict[str, int] = {}
        self._epochs: dict[str, str] = {}
        self._in_tx = False
        self._since_trim: dict[str, int] = {}
        self._recent: OrderedDict[str, None] = OrderedDict()  # rooms in the caches, LRU first
        self._cursors: dict[str, weakref.WeakSet[Cursor]] = {}  # open replays, by room
        # Idempotency keys are kept this long (ms); without storage, in memory.
        self.dedupe_ms = 600_000
        self._sends: OrderedDict[tuple[str, str], tuple[int, int]] = OrderedDict()
        self._reads: dict[tuple[str, str], int] = {}  # without storage only
        # Messages older than this (ms) are gone too (0: kept by count alone). They
        # are deleted as new ones come and by ``sweep``; reads skip them meanwhile.
        self.ttl_ms = 0
        self._swept = ""  # the room a sweep stopped after

    def _touch(self, room: str) -> None:
        """``room`` was used: keep its cached values; forget the least recently used room's."""
        recent = self._recent
        if room in recent:
            recent.move_to_end(room)
            return
        recent[room] = None
        if len(recent) > ROOM_CACHE:
            old, _ = recent.popitem(last=False)
            self._last.pop(old, None)
            self._epochs.pop(old, None)
            self._since_trim.pop(old, None)

    def last_id(self, room: str) -> int:
        self._touch(room)
        last = self._last.get(room)
        if last is None:
            row = self.db.execute("SELECT MAX(id) FROM messages WHERE room = ?", (room,)).fetchone()
            last = self._last[room] = row[0] or 0
        return last

    def epoch(self, room: str) -> str | None:
        """The room's epoch; None while it has no message."""
        self._touch(room)
        epoch = self._epochs.get(room)
        if epoch is None and self.retention:
            row = self.db.execute("SELECT epoch FROM rooms WHERE room = ?", (room,)).fetchone()
            if row is not None:
                epoch = self._epochs[room] = row[0]
            elif self.last_id(room) > 0:  # a database from before epochs: give it one now
                epoch = self._new_epoch(room)
        return epoch

    def _new_epoch(self, room: str) -> str:
        epoch = new_epoch()
        if self.retention:  # in the batch if there is one, else committed at once
            self.db.execute("INSERT INTO rooms (room, epoch) VALUES (?, ?)", (room, epoch))
        self._epochs[room] = epoch
        return epoch

    def read_marker(self, room: str, who: str) -> int:
        """The last id ``who`` has read in ``room`` (0: none)."""
        if not self.retention:
            return self._reads.get((room, who), 0)
        row = self.db.execute(
            "SELECT id FROM reads WHERE room = ? AND who = ?", (room, who)
        ).fetchone()
        return row[0] if row else 0

    def unread(self, room: str, after: int) -> int:
        """How many kept messages of ``room`` came after id ``after``: messages only,
        not edits, deletes or reactions, and not deleted ones (without storage: every id)."""
        if not self.retention:
            return max(0, self.last_id(room) - after)
        row = self.db.execute(
            "SELECT count(*) FROM messages WHERE room = ? AND id > ? AND kind IS NULL "
            "AND deleted IS NULL",
            (room, after),
        ).fetchone()
        return int(row[0])

    def mark_read(self, room: str, who: str, id: int) -> int:
        """Move ``who``'s marker in ``room`` up to ``id`` (never back, never past the
        last id); the marker it is at now. Written with the batch if one is open."""
        id = min(id, self.last_id(room))
        if id <= 0:  # (nothing to read: no row for it)
            return self.read_marker(room, who)
        if not self.retention:
            reads = self._reads
            now = reads[(room, who)] = max(reads.pop((room, who), 0), id)
            if len(reads) > ROOM_CACHE * 10:  # (kept in memory: the oldest go first)
                del reads[next(iter(reads))]
            return now
        self.db.execute(
            "INSERT INTO reads (room, who, id) VALUES (?, ?, ?) ON CONFLICT (room, who) "
            "DO UPDATE SET id = max(id, excluded.id)",
            (room, who, id),
        )
        return self.read_marker(room, who)

    def sent(self, room: str, key: str) -> Message | None:
        """The message an idempotency ``key`` made in ``room`` within the dedupe window
        (one of an uncommitted batch too); its text is empty if retention dropped it."""
        floor = int(time.time() * 1000) - self.dedupe_ms
        if not self.retention:
            found = self._sends.get((room, key))
            if found is None or found[1] < floor:
                return None
            return Message(room, found[0], found[1], "", "")
        row = self.db.execute(
            "SELECT id, ts FROM sends WHERE room = ? AND key = ? AND ts >= ?", (room, key, floor)
        ).fetchone()
        if row is None:
            return None
        msgs = self._rows(room, row[0] - 1, row[0], 1)
        return msgs[0] if msgs else Message(room, row[0], row[1], "", "")

    def append(
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
    ) -> Message:
        """Assign the next id and write the message (committed by ``commit``); with an
        idempotency ``key``, remember which message the key made (``sent``).

        An event (``kind`` in KINDS) about message ``target`` also changes that
        message's row in the same transaction: an edit's text replaces its text,
        a delete empties it and the texts of its edits (the text is gone from the
        database), a reaction is added to or taken from ``reactions``. It fails
        with ``Refused`` if ``target`` is not a kept, undeleted message, or (with
        ``author``) is not the sender's own (the same ``user``; for an anonymous
        sender, no user and the same nick)."""
        msg = Message(
            room,
            self.last_id(room) + 1,
            int(time.time() * 1000),
            sender,
            text,
            ref,
            user,
            kind,
            target,
        )
        if kind:
            self._amend(msg, author)
        if key and not self.retention:
            sends = self._sends
            sends[(room, key)] = (msg.id, msg.ts)
            sends.move_to_end((room, key))
            while sends and next(iter(sends.values()))[1] < msg.ts - self.dedupe_ms:
                sends.popitem(last=False)
        if self.retention:
            if not self._in_tx:
                self.db.execute("BEGIN")
                self._in_tx = True
            if room not in self._epochs and self.epoch(room) is None:
                self._new_epoch(room)
            self.db.execute(
                "INSERT INTO messages (room, id, ts, sender, text, user, kind, target) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (room, msg.id, msg.ts, sender, text, user or None, kind or None, target or None),
            )
            if key:
                self.db.execute(
                    "INSERT OR REPLACE INTO sends (room, key, id, ts) VALUES (?, ?, ?, ?)",
                    (room, key, msg.id, msg.ts),
                )
            n = self._since_trim.get(room, 0) + 1
            if n >= 100:  # trim now and then, not on every message
                floor = msg.id - self.retention
                cursors = self._cursors.get(room)
                if cursors:  # keep what an open replay has still to read
                    floor = min(floor, *(c.after for c in cursors))
                self.db.execute("DELETE FROM messages WHERE room = ? AND id <= ?", (room, floor))
                self.db.execute(
                    "DELETE FROM reactions WHERE room = ? AND target <= ?", (room, floor)
                )
                self.db.execute(  # idempotency keys past the window
                    "DELETE FROM sends WHERE room = ? AND ts < ?", (room, msg.ts - self.dedupe_ms)
                )
                if self.ttl_ms:
                    self._expire(room, msg.ts - self.ttl_ms)
                n = 0
            self._since_trim[room] = n
        elif room not in self._epochs:
            self._new_epoch(room)
        self._last[room] = msg.id  # only once it is written
        return msg

    def _amend(self, event: Message, author: bool) -> None:
        """Check an event about a message and change what it changes (see ``append``)."""
        room, target, text = event.room, event.target, event.text
        row, began = None, False
        if self.retention:
            if not self._in_tx:
                self.db.execute("BEGIN")
                self._in_tx = began = True
            row = self.db.execute(
                "SELECT sender, user, kind, deleted FROM messages WHERE room = ? AND id = ?",
                (room, target),
            ).fetchone()
        refused = None
        if row is None or row[2] is not None or row[3] is not None:
            refused = Refused("not_found", f"no message {target} is kept in {room}")
        elif author and (
            (row[1] or "") != event.user or (not event.user and row[0] != event.sender)
        ):
            refused = Refused("forbidden", f"message {target} of {room} is not yours")
        db, who, kind = self.db, event.user or event.sender, event.kind
        if refused is None and kind == "react":
            n = db.execute(
                "SELECT COUNT(DISTINCT emoji) FROM reactions WHERE room = ? AND target = ? "
                "AND emoji != ?",
                (room, target, text),
            ).fetchone()[0]
            if n >= MAX_REACTIONS:
                refused = Refused("too_many", f"message {target} has {n} different reactions")
        if refused is not None:
            if began:  # (nothing was written: end the read)
                self.commit()
            raise refused
        if kind == "edit":
            db.execute(
                "UPDATE messages SET text = ?, edited = ?, updated = ? WHERE room = ? AND id = ?",
                (text, event.id, event.id, room, target),
            )
        elif kind == "delete":
            db.execute(
                "UPDATE messages SET text = '', deleted = ?, updated = ? WHERE room = ? AND id = ?",
                (event.id, event.id, room, target),
            )
            db.execute(
                "UPDATE messages SET text = '' WHERE room = ? AND kind = 'edit' AND target = ?",
                (room, target),
            )
            db.execute("DELETE FROM reactions WHERE room = ? AND target = ?", (room, target))
            self._scrub = True
        else:
            db.execute(
                "UPDATE messages SET updated = ? WHERE room = ? AND id = ?",
                (event.id, room, target),
            )
        if kind == "react":
            db.execute(
                "INSERT OR IGNORE INTO reactions (room, target, emoji, who) VALUES (?, ?, ?, ?)",
                (room, target, text, who),
            )
        elif kind == "unreact":
            db.execute(
                "DELETE FROM reactions WHERE room = ? AND target = ? AND emoji = ? AND who = ?",
                (room, target, text, who),
            )

    def commit(self) -> None:
        if self._in_tx:
            self.db.execute("COMMIT")
            self._in_tx = False
        if self._scrub:  # (a delete: the old pages leave the WAL file, a few ms)
            self._scrub = False
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def rollback(self) -> None:
        """Forget an uncommitted batch; ids and epochs are read again from the database."""
        if self._in_tx:
            self._in_tx = False
            with contextlib.suppress(sqlite3.Error):  # SQLite may have rolled back already
                self.db.execute("ROLLBACK")
        self._last.clear()
        self._epochs.clear()  # (with retention 0 ids restart, so the epoch must too)
        self._recent.clear()

    def since(self, room: str, after: int) -> tuple[list[Message], bool]:
        """Messages with id > ``after`` (at most ``retention``), and whether some were lost."""
        msgs, truncated, _ = self.page(room, after, None)
        return msgs, truncated

    def _floor(self, room: str, after: int) -> int:
        """``after``, raised past the room's messages the retention (count or age) dropped."""
        after = max(after, self.last_id(room) - self.retention)
        if self.ttl_ms:
            row = self.db.execute(
                "SELECT id FROM messages WHERE room = ? AND id > ? AND ts >= ? ORDER BY id LIMIT 1",
                (room, after, int(time.time() * 1000) - self.ttl_ms),
            ).fetchone()
            after = row[0] - 1 if row else max(after, self.last_id(room))
        return after

    def sweep(self, rooms: int = 100) -> int:
        """Delete the expired messages (``ttl_ms``) of up to ``rooms`` rooms, taking
        the rooms in turn across calls (quiet rooms too); how many rows went."""
        if not self.ttl_ms or not self.retention or self._in_tx:
            return 0
        names = [
            r[0]
            for r in self.db.execute(
                "SELECT room FROM rooms WHERE room > ? ORDER BY room LIMIT ?", (self._swept, rooms)
            )
        ]
        self._swept = names[-1] if len(names) == rooms else ""
        cutoff, gone = int(time.time() * 1000) - self.ttl_ms, 0
        for room in names:
            gone += self._expire(room, cutoff)
        return gone

    def _expire(self, room: str, cutoff: int) -> int:
        """Delete ``room``'s messages older than ``cutoff`` that no open replay still needs."""
        query, args = "DELETE FROM messages WHERE room = ? AND ts < ?", [room, cutoff]
        cursors = self._cursors.get(room)
        if cursors:
            query += " AND id <= ?"
            args.append(min(c.after for c in cursors))
        gone = self.db.execute(query, args).rowcount
        if gone:
            self.db.execute(
                "DELETE FROM reactions WHERE room = ? AND target < "
                "(SELECT coalesce(min(id), 2 << 62) FROM messages WHERE room = ?)",
                (room, room),
            )
        return gone

    def page(
        self, room: str, after: int, limit: int | None = PAGE_ROWS
    ) -> tuple[list[Message], bool, Cursor | None]:
        """The first ``limit`` messages with id > ``after`` (within the retention),
        whether some were lost, and a Cursor for the rest up to today's last id
        (None if there is none)."""
        last = self.last_id(room)
        if not self.retention:
            return [], after < last, None
        start = self._floor(room, after)
        cursor = Cursor(self, room, start, last)
        msgs = cursor.read(limit if limit is not None else -1)
        first = msgs[0].id if msgs else last + 1
        if cursor.after < last:
            self._cursors.setdefault(room, weakref.WeakSet()).add(cursor)
            return msgs, first > after + 1, cursor
        return msgs, first > after + 1, None

    def range(
        self, room: str, after: int, before: int | None, limit: int, newest: bool
    ) -> tuple[list[Message], bool]:
        """Up to ``limit`` kept messages with ``after`` < id < ``before`` (None: no
        bound), oldest first: the ``newest`` of them, or the oldest; and whether more
        are kept beyond them (older ones if ``newest``, newer ones otherwise)."""
        if not self.retention:
            return [], False
        after = self._floor(room, after)  # (trimmed lazily)
        rows = self.db.execute(
            f"SELECT {_COLUMNS} FROM messages WHERE room = ? AND id > ? "
            f"AND id < ? ORDER BY id {'DESC' if newest else 'ASC'} LIMIT ?",
            (room, after, before if before is not None else 2**62, limit + 1),
        ).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        if newest:
            rows.reverse()
        return self._messages(room, rows), more

    def _rows(self, room: str, after: int, until: int, limit: int) -> list[Message]:
        rows = self.db.execute(
            f"SELECT {_COLUMNS} FROM messages WHERE room = ? AND id > ? "
            "AND id <= ? ORDER BY id LIMIT ?",
            (room, after, until, limit),
        ).fetchall()
        return self._messages(room, rows)

    def _messages(self, room: str, rows: list[tuple[Any, ...]]) -> list[Message]:
        """Messages of rows (``_COLUMNS``, by id), with the reactions of those that have some."""
        if not rows:
            return []
        reactions: dict[int, Reactions] = {}
        for target, emoji, who in self.db.execute(
            "SELECT target, emoji, who FROM reactions WHERE room = ? AND target BETWEEN ? AND ?",
            (room, rows[0][0], rows[-1][0]),
        ):
            reactions.setdefault(target, {}).setdefault(emoji, []).append(who)
        return [
            Message(
                room,
                i,
                ts,
                s,
                t,
                None,
                u or "",
                k or "",
                g or 0,
                e or 0,
                d or 0,
                v or 0,
                reactions.get(i),
            )
            for i, ts, s, t, u, k, g, e, d, v in rows
        ]

    def recent(self, room: str, n: int) -> list[Message]:
        """The last ``n`` messages of a room, oldest first."""
        return self.since(room, max(0, self.last_id(room) - min(n, self.retention)))[0]

    def close(self) -> None:
        self.commit()
        self.db.close()


class Cursor:
    """The rest of a replay: messages after ``after`` up to ``until``, read a batch at a time."""

    __slots__ = ("__weakref__", "after", "history", "room", "rows", "until")

    def __init__(self, history: History, room: str, after: int, until: int) -> None:
        self.history = history
        self.room = room
        self.after = after
        self.until = until
        self.rows = PAGE_ROWS

    def read(self, limit: int | None = None) -> list[Message]:
        """The next batch, oldest first; empty once everything up to ``until`` was read."""
        if self.after >= self.until:
            return []
        msgs = self.history._rows(self.room, self.after, self.until, limit or self.rows)
        if msgs:
            self.after = msgs[-1].id
            size = sum(len(m.text) for m in msgs) // len(msgs) + 100
            self.rows = max(4, min(1024, PAGE_BYTES // size + 1))
        if not msgs or self.after >= self.until:  # (the pin keeps every row: no gap)
            self.after = self.until
            cursors = self.history._cursors.get(self.room)
            if cursors is not None:
                cursors.discard(self)
                if not cursors:
                    del self.history._cursors[self.room]
        return msgs

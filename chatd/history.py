"""Chat history in SQLite: ids per room, retention, replay after an id.

Every accepted chat message is appended here before it is broadcast, so a
client that reconnects with ``since`` sees everything it missed, and a
restarted daemon keeps its history.

Cost on the reactor thread: appends are grouped per reactor turn (one
``commit`` per batch, WAL journal, ``synchronous=NORMAL``), measured at a
few microseconds per message batched and about 35 us unbatched (see
bench/RESULTS.md). A committed WAL write survives the process being killed;
``synchronous=NORMAL`` may lose the last transactions on power loss, which
``--db-sync full`` trades for an fsync per batch. Reads are bounded by the
retention, through the primary key.

A long replay is read in pages (``page`` and its ``Cursor``), as fast as
the client takes it, not all at once: a batch is sized to about a 64 KiB
page from the sizes of the previous one. While a cursor is open on a room,
trimming that room keeps what the cursor has still to read, so a slow
replay has no gap; the table then holds, for as long as the replay lasts,
up to the messages posted meanwhile beyond the retention.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
import weakref
from dataclasses import dataclass

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    room TEXT NOT NULL,
    id INTEGER NOT NULL,
    ts INTEGER NOT NULL,          -- milliseconds since the epoch
    sender TEXT NOT NULL,
    text TEXT NOT NULL,
    PRIMARY KEY (room, id)
) WITHOUT ROWID;
"""


PAGE_ROWS = 16  # rows of a first read (at most 256 KiB of text); later ones aim at PAGE_BYTES
PAGE_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class Message:
    room: str
    id: int
    ts: int
    sender: str
    text: str
    ref: str | None = None


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
        self.db.executescript(SCHEMA)
        self._last: dict[str, int] = {}
        self._in_tx = False
        self._since_trim: dict[str, int] = {}
        self._cursors: dict[str, weakref.WeakSet[Cursor]] = {}  # open replays, by room

    def last_id(self, room: str) -> int:
        last = self._last.get(room)
        if last is None:
            row = self.db.execute("SELECT MAX(id) FROM messages WHERE room = ?", (room,)).fetchone()
            last = self._last[room] = row[0] or 0
        return last

    def append(self, room: str, sender: str, text: str, ref: str | None = None) -> Message:
        """Assign the next id and write the message (committed by ``commit``)."""
        msg = Message(room, self.last_id(room) + 1, int(time.time() * 1000), sender, text, ref)
        if self.retention:
            if not self._in_tx:
                self.db.execute("BEGIN")
                self._in_tx = True
            self.db.execute(
                "INSERT INTO messages (room, id, ts, sender, text) VALUES (?, ?, ?, ?, ?)",
                (room, msg.id, msg.ts, sender, text),
            )
            n = self._since_trim.get(room, 0) + 1
            if n >= 100:  # trim now and then, not on every message
                floor = msg.id - self.retention
                cursors = self._cursors.get(room)
                if cursors:  # keep what an open replay has still to read
                    floor = min(floor, *(c.after for c in cursors))
                self.db.execute("DELETE FROM messages WHERE room = ? AND id <= ?", (room, floor))
                n = 0
            self._since_trim[room] = n
        self._last[room] = msg.id  # only once it is written
        return msg

    def commit(self) -> None:
        if self._in_tx:
            self.db.execute("COMMIT")
            self._in_tx = False

    def rollback(self) -> None:
        """Forget an uncommitted batch; ids are read again from the database."""
        if self._in_tx:
            self._in_tx = False
            with contextlib.suppress(sqlite3.Error):  # SQLite may have rolled back already
                self.db.execute("ROLLBACK")
        self._last.clear()

    def since(self, room: str, after: int) -> tuple[list[Message], bool]:
        """Messages with id > ``after`` (at most ``retention``), and whether some were lost."""
        msgs, truncated, _ = self.page(room, after, None)
        return msgs, truncated

    def page(
        self, room: str, after: int, limit: int | None = PAGE_ROWS
    ) -> tuple[list[Message], bool, Cursor | None]:
        """The first ``limit`` messages with id > ``after`` (within the retention),
        whether some were lost, and a Cursor for the rest up to today's last id
        (None if there is none)."""
        last = self.last_id(room)
        if not self.retention:
            return [], after < last, None
        start = max(after, last - self.retention)
        cursor = Cursor(self, room, start, last)
        msgs = cursor.read(limit if limit is not None else -1)
        first = msgs[0].id if msgs else last + 1
        if cursor.after < last:
            self._cursors.setdefault(room, weakref.WeakSet()).add(cursor)
            return msgs, first > after + 1, cursor
        return msgs, first > after + 1, None

    def _rows(self, room: str, after: int, until: int, limit: int) -> list[Message]:
        rows = self.db.execute(
            "SELECT id, ts, sender, text FROM messages WHERE room = ? AND id > ? AND id <= ? "
            "ORDER BY id LIMIT ?",
            (room, after, until, limit),
        ).fetchall()
        return [Message(room, i, ts, s, t) for i, ts, s, t in rows]

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

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
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
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
                self.db.execute(
                    "DELETE FROM messages WHERE room = ? AND id <= ?",
                    (room, msg.id - self.retention),
                )
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
        if not self.retention:
            return [], after < self.last_id(room)
        rows = self.db.execute(
            "SELECT id, ts, sender, text FROM messages WHERE room = ? AND id > ? "
            "AND id > ? ORDER BY id",
            (room, after, self.last_id(room) - self.retention),
        ).fetchall()
        msgs = [Message(room, i, ts, s, t) for i, ts, s, t in rows]
        first = msgs[0].id if msgs else self.last_id(room) + 1
        return msgs, first > after + 1

    def recent(self, room: str, n: int) -> list[Message]:
        """The last ``n`` messages of a room, oldest first."""
        return self.since(room, max(0, self.last_id(room) - min(n, self.retention)))[0]

    def close(self) -> None:
        self.commit()
        self.db.close()

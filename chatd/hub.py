"""Rooms and their members: the seam a multi-node (Redis) hub plugs into.

Protocols never loop over clients themselves: they join, leave and publish
through a ``Hub``. ``InMemoryHub`` is the single-process implementation; a
clustered one keeps the same four methods and publishes through its broker,
calling ``fanout.broadcast`` for the members it holds locally.

Room keys are opaque strings chosen by the protocols (``relay/<name>``,
``chat/lobby``), so different kinds of room can never see each other.
"""

from __future__ import annotations

from typing import Protocol

from chatd.fanout import Link, broadcast


class Hub(Protocol):
    def join(self, room: str, link: Link) -> None:
        """Add ``link`` to ``room``, creating the room on first join."""

    def leave(self, room: str, link: Link) -> None:
        """Remove ``link`` from ``room``; an empty room is dropped. Idempotent."""

    def publish(self, room: str, payload: bytes, binary: bool) -> int:
        """Deliver one message to every member of ``room``; return how many got it."""

    def rooms(self) -> dict[str, int]:
        """Every room with its member count."""


class InMemoryHub:
    """All rooms of one process, as dicts used as ordered sets of links."""

    def __init__(self) -> None:
        self._rooms: dict[str, dict[Link, None]] = {}
        self.published = 0  # messages accepted
        self.delivered = 0  # frames handed to transports

    def join(self, room: str, link: Link) -> None:
        members = self._rooms.get(room)
        if members is None:
            members = self._rooms[room] = {}
        members[link] = None

    def leave(self, room: str, link: Link) -> None:
        members = self._rooms.get(room)
        if members is None:
            return
        members.pop(link, None)
        if not members:
            del self._rooms[room]

    def publish(self, room: str, payload: bytes, binary: bool) -> int:
        members = self._rooms.get(room)
        self.published += 1
        if not members:
            return 0
        n = broadcast(tuple(members), payload, binary)
        self.delivered += n
        return n

    def rooms(self) -> dict[str, int]:
        return {name: len(members) for name, members in self._rooms.items()}

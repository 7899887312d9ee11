"""Relay rooms on "/relay/<room>": every message, text or binary, byte-exact to every member.

The generic fan-out (bullet comments, game state, live quotes) and the
Autobahn|Testsuite target: with one member a relay room is an echo server.
"""

from __future__ import annotations

from urllib.parse import unquote

from autobahn.websocket.types import ConnectionDeny

from chatd.fanout import Link
from chatd.limits import valid_room_name
from chatd.protocols.base import Connection

PREFIX = "/relay/"


def room_from_path(path: str) -> str | None:
    """The room named by ``/relay/<room>``, or None if the path names none."""
    if not path.startswith(PREFIX):
        return None
    name = unquote(path[len(PREFIX) :])  # as twisted.web decodes path segments
    return name if valid_room_name(name) else None


class Relay(Connection):
    kind = "relay"
    room = ""

    def onConnect(self, request):
        name = room_from_path(request.path)
        if name is None:  # web.py checks first; this guards other mounts
            raise ConnectionDeny(ConnectionDeny.NOT_FOUND, "no such relay room")
        self.room = name
        return None

    def attach(self) -> None:
        assert self.link is not None
        self.hub.join(self.room, self.link)

    def detach(self, link: Link) -> None:
        self.hub.leave(self.room, link)

    def received(self, payload: bytes, isBinary: bool) -> None:
        self.hub.publish(self.room, payload, isBinary)

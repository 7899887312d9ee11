"""Relay rooms on "/relay/<room>": every message, text or binary, byte-exact to every member.

The generic fan-out (bullet comments, game state, live quotes) and the
Autobahn|Testsuite target: with one member a relay room is an echo server.
"""

from __future__ import annotations

from urllib.parse import unquote

from autobahn.websocket.types import ConnectionDeny

from chatd import limits
from chatd.fanout import Link
from chatd.limits import valid_room_name
from chatd.protocols.base import Connection, Refused

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
    may_publish = True

    def onConnect(self, request):
        name = room_from_path(request.path)
        if name is None:  # web.py checks first; this guards other mounts
            raise ConnectionDeny(ConnectionDeny.NOT_FOUND, "no such relay room")
        policy = self.factory.policy
        if policy.enabled:
            identity = self.identify(request, policy.required)
            rights = identity.relay if identity is not None else policy.anonymous_rights()
            if not rights.can_read(name):
                raise Refused(403, "forbidden", f"no right to relay room {name}")
            self.may_publish = rights.can_write(name)
        self.room = name
        return None

    def attach(self) -> None:
        assert self.link is not None
        self.hub.join(self.room, self.link)

    def detach(self, link: Link) -> None:
        self.hub.leave(self.room, link)

    def received(self, payload: bytes, isBinary: bool) -> None:
        if not self.may_publish:
            self.fail(limits.CLOSE_FORBIDDEN, f"no right to publish to {self.room}")
            return
        self.hub.publish(self.room, payload, isBinary)

"""A chatd.v1 client for tests: the raw WebSocket client speaking JSON."""

from __future__ import annotations

import json
from typing import Any

from wsclient import TEXT, Client


class V1(Client):
    def __init__(self, port: int, nick: str | None = None, **kw: Any) -> None:
        headers = {"Sec-WebSocket-Protocol": kw.pop("subprotocols", "chatd.v1")}
        super().__init__(port, "/", headers=headers, **kw)
        if nick is not None:
            self.req("hello", nick=nick)
            welcome = self.next("welcome")
            assert welcome["nick"] == nick

    def req(self, type_: str, **fields: Any) -> None:
        self.send_frame(TEXT, json.dumps({"type": type_, **fields}).encode())

    def next(self, type_: str | None = None) -> dict[str, Any]:
        """The next frame (as a dict); with ``type_``, it must be of that type."""
        opcode, payload = self.recv_message()
        assert opcode == TEXT
        obj = json.loads(payload)
        if type_ is not None:
            assert obj["type"] == type_, obj
        return obj

    def join(self, room: str, **fields: Any) -> dict[str, Any]:
        self.req("join", room=room, **fields)
        return self.next("joined")

    def say(self, room: str, text: str, **fields: Any) -> None:
        self.req("send", room=room, text=text, **fields)

"""The HTTP push API: back ends publish to chat and relay rooms with a bearer token.

    POST /api/rooms/<room>/messages   {"text": ..., "from": ...}  -> 201 {"room", "id", "ts"}
    POST /api/users/<sub>/messages    the same, to the user's personal room ``@<sub>``
    DELETE /api/users/<sub>/connections  close them on every node (4003) -> 202 {"user"}
    GET  /api/rooms/<room>/members                                -> 200 {"room", "members"}
    PATCH /api/rooms/<room>/messages/<id>  {"text", "from"?} -> 200 {"room", "id", "ts", "target"}
    DELETE /api/rooms/<room>/messages/<id>                     -> 200 the same
    POST /api/relay/<room>/messages   any body                    -> 200 {"room", "delivered"}
    GET  /api/rooms                                               -> 200 {"rooms": [...]}

Off (404) while no token is configured. Answers: 400 bad JSON or fields,
401 no bearer token, 403 a wrong one, 404 no such path, 405 wrong method,
413 too large, 415 a chat body that is not application/json, 503 history
unavailable. Every answer is JSON. An edit or delete by the back end is any
message's (a user may change only its own); it is stored as an event
(``kind`` ``edit`` or ``delete``, docs/PROTOCOL.md) with its own id, and is
404 for a message that is not kept, or was deleted.

A body is only read once the request's head has passed every check that
does not need it: ``body_limit`` tells chatd.web's channel, as soon as the
headers are in, how much body a request may send (0 for one that will be
refused anyway), so a body without a valid token, or over the limit by its
Content-Length, is answered without being read.
"""

from __future__ import annotations

import hmac
import json
from typing import IO, Any, cast

from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from chatd import jsonin, limits
from chatd.config import Settings
from chatd.history import Message, Refused
from chatd.hub import Duplicate, Hub, Unavailable
from chatd.stats import Stats

DEFAULT_SENDER = "api"


def _room_of(kind: str, name: str) -> str:
    """The room a path names: a user's (``users/<sub>``) is the personal room ``@<sub>``."""
    return f"@{name}" if kind == "users" else name


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[bytes, bytes] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


class PushAPI(Resource):
    isLeaf = True

    def __init__(self, hub: Hub, settings: Settings, stats: Stats) -> None:
        super().__init__()
        self.hub = hub
        self.settings = settings
        self.stats = stats
        self.token = (settings.api_token or "").encode()

    def render(self, request: Request) -> bytes | int:
        try:
            return self._route(request)
        except ApiError as e:
            for name, value in e.headers.items():
                request.setHeader(name, value)
            return self._json(request, e.status, {"error": str(e)})

    def _json(self, request: Request, status: int, body: dict[str, Any]) -> bytes:
        self.stats.api_requests[str(status)] += 1
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-store")
        return json.dumps(body, ensure_ascii=False).encode() + b"\n"

    def _route(self, request: Request) -> bytes | int:
        if not self.token:
            raise ApiError(404, "the push API is off: set api_token")
        self._authorize(request)
        postpath = request.postpath
        assert postpath is not None  # set by the Site as it found this resource
        path = [p.decode("utf-8", "replace") for p in postpath]
        method = request.method
        if path == ["rooms"]:
            self._method(method, b"GET")
            return self._list(request)
        if len(path) == 3 and path[0] == "users" and path[2] == "connections":
            self._method(method, b"DELETE")
            self.hub.kick(path[1])
            return self._json(request, 202, {"user": path[1]})
        if len(path) == 3 and path[0] == "rooms" and path[2] == "members":
            self._method(method, b"GET")
            if not limits.valid_room_name(path[1]):
                raise ApiError(400, limits.ROOM_NAME_RULE)
            return self._members(request, path[1])
        if len(path) == 3 and path[0] in ("rooms", "relay", "users") and path[2] == "messages":
            self._method(method, b"POST")
            room = _room_of(path[0], path[1])
            if not limits.valid_room_name(room):
                raise ApiError(400, limits.ROOM_NAME_RULE)
            if path[0] == "relay":
                return self._relay(request, room)
            return self._chat(request, room)
        if (
            len(path) == 4
            and path[0] in ("rooms", "users")
            and path[2] == "messages"
            and path[3].isdigit()
            and 0 < len(path[3]) < 16
        ):
            room = _room_of(path[0], path[1])
            if not limits.valid_room_name(room):
                raise ApiError(400, limits.ROOM_NAME_RULE)
            if method == b"DELETE":
                return self._amend(request, room, int(path[3]), "delete", "", DEFAULT_SENDER)
            self._method(method, b"PATCH")
            text, sender = self._chat_body(request)
            return self._amend(request, room, int(path[3]), "edit", text, sender)
        raise ApiError(404, "no such API path")

    def _authorize(self, request: Request) -> None:
        header = request.getHeader(b"authorization")
        if not header or not header[:7].lower() == b"bearer ":
            raise ApiError(
                401, "send Authorization: Bearer <token>", {b"WWW-Authenticate": b"Bearer"}
            )
        if not hmac.compare_digest(header[7:].strip(), self.token):
            raise ApiError(403, "wrong token")

    def body_limit(self, method: bytes, postpath: list[bytes], request: Request) -> int:
        """Bytes of body the request may send, judged on its head alone.

        0 for anything ``render`` refuses without reading the body (the API
        off, no or a wrong token, no such path, a wrong method, a bad room
        name, a chat body that is not JSON); else the limit ``_body`` applies.
        """
        if not self.token or method not in (b"POST", b"PATCH"):
            return 0
        try:
            self._authorize(request)
        except ApiError:
            return 0
        path = [p.decode("utf-8", "replace") for p in postpath]
        if method == b"PATCH":  # an edit: /rooms/<room>/messages/<id>
            if len(path) != 4 or path[0] == "relay" or not path[3].isdigit():
                return 0
            path = path[:3]
        if len(path) != 3 or path[0] not in ("rooms", "relay", "users") or path[2] != "messages":
            return 0
        if not limits.valid_room_name(_room_of(path[0], path[1])):
            return 0
        if path[0] != "relay":
            ctype = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
            return self.settings.max_message_size if ctype == b"application/json" else 0
        return self.settings.relay_max_size

    @staticmethod
    def _method(method: bytes, allowed: bytes) -> None:
        if method != allowed:
            raise ApiError(405, f"use {allowed.decode()}", {b"Allow": allowed})

    @staticmethod
    def _body(request: Request, limit: int) -> bytes:
        length = request.getHeader(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise ApiError(413, f"the body is over {limit} bytes")
        # (twisted.web types Request.content by its class default, None; the
        # channel sets it to the body's file before the request is handled)
        body = cast(IO[bytes], request.content).read(limit + 1)
        if len(body) > limit:
            raise ApiError(413, f"the body is over {limit} bytes")
        return body

    def _list(self, request: Request) -> bytes:
        rooms = []
        for key, members in sorted(self.hub.rooms().items()):
            kind, name = key.split("/", 1)
            rooms.append({"kind": kind, "name": name, "members": members})
        return self._json(request, 200, {"rooms": rooms})

    def _chat(self, request: Request, room: str) -> int | bytes:
        text, sender = self._chat_body(request)
        d = self.hub.post(room, sender, text, key=self._idempotency_key(request))

        def done(msg: Message, status: int = 201) -> None:
            body = {"room": msg.room, "id": msg.id, "ts": msg.ts}
            if status == 200:
                body["duplicate"] = True
            request.write(self._json(request, status, body))
            request.finish()

        def failed(f: Failure) -> None:
            if f.check(Duplicate):
                done(f.value.original, 200)
                return
            f.trap(Unavailable)
            request.write(self._json(request, 503, {"error": "history unavailable; not sent"}))
            request.finish()

        d.addCallbacks(done, failed)
        return NOT_DONE_YET

    def _amend(
        self, request: Request, room: str, target: int, kind: str, text: str, sender: str
    ) -> int:
        d = self.hub.post(room, sender, text, None, "", "", kind, target)

        def done(msg: Message) -> None:
            body = {"room": msg.room, "id": msg.id, "ts": msg.ts, "target": target}
            request.write(self._json(request, 200, body))
            request.finish()

        def failed(f: Failure) -> None:
            if f.check(Refused):
                request.write(self._json(request, 404, {"error": str(f.value)}))
            else:
                f.trap(Unavailable)
                request.write(self._json(request, 503, {"error": "history unavailable"}))
            request.finish()

        d.addCallbacks(done, failed)
        return NOT_DONE_YET

    def _chat_body(self, request: Request) -> tuple[str, str]:
        """(text, sender) of a chat request's JSON body, checked."""
        ctype = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
        if ctype != b"application/json":
            raise ApiError(415, "send Content-Type: application/json")
        body = self._body(request, self.settings.max_message_size)
        try:
            obj = jsonin.loads(body)
        except jsonin.BadJSON as e:
            raise ApiError(400, f"not JSON: {e}") from None
        if not isinstance(obj, dict):
            raise ApiError(400, "the body is a JSON object")
        text, sender = obj.get("text"), obj.get("from", DEFAULT_SENDER)
        if not isinstance(text, str) or not text.strip():
            raise ApiError(400, "'text' is a non-empty string")
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError:
            raise ApiError(400, "'text' is not valid Unicode") from None
        if size > self.settings.max_text:
            raise ApiError(413, f"'text' is over {self.settings.max_text} bytes of UTF-8")
        problem = limits.nick_problem(sender)
        if problem:
            raise ApiError(400, f"'from': {problem}")
        return text, sender

    @staticmethod
    def _idempotency_key(request: Request) -> str:
        """The send's key from an ``Idempotency-Key`` header ("" without one): a retry
        with the same key gets the first message's answer (200, ``duplicate``)."""
        header = request.getHeader(b"idempotency-key")
        if header is None:
            return ""
        cid = header.decode("latin-1")
        if not (0 < len(cid) <= 64 and cid.isascii() and cid.isprintable()):
            raise ApiError(400, "Idempotency-Key is 1-64 printable ASCII characters")
        return f"api\n{cid}"

    def _members(self, request: Request, room: str) -> int:
        def done(members: list[str]) -> None:
            request.write(self._json(request, 200, {"room": room, "members": members}))
            request.finish()

        def failed(f: Failure) -> None:
            f.trap(Unavailable)
            request.write(self._json(request, 503, {"error": "presence unavailable"}))
            request.finish()

        self.hub.everyone(room).addCallbacks(done, failed)
        return NOT_DONE_YET

    def _relay(self, request: Request, room: str) -> bytes:
        body = self._body(request, self.settings.relay_max_size)
        ctype = (request.getHeader(b"content-type") or b"").strip().lower()
        binary = not ctype.startswith(b"text/")
        if not binary:
            try:
                body.decode("utf-8")
            except UnicodeDecodeError:
                raise ApiError(400, "a text/* body must be UTF-8") from None
        delivered = self.hub.publish(room, body, binary)
        return self._json(request, 200, {"room": room, "delivered": delivered})

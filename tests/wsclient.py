"""A small blocking WebSocket client over a raw socket, for tests.

Written here rather than borrowed so tests control every byte on the wire:
fragmentation, opcodes, masking, abrupt drops, clients that never read.
"""

from __future__ import annotations

import base64
import os
import socket
import struct
from dataclasses import dataclass
from typing import NamedTuple

TEXT, BINARY, CLOSE, PING, PONG, CONT = 0x1, 0x2, 0x8, 0x9, 0xA, 0x0


class HandshakeError(Exception):
    def __init__(self, status: int, head: str) -> None:
        super().__init__(f"HTTP {status}: {head.splitlines()[0] if head else ''}")
        self.status = status
        self.head = head


@dataclass
class Closed(Exception):
    code: int | None
    reason: str = ""


class Frame(NamedTuple):
    fin: bool
    rsv: int  # RSV1..RSV3 as bits 2..0: 4 is RSV1 (permessage-deflate)
    opcode: int
    payload: bytes


def frame(opcode: int, payload: bytes, fin: bool = True, mask: bool = True, rsv: int = 0) -> bytes:
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    n = len(payload)
    maskbit = 0x80 if mask else 0
    if n < 126:
        head = struct.pack("!BB", first, maskbit | n)
    elif n < 65536:
        head = struct.pack("!BBH", first, maskbit | 126, n)
    else:
        head = struct.pack("!BBQ", first, maskbit | 127, n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + _xor(payload, key)


def _xor(data: bytes, key: bytes) -> bytes:
    if not data:
        return b""
    k = int.from_bytes((key * (len(data) // 4 + 1))[: len(data)], "big")
    return (int.from_bytes(data, "big") ^ k).to_bytes(len(data), "big")


class Client:
    def __init__(
        self,
        port: int,
        path: str = "/",
        host: str = "127.0.0.1",
        headers: dict[str, str] | None = None,
        timeout: float = 10.0,
        rcvbuf: int | None = None,
        sock: socket.socket | None = None,
    ) -> None:
        if sock is None:  # else: an already connected socket, e.g. TLS-wrapped
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            if rcvbuf is not None:  # small buffers: a client that stops reading falls behind fast
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.settimeout(timeout)
            sock.connect((host, port))
        self.sock = sock
        self.sock.settimeout(timeout)
        self.buf = b""
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            f"GET {path} HTTP/1.1",
            f"Host: {host}:{port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
        ]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = self._read_head()
        status = int(head.split(" ", 2)[1])
        if status != 101:
            raise HandshakeError(status, head)
        self.response_headers = head
        self.local_port = self.sock.getsockname()[1]

    def _read_head(self) -> str:
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            self.buf += chunk
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        return head.decode("latin-1")

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(max(65536, n - len(self.buf)))
            if not chunk:
                raise Closed(None, "TCP connection closed")
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def send_frame(self, opcode: int, payload: bytes, fin: bool = True, **kw: object) -> None:
        self.sock.sendall(frame(opcode, payload, fin, **kw))  # type: ignore[arg-type]

    def send(self, payload: str | bytes) -> None:
        if isinstance(payload, str):
            self.send_frame(TEXT, payload.encode("utf-8"))
        else:
            self.send_frame(BINARY, payload)

    def send_fragmented(self, payload: bytes, opcode: int, pieces: int) -> None:
        step = max(1, -(-len(payload) // pieces))
        chunks = [payload[i : i + step] for i in range(0, len(payload), step)] or [b""]
        for i, chunk in enumerate(chunks):
            self.send_frame(opcode if i == 0 else CONT, chunk, fin=i == len(chunks) - 1)

    def read_frame(self) -> Frame:
        """The next frame as sent, RSV bits included (a compressed message has RSV1)."""
        b0, b1 = self._read(2)
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", self._read(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", self._read(8))
        assert not b1 & 0x80, "server frames must not be masked"
        return Frame(bool(b0 & 0x80), (b0 >> 4) & 0x7, b0 & 0x0F, self._read(n))

    def recv_frame(self) -> tuple[bool, int, bytes]:
        f = self.read_frame()
        return f.fin, f.opcode, f.payload

    def recv_message(self) -> tuple[int, bytes]:
        """The next data message (opcode, payload); answers pings; raises Closed."""
        parts: list[bytes] = []
        opcode = None
        while True:
            fin, op, payload = self.recv_frame()
            if op == PING:
                self.send_frame(PONG, payload)
                continue
            if op == PONG:
                continue
            if op == CLOSE:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                raise Closed(code, payload[2:].decode("utf-8", "replace"))
            if opcode is None:
                opcode = op
            parts.append(payload)
            if fin:
                return opcode, b"".join(parts)

    def recv(self) -> str | bytes:
        opcode, payload = self.recv_message()
        return payload.decode("utf-8") if opcode == TEXT else payload

    def expect_close(self) -> int | None:
        """Read until the server's close frame (skipping data); return its code."""
        while True:
            try:
                self.recv_message()
            except Closed as c:
                return c.code

    def close(self, code: int = 1000) -> int | None:
        """Clean close handshake; returns the code the server answered with."""
        try:
            self.send_frame(CLOSE, struct.pack("!H", code))
            return self.expect_close()
        except OSError:
            return None
        finally:
            self.sock.close()

    def drop(self) -> None:
        """Vanish without a close frame: a TCP reset, as a crashed client would."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

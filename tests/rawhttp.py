"""Raw HTTP over a socket, for tests that control every byte of a request.

One exchange helper for the door (tests/test_door.py), the upgrade path
(tests/test_upgrade_path.py) and the routing table (tests/test_routing.py):
send bytes, read the answer until the server closes, or only until its head
is complete.
"""

from __future__ import annotations

import re
import socket
import time

KEY = "dGhlIHNhbXBsZSBub25jZQ=="
ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def handshake(path: str = "/relay/r", *extra: str, first: str = "") -> bytes:
    """A WebSocket opening handshake (RFC 6455's sample key), with ``extra`` header lines."""
    lines = [
        first or f"GET {path} HTTP/1.1",
        "Host: 127.0.0.1:9000",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {KEY}",
        "Sec-WebSocket-Version: 13",
        *extra,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def exchange(
    port: int,
    data: bytes,
    wait: float = 5.0,
    host: str = "127.0.0.1",
    head_only: bool = False,
) -> bytes:
    """Send ``data`` (from the source address ``host``); return what comes back until the
    server closes (or resets), or with ``head_only`` until its response head is complete.

    (A caller that looks at the head only must not wait for "quiet" instead: that
    could cut a head that a loaded server sends in pieces.)
    """
    s = socket.create_connection(("127.0.0.1", port), timeout=wait, source_address=(host, 0))
    try:
        s.sendall(data)
        got = b""
        deadline = time.monotonic() + wait
        while not (head_only and b"\r\n\r\n" in got) and time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            got += chunk
        return got
    finally:
        s.close()


def status_of(answer: bytes) -> int:
    m = re.match(rb"HTTP/1\.1 (\d{3}) ", answer)
    assert m, answer[:200]
    return int(m.group(1))

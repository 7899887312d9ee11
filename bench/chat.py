"""Chat path benchmark: SQLite write cost per message, fan-out with history on and off.

    python -m bench.chat [--members 100] [--messages 20000] [--size 64]

The daemon is pinned to CPU 0 and this generator to CPU 1 (when there are
two). The generator is one process: N member sockets read by one selector
loop that only parses frame headers, and one sender that keeps a window of
messages in flight (its own copies are its acknowledgements). Its own CPU
time is printed so a saturated generator shows.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import statistics
import tempfile
import time

from chatd.history import History
from tools.daemon import Daemon

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def mask(payload: bytes) -> bytes:
    n = len(payload)
    head = bytes([0x81, 0x80 | n]) if n < 126 else bytes([0x81, 0xFE]) + n.to_bytes(2, "big")
    return head + b"\0\0\0\0" + payload  # a zero mask: valid, and free to apply


class Member:
    """A v1 member that counts the frames it receives, parsing only their headers."""

    def __init__(self, port: int, nick: str, room: str) -> None:
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(
            (
                f"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {KEY.decode()}\r\n"
                f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: chatd.v1\r\n\r\n"
            ).encode()
        )
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += s.recv(4096)
        self.sock = s
        self.buf = buf.split(b"\r\n\r\n", 1)[1]
        self.frames = 0
        for obj in ({"type": "hello", "nick": nick}, {"type": "join", "room": room}):
            s.sendall(mask(json.dumps(obj).encode()))

    def read(self) -> int:
        data = self.sock.recv(1 << 20)
        if not data:
            raise ConnectionError("closed")
        buf = self.buf + data
        i, n, got = 0, len(buf), 0
        while i + 2 <= n:
            ln = buf[i + 1] & 0x7F
            h = 2
            if ln == 126:
                if i + 4 > n:
                    break
                ln, h = int.from_bytes(buf[i + 2 : i + 4], "big"), 4
            elif ln == 127:
                if i + 10 > n:
                    break
                ln, h = int.from_bytes(buf[i + 2 : i + 10], "big"), 10
            if i + h + ln > n:
                break
            i += h + ln
            got += 1
        self.buf = buf[i:]
        self.frames += got
        return got


def drain(members: list[Member], quiet: float = 0.3) -> None:
    sel = selectors.DefaultSelector()
    for m in members:
        sel.register(m.sock, selectors.EVENT_READ, m)
    while True:
        events = sel.select(quiet)
        if not events:
            break
        for key, _ in events:
            key.data.read()
    sel.close()
    for m in members:
        m.frames = 0


def chatd_args(history_size: int) -> list[str]:
    """The daemon's options for the fan-out run (tests/test_settings.py parses them)."""
    return [
        "--history-size",
        str(history_size),
        "--rate",
        "1000000",  # (the highest --rate and --rate-burst accept)
        "--rate-burst",
        "1000000",
        "--ping-interval",
        "0",
        "--join-history",
        "0",
        "--max-backlog",
        "64M",
    ]


def fanout(history_size: int, members: int, messages: int, size: int, window: int) -> dict:
    with Daemon(*chatd_args(history_size)) as d:
        if os.cpu_count() and os.cpu_count() > 1:
            os.sched_setaffinity(d.pid, {0})
            os.sched_setaffinity(0, {1})
        ms = [Member(d.port, f"m{i}", "bench") for i in range(members)]
        sender = ms[0]
        drain(ms)
        sel = selectors.DefaultSelector()
        for m in ms:
            sel.register(m.sock, selectors.EVENT_READ, m)
        text = "x" * size
        frame = mask(json.dumps({"type": "send", "room": "bench", "text": text}).encode())
        cpu0, gen0, t0 = cpu_seconds(d.pid), time.process_time(), time.perf_counter()
        sent = 0
        total = members * messages
        received = 0
        deadline = t0 + 120
        while received < total and time.perf_counter() < deadline:
            if sent < messages and sent - sender.frames < window:
                k = min(window - (sent - sender.frames), messages - sent)
                sender.sock.sendall(frame * k)
                sent += k
            for key, _ in sel.select(0.5):
                received += key.data.read()
        elapsed = time.perf_counter() - t0
        server_cpu = cpu_seconds(d.pid) - cpu0
        gen_cpu = time.process_time() - gen0
        sel.close()
        for m in ms:
            m.sock.close()
    return {
        "deliveries_per_s": received / elapsed,
        "messages_per_s": received / members / elapsed,
        "server_us_per_delivery": server_cpu / max(received, 1) * 1e6,
        "server_cpu_share": server_cpu / elapsed,
        "generator_cpu_share": gen_cpu / elapsed,
        "complete": received == total,
    }


def sqlite_cost(messages: int, batch: int, size: int) -> float:
    """Microseconds per message for append + commit, committing every ``batch``."""
    with tempfile.TemporaryDirectory() as tmp:
        h = History(os.path.join(tmp, "bench.sqlite3"), retention=1000)
        text = "x" * size
        t0 = time.perf_counter()
        for i in range(messages):
            h.append("bench", "sender", text)
            if (i + 1) % batch == 0:
                h.commit()
        h.commit()
        dt = time.perf_counter() - t0
        h.close()
    return dt / messages * 1e6


RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS-chat.md")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--members", type=int, default=100)
    ap.add_argument("--messages", type=int, default=5000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--window", type=int, default=50)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    lines: list[str] = []

    def say(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    say(
        f"chatd chat-path benchmark, {time.strftime('%Y-%m-%d %H:%M:%S')}, "
        f"{os.cpu_count()} CPUs, text {a.size} B"
    )
    say("\nSQLite append+commit, microseconds per message (median of 3):")
    for batch in (1, 10, 100):
        cost = statistics.median(sqlite_cost(5000, batch, a.size) for _ in range(3))
        say(f"  commit every {batch:>3} message(s): {cost:7.1f} us")

    say(
        f"\nfan-out: {a.members} members in one room, {a.messages} messages, "
        f"window {a.window}, median of {a.runs}:"
    )
    say(
        f"  {'history':<12}{'deliveries/s':>14}{'msgs/s':>10}{'us/deliv':>10}"
        f"{'server cpu':>12}{'gen cpu':>9}"
    )
    for label, hist in (("on (1000)", 1000), ("off (0)", 0)):
        runs = [fanout(hist, a.members, a.messages, a.size, a.window) for _ in range(a.runs)]
        runs.sort(key=lambda r: r["deliveries_per_s"])
        r = runs[len(runs) // 2]
        flag = "  GENERATOR SATURATED" if r["generator_cpu_share"] > 0.9 else ""
        flag += "" if r["complete"] else "  INCOMPLETE"
        say(
            f"  {label:<12}{r['deliveries_per_s']:>14,.0f}{r['messages_per_s']:>10,.0f}"
            f"{r['server_us_per_delivery']:>10.2f}{r['server_cpu_share']:>11.0%}"
            f"{r['generator_cpu_share']:>9.0%}{flag}"
        )
    with open(RESULTS, "w") as f:
        f.write("# chatd chat path: newest run of `python -m bench.chat`\n\n```\n")
        f.write("\n".join(lines).strip() + "\n```\n")


if __name__ == "__main__":
    main()

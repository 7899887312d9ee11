"""permessage-deflate side by side: plain, deflate (chatd's default), deflate with context takeover.

    python -m bench.deflate [--quick] [--only memory,cpu,wire]

Why: issue #13 ("compression that scales"). Each row starts a fresh chatd
(pinned to CPU 0, the C generator bench/loadgen.c on CPU 1, as bench.run
does) and measures, with clients that offer permessage-deflate as Chromium
does (``permessage-deflate; client_max_window_bits``):

- memory: server RSS growth per connection: 2,000 idle connections (opened,
  no message); 300 members of a relay room after 1 message and after 600
  messages of 200 B;
- cpu: server CPU per delivery, 300 members, 100 msg/s of 200 B for 6 s
  (loadgen's latency mode: p50 too), and at 20 msg/s (30 s), where a server
  that deflates per connection is not saturated;
- wire: bytes on the wire per message (frame header included) that one
  member receives, for chat-sized JSON (~150-200 B, varied) and for 4 KiB
  JSON documents, from a Python client on loopback.

"deflate" is chatd's default (no context takeover, one deflated frame per
message shared by all); "takeover" is ``--compression-context-takeover``
(a compressor and a deflate per connection). With BENCH_BASELINE=<another
checkout of chatd> (as for bench.run) a column "base deflate" runs that
chatd with compression on, its clients keeping their inflater's context. Results go to stdout and to
the "permessage-deflate" section of bench/RESULTS-deflate.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import struct
import time
import zlib
from dataclasses import dataclass
from typing import Any

from bench.run import (
    CHATD_COMMON,
    REPO,
    ServerSpec,
    build_loadgen,
    load,
    log,
    machine,
    proc_rss_kib,
)
from tools.daemon import Daemon

RESULTS = REPO / "bench" / "RESULTS-deflate.md"
CHROMIUM = "permessage-deflate; client_max_window_bits"
KIND_ARGS = {"plain": (), "deflate": (), "takeover": ("--compression-context-takeover",)}
KINDS = tuple(KIND_ARGS)
BASELINE = os.environ.get("BENCH_BASELINE", "")
BASE = "base deflate"


def spec(kind: str) -> ServerSpec:
    return ServerSpec(
        kind,
        kind,
        chatd_args=("--history-size", "0", *KIND_ARGS.get(kind, ())),
        path="/relay/bench",
        deflate={"plain": 0, "deflate": 1}.get(kind, 2),
        tree=BASELINE if kind == BASE else "",
    )


@dataclass
class Run:
    members: int
    rate: float
    seconds: float


def idle_kib(kind: str, n: int = 2000) -> float:
    """Server RSS growth per open connection, nothing sent."""
    args = ["-n", str(n), "--hold", "2", "--setup", ""]
    with load(spec(kind), "idle", args, 120) as (gen, server):
        res = gen.result()
        after = proc_rss_kib(server.pid)
    if res.get("error") or not res.get("open"):
        return float("nan")
    return float((after - gen.rss_before) / res["open"])


def latency_run(kind: str, r: Run) -> dict[str, Any]:
    """One loadgen latency run: RSS growth per member, CPU per delivery, p50."""
    args = ["-n", str(r.members), "--rate", str(r.rate), "--duration", str(r.seconds)]
    args += ["--size", "200", "--setup", ""]
    with load(spec(kind), "latency", args, r.seconds + 120, ("--max-backlog", "64M")) as (gen, _):
        res = gen.result()
        a, b = gen.marks.get("start"), gen.marks.get("end")
        before = gen.rss_before
    out: dict[str, Any] = {"result": res}
    if a and b:
        deliveries = max(res.get("deliveries", 0), 1)
        out["us_per_delivery"] = (b.cpu - a.cpu) / deliveries * 1e6
        out["kib_per_conn"] = (b.rss - before) / r.members
    return out


# -- bytes on the wire ---------------------------------------------------------------


class Raw:
    """A minimal blocking WebSocket client: the bytes of every frame it reads are counted."""

    def __init__(self, port: int, path: str, offer: str | None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        ext = f"Sec-WebSocket-Extensions: {offer}\r\n" if offer else ""
        self.sock.sendall(
            (
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                f"Sec-WebSocket-Version: 13\r\n{ext}\r\n"
            ).encode()
        )
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("closed during the handshake")
            self.buf += chunk
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        self.head = head.decode("latin-1")
        assert self.head.startswith("HTTP/1.1 101"), self.head
        self.inflater = zlib.decompressobj(-15)  # context takeover: one for the connection
        self.wire = 0

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n:]
        self.wire += n
        return data

    def send(self, payload: bytes) -> None:
        n = len(payload)
        if n < 126:
            head = struct.pack("!BB", 0x81, 0x80 | n)
        elif n < 65536:
            head = struct.pack("!BBH", 0x81, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", 0x81, 0x80 | 127, n)
        self.sock.sendall(head + b"\0\0\0\0" + payload)  # a zero mask

    def message(self) -> bytes:
        b0, b1 = self._read(2)
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", self._read(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", self._read(8))
        payload = self._read(n)
        if b0 & 0x40:
            return self.inflater.decompress(payload + b"\x00\x00\xff\xff")
        return payload

    def close(self) -> None:
        self.sock.close()


_TEXT = (
    "the a to and of in is it you that for on was with he as I his they be at one have this "
    "from or had by hot word but what some we can out other were all there when up use your how "
    "said an each she which do their time if will way about many then them write would like so "
    "these her long make thing see him two has look more day could go come did number sound no "
    "most people my over know water than call first who may down side been now find meeting "
    "deploy standup coffee lunch review merge branch ticket tomorrow thanks ok sure"
)
WORDS = tuple(_TEXT.split(" "))


def chat_messages(n: int, rng: random.Random) -> list[bytes]:
    """Chat lines as chatd.v1 renders them (~150-200 B), different every time."""
    out = []
    ts = 1764547200.0
    for i in range(n):
        ts += rng.uniform(0.5, 30)
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 16)))
        msg = {
            "type": "message",
            "room": "lobby",
            "id": 1000 + i,
            "ts": round(ts, 3),
            "nick": f"user{rng.randint(1, 40)}",
            "text": text,
        }
        out.append(json.dumps(msg, separators=(",", ":")).encode())
    return out


def documents(n: int, rng: random.Random, size: int = 4096) -> list[bytes]:
    """4 KiB JSON documents (a page of price updates), different every time."""
    out = []
    for i in range(n):
        items: list[dict[str, Any]] = []
        doc: dict[str, Any] = {"type": "update", "seq": i, "items": items}
        while len(json.dumps(doc, separators=(",", ":"))) < size - 90:
            items.append(
                {
                    "sym": "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(4)),
                    "bid": round(rng.uniform(1, 500), 2),
                    "ask": round(rng.uniform(1, 500), 2),
                    "vol": rng.randint(0, 10**6),
                }
            )
        data = json.dumps(doc, separators=(",", ":")).encode()
        out.append(data[:size] if len(data) > size else data)
    return out


def wire_bytes(kind: str, payloads: list[bytes]) -> float:
    """Bytes on the wire per message that one member receives."""
    common = [a for a in CHATD_COMMON if not (kind != "plain" and a == "--no-compression")]
    env = {"PYTHONPATH": BASELINE} if kind == BASE else None
    d = Daemon(*common, "--history-size", "0", *KIND_ARGS.get(kind, ()), timeout=60, env=env)
    try:
        member = Raw(d.port, "/relay/wire", None if kind == "plain" else CHROMIUM)
        publisher = Raw(d.port, "/relay/wire", None)
        for p in payloads:
            publisher.send(p)
            got = member.message()
            assert got == p, (kind, len(got), len(p))
            publisher.message()
        member.close()
        publisher.close()
        return member.wire / len(payloads)
    finally:
        d.stop()


# -- the report ----------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="shorter runs")
    ap.add_argument("--only", default="memory,cpu,wire")
    a = ap.parse_args()
    only = {x.strip() for x in a.only.split(",")}
    kinds = (*KINDS, BASE) if BASELINE else KINDS
    build_loadgen()
    scale = 0.5 if a.quick else 1.0
    rows: list[tuple[str, dict[str, str]]] = []
    started = time.monotonic()
    log(f"permessage-deflate benchmark: {machine()}")
    if "memory" in only:
        one: dict[str, str] = {}
        idle: dict[str, str] = {}
        many: dict[str, str] = {}
        for kind in kinds:
            log(f"[{kind}] memory")
            idle[kind] = f"{idle_kib(kind):.1f}"
            r1 = latency_run(kind, Run(300, 1, 1))  # one message
            r600 = latency_run(kind, Run(300, 100, 6))  # 600 messages of 200 B
            one[kind] = f"{r1.get('kib_per_conn', float('nan')):.1f}"
            many[kind] = f"{r600.get('kib_per_conn', float('nan')):.1f}"
            log(f"  idle {idle[kind]}, 1 msg {one[kind]}, 600 msgs {many[kind]} KiB/conn")
        rows += [
            ("KiB/conn, 2,000 connections open (no message)", idle),
            ("KiB/conn after 1 message", one),
            ("KiB/conn after 600 messages of 200 B", many),
        ]
    if "cpu" in only:
        for rate, seconds in ((100, 6), (20, 30)):
            us: dict[str, str] = {}
            p50: dict[str, str] = {}
            for kind in kinds:
                log(f"[{kind}] cpu at {rate} msg/s")
                r = latency_run(kind, Run(300, rate, seconds * scale))
                res = r["result"]
                lost = res.get("expected", 0) - res.get("deliveries", 0)
                us[kind] = f"{r.get('us_per_delivery', float('nan')):.2f}"
                us[kind] += " (lost)" if lost else ""
                p50[kind] = f"{res.get('p50_ms', -1):.2f}"
                log(f"  {us[kind]} us/delivery, p50 {p50[kind]} ms, result {res}")
            rows += [
                (f"server CPU us/delivery (300 x {rate} msg/s, 200 B)", us),
                ("  latency p50 ms", p50),
            ]
    if "wire" in only:
        rng = random.Random(13)
        n = 100 if a.quick else 300
        sets = {
            "chat JSON (~150-200 B)": chat_messages(n, rng),
            "4 KiB JSON": documents(n // 3, rng),
        }
        for name, payloads in sets.items():
            raw = sum(len(p) for p in payloads) / len(payloads)
            cells = {}
            for kind in kinds:
                log(f"[{kind}] wire: {name}")
                cells[kind] = f"{wire_bytes(kind, payloads):.0f}"
            rows.append((f"wire B/message: {name}, payload {raw:.0f} B", cells))
            log(f"  {cells}")
    label_w = max(len(r[0]) for r in rows) + 2
    head = "".ljust(label_w) + "".join(k.rjust(14) for k in kinds)
    lines = [head, "-" * len(head)]
    for label, cells in rows:
        lines.append(label.ljust(label_w) + "".join(cells.get(k, "-").rjust(14) for k in kinds))
    text = "\n".join(lines)
    print(text)
    log(f"done in {time.monotonic() - started:.0f} s")
    RESULTS.write_text(
        "# permessage-deflate: plain, deflate (default), deflate with context takeover\n\n"
        f"Made by `python -m bench.deflate{' --quick' if a.quick else ''}` on "
        f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}; {machine()}; server on CPU 0, "
        "generator on CPU 1.\n\n```\n" + text + "\n```\n\n"
        "Clients offer `permessage-deflate; client_max_window_bits` (Chromium's offer); "
        "plain clients offer nothing. deflate: chatd's default (server and client "
        "no context takeover: one deflated frame per message, shared); takeover: "
        "`--compression-context-takeover`."
        + (f" base deflate: the chatd in {BASELINE} (BENCH_BASELINE)." if BASELINE else "")
        + " Memory and CPU: a relay room of 300 loadgen "
        "members, 200-byte messages (a marker and padding: very compressible); KiB/conn is "
        "the server's RSS growth over the members, so it includes the process's one "
        "compressor (~256 KiB, under 1 KiB per member here). A p50 of 50 ms or more "
        "means the server could not keep up (saturated): its CPU per delivery then "
        "includes falling behind. wire: what one member reads, "
        "frame headers included, for messages that are all different.\n"
    )
    log(f"wrote {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()

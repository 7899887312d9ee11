"""permessage-deflate side by side: plain, deflate (chatd's default), deflate with context takeover.

    python -m bench.deflate [--quick] [--only memory,cpu,wire,chromium]

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
  JSON documents, from a Python client on loopback;
- chromium: Chromium itself, a column "chromium (deflate)" beside the
  memory and cpu rows. chatd as in the deflate column; headless Debian
  Chromium (/usr/bin/chromium or CHATD_CHROMIUM, launched through Playwright
  as tests/conftest.py does, on CPU 1) loads /plain.html from that chatd
  and from that one page opens 200 WebSockets to the relay room (Chromium
  allows about 255 per profile); the page checks that every socket's
  ``extensions`` is permessage-deflate. With one plain Python client
  publishing (a member too: 201 connections), the server's RSS growth per
  connection from after the page load: with the sockets open (no message),
  after 1 message, after 600 of 200 B (599 more at 100 msg/s, loadgen's
  payload), with the server's CPU per delivery over those 599; then 600
  more at 20 msg/s for the CPU at a rate the browser keeps up with. Every
  delivery is counted in the page (bounded waits); p50 is the page's
  Date.now() against the publisher's clock. The browser shares CPU 1 with
  the publisher and inflates every message on every socket: its p50 at
  100 msg/s is the browser falling behind, and the CPU rows of this column
  are the server's cost with a real browser as the load, not a comparison
  with loadgen's. Skipped, with the reason, when Playwright or Chromium is
  missing.

"deflate" is chatd's default (no context takeover, one deflated frame per
message shared by all); "takeover" is ``--compression-context-takeover``
(a compressor and a deflate per connection). With BENCH_BASELINE=<another
checkout of chatd> (as for bench.run) a column "base deflate" runs that
chatd with compression on, its clients keeping their inflater's context.
Results go to stdout and to bench/RESULTS-deflate.md: a full run replaces
its first section, a run with --only its own section after that one; the
sections written by hand are kept.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from typing import Any

from bench.run import (
    CHATD_COMMON,
    GEN_CPU,
    REPO,
    ServerSpec,
    build_loadgen,
    load,
    log,
    machine,
    proc_cpu_s,
    proc_rss_kib,
    running,
)
from tools.chromium import CHROMIUM as CHROMIUM_BIN
from tools.chromium import CHROMIUM_ARGS
from tools.daemon import Daemon

RESULTS = REPO / "bench" / "RESULTS-deflate.md"
CHROMIUM = "permessage-deflate; client_max_window_bits"
KIND_ARGS = {"plain": (), "deflate": (), "takeover": ("--compression-context-takeover",)}
KINDS = tuple(KIND_ARGS)
BASELINE = os.environ.get("BENCH_BASELINE", "")
BASE = "base deflate"
BROWSER = "chromium (deflate)"
BROWSER_SOCKETS = 200  # one page; Chromium allows about 255 WebSockets per profile
PARTS = ("memory", "cpu", "wire", "chromium")


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


# -- Chromium itself ------------------------------------------------------------------

# Opens n WebSockets from the page; counts opens, closes and messages (and, while
# window.bench.timing, each message's age: its first 18 bytes are "@@" and the send
# time in ms since the epoch, as Date.now() reads it).
OPEN_SOCKETS = """([url, n]) => {
  const b = (window.bench = {open: 0, closed: 0, got: 0, timing: false, lat: [], socks: []});
  for (let i = 0; i < n; i++) {
    const ws = new WebSocket(url);
    ws.onopen = () => { b.open++; };
    ws.onclose = () => { b.closed++; };
    ws.onmessage = (e) => {
      b.got++;
      if (b.timing) b.lat.push(Date.now() - Number(e.data.slice(2, 18)));
    };
    b.socks.push(ws);
  }
}"""
STATE = """() => {
  const b = window.bench;
  return {open: b.open, closed: b.closed, got: b.got,
          extensions: [...new Set(b.socks.map((ws) => ws.extensions))]};
}"""
P50 = """() => {
  const a = window.bench.lat.slice().sort((x, y) => x - y);
  return a.length ? a[a.length >> 1] : -1;
}"""


def publish(pub: Raw, count: int, rate: float) -> None:
    """``count`` messages of 200 B at ``rate``/s (a marker, the time, padding), as loadgen's."""
    # its own copies, read meanwhile (as loadgen's publisher does), not queued in chatd
    reader = threading.Thread(target=lambda: [pub.message() for _ in range(count)], daemon=True)
    reader.start()
    t0 = time.monotonic()
    for i in range(count):
        delay = t0 + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        pub.send(f"@@{time.time() * 1000:016.2f}".encode().ljust(200, b"x"))
    reader.join(30)
    if reader.is_alive():
        raise RuntimeError("the publisher did not get its own messages back in 30 s")


def chromium(quick: bool) -> tuple[dict[str, str], str]:
    """Chromium's own permessage-deflate: BROWSER_SOCKETS WebSockets from one page.

    Returns cells by row key ("idle", "one", "many", "cpu100", "p50_100",
    "cpu20", "p50_20") and a note, or no cells and why not.
    """
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as e:
        return {}, f"skipped: Playwright is not importable ({e})"
    if not shutil.which(CHROMIUM_BIN):
        return {}, f"skipped: {CHROMIUM_BIN} is missing (Debian's chromium; CHATD_CHROMIUM)"
    n = BROWSER_SOCKETS
    conns = n + 1  # and the publisher, a plain Python client (loadgen's is a member too)
    cells: dict[str, str] = {}
    affinity = os.sched_getaffinity(0)
    if GEN_CPU is not None:
        os.sched_setaffinity(0, {GEN_CPU})  # Chromium and its driver inherit the generator's CPU
    try:
        with (
            running(spec("deflate"), ("--max-backlog", "64M")) as server,
            sync_playwright() as p,
        ):
            browser = p.chromium.launch(executable_path=CHROMIUM_BIN, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                page.goto(f"http://127.0.0.1:{server.port}/plain.html", timeout=30_000)
                time.sleep(0.5)
                before = proc_rss_kib(server.pid)  # after the page's own HTTP requests

                def kib() -> float:
                    return (proc_rss_kib(server.pid) - before) / conns

                def until(expr: str, seconds: float) -> bool:
                    """Whether ``expr`` became true in the page within ``seconds`` (polled:
                    the page's CSP forbids wait_for_function's eval)."""
                    deadline = time.monotonic() + seconds
                    while not page.evaluate(expr):
                        if time.monotonic() > deadline:
                            return False
                        time.sleep(0.05)
                    return True

                def delivered(target: int, seconds: float) -> bool:
                    ok = until(f"window.bench.got >= {target}", seconds)
                    if not ok:
                        got = page.evaluate("window.bench.got")
                        log(f"  chromium: {got} of {target} deliveries counted in {seconds} s")
                    return ok

                url = f"ws://127.0.0.1:{server.port}/relay/bench"
                page.evaluate(OPEN_SOCKETS, [url, n])
                until(f"window.bench.open === {n} || window.bench.closed > 0", 60)
                st = page.evaluate(STATE)
                if st["open"] != n or st["closed"]:
                    return {}, f"failed: {st['open']} of {n} open, {st['closed']} closed"
                exts = st["extensions"]
                if not all(str(e).startswith("permessage-deflate") for e in exts):
                    return {}, f"failed: not every socket negotiated permessage-deflate: {exts}"
                offered = " and ".join(f"`{e}`" for e in exts)
                note = f"Chromium {browser.version}: all {n} sockets negotiated {offered}"
                log(f"  {note}")
                pub = Raw(server.port, "/relay/bench", None)
                time.sleep(2)  # as loadgen's idle run holds its connections
                cells["idle"] = f"{kib():.1f}"
                publish(pub, 1, 1)
                ok = delivered(n, 30)
                cells["one"] = f"{kib():.1f}" + ("" if ok else " (lost)")
                # 599 more at 100 msg/s: 600 messages of 200 B in all, and the CPU
                page.evaluate("window.bench.timing = true")
                cpu = proc_cpu_s(server.pid)
                publish(pub, 599, 100)
                ok = delivered(n * 600, 60)
                us = (proc_cpu_s(server.pid) - cpu) / (599 * conns) * 1e6
                cells["many"] = f"{kib():.1f}" + ("" if ok else " (lost)")
                cells["cpu100"] = f"{us:.2f}" + ("" if ok else " (lost)")
                cells["p50_100"] = f"{page.evaluate(P50):.2f}"
                count = int(20 * 30 * (0.5 if quick else 1.0))
                page.evaluate("window.bench.lat = []")
                cpu = proc_cpu_s(server.pid)
                publish(pub, count, 20)
                ok = delivered(n * (600 + count), 60)
                us = (proc_cpu_s(server.pid) - cpu) / (count * conns) * 1e6
                cells["cpu20"] = f"{us:.2f}" + ("" if ok else " (lost)")
                cells["p50_20"] = f"{page.evaluate(P50):.2f}"
                note += f"; after the 20 msg/s run, {kib():.1f} KiB/conn"
                pub.close()
            finally:
                browser.close()
    finally:
        os.sched_setaffinity(0, affinity)
    log(f"  chromium: {cells}")
    return cells, note


# -- the report ----------------------------------------------------------------------


LABELS = {
    "idle": "KiB/conn, connections open (no message)",
    "one": "KiB/conn after 1 message",
    "many": "KiB/conn after 600 messages of 200 B",
    "cpu100": "server CPU us/delivery (100 msg/s, 200 B)",
    "p50_100": "  latency p50 ms",
    "cpu20": "server CPU us/delivery (20 msg/s, 200 B)",
    "p50_20": "  latency p50 ms",
}


def legend(kinds: tuple[str, ...], browser_note: str, quick: bool) -> str:
    parts = []
    if set(kinds) - {BROWSER}:
        parts.append(
            "Clients offer `permessage-deflate; client_max_window_bits` (Chromium's offer); "
            "plain clients offer nothing. deflate: chatd's default (server and client "
            "no context takeover: one deflated frame per message, shared); takeover: "
            "`--compression-context-takeover`."
            + (f" base deflate: the chatd in {BASELINE} (BENCH_BASELINE)." if BASELINE else "")
            + " Memory and CPU: a relay room of 300 loadgen members (2,000 connections for "
            "the row with no message), 200-byte messages (a marker and padding: very "
            "compressible), 600 at 100 msg/s (6 s) and 600 at 20 msg/s (30 s); KiB/conn is "
            "the server's RSS growth over the members, so it includes the process's one "
            "compressor (~256 KiB, under 1 KiB per member here). A p50 of 50 ms or more "
            "means the server could not keep up (saturated): its CPU per delivery then "
            "includes falling behind. wire: what one member reads, "
            "frame headers included, for messages that are all different."
        )
    if BROWSER in kinds:
        later = 300 if quick else 600
        parts.append(
            f"{BROWSER}: chatd with its default compression (the deflate column's "
            "flags), headless Debian Chromium through Playwright on CPU 1 (the generator's), "
            f"one page of the daemon (/plain.html) opening {BROWSER_SOCKETS} WebSockets to "
            "the relay room, every one checked in the page to have negotiated "
            "permessage-deflate, and one plain Python client publishing (a member too, so "
            f"{BROWSER_SOCKETS + 1} connections: KiB/conn and deliveries are over them). "
            "Its RSS baseline is taken after the page loaded; its messages are cumulative on "
            "the same connections (the 1st, then 599 more at 100 msg/s: the 600 row and the "
            f"100 msg/s CPU row, then {later} more at 20 msg/s) and the same 200-byte "
            "payloads as loadgen's; every delivery is counted in the page, with a bounded "
            "wait, and its p50 is the page's Date.now() against the publisher's clock. "
            "Chromium (browser, renderer, network service: it inflates every message on "
            "every socket) shares CPU 1 with the publisher, so this column's p50 is "
            "Chromium's: a p50 of seconds means the browser fell behind, not the server, "
            "and the server then writes more frames per write (a lower CPU per delivery). "
            f"Its CPU rows are the server's CPU per delivery while a browser is the load; "
            "the memory rows are what compares. On a machine shared with other work "
            "the memory figures hold (RSS of chatd alone); CPU figures and p50 do not "
            f"(see the load averages above). {browser_note}."
        )
    return "\n\n".join(parts)


def write_results(body: str, parts: set[str], quick: bool, load0: str) -> None:
    """A full run replaces the file's first section; a partial run (--only) its own
    section after it; the sections written by hand are kept."""
    title = "# permessage-deflate: plain, deflate (default), deflate with context takeover\n"
    old = RESULTS.read_text() if RESULTS.exists() else title
    first, sep, rest = old.partition("\n## ")
    rest = sep + rest if sep else ""
    full = parts >= set(PARTS)
    args = f"{' --quick' if quick else ''}" + ("" if full else f" --only {','.join(sorted(parts))}")
    made = (
        f"Made by `python -m bench.deflate{args}` on {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; "
        f"{machine()}; server on CPU 0, generator on CPU 1; load average {load0} at the "
        f"start, {os.getloadavg()[0]:.1f} at the end.\n\n"
    )
    if full:
        RESULTS.write_text(title + "\n" + made + body + rest)
        return
    heading = f"## `python -m bench.deflate --only {','.join(sorted(parts))}`\n"
    sections = rest.split("\n## ")
    kept = [x for x in sections[1:] if not ("## " + x).startswith(heading)]
    text = first.rstrip("\n") + "\n\n" + heading + "\n" + made + body
    RESULTS.write_text(text + "".join("\n## " + x for x in kept))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="shorter runs")
    ap.add_argument("--only", default=",".join(PARTS), help=f"some of {','.join(PARTS)}")
    a = ap.parse_args()
    only = {x.strip() for x in a.only.split(",")}
    if not only <= set(PARTS):
        ap.error(f"--only: {','.join(sorted(only - set(PARTS)))} is not one of {PARTS}")
    kinds = (*KINDS, BASE) if BASELINE else KINDS
    build_loadgen()
    scale = 0.5 if a.quick else 1.0
    rows: dict[str, dict[str, str]] = {k: {} for k in LABELS}
    labels = dict(LABELS)
    started = time.monotonic()
    load0 = f"{os.getloadavg()[0]:.1f}"  # (1 min) other work on the machine
    log(f"permessage-deflate benchmark: {machine()}, load average {load0}")
    if "memory" in only:
        for kind in kinds:
            log(f"[{kind}] memory")
            rows["idle"][kind] = f"{idle_kib(kind):.1f}"
            r1 = latency_run(kind, Run(300, 1, 1))  # one message
            r600 = latency_run(kind, Run(300, 100, 6))  # 600 messages of 200 B
            rows["one"][kind] = f"{r1.get('kib_per_conn', float('nan')):.1f}"
            rows["many"][kind] = f"{r600.get('kib_per_conn', float('nan')):.1f}"
            log(
                f"  idle {rows['idle'][kind]}, 1 msg {rows['one'][kind]}, "
                f"600 msgs {rows['many'][kind]} KiB/conn"
            )
    if "cpu" in only:
        for rate, seconds in ((100, 6), (20, 30)):
            for kind in kinds:
                log(f"[{kind}] cpu at {rate} msg/s")
                r = latency_run(kind, Run(300, rate, seconds * scale))
                res = r["result"]
                lost = res.get("expected", 0) - res.get("deliveries", 0)
                us = f"{r.get('us_per_delivery', float('nan')):.2f}"
                rows[f"cpu{rate}"][kind] = us + (" (lost)" if lost else "")
                rows[f"p50_{rate}"][kind] = f"{res.get('p50_ms', -1):.2f}"
                log(f"  {us} us/delivery, p50 {rows[f'p50_{rate}'][kind]} ms, result {res}")
    if "wire" in only:
        rng = random.Random(13)
        n = 100 if a.quick else 300
        sets = {
            "chat JSON (~150-200 B)": chat_messages(n, rng),
            "4 KiB JSON": documents(n // 3, rng),
        }
        for name, payloads in sets.items():
            raw = sum(len(p) for p in payloads) / len(payloads)
            key = f"wire {name}"
            labels[key] = f"wire B/message: {name}, payload {raw:.0f} B"
            rows[key] = {}
            for kind in kinds:
                log(f"[{kind}] wire: {name}")
                rows[key][kind] = f"{wire_bytes(kind, payloads):.0f}"
            log(f"  {rows[key]}")
    browser_note = ""
    if "chromium" in only:
        log(f"[{BROWSER}] memory, cpu")
        cells, browser_note = chromium(a.quick)
        if not cells:
            log(f"  {BROWSER}: {browser_note}")
        for key, cell in cells.items():
            rows[key][BROWSER] = cell
    columns = tuple(k for k in (*kinds, BROWSER) if any(k in c for c in rows.values()))
    shown = [(labels[k], c) for k, c in rows.items() if c]
    if not shown:
        log("nothing measured")
        return
    label_w = max(len(r[0]) for r in shown) + 2
    widths = [max(14, len(k) + 2) for k in columns]
    head = "".ljust(label_w) + "".join(k.rjust(w) for k, w in zip(columns, widths, strict=True))
    lines = [head, "-" * len(head)]
    for label, cells in shown:
        lines.append(
            label.ljust(label_w)
            + "".join(cells.get(k, "-").rjust(w) for k, w in zip(columns, widths, strict=True))
        )
    text = "\n".join(lines)
    print(text)
    if browser_note and BROWSER not in columns:
        print(f"{BROWSER}: {browser_note}")
    log(f"done in {time.monotonic() - started:.0f} s")
    body = "```\n" + text + "\n```\n\n" + legend(columns, browser_note, a.quick) + "\n"
    if browser_note and BROWSER not in columns:
        body += f"\n{BROWSER}: {browser_note}.\n"
    write_results(body, only, a.quick, load0)
    log(f"wrote {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()

"""chatd.js (chatd/static/chatd.js) under Node's own test runner, against real daemons.

Three daemons: a plain one (CHATD_PORT), one with ``--auth token``
(CHATD_AUTH_PORT, its key in CHATD_JWT_KEY: the node tests sign their own
HS256 tokens) and one that the node tests restart through a small HTTP
control server on loopback (CHATD_CONTROL_PORT: POST /stop, /aside, /start,
/fresh: on a new database;
see clients/js/test/reconnect.test.mjs). Node 20's global WebSocket
(``--experimental-websocket``): nothing from npm. Node's output is shown
when it fails, and with ``-s`` (the measured sizes and reconnect times).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tools.daemon import Daemon

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "clients" / "js" / "test"
SECRET = "js-client-" * 4  # 40 bytes: HS256 needs at least 32
NODE_TIMEOUT = 180.0


class Restartable:
    """A daemon the node tests stop and start again on the same port and database."""

    def __init__(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="chatd-js-")
        self.cwd = self._tmp.name
        self._old: list[tempfile.TemporaryDirectory[str]] = []
        self.lock = threading.Lock()
        self.daemon: Daemon | None = Daemon("--ping-interval", "0", cwd=self.cwd)
        self.port = self.daemon.port

    def act(self, what: str) -> dict[str, int]:
        with self.lock:
            if what == "stop":
                self._stop()
                return {}
            self._stop()
            if what == "fresh":  # a new, empty database: the rooms' histories are lost
                self._old.append(self._tmp)
                self._tmp = tempfile.TemporaryDirectory(prefix="chatd-js-")
                self.cwd = self._tmp.name
            # aside: the same database on another port, which the clients do not know
            port = "0" if what == "aside" else str(self.port)
            self.daemon = Daemon("--ping-interval", "0", "--port", port, cwd=self.cwd)
            return {"port": self.daemon.port}

    def _stop(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()
            assert "Unhandled" not in self.daemon.log(), self.daemon.log()
            self.daemon = None

    def close(self) -> None:
        with self.lock:
            self._stop()
        for tmp in (*self._old, self._tmp):
            tmp.cleanup()


def control_server(target: Restartable) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            what = self.path.strip("/")
            if what not in ("stop", "aside", "start", "fresh"):
                self.send_error(404)
                return
            try:
                body = json.dumps(target.act(what)).encode()
                status = 200
            except Exception as e:  # the node test shows it
                body, status = repr(e).encode(), 500
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def restartable() -> Iterator[Restartable]:
    r = Restartable()
    yield r
    r.close()


def test_chatd_js_under_node(daemon, restartable: Restartable) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is missing: the nodejs package, 20.10 or later")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30).stdout
    major, minor = (int(x) for x in version.strip().lstrip("v").split(".")[:2])
    if (major, minor) < (20, 10):  # the first with --experimental-websocket
        pytest.fail(f"node {version.strip()} has no WebSocket: chatd.js's tests need 20.10+")
    plain = daemon("--ping-interval", "0")
    auth = daemon("--ping-interval", "0", "--auth", "token", "--jwt-key", SECRET)
    server = control_server(restartable)
    # (a directory would also run helpers.mjs; CHATD_JS_TESTS=reconnect picks files)
    only = os.environ.get("CHATD_JS_TESTS")
    files = sorted(str(p) for p in TESTS.glob(f"*{only}*.test.mjs" if only else "*.test.mjs"))
    assert files, TESTS
    env = {
        **os.environ,
        "CHATD_PORT": str(plain.port),
        "CHATD_AUTH_PORT": str(auth.port),
        "CHATD_JWT_KEY": SECRET,
        "CHATD_RESTART_PORT": str(restartable.port),
        "CHATD_CONTROL_PORT": str(server.server_address[1]),
    }
    # its own process group: on a timeout, node and the test files it runs go together
    proc = subprocess.Popen(
        [node, "--experimental-websocket", "--no-warnings", "--test", *files],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=NODE_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"node --test ran over {NODE_TIMEOUT} s:\n{out}")
    finally:
        server.shutdown()
        server.server_close()
    print(out)
    assert proc.returncode == 0, out

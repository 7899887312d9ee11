"""Start a real chatd (``twistd -n chatd``) as a child process and stop it by pid.

Used by the tests, the conformance run and the benchmarks, so all of them
exercise the daemon exactly as an operator runs it. ``--port 0`` lets the
kernel pick a free port; the daemon logs it and we read it back.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
_LISTENING = re.compile(r"chatd \S+ (\w+) listening on (\S+?):(\d+)")


def twistd() -> str:
    """The twistd beside this interpreter (the venv's)."""
    path = Path(sys.executable).parent / "twistd"
    return str(path) if path.exists() else "twistd"


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a child that must import chatd from this tree."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class Daemon:
    """One chatd process; ``lines`` collects everything it logs.

    It runs in ``cwd`` (by default a fresh temporary directory), where its
    history database ``chatd.sqlite3`` lives: pass the same ``cwd`` to a
    second Daemon to restart "the same" server.
    """

    def __init__(
        self,
        *args: str,
        timeout: float = 15.0,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        argv: list[str] | None = None,
    ) -> None:
        if cwd is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="chatd-")
            cwd = self._tmp.name
        self.cwd = cwd
        if argv is None:
            argv = [twistd(), "-n", "--pidfile=", "chatd", *args]
            explicit = ("--port", "--endpoint", "-e", "--config", "-c")
            if not any(a.split("=")[0] in explicit for a in args):
                argv += ["--port", "0"]
        self.argv = argv
        self.ports: dict[str, int] = {}
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._logged = threading.Condition()  # notified on every line the daemon logs
        self._ended = False
        self.proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=child_env(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            encoding="utf-8",
            errors="replace",
        )
        self.pid = self.proc.pid
        threading.Thread(target=self._pump, daemon=True).start()
        self.host, self.port = self._wait_listening(timeout)

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._logged:
                self.lines.append(line.rstrip("\n"))
                self._logged.notify_all()
            self._queue.put(line)
        with self._logged:
            self._ended = True
            self._logged.notify_all()
        self._queue.put(None)

    def _wait_listening(self, timeout: float) -> tuple[str, int]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.stop()
                raise RuntimeError("chatd did not start:\n" + self.log())
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                self.proc.wait(5)
                raise RuntimeError(f"chatd exited {self.proc.returncode}:\n" + self.log())
            m = _LISTENING.search(line)
            if m:
                self.ports[m.group(1)] = int(m.group(3))
                if m.group(1) == "web":
                    return m.group(2), int(m.group(3))

    def url(self, path: str = "/", scheme: str = "ws") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    def port_of(self, what: str, timeout: float = 30.0) -> int:
        """The port of another listener ("metrics"), once it has said so."""
        line = self.wait_for_log(rf"chatd \S+ {what} listening on", timeout)
        m = _LISTENING.search(line)
        assert m is not None
        return int(m.group(3))

    def log(self) -> str:
        return "\n".join(self.lines)

    def rss_kib(self) -> int:
        """Resident memory of the daemon, from /proc."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def wait_for_log(self, pattern: str, timeout: float = 30.0) -> str:
        """The first line logged that matches ``pattern``; waits (bounded) for it to come."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._logged:
            while True:
                for line in self.lines[seen:]:
                    if rx.search(line):
                        return line
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or self._ended:
                    break
                self._logged.wait(left)
        raise AssertionError(f"no log line matching {pattern!r}:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Stop our own child by its pid; returns its exit code."""
        if self.proc.poll() is None:
            os.kill(self.pid, sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(5)
        return self.proc.returncode

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

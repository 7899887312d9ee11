"""Start a real ``redis-server`` on a free loopback port, and stop it by pid.

For the cluster tests and benchmarks. Data lives in a directory of its own
with the append-only file on, so a restart (``stop`` then ``start``) keeps
it, as a production Redis configured for chatd would (docs/SCALING.md).
With ``persist=False`` nothing is written (``--save "" --appendonly no``):
a restart comes back empty, as a Redis without persistence does.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    def __init__(
        self, port: int | None = None, directory: str | None = None, persist: bool = True
    ) -> None:
        self.binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if directory is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="chatd-redis-")
            directory = self._tmp.name
        self.dir = Path(directory)
        self.port = port or free_port()
        self.persist = persist
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.dir),
                "--save",
                "",
                "--appendonly",
                "yes" if self.persist else "no",
                "--appendfsync",
                "everysec",
                "--protected-mode",
                "no",
                "--loglevel",
                "warning",
            ],
            stdin=subprocess.DEVNULL,
            stdout=open(self.dir / "redis.log", "ab"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {(self.dir / 'redis.log').read_text()}")
            try:
                if self.command("PING") == b"PONG":
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError("redis-server did not answer PING")

    def command(self, *args: str) -> bytes:
        """One command through redis-cli (Debian's redis-tools): its reply as text."""
        cli = shutil.which("redis-cli") or "/usr/bin/redis-cli"
        out = subprocess.run(
            [cli, "-h", "127.0.0.1", "-p", str(self.port), *args],
            capture_output=True,
            timeout=10,
        )
        if out.returncode != 0:
            raise OSError(out.stderr.decode(errors="replace").strip() or "redis-cli failed")
        return out.stdout.rstrip(b"\n")

    def clients(self) -> list[dict[str, str]]:
        """CLIENT LIST, parsed."""
        text = self.command("CLIENT", "LIST").decode()
        return [dict(f.split("=", 1) for f in line.split()) for line in text.splitlines()]

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """SIGTERM: Redis writes what it has and exits; SIGKILL: it dies."""
        p = self.proc
        if p is None or p.poll() is not None:
            return
        p.send_signal(sig)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

    def close(self) -> None:
        self.stop()
        tmp = getattr(self, "_tmp", None)
        if tmp is not None:
            tmp.cleanup()

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

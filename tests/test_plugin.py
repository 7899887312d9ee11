"""twistd finds chatd; options are checked before anything binds; pip install . works."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile

import pytest
from wsclient import Client

from tools.daemon import REPO, Daemon, child_env, twistd


def run(*argv: str, env: dict[str, str] | None = None, cwd: str | None = None):
    """Run in a scratch directory: a daemon that gets as far as start-up makes its database."""
    with tempfile.TemporaryDirectory() as scratch:
        return subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=60,
            env=env or child_env(),
            cwd=cwd or scratch,
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_twistd_help_lists_chatd() -> None:
    r = run(twistd(), "--help")
    assert r.returncode == 0
    assert any(line.split()[:1] == ["chatd"] for line in r.stdout.splitlines()), r.stdout


def test_chatd_help_lists_every_option() -> None:
    r = run(twistd(), "chatd", "--help")
    assert r.returncode == 0
    for opt in (
        "--port",
        "--interface",
        "--endpoint",
        "--static",
        "--max-message-size",
        "--relay-max-size",
        "--max-backlog",
        "--listen-backlog",
        "--no-compression",
    ):
        assert opt in r.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--port", "notaport"], "port"),
        (["--port", "70000"], "--port must be 0-65535"),
        (["--max-message-size", "0"], "--max-message-size"),
        (["--max-backlog", "lots"], "max-backlog"),
        (["--endpoint", "nonsense:1:2"], "endpoint"),
        (["--static", "/nonexistent/dir"], "static"),
        (["--no-such-option"], "no-such-option"),
        (["--ping-interval", "-1"], "--ping-interval"),
    ],
)
def test_wrong_options_one_line_and_exit_2_before_binding(args: list[str], message: str) -> None:
    port = free_port()
    r = run(twistd(), "-n", "--pidfile=", "chatd", "--port", str(port), *args)
    assert r.returncode == 2
    out = r.stdout + r.stderr
    assert message in out, out
    assert out.count("chatd: error: ") == 1 and "Usage:" not in out, out
    assert "listening on" not in out
    with socket.socket() as s:  # the port was never bound: we can take it
        s.bind(("127.0.0.1", port))


def test_end_to_end_twistd_on_a_given_port() -> None:
    port = free_port()
    with Daemon("--port", str(port)) as d:
        assert d.port == port
        a = Client(port, "/")
        a.send("e2e")
        assert a.recv() == f"ID{a.local_port}: e2e"
        a.close()
        # twistd re-raises the signal that stopped it (graceful exit 0 is the ops issue).
        assert d.stop() in (0, -signal.SIGTERM)


def test_endpoint_option(daemon) -> None:
    port = free_port()
    d = daemon("--endpoint", f"tcp:{port}:interface=127.0.0.1")
    assert d.port == port
    a = Client(port, "/relay/e")
    a.send(b"\x01")
    assert a.recv() == b"\x01"
    a.close()


def test_port_in_use_fails_at_start() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = run(twistd(), "-n", "--pidfile=", "chatd", "--port", str(port))
        assert r.returncode == 2
        assert "Address already in use" in r.stdout + r.stderr


def test_pip_install_ships_plugin_and_page(tmp_path) -> None:
    """What `pip install .` installs is enough: the plugin is found and the page is there."""
    target = tmp_path / "site"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert (target / "twisted" / "plugins" / "chatd_plugin.py").exists()
    assert not (target / "twisted" / "__init__.py").exists()
    assert (target / "chatd" / "static" / "index.html").exists()
    env = dict(os.environ, PYTHONPATH=str(target))
    r = run(twistd(), "--help", env=env, cwd=str(tmp_path))
    assert any(line.split()[:1] == ["chatd"] for line in r.stdout.splitlines()), r.stdout
    r = run(
        sys.executable,
        "-c",
        "import chatd.config as c; print(c.PAGE_DIR)",
        env=env,
        cwd=str(tmp_path),
    )
    assert r.stdout.strip() == str(target / "chatd" / "static")

"""twistd finds chatd and runs it; pip install . works.

(Wrong options and a port in use: tests/test_startup.py.)"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile

from wsclient import Client

import chatd
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
    # sizes as the README writes them (every default: tests/test_settings.py, in process)
    text = " ".join(r.stdout.split())
    for shown in ("[default: 64K]", "[default: 16M]", "[default: 4M]", "[default: 256M]"):
        assert shown in text, r.stdout
    assert "4194304" not in text and "65536" not in text


def test_chatd_version_is_chatds_not_twisteds() -> None:
    r = run(twistd(), "chatd", "--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"chatd {chatd.__version__}\n"
    assert "--version" in run(twistd(), "chatd", "--help").stdout


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

"""Start-up errors: one line naming the option as the user wrote it, exit 2, nothing left behind.

Each case runs the real ``twistd chatd`` in a scratch directory and checks
what an operator sees: a single ``chatd: error: ...`` line (no traceback, no
usage dump), exit code 2, the port not bound, and no database file created.
"""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from tools.daemon import child_env, twistd


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [twistd(), "-n", "--pidfile=", "chatd", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(env),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
    )


def assert_one_line_error(r: subprocess.CompletedProcess, *fragments: str) -> str:
    out = r.stdout + r.stderr
    assert r.returncode == 2, out
    errors = [line for line in out.splitlines() if "chatd: error:" in line]
    assert len(errors) == 1, out
    assert "Traceback" not in out and "Usage:" not in out, out
    assert "listening on" not in out, out
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def assert_nothing_left(cwd: Path) -> None:
    assert sorted(os.listdir(cwd)) == [], os.listdir(cwd)


CASES = [
    (["--port", "70000"], ["--port must be 0-65535"]),
    (["--rate", "nan"], ["--rate must be a finite number"]),
    (["--ping-interval", "inf"], ["--ping-interval must be a finite number"]),
    (["--ping-timeout", "1e308"], ["--ping-timeout must be"]),
    (["--rate", "1e12"], ["--rate must be"]),
    (["--history-size", "-1"], ["--history-size must be"]),
    (["--max-backlog", "0"], ["--max-backlog must be"]),
    (["--max-backlog", "１６M"], ["--max-backlog must be a size"]),
    (["--port", "²"], ["--port must be an integer"]),
    (["--no-such-option"], ["--no-such-option"]),
    (["--endpoint", "nonsense:1:2"], ["--endpoint 'nonsense:1:2' is not a valid endpoint"]),
    (["--metrics-endpoint", "tcp:nope"], ["--metrics-endpoint 'tcp:nope'"]),
    (["--endpoint", "tcp:0", "--port", "0"], ["--endpoint replaces --port"]),
    (["--endpoint", "tcp:0", "--interface", "127.0.0.1"], ["--endpoint replaces --interface"]),
    (
        ["--endpoint", "ssl:0:privateKey=missing-key.pem:certKey=missing-cert.pem"],
        ["--endpoint", "cannot read", "missing-", "No such file"],
    ),
    (["--endpoint", "systemd:domain=INET:index=0"], ["--endpoint", "systemd", "LISTEN_FDS"]),
    (["--api-token", "change-me-to-a-long-random-string"], ["placeholder"]),
    (["--db", "/nonexistent/dir/chatd.sqlite3"], ["--db", "cannot open the history database"]),
]


@pytest.mark.parametrize(("args", "fragments"), CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_option_is_one_line_exit_2(tmp_path, args, fragments) -> None:
    port = free_port()
    explicit = {"--endpoint", "--port", "--interface"} & set(args)
    extra = [] if explicit else ["--port", str(port)]
    r = start(tmp_path, *extra, *args)
    assert_one_line_error(r, *fragments)
    assert_nothing_left(tmp_path)
    with socket.socket() as s:  # nothing was bound
        s.bind(("127.0.0.1", port))


def test_tls_files_that_are_not_pem(tmp_path) -> None:
    (tmp_path / "key.pem").write_text("not a key\n")
    (tmp_path / "cert.pem").write_text("not a certificate\n")
    r = start(tmp_path, "--endpoint", "ssl:0:privateKey=key.pem:certKey=cert.pem")
    assert_one_line_error(r, "--endpoint")
    assert sorted(os.listdir(tmp_path)) == ["cert.pem", "key.pem"]


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        ("[chatd]\nrate = nan\n", ["chatd.toml: rate must be a finite number"]),
        ("[chatd]\nping_interval = inf\n", ["chatd.toml: ping_interval must be a finite"]),
        ("[chatd]\nport = 70000\n", ["chatd.toml: port must be 0-65535"]),
        (
            '[chatd]\nendpoint = "tcp:0"\nport = 9000\n',
            ["endpoint in ", "replaces port in "],
        ),
        ('[chatd]\napi_token = "change-me-to-a-long-random-string"\n', ["placeholder"]),
    ],
)
def test_bad_config_value_names_the_key(tmp_path, content, fragments) -> None:
    work = tmp_path / "work"
    work.mkdir()
    cfg = tmp_path / "chatd.toml"
    cfg.write_text(content)
    r = start(work, "--config", str(cfg))
    assert_one_line_error(r, *fragments)
    assert_nothing_left(work)


def test_example_placeholder_from_the_environment(tmp_path) -> None:
    r = start(
        tmp_path,
        "--port",
        "0",
        env={"CHATD_API_TOKEN": "change-me-to-a-long-random-string"},
    )
    assert_one_line_error(r, "CHATD_API_TOKEN: api_token is still the example's placeholder")


def test_port_in_use_one_line_with_hint_and_no_database(tmp_path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = start(tmp_path, "--port", str(port))
    line = assert_one_line_error(r, f"127.0.0.1:{port}", "Address already in use", "--port")
    assert "another" in line
    assert_nothing_left(tmp_path)  # the history database it had opened is gone again


def test_metrics_port_in_use_names_metrics_endpoint(tmp_path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = start(tmp_path, "--port", "0", "--metrics-endpoint", f"tcp:{port}:interface=127.0.0.1")
    assert_one_line_error(r, "Address already in use", "--metrics-endpoint")
    assert_nothing_left(tmp_path)


def test_interface_that_is_not_on_this_machine(tmp_path) -> None:
    # 192.0.2.1 is TEST-NET-1 (RFC 5737): never a local address; bind fails at once.
    r = start(tmp_path, "--interface", "192.0.2.1", "--port", "0")
    assert_one_line_error(r, "192.0.2.1", "--interface")
    assert_nothing_left(tmp_path)


def test_existing_database_is_kept_when_start_fails(tmp_path) -> None:
    db = tmp_path / "chatd.sqlite3"
    import sqlite3

    sqlite3.connect(db).close()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        r = start(tmp_path, "--port", str(s.getsockname()[1]))
    assert_one_line_error(r, "Address already in use")
    assert db.exists()  # an operator's history is never deleted


def test_help_shows_sizes_as_the_readme_writes_them(tmp_path) -> None:
    r = start(tmp_path, "--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    for shown in ("[default: 64K]", "[default: 16M]", "[default: 4M]", "[default: 256M]"):
        assert shown in text, r.stdout
    assert "4194304" not in text and "65536" not in text

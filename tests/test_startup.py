"""Start-up errors: one line naming the option as the user wrote it, exit 2, nothing left behind.

What an operator sees: a single ``chatd: error: ...`` line (no traceback, no
usage dump), exit code 2, the port not bound, and no database file created.

Errors found while the options are read (``chatd.tap.Options.parseOptions``,
the first thing ``twistd chatd`` runs, before any service exists) are checked
in process, one case each. The real ``twistd chatd`` is run, in a scratch
directory, for one such error of each source (an option, a config file, the
environment: that twistd turns them into one line and exit 2, binding
nothing) and for every error that only start-up can find (the port in use,
the database, the TLS files).
"""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from chatd.tap import Options
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


# Found by parseOptions: checked in process (test_refused_while_reading_the_options).
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
    (["--port", "notaport"], ["--port must be an integer"]),
    (["--max-message-size", "0"], ["--max-message-size must be"]),
    (["--max-backlog", "lots"], ["--max-backlog must be a size"]),
    (["--static", "/nonexistent/dir"], ["--static"]),
    (["--ping-interval", "-1"], ["--ping-interval must be"]),
]
# Found only by starting: run by the real twistd (with one of CASES, to show that path).
AT_START = [
    (["--rate", "nan"], ["--rate must be a finite number"]),
    (["--db", "/nonexistent/dir/chatd.sqlite3"], ["--db", "cannot open the history database"]),
]


def refused_in_process(capfd, argv: list[str]) -> str:
    """The one error line ``Options().parseOptions`` writes (to fd 2) as it exits 2."""
    with pytest.raises(SystemExit) as e:
        Options().parseOptions(argv)
    assert e.value.code == 2
    out, err = capfd.readouterr()
    errors = [line for line in (out + err).splitlines() if "chatd: error:" in line]
    assert len(errors) == 1, out + err
    assert "Traceback" not in out + err and "Usage:" not in out + err, out + err
    return errors[0]


@pytest.mark.parametrize(("args", "fragments"), CASES, ids=[" ".join(a) for a, _ in CASES])
def test_refused_while_reading_the_options(tmp_path, monkeypatch, capfd, args, fragments) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CHATD_API_TOKEN", raising=False)
    explicit = {"--endpoint", "--port", "--interface"} & set(args)
    line = refused_in_process(capfd, [*([] if explicit else ["--port", "0"]), *args])
    for fragment in fragments:
        assert fragment in line, line
    assert_nothing_left(tmp_path)


@pytest.mark.parametrize(("args", "fragments"), AT_START, ids=[" ".join(a) for a, _ in AT_START])
def test_bad_option_is_one_line_exit_2(tmp_path, args, fragments) -> None:
    port = free_port()
    r = start(tmp_path, "--port", str(port), *args)
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


CONFIG_CASES = [
    ("[chatd]\nrate = nan\n", ["chatd.toml: rate must be a finite number"]),
    ("[chatd]\nping_interval = inf\n", ["chatd.toml: ping_interval must be a finite"]),
    ("[chatd]\nport = 70000\n", ["chatd.toml: port must be 0-65535"]),
    (
        '[chatd]\nendpoint = "tcp:0"\nport = 9000\n',
        ["endpoint in ", "replaces port in "],
    ),
    ('[chatd]\napi_token = "change-me-to-a-long-random-string"\n', ["placeholder"]),
    ("[chatd]\nprot = 9000\n", ["unknown key 'prot'"]),
    ("[chatd]\nport = 'nine'\n", ["port must be an integer"]),
    ("[chatd]\nmax_backlog = 'lots'\n", ["max_backlog must be a size"]),
    ("[chatd]\ncompression = 'yes'\n", ["compression must be true or false"]),
    ("[chatd]\nport = 9000\nport = 9001\n", ["config"]),
    ("[chatd]\nlog_format = 'xml'\n", ["log_format must be text or json"]),
    ("[chatd]\napi_token = 'short'\n", ["api_token must be at least 16"]),
]


@pytest.mark.parametrize(("content", "fragments"), CONFIG_CASES)
def test_bad_config_value_names_the_key(tmp_path, monkeypatch, capfd, content, fragments) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("CHATD_API_TOKEN", raising=False)
    cfg = tmp_path / "chatd.toml"
    cfg.write_text(content)
    line = refused_in_process(capfd, ["--config", str(cfg)])
    for fragment in fragments:
        assert fragment in line, line
    assert_nothing_left(work)


def test_bad_config_value_through_twistd(tmp_path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    cfg = tmp_path / "chatd.toml"
    cfg.write_text(CONFIG_CASES[0][0])
    r = start(work, "--config", str(cfg))
    assert_one_line_error(r, *CONFIG_CASES[0][1])
    assert_nothing_left(work)


def test_missing_config_file(tmp_path, monkeypatch, capfd) -> None:
    monkeypatch.chdir(tmp_path)
    line = refused_in_process(capfd, ["--config", "/nonexistent.toml"])
    assert "No such file" in line, line
    assert_nothing_left(tmp_path)


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

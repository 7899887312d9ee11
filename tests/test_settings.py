"""Each setting is declared once (chatd.config.SETTINGS); the rest is made from it or checked.

In process, no daemon: ``chatd.tap.Options().parseOptions`` is what ``twistd
chatd`` runs first. Every declared setting round-trips from the command line
and from a TOML file, every bound is enforced with a message naming the
option as it was given, ``--help`` shows every default as the README writes
it, and the README's options table (a row for every option ``--help``
lists) and etc/chatd.toml agree with the declarations (the drift check: a
setting added, renamed or given a new default fails here until both are
updated). ``Settings``, written out for type checkers, is checked against
them at import; the check is tried here on classes that differ.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, field, fields, make_dataclass
from pathlib import Path
from typing import Any, get_type_hints

import pytest

from chatd import config
from chatd.config import SETTINGS, Setting, Settings
from chatd.tap import Options

REPO = Path(__file__).resolve().parent.parent

# A valid value other than the default, for text settings without choices
# (the others are made from their declaration).
TEXT_SAMPLES = {
    "interface": "::1",
    "endpoint": "tcp:0:interface=127.0.0.1",
    "static": None,  # a scratch directory with an index.html (made per test)
    "db": "other.sqlite3",
    "api_token": "a-token-long-enough-for-the-api",
    "metrics_endpoint": "tcp:0:interface=127.0.0.1",
    "redis": "redis://127.0.0.1:6390/2",
    "jwt_key": "a-secret-of-at-least-32-bytes-for-hs256",
    "jwt_audience": "chat.example",
    "jwt_issuer": "https://auth.example",
    "webhook_url": "https://backend.example/chatd/events",
    "webhook_secret": "a-webhook-secret-long-enough",
    "webhook_rooms": "support-*,orders",
    "page_csp": "default-src 'self'; img-src 'self' https://img.example",
}
# What a sample needs beside it to be valid (a mode that checks tokens needs a key).
COMPANIONS: dict[str, dict[str, str]] = {
    "auth": {"jwt_key": TEXT_SAMPLES["jwt_key"]},
    "webhook_url": {"webhook_secret": TEXT_SAMPLES["webhook_secret"]},
}


@pytest.fixture(autouse=True)
def _no_env_token(monkeypatch) -> None:
    monkeypatch.delenv("CHATD_API_TOKEN", raising=False)
    monkeypatch.delenv("CHATD_JWT_KEY", raising=False)
    monkeypatch.delenv("CHATD_WEBHOOK_SECRET", raising=False)


def _ids(settings) -> list[str]:
    return [s.name for s in settings]


def sample(s: Setting, tmp_path: Path) -> Any:
    """A valid value of ``s`` other than its default (as the setting holds it)."""
    if s.kind == "flag":
        return not s.default
    if s.kind == "list":
        if s.name == "frame_ancestors":
            return ("https://app.example", "'self'")
        return ("https://chat.example", "*")
    if s.choices:
        return next(c for c in s.choices if c != s.default)
    if s.kind == "rights":
        return "lobby=r,help-*=rw"
    if s.kind == "text":
        if s.name == "static":
            (tmp_path / "index.html").write_text("<!doctype html>\n")
            return str(tmp_path)
        return TEXT_SAMPLES[s.name]
    for v in (s.default * 2, s.default + 1, s.high):
        if v != s.default and s.problem(v) is None:
            return KIND_TYPE[s.kind](v)
    raise AssertionError(s)


def _opt(name: str) -> str:
    return config.BY_NAME[name].option


KIND_TYPE = {"size": int, "count": int, "seconds": float, "rate": float}


def as_argv(s: Setting, value: Any) -> list[str]:
    if s.kind == "flag":
        assert value is not s.default
        return [f"--{s.option}"]
    if s.kind == "list":
        return [arg for v in value for arg in (f"--{s.option}", v)]
    if s.kind == "size":
        return [f"--{s.option}", config.format_size(value)]
    return [f"--{s.option}", str(value)]


def as_toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return json.dumps(list(value))
    return json.dumps(value)


def parse(argv: list[str]) -> Settings:
    options = Options()
    options.parseOptions(argv)
    return options.settings


def refused(capfd, argv: list[str]) -> str:
    """The one error line parseOptions writes (to fd 2) before exiting 2."""
    with pytest.raises(SystemExit) as e:
        Options().parseOptions(argv)
    assert e.value.code == 2
    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("chatd: error: ")]
    assert len(lines) == 1, err
    return lines[0]


# -- the declarations -----------------------------------------------------------


def test_settings_agrees_with_the_declarations() -> None:
    config.check_declarations(Settings)  # as at import
    d = Settings()
    assert [f for f in Settings.__dataclass_fields__] == [s.name for s in SETTINGS]
    for s in SETTINGS:
        assert getattr(d, s.name) == s.default, s.name
    assert {s.name: s.coerce for s in SETTINGS} == config.COERCE
    d.check()  # the defaults are valid


def variant(
    drop: str = "", add: str = "", retype: tuple[str, Any] | None = None, **defaults: Any
) -> type:
    """A copy of Settings with one thing wrong: a field dropped, added, retyped or re-defaulted."""
    hints = get_type_hints(Settings)
    spec: list[tuple[str, Any, Any]] = []
    for f in fields(Settings):
        if f.name == drop:
            continue
        t = retype[1] if retype and retype[0] == f.name else hints[f.name]
        spec.append((f.name, t, field(default=defaults.get(f.name, f.default))))
    if add:
        spec.append((add, int, field(default=0)))
    return make_dataclass("Wrong", spec, frozen=True, slots=True)


@pytest.mark.parametrize(
    ("wrong", "message"),
    [
        (variant(drop="max_backlog"), "setting max_backlog has no field"),
        (variant(add="max_backlogg"), "field max_backlogg is not in SETTINGS"),
        (variant(max_backlog=1), "max_backlog defaults to 1; SETTINGS says 4194304"),
        (variant(rate=20), "rate defaults to 20; SETTINGS says 20.0"),  # an int for a float
        (variant(port=None), "port defaults to None; SETTINGS says 9000"),
        (variant(retype=("rate", int)), "rate is int, but a rate setting is float"),
        (variant(retype=("port", int | None)), "port is int | None, but a count setting is int"),
        (
            variant(retype=("api_token", str)),
            "api_token is str, but a text setting with no default is str | None",
        ),
        (
            variant(retype=("allowed_origins", list[str])),
            "allowed_origins is list[str], but a list setting is tuple[str, ...]",
        ),
    ],
)
def test_a_settings_class_that_differs_from_the_declarations_is_refused(
    wrong: type, message: str
) -> None:
    with pytest.raises(AssertionError) as e:
        config.check_declarations(wrong)
    assert str(e.value) == f"Wrong does not agree with SETTINGS:\n  - {message}"


def test_a_hand_written_settings_class_is_checked_for_order_frozen_and_slots() -> None:
    @dataclass
    class Loose:
        interface: str = "127.0.0.1"
        port: int = 9000

    with pytest.raises(AssertionError) as e:
        config.check_declarations(Loose, SETTINGS[:2])
    assert str(e.value).splitlines() == [
        "Loose does not agree with SETTINGS:",
        "  - it is not frozen",
        "  - it is not slotted",
        "  - the fields are not in SETTINGS' order: interface, port",
    ]
    with pytest.raises(AssertionError, match="Loose does not agree"):
        config.check_declarations(Loose)  # and 29 settings without a field
    with pytest.raises(AssertionError, match="int is not a dataclass"):
        config.check_declarations(int)


def test_every_text_setting_without_choices_has_a_sample() -> None:
    plain = {s.name for s in SETTINGS if s.kind == "text" and not s.choices}
    assert plain == set(TEXT_SAMPLES), "add a sample for a new setting"


# -- round trips ----------------------------------------------------------------


@pytest.mark.parametrize("s", SETTINGS, ids=_ids(SETTINGS))
def test_round_trip_from_the_command_line(s: Setting, tmp_path) -> None:
    value = sample(s, tmp_path)
    extra = [a for k, v in COMPANIONS.get(s.name, {}).items() for a in (f"--{_opt(k)}", v)]
    settings = parse(as_argv(s, value) + extra)
    assert getattr(settings, s.name) == value
    assert getattr(parse([]), s.name) == s.default


@pytest.mark.parametrize("s", SETTINGS, ids=_ids(SETTINGS))
def test_round_trip_from_a_toml_file(s: Setting, tmp_path) -> None:
    value = sample(s, tmp_path)
    cfg = tmp_path / "chatd.toml"
    extra = "".join(f"{k} = {as_toml(v)}\n" for k, v in COMPANIONS.get(s.name, {}).items())
    cfg.write_text(f"[chatd]\n{s.name} = {as_toml(value)}\n{extra}")
    assert getattr(parse(["--config", str(cfg)]), s.name) == value
    if s.kind == "size":  # sizes also as written in the docs: "4M"
        cfg.write_text(f'[chatd]\n{s.name} = "{config.format_size(value)}"\n')
        assert getattr(parse(["--config", str(cfg)]), s.name) == value


def test_the_command_line_wins_over_the_file(tmp_path) -> None:
    cfg = tmp_path / "chatd.toml"
    cfg.write_text('[chatd]\nmax_text = "10"\nrate = 5\n')
    settings = parse(["--config", str(cfg), "--max-text", "2K"])
    assert (settings.max_text, settings.rate) == (2048, 5.0)


# -- bounds ---------------------------------------------------------------------

BOUNDED = [s for s in SETTINGS if s.low is not None or s.high is not None]


def out_of_range(s: Setting) -> list[Any]:
    """Values just past each bound: the low one itself when the value must be above it."""
    step = 1 if s.kind in ("size", "count") else 0.5
    values = []
    if s.low is not None:
        values.append(s.low if s.above else s.low - step)
    if s.high is not None:
        values.append(s.high + step)
    return [KIND_TYPE[s.kind](v) for v in values]


def test_every_number_has_bounds() -> None:
    numbers = {s.name for s in SETTINGS if s.kind in KIND_TYPE}
    assert numbers == set(_ids(BOUNDED))
    assert all(s.low is not None and s.high is not None for s in BOUNDED)


@pytest.mark.parametrize("s", BOUNDED, ids=_ids(BOUNDED))
def test_every_bound_is_enforced_naming_the_option(s: Setting, capfd, tmp_path) -> None:
    for value in out_of_range(s):
        line = refused(capfd, [f"--{s.option}", str(value)])
        assert f"--{s.option} must be " in line and f"not {value}" in line, line
        cfg = tmp_path / "chatd.toml"
        cfg.write_text(f"[chatd]\n{s.name} = {value}\n")
        line = refused(capfd, ["--config", str(cfg)])
        assert f"chatd.toml: {s.name} must be " in line, line
    for value in (s.low, s.high):  # the bounds themselves
        if not (s.above and value == s.low):
            argv = [f"--{s.option}", str(KIND_TYPE[s.kind](value)), *ROOM_FOR.get(s.name, [])]
            assert getattr(parse(argv), s.name) == value


# What a bound of these needs of other settings (max_total_inbound >= the message sizes).
ROOM_FOR = {
    "max_message_size": ["--max-total-inbound", "2G"],
    "relay_max_size": ["--max-total-inbound", "2G"],
    "max_total_inbound": ["--max-message-size", "1", "--relay-max-size", "1"],
}


CHOOSY = [s for s in SETTINGS if s.choices or s.empty]


@pytest.mark.parametrize("s", CHOOSY, ids=_ids(CHOOSY))
def test_choices_and_empty_values_are_refused_naming_the_option(s: Setting, capfd) -> None:
    if s.choices:
        line = refused(capfd, [f"--{s.option}", "nonsense"])
        assert f"--{s.option} must be {' or '.join(s.choices)}, not 'nonsense'" in line, line
    if s.empty:
        line = refused(capfd, [f"--{s.option}", ""])
        assert f"--{s.option} {s.empty}" in line, line


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--port", "70000"], "--port must be 0-65535, not 70000"),
        (["--rate", "nan"], "--rate must be a finite number"),
        (["--ping-timeout", "0"], "--ping-timeout must be > 0 and <= 3600 s"),
        (["--max-backlog", "0"], "--max-backlog must be 1-2G bytes, not 0"),
        (["--max-backlog", "lots"], "--max-backlog must be a size"),
        (["--max-total-inbound", "1K"], "--max-total-inbound must be at least"),
        (["--allowed-origin", "example.com"], "--allowed-origin: 'example.com' is not"),
        (["--api-token", "short"], "--api-token must be at least 16"),
        (["--redis", "http://x"], "--redis "),
    ],
)
def test_messages_name_the_option(argv: list[str], message: str, capfd) -> None:
    assert message in refused(capfd, argv)


# -- --help -----------------------------------------------------------------------


def test_help_lists_every_option_with_its_default_as_the_readme_writes_it() -> None:
    options = Options()
    text = " ".join(str(options).split())
    for s in SETTINGS:
        short = f"-{s.short}, " if s.short else ""
        assert f"{short}--{s.option}" in text, s.option
        doc = " ".join(options.docs[s.option].split())
        if s.default is None:
            assert "[default:" not in doc, doc
        else:
            assert doc.endswith(f"[default: {s.shown}]"), doc
    assert "4194304" not in text and "30.0" not in text


# -- the docs agree with the declarations (the drift check) ----------------------------


def readme_options() -> dict[str, tuple[str | None, str]]:
    """The README's options table (under "Running it"): option -> (short, default cell)."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Running it\n", 1)[1].split("\n## ", 1)[0]
    head = "| option | default | meaning |\n|---|---|---|\n"
    assert section.count(head) == 1
    table = section.split(head, 1)[1].split("\n\n", 1)[0]
    rows: dict[str, tuple[str | None, str]] = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        assert len(cells) == 3 and line.startswith("| "), f"not a table row: {line!r}"
        names = re.findall(r"`(--?[a-z][a-z-]*)", cells[0])
        long = [n[2:] for n in names if n.startswith("--")]
        short = [n[1:] for n in names if not n.startswith("--")]
        assert len(long) == 1 and len(short) <= 1, f"one option a row: {line!r}"
        assert long[0] not in rows, f"--{long[0]} twice in the README"
        rows[long[0]] = (short[0] if short else None, cells[1])
    return rows


def as_readme_writes_it(cell: str) -> str:
    """A default cell without markup and without a remark: "0 (no cap)" -> "0"."""
    return re.sub(r" \([^)]*\)$", "", cell.replace("`", ""))


def test_readme_options_table_agrees_with_the_declarations() -> None:
    rows = readme_options()
    options = {s.option: s for s in SETTINGS}
    own = {"config", "version", "help"}  # tap.py's and twisted.python.usage's
    extra = set(rows) - set(options) - own
    assert not extra, f"README options that are not settings: {sorted(extra)}"
    # one row for every option `twistd chatd --help` lists
    assert set(rows) == {o.rstrip("=") for o in Options().longOpt}
    for s in SETTINGS:
        assert s.option in rows, f"--{s.option} is not in the README's options table"
        short, cell = rows[s.option]
        assert short == s.short, f"--{s.option}: README -{short}, declared -{s.short}"
        assert as_readme_writes_it(cell) == s.shown, f"--{s.option}: README {cell!r}"
    assert rows["config"] == ("c", "—")  # tap.py's own option
    assert rows["version"] == rows["help"] == (None, "—")


def example_lines() -> dict[str, str]:
    """etc/chatd.toml's ``# key = value`` lines: key -> the first such line, uncommented."""
    lines: dict[str, str] = {}
    for line in (REPO / "etc" / "chatd.toml").read_text().splitlines():
        m = re.match(r"# ([a-z_]+) = ", line)
        if m:
            lines.setdefault(m.group(1), line[2:])
    return lines


def test_example_config_agrees_with_the_declarations() -> None:
    lines = example_lines()
    unknown = set(lines) - {s.name for s in SETTINGS}
    assert not unknown, f"etc/chatd.toml keys that are not settings: {sorted(unknown)}"
    for s in SETTINGS:
        assert s.name in lines, f"{s.name} is not in etc/chatd.toml"
        value = s.coerce(tomllib.loads(lines[s.name])[s.name])
        # A setting without a default to write (none, the shipped page, the
        # page's own host) shows an example; the others show their default.
        if s.default is not None and s.name not in EXAMPLES:
            assert value == s.default, f"etc/chatd.toml: {lines[s.name]!r}, default {s.shown}"


EXAMPLES = {"static", "allowed_origins", "frame_ancestors", "anonymous_rooms"}


def test_the_benchmarks_start_chatd_with_options_it_accepts() -> None:
    """``make bench`` is not part of the tests: its daemons' options are (a bound
    added to a setting once made every bench run fail at start-up)."""
    from bench import chat, cluster, deflate, run

    for spec in run.servers_chatd():
        parse([*run.CHATD_COMMON, *spec.chatd_args])
    for kind in deflate.KINDS:
        parse([*run.CHATD_COMMON, *deflate.spec(kind).chatd_args])
    for history in (0, 1000):
        parse(chat.chatd_args(history))
    url = ("--redis", "redis://127.0.0.1:6379/0")
    parse([*run.CHATD_COMMON, *cluster.SPEC.chatd_args, *url])
    parse(
        [
            *run.CHATD_COMMON,
            *cluster.SPEC.chatd_args,
            *url,
            "--rate",
            "1000",
            "--rate-burst",
            "1000",
        ]
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["--frame-ancestor", "app.example"],  # no scheme
        ["--frame-ancestor", "https://a.example; script-src *"],  # a directive smuggled in
        ["--frame-ancestor", "*"],
        ["--page-csp", "default-src 'self'\r\nX-Evil: 1"],  # a header smuggled in
        ["--page-csp", " "],
        ["--page-csp", "default-src 'self'; frame-ancestors *"],  # (that is --frame-ancestor's)
    ],
)
def test_page_headers_refuse_what_would_change_another_header_or_directive(
    capfd, argv: list[str]
) -> None:
    line = refused(capfd, argv)
    assert "--frame-ancestor: " in line or "--page-csp: " in line

"""The daemon's settings: one immutable value, checked once before anything binds.

Each setting is declared once, as a ``Setting`` in ``SETTINGS``: its name
(the TOML key), kind (size, seconds, count, rate, text, flag or list: how it
is read and written), default, bounds, short option and help text. From
that come ``COERCE``, the per-setting range checks of ``Settings.check``
(checks across settings follow them as code), and chatd.tap's options and
``--help``.

``Settings`` itself is written out, a typed field per setting, so that type
checkers (mypy) know ``settings.max_backlog`` is an int; ``check_declarations``
runs at import and fails, naming each mismatch, unless its fields are
SETTINGS' names in SETTINGS' order, each typed as its kind says (``| None``
when the default is None) with the declared default. A setting is added in
both places, or chatd does not start. The README's options table and
etc/chatd.toml are written by hand too and checked against ``SETTINGS`` by
tests/test_settings.py.

Settings come from three places, later ones winning: a TOML file
(``--config``, keys named as the settings), the environment
(``CHATD_API_TOKEN`` only, so a secret need not sit in a unit file or on a
command line), and the command line. ``from_mapping`` turns either source's
values into a ``Settings``, naming the key of anything wrong.
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, fields
from typing import Any, get_type_hints

from chatd import limits

PAGE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")


class ConfigError(ValueError):
    """A setting is wrong; the message names it."""


# The api_token placeholder of etc/chatd.toml: a copied example must not open the API.
EXAMPLE_API_TOKEN = "change-me-to-a-long-random-string"


def format_size(n: int) -> str:
    """Bytes as the README writes them: 4M, 64K, 16M, or plain bytes when not a round size."""
    for suffix, factor in (("G", 1024**3), ("M", 1024**2), ("K", 1024)):
        if n >= factor and n % factor == 0:
            return f"{n // factor}{suffix}"
    return str(n)


def _int(v: Any) -> int:
    if isinstance(v, bool):
        raise ValueError("must be an integer")
    if isinstance(v, int):
        return v
    digits = v.strip().removeprefix("-") if isinstance(v, str) else ""
    if digits.isascii() and digits.isdigit():
        return int(v)
    raise ValueError("must be an integer")


def _float(v: Any) -> float:
    if isinstance(v, bool):
        raise ValueError("must be a number")
    try:
        f = float(v)
    except (TypeError, ValueError, OverflowError):
        raise ValueError("must be a number") from None
    if not math.isfinite(f):  # nan would pass every range check (all comparisons are False)
        raise ValueError(f"must be a finite number, not {v}")
    return f


def _size(v: Any) -> int:
    """Bytes: an integer, or a string with a K/M/G suffix (powers of 1024)."""
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    if not isinstance(v, str):
        raise ValueError("must be a size such as 65536, 64K or 16M")
    text = v.strip().upper().removesuffix("B").removesuffix("I")
    factor = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(text[-1:], 1)
    if factor != 1:
        text = text[:-1]
    if not (text.isascii() and text.isdigit()):
        raise ValueError("must be a size such as 65536, 64K or 16M")
    return int(text) * factor


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError("must be a string")
    return v


def _bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    raise ValueError("must be true or false")


def _strs(v: Any) -> tuple[str, ...]:
    if isinstance(v, str):
        return (v,)
    if isinstance(v, list | tuple) and all(isinstance(x, str) for x in v):
        return tuple(v)
    raise ValueError("must be a list of strings")


def _rights(v: Any) -> str:
    """A rights table (TOML ``{lobby = "r"}``) or its text (``lobby=r,team-*=rw``), as text."""
    if isinstance(v, dict):
        if not all(isinstance(k, str) and isinstance(r, str) for k, r in v.items()):
            raise ValueError('must be a table of room (or prefix*) = "r" or "rw"')
        v = ",".join(f"{k}={r}" for k, r in v.items())
    if not isinstance(v, str):
        raise ValueError('must be a table of room (or prefix*) = "r" or "rw"')
    from chatd.auth import Rights

    Rights.from_text(v)  # ValueError saying what is wrong
    return v


def _number(v: float) -> str:
    """Seconds and rates as the README writes them: 30, 2.5, 1000000."""
    return f"{v:.15g}"


@dataclass(frozen=True, slots=True)
class Kind:
    """What a setting's value is: how it is read, its type, and how it is written."""

    coerce: Callable[[Any], Any]  # a TOML value or an option's string -> the value
    type: Any
    show: Callable[[Any], str]  # the value as the README, --help and messages write it
    unit: str = ""  # after a range in a message


KINDS: dict[str, Kind] = {
    "size": Kind(_size, int, format_size, " bytes"),  # bytes; K, M, G suffixes
    "seconds": Kind(_float, float, _number, " s"),
    "count": Kind(_int, int, str),  # an integer: a number of things (or a port)
    "rate": Kind(_float, float, _number, " per second"),
    "text": Kind(_str, str, str),
    "flag": Kind(_bool, bool, str),  # its option is a flag that sets the opposite
    "list": Kind(_strs, tuple[str, ...], str),  # its option is repeated
    "rights": Kind(_rights, str, str),  # room=r,prefix*=rw (a table in TOML)
}


@dataclass(frozen=True, slots=True)
class Setting:
    """One setting, declared once: chatd.tap, the checks and the docs' tests all read this.

    ``name`` is the TOML key and the ``Settings`` field; the command-line option
    is ``--name`` with ``-`` for ``_`` unless ``option`` says otherwise.
    """

    name: str
    kind: str  # a key of KINDS
    default: Any
    help: str  # --help's text, without the default (added from ``shown``)
    short: str | None = None  # the one-letter option
    low: float | None = None
    high: float | None = None
    above: bool = False  # the value must be > low, not >= low
    choices: tuple[str, ...] = ()
    empty: str = ""  # if set: "" is refused, and this says what to give instead
    option: str = ""  # the command-line option when not the name with "-" for "_"
    shown: str = ""  # the default as README and --help write it, when not the value's own form

    def __post_init__(self) -> None:
        assert self.kind in KINDS, self
        assert (self.low is None) == (self.high is None), "bounds come in pairs"
        if not self.option:
            object.__setattr__(self, "option", self.name.replace("_", "-"))
        if not self.shown:
            shown = "—" if self.default is None else KINDS[self.kind].show(self.default)
            object.__setattr__(self, "shown", shown)
        assert self.default is None or self.problem(self.default) is None, self

    @property
    def coerce(self) -> Callable[[Any], Any]:
        return KINDS[self.kind].coerce

    @property
    def option_help(self) -> str:
        """The option's line in --help: what it does and (if it has one) its default."""
        if self.default is None:
            return self.help
        return f"{self.help} [default: {self.shown}]"

    def problem(self, value: Any) -> str | None:
        """What is wrong with ``value``, or None; the message starts with ``name``."""
        if value is None:
            return None
        show = KINDS[self.kind].show
        if self.empty and value == "":
            return f"{self.name} {self.empty}"
        if self.choices and value not in self.choices:
            return f"{self.name} must be {' or '.join(self.choices)}, not {value!r}"
        low_ok = self.low is None or (value > self.low if self.above else value >= self.low)
        if low_ok and (self.high is None or value <= self.high):
            return None
        unit = KINDS[self.kind].unit
        if self.above:
            bound = f"> {show(self.low)} and <= {show(self.high)}"
        else:
            bound = f"{show(self.low)}-{show(self.high)}"
        return f"{self.name} must be {bound}{unit}, not {value}"


# Every setting, in the order of the Settings fields (check_declarations sees to it). The
# README's options table (under "Running it") and etc/chatd.toml are checked against this
# by tests/test_settings.py.
SETTINGS: tuple[Setting, ...] = (
    Setting(
        "port",
        "count",
        9000,
        "TCP port to listen on (0: any free port).",
        short="p",
        low=0,
        high=65535,
    ),
    Setting(
        "interface",
        "text",
        "127.0.0.1",
        "Address to listen on.",
        short="i",
        empty="must not be empty",
    ),
    Setting(
        "endpoint",
        "text",
        None,
        "A Twisted strports description to listen on, overriding --port and "
        "--interface: tcp:9000:interface=0.0.0.0, ssl:9443:privateKey=key.pem:certKey=cert.pem, "
        "systemd:domain=INET:index=0.",
        short="e",
    ),
    Setting(
        "static",
        "text",
        PAGE_DIR,
        "Directory of the page served on '/' (needs index.html).",
        shown="the shipped page",
    ),
    Setting(
        "max_message_size",
        "size",
        limits.MAX_MESSAGE_SIZE,
        "Largest message on '/', bytes (K/M suffixes); larger: close 1009.",
        low=1,
        high=2**31,
    ),
    Setting(
        "relay_max_size",
        "size",
        limits.RELAY_MAX_SIZE,
        "Largest relay message; larger: close 1009.",
        low=1,
        high=2**31,
    ),
    Setting(
        "max_backlog",
        "size",
        limits.MAX_BACKLOG,
        "Unsent bytes allowed for a client that stopped reading; past it: close 1008.",
        low=1,
        high=2**31,
    ),
    Setting(
        "max_total_backlog",
        "size",
        limits.MAX_TOTAL_BACKLOG,
        "Unsent bytes over all slow clients; past it a client that is behind gets close 1013.",
        low=1,
        high=2**31,
    ),
    Setting(
        "max_total_inbound",
        "size",
        limits.MAX_TOTAL_INBOUND,
        "Bytes of messages being received (partly arrived or inflated) over all "
        "clients; past it the client adding to them gets close 1013.",
        low=1,
        high=2**31,
    ),
    Setting(
        "listen_backlog",
        "count",
        limits.LISTEN_BACKLOG,
        "The kernel's queue of connections not yet accepted.",
        low=1,
        high=65535,
    ),
    Setting(
        "ping_interval",
        "seconds",
        limits.PING_INTERVAL,
        "Seconds between pings to each client (0: none).",
        low=0,
        high=86400,
    ),
    Setting(
        "ping_timeout",
        "seconds",
        limits.PING_TIMEOUT,
        "Seconds to wait for a pong.",
        low=0,
        above=True,
        high=3600,
    ),
    Setting(
        "compression",
        "flag",
        True,
        "Decline permessage-deflate.",
        option="no-compression",
        shown="off",
    ),
    Setting(
        "compression_context_takeover",
        "flag",
        False,
        "permessage-deflate with server context takeover: fewer bytes on the wire for "
        "similar messages, but a compressor (~256 KiB) and a deflate per connection.",
        shown="off",
    ),
    Setting(
        "db",
        "text",
        "chatd.sqlite3",
        "SQLite file for chat history (relative to the working directory), or :memory:.",
        empty="must be a file path or :memory:",
    ),
    Setting(
        "db_sync",
        "text",
        "normal",
        "normal: history survives a crash of chatd; full: also a power loss.",
        choices=("normal", "full"),
    ),
    Setting(
        "history_size",
        "count",
        limits.HISTORY_SIZE,
        "Chat messages kept per room (0: none).",
        low=0,
        high=10_000_000,
    ),
    Setting(
        "join_history",
        "count",
        limits.JOIN_HISTORY,
        "Messages sent with 'joined' when no 'since' is given.",
        low=0,
        high=10_000,
    ),
    Setting(
        "history_ttl",
        "seconds",
        0.0,
        "Seconds a chat message is kept at most, alongside history_size (0: no limit by age).",
        low=0,
        high=10 * 365 * 86_400,
    ),
    Setting(
        "dedupe_window",
        "seconds",
        limits.DEDUPE_WINDOW,
        "Seconds a send's idempotency key (chatd.v1 'cid', the push API's Idempotency-Key) "
        "is kept: a retry within them is answered with the first send's message.",
        low=1,
        high=86_400,
    ),
    Setting(
        "presence_debounce",
        "seconds",
        limits.PRESENCE_DEBOUNCE,
        "Seconds a token user stays present in a room after its last connection there "
        "left: a reconnect within them shows no leave and join (0: leave at once).",
        low=0,
        high=3600,
    ),
    Setting(
        "max_text",
        "size",
        limits.MAX_TEXT,
        "Longest chat text, bytes of UTF-8.",
        low=1,
        high=2**31,
    ),
    Setting(
        "rate",
        "rate",
        limits.RATE,
        "Chat frames per second per connection.",
        low=0,
        above=True,
        high=1_000_000,
    ),
    Setting(
        "rate_burst",
        "count",
        limits.RATE_BURST,
        "Chat frames a connection may send at once (the burst of --rate).",
        low=1,
        high=1_000_000,
    ),
    Setting(
        "rate_flood",
        "count",
        limits.RATE_FLOOD,
        "Frames refused for rate before close 1008.",
        low=0,
        high=1_000_000,
    ),
    Setting(
        "allowed_origins",
        "list",
        (),
        "A page origin (scheme://host[:port]) that may open WebSockets, or * for any. Repeatable.",
        option="allowed-origin",
        shown="the page's own host",
    ),
    Setting(
        "frame_ancestors",
        "list",
        (),
        "An origin (scheme://host[:port]) whose pages may embed the page in a frame, or 'self'. "
        "Repeatable.",
        option="frame-ancestor",
        shown="none: the page is never framed",
    ),
    Setting(
        "page_csp",
        "text",
        None,
        "The page's Content-Security-Policy, whole (for a --static page that needs more); "
        "frame-ancestors is added from --frame-ancestor.",
        shown="the shipped page's: its own files only",
    ),
    Setting(
        "api_token",
        "text",
        None,
        "Bearer token of the HTTP push API (or CHATD_API_TOKEN); the API is off without one.",
    ),
    Setting(
        "webhook_url",
        "text",
        None,
        "http(s) URL chatd POSTs signed JSON events to: user.online, user.offline, "
        "message.created (docs/WEBHOOKS.md); webhooks are off without one.",
    ),
    Setting(
        "webhook_secret",
        "text",
        None,
        "The HMAC-SHA256 key of the webhooks' Chatd-Signature, at least 16 characters "
        "(or CHATD_WEBHOOK_SECRET); needed with --webhook-url.",
    ),
    Setting(
        "webhook_rooms",
        "text",
        "",
        "Rooms whose messages are sent as message.created, comma-separated; a name "
        "ending in * is a prefix, * alone every room (support-*,orders).",
        shown="—",
    ),
    Setting(
        "webhook_queue",
        "count",
        10_000,
        "Webhook events held in memory at most; past it new ones are dropped (counted).",
        low=1,
        high=1_000_000,
    ),
    Setting(
        "webhook_timeout",
        "seconds",
        10.0,
        "Seconds a webhook request gets (connect, send, answer) before it is retried.",
        low=0,
        above=True,
        high=300,
    ),
    Setting(
        "metrics_endpoint",
        "text",
        None,
        "Serve /healthz and /metrics on this strports endpoint only "
        "(e.g. tcp:9100:interface=127.0.0.1) instead of the main port.",
    ),
    Setting(
        "log_format",
        "text",
        "text",
        "text, or json: one JSON object per line.",
        choices=("text", "json"),
    ),
    Setting(
        "shutdown_timeout",
        "seconds",
        10.0,
        "Seconds clients get to finish closing on SIGTERM.",
        low=0,
        above=True,
        high=3600,
    ),
    Setting(
        "redis",
        "text",
        None,
        "redis://[[user]:password@]host[:port][/db]: run as one node of a cluster sharing "
        "rooms, presence and history in Redis (docs/SCALING.md). Without it: one process, "
        "history in --db.",
    ),
    Setting(
        "cluster_ttl",
        "seconds",
        limits.CLUSTER_TTL,
        "Seconds after which a silent cluster node's members are removed.",
        low=1,
        high=3600,
    ),
    Setting(
        "handshake_timeout",
        "seconds",
        limits.OPEN_HANDSHAKE_TIMEOUT,
        "Seconds a connection gets to send a whole request head (and finish the "
        "WebSocket upgrade); an idle HTTP connection is closed as late.",
        low=0,
        above=True,
        high=3600,
    ),
    Setting(
        "max_pending",
        "count",
        limits.MAX_PENDING,
        "Connections waiting for a request head, at most; past it the one waiting "
        "longest is dropped.",
        low=1,
        high=1_000_000,
    ),
    Setting(
        "max_connections_per_ip",
        "count",
        limits.MAX_CONNECTIONS_PER_IP,
        "Connections from one IP address, at most (0: no cap; behind a proxy every "
        "client has its address).",
        low=0,
        high=1_000_000,
    ),
    Setting(
        "auth",
        "text",
        "none",
        "none: anyone, under any free nick; token: every chat and relay client shows a "
        "signed token (docs/AUTH.md); optional: clients without one get anonymous_rooms.",
        choices=("none", "token", "optional"),
    ),
    Setting(
        "jwt_key",
        "text",
        None,
        "The key tokens are checked with: an HS256 secret of at least 32 bytes (or "
        "CHATD_JWT_KEY), or a PEM file of an RSA, P-256 or Ed25519 public key.",
    ),
    Setting("jwt_audience", "text", None, "The 'aud' tokens must name (not checked if unset)."),
    Setting("jwt_issuer", "text", None, "The 'iss' tokens must name (not checked if unset)."),
    Setting(
        "anonymous_rooms",
        "rights",
        "",
        "With --auth optional: what clients without a token may do, as room=r or "
        "room=rw, comma-separated; a name ending in * is a prefix (lobby=r,help-*=rw).",
        shown="—",
    ),
)
BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}
assert len(BY_NAME) == len(SETTINGS), "a setting declared twice"
COERCE: dict[str, Callable[[Any], Any]] = {s.name: s.coerce for s in SETTINGS}


@dataclass(frozen=True, slots=True)
class Settings:
    """The daemon's settings: one immutable value, a field per setting (see SETTINGS).

    Written out so type checkers see each field's type; check_declarations,
    run below at import, keeps it to SETTINGS: the same names in the same order,
    each type the kind's (``| None`` when the default is None), the same defaults.
    """

    port: int = 9000
    interface: str = "127.0.0.1"
    endpoint: str | None = None
    static: str = PAGE_DIR
    max_message_size: int = limits.MAX_MESSAGE_SIZE
    relay_max_size: int = limits.RELAY_MAX_SIZE
    max_backlog: int = limits.MAX_BACKLOG
    max_total_backlog: int = limits.MAX_TOTAL_BACKLOG
    max_total_inbound: int = limits.MAX_TOTAL_INBOUND
    listen_backlog: int = limits.LISTEN_BACKLOG
    ping_interval: float = limits.PING_INTERVAL
    ping_timeout: float = limits.PING_TIMEOUT
    compression: bool = True
    compression_context_takeover: bool = False
    db: str = "chatd.sqlite3"
    db_sync: str = "normal"
    history_size: int = limits.HISTORY_SIZE
    join_history: int = limits.JOIN_HISTORY
    history_ttl: float = 0.0
    dedupe_window: float = limits.DEDUPE_WINDOW
    presence_debounce: float = limits.PRESENCE_DEBOUNCE
    max_text: int = limits.MAX_TEXT
    rate: float = limits.RATE
    rate_burst: int = limits.RATE_BURST
    rate_flood: int = limits.RATE_FLOOD
    allowed_origins: tuple[str, ...] = ()  # empty: the page's own host only
    frame_ancestors: tuple[str, ...] = ()  # empty: the page is never framed
    page_csp: str | None = None  # None: the shipped page's (chatd.web.PAGE_CSP)
    api_token: str | None = None  # the push API is off without one
    webhook_url: str | None = None  # webhooks are off without one
    webhook_secret: str | None = None
    webhook_rooms: str = ""  # support-*,orders: message.created for these
    webhook_queue: int = 10_000
    webhook_timeout: float = 10.0
    metrics_endpoint: str | None = None  # /healthz and /metrics there instead
    log_format: str = "text"
    shutdown_timeout: float = 10.0
    redis: str | None = None  # redis://host:port/db: a cluster node; None: one process
    cluster_ttl: float = limits.CLUSTER_TTL
    handshake_timeout: float = limits.OPEN_HANDSHAKE_TIMEOUT
    max_pending: int = limits.MAX_PENDING
    max_connections_per_ip: int = limits.MAX_CONNECTIONS_PER_IP
    auth: str = "none"
    jwt_key: str | None = None  # an HS256 secret or a PEM public key file
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    anonymous_rooms: str = ""  # room=r,prefix*=rw

    def check(self) -> None:
        """Raise ConfigError naming the first setting that is out of range (TOML key names)."""
        for s in SETTINGS:
            problem = s.problem(getattr(self, s.name))
            if problem:
                raise ConfigError(problem)
        # What one setting's declaration cannot say: checks across settings, and forms.
        if self.max_total_inbound < max(self.max_message_size, self.relay_max_size):
            raise ConfigError(
                "max_total_inbound must be at least max_message_size and relay_max_size "
                f"(else a largest message could never arrive), not {self.max_total_inbound}"
            )
        if self.api_token is not None and len(self.api_token) < 16:
            raise ConfigError("api_token must be at least 16 characters")
        if self.api_token == EXAMPLE_API_TOKEN:
            raise ConfigError(
                "api_token is still the example's placeholder: set a random one "
                "(openssl rand -hex 24)"
            )
        self.check_webhooks()
        for origin in self.allowed_origins:
            if origin != "*" and "://" not in origin:
                raise ConfigError(f"allowed_origins: {origin!r} is not scheme://host[:port]")
        for origin in self.frame_ancestors:
            if origin != "'self'" and (
                "://" not in origin or any(c in origin for c in " ;,'\"\r\n")
            ):
                raise ConfigError(
                    f"frame_ancestors: {origin!r} is not scheme://host[:port] or 'self'"
                )
        if self.page_csp is not None and (
            not self.page_csp.strip() or any(c in self.page_csp for c in "\r\n")
        ):
            raise ConfigError("page_csp: one line of Content-Security-Policy directives")
        if self.page_csp is not None and "frame-ancestors" in self.page_csp:
            raise ConfigError("page_csp: set frame-ancestors with frame_ancestors, not here")
        if self.redis is not None:
            from chatd.redisconn import parse_url

            try:
                parse_url(self.redis)
            except ValueError as e:
                raise ConfigError(f"redis {e}") from None
        if self.auth != "none" or self.jwt_key is not None:
            self.auth_policy()  # ConfigError if the key cannot be used
        if not os.path.isfile(os.path.join(self.static, "index.html")):
            raise ConfigError(f"static: {self.static!r} has no index.html")

    def check_webhooks(self) -> None:
        """ConfigError if the webhook settings cannot work (chatd/webhooks.py)."""
        from chatd.webhooks import EXAMPLE_SECRET, Rooms, check_url

        try:
            Rooms.from_text(self.webhook_rooms)
        except ValueError as e:
            raise ConfigError(f"webhook_rooms: {e}") from None
        if self.webhook_secret is not None and len(self.webhook_secret) < 16:
            raise ConfigError("webhook_secret must be at least 16 characters")
        if self.webhook_secret == EXAMPLE_SECRET:
            raise ConfigError(
                "webhook_secret is still the example's placeholder: set a random one "
                "(openssl rand -hex 24)"
            )
        if self.webhook_url is None:
            return
        try:
            check_url(self.webhook_url)
        except ValueError as e:
            raise ConfigError(f"webhook_url {e}") from None
        if self.webhook_secret is None:
            raise ConfigError(
                "webhook_url needs webhook_secret (at least 16 characters; or "
                "CHATD_WEBHOOK_SECRET): the back end checks each event's signature with it"
            )

    def auth_policy(self) -> Any:
        """The ``chatd.auth.Policy`` these settings make; ConfigError if the key is unusable."""
        from chatd import auth

        if self.auth == "none":
            return auth.NO_AUTH
        if self.jwt_key is None:
            raise ConfigError(
                f"auth {self.auth} needs jwt_key (a secret, or a PEM public key file; "
                "or CHATD_JWT_KEY)"
            )
        try:
            verifier = auth.Verifier(
                auth.read_key(self.jwt_key), self.jwt_audience, self.jwt_issuer
            )
        except auth.KeyError_ as e:
            raise ConfigError(str(e)) from None
        return auth.Policy(self.auth, verifier, auth.Rights.from_text(self.anonymous_rooms))

    def endpoint_description(self) -> str:
        """The strports description to listen on: --endpoint, else tcp on port/interface."""
        if self.endpoint:
            return self.endpoint
        interface = self.interface.replace(":", "\\:")  # IPv6 literals
        return f"tcp:{self.port}:interface={interface}:backlog={self.listen_backlog}"


def _type_name(t: Any) -> str:
    return t.__name__ if isinstance(t, type) else str(t)  # int; int | None; tuple[str, ...]


def field_type(s: Setting) -> Any:
    """The type of ``s``'s Settings field: its kind's type, ``| None`` if the default is None."""
    t = KINDS[s.kind].type
    return t | None if s.default is None else t


def check_declarations(cls: type[Any], settings: Sequence[Setting] = SETTINGS) -> None:
    """Raise AssertionError naming every way ``cls`` (a dataclass) differs from ``settings``.

    ``cls`` must be a frozen, slotted dataclass with a field per setting, in the
    same order, of type ``field_type(setting)``, whose default is the declared
    one (equal and of the same type). Run on ``Settings`` at import.
    """
    params = getattr(cls, "__dataclass_params__", None)
    if params is None:
        raise AssertionError(f"{cls.__name__} is not a dataclass")
    problems: list[str] = []
    if not params.frozen:
        problems.append("it is not frozen")
    if "__slots__" not in cls.__dict__:
        problems.append("it is not slotted")
    declared = {s.name: s for s in settings}
    have = {f.name: f for f in fields(cls)}
    problems += [f"field {n} is not in SETTINGS" for n in have if n not in declared]
    problems += [f"setting {n} has no field" for n in declared if n not in have]
    both = [n for n in have if n in declared]
    if both != [n for n in declared if n in have]:
        problems.append(f"the fields are not in SETTINGS' order: {', '.join(both)}")
    hints = get_type_hints(cls)
    for s in settings:
        f = have.get(s.name)
        if f is None:
            continue
        want = field_type(s)
        if hints[s.name] != want:
            problems.append(
                f"{s.name} is {_type_name(hints[s.name])}, but a {s.kind} setting "
                f"{'with no default ' if s.default is None else ''}is {_type_name(want)}"
            )
        if f.default is MISSING:
            problems.append(f"{s.name} has no default; SETTINGS says {s.default!r}")
        elif type(f.default) is not type(s.default) or f.default != s.default:
            problems.append(f"{s.name} defaults to {f.default!r}; SETTINGS says {s.default!r}")
    if problems:
        lines = "".join(f"\n  - {p}" for p in problems)
        raise AssertionError(f"{cls.__name__} does not agree with SETTINGS:{lines}")


# Raised, not asserted: python -O does not skip it.
check_declarations(Settings)


def from_mapping(
    values: Mapping[str, Any],
    source: str,
    base: Settings | None = None,
    label: Callable[[str], str] = str,
) -> Settings:
    """Settings from ``values`` (over ``base``); ConfigError names the source and key."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        coerce = COERCE.get(key)
        if coerce is None:
            raise ConfigError(f"{source}unknown key {label(key)!r}")
        try:
            out[key] = coerce(value)
        except ValueError as e:
            raise ConfigError(f"{source}{label(key)} {e}") from None
    base = base or Settings()
    return Settings(**{**{f.name: getattr(base, f.name) for f in fields(Settings)}, **out})


def load_file(path: str) -> dict[str, Any]:
    """The keys of a TOML config file; ConfigError if it cannot be read or parsed."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"config {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config {path}: {e}") from None
    # A [chatd] table, or the keys at the top level.
    return data.get("chatd", data) if isinstance(data.get("chatd"), dict) else data

"""The daemon's settings: one immutable value, checked once before anything binds.

Settings come from three places, later ones winning: a TOML file
(``--config``, keys named as the fields below), the environment
(``CHATD_API_TOKEN`` only, so a secret need not sit in a unit file or on a
command line), and the command line. ``from_mapping`` turns either source's
values into a ``Settings``, naming the key of anything wrong.
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

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


@dataclass(frozen=True, slots=True)
class Settings:
    port: int = 9000
    interface: str = "127.0.0.1"
    endpoint: str | None = None
    static: str = PAGE_DIR
    max_message_size: int = limits.MAX_MESSAGE_SIZE
    relay_max_size: int = limits.RELAY_MAX_SIZE
    max_backlog: int = limits.MAX_BACKLOG
    listen_backlog: int = limits.LISTEN_BACKLOG
    ping_interval: float = limits.PING_INTERVAL
    ping_timeout: float = limits.PING_TIMEOUT
    compression: bool = True
    max_total_backlog: int = limits.MAX_TOTAL_BACKLOG
    max_total_inbound: int = limits.MAX_TOTAL_INBOUND
    db: str = "chatd.sqlite3"
    db_sync: str = "normal"
    history_size: int = limits.HISTORY_SIZE
    join_history: int = limits.JOIN_HISTORY
    max_text: int = limits.MAX_TEXT
    rate: float = limits.RATE
    rate_burst: int = limits.RATE_BURST
    rate_flood: int = limits.RATE_FLOOD
    allowed_origins: tuple[str, ...] = ()  # empty: the page's own host only
    api_token: str | None = None  # the push API is off without one
    metrics_endpoint: str | None = None  # /healthz and /metrics there instead
    log_format: str = "text"
    shutdown_timeout: float = 10.0
    redis: str | None = None  # redis://host:port/db: a cluster node; None: one process
    cluster_ttl: float = limits.CLUSTER_TTL
    handshake_timeout: float = limits.OPEN_HANDSHAKE_TIMEOUT
    max_pending: int = limits.MAX_PENDING
    max_connections_per_ip: int = limits.MAX_CONNECTIONS_PER_IP

    def check(self) -> None:
        """Raise ConfigError naming the first setting that is out of range (TOML key names)."""
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be 0-65535, not {self.port}")
        if not self.interface:
            raise ConfigError("interface must not be empty")
        for name in (
            "max_message_size",
            "relay_max_size",
            "max_backlog",
            "max_total_backlog",
            "max_total_inbound",
            "max_text",
        ):
            value = getattr(self, name)
            if not 1 <= value <= 2**31:
                raise ConfigError(f"{name} must be 1 to 2**31 bytes, not {value}")
        if self.max_total_inbound < max(self.max_message_size, self.relay_max_size):
            raise ConfigError(
                "max_total_inbound must be at least max_message_size and relay_max_size "
                f"(else a largest message could never arrive), not {self.max_total_inbound}"
            )
        if not 1 <= self.listen_backlog <= 65535:
            raise ConfigError(f"listen_backlog must be 1-65535, not {self.listen_backlog}")
        if not 0 <= self.ping_interval <= 86400:
            raise ConfigError(f"ping_interval must be 0-86400 s, not {self.ping_interval}")
        if not 0 < self.ping_timeout <= 3600:
            raise ConfigError(f"ping_timeout must be > 0 and <= 3600 s, not {self.ping_timeout}")
        if not self.db:
            raise ConfigError("db must be a file path or :memory:")
        if self.db_sync not in ("normal", "full"):
            raise ConfigError(f"db_sync must be normal or full, not {self.db_sync!r}")
        if not 0 <= self.history_size <= 10_000_000:
            raise ConfigError(f"history_size must be 0 to 10000000, not {self.history_size}")
        if not 0 <= self.join_history <= 10_000:
            raise ConfigError(f"join_history must be 0 to 10000, not {self.join_history}")
        if not 0 < self.rate <= 1_000_000:
            raise ConfigError(f"rate must be > 0 and <= 1000000 per second, not {self.rate}")
        if not 1 <= self.rate_burst <= 1_000_000:
            raise ConfigError(f"rate_burst must be 1-1000000, not {self.rate_burst}")
        if not 0 <= self.rate_flood <= 1_000_000:
            raise ConfigError(f"rate_flood must be 0-1000000, not {self.rate_flood}")
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"log_format must be text or json, not {self.log_format!r}")
        if not 0 < self.shutdown_timeout <= 3600:
            raise ConfigError(f"shutdown_timeout must be 0-3600 s, not {self.shutdown_timeout}")
        if self.api_token is not None and len(self.api_token) < 16:
            raise ConfigError("api_token must be at least 16 characters")
        if self.api_token == EXAMPLE_API_TOKEN:
            raise ConfigError(
                "api_token is still the example's placeholder: set a random one "
                "(openssl rand -hex 24)"
            )
        for origin in self.allowed_origins:
            if origin != "*" and "://" not in origin:
                raise ConfigError(f"allowed_origins: {origin!r} is not scheme://host[:port]")
        if self.redis is not None:
            from chatd.broker import parse_url

            try:
                parse_url(self.redis)
            except ValueError as e:
                raise ConfigError(f"redis {e}") from None
        if not 1 <= self.cluster_ttl <= 3600:
            raise ConfigError(f"cluster_ttl must be 1-3600 s, not {self.cluster_ttl}")
        if not 0 < self.handshake_timeout <= 3600:
            raise ConfigError(f"handshake_timeout must be 0-3600 s, not {self.handshake_timeout}")
        if not 1 <= self.max_pending <= 1_000_000:
            raise ConfigError(f"max_pending must be 1 to 1000000, not {self.max_pending}")
        if not 0 <= self.max_connections_per_ip <= 1_000_000:
            raise ConfigError(
                f"max_connections_per_ip must be 0 to 1000000, not {self.max_connections_per_ip}"
            )
        if not os.path.isfile(os.path.join(self.static, "index.html")):
            raise ConfigError(f"static: {self.static!r} has no index.html")

    def endpoint_description(self) -> str:
        """The strports description to listen on: --endpoint, else tcp on port/interface."""
        if self.endpoint:
            return self.endpoint
        interface = self.interface.replace(":", "\\:")  # IPv6 literals
        return f"tcp:{self.port}:interface={interface}:backlog={self.listen_backlog}"


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


COERCE: dict[str, Callable[[Any], Any]] = {
    "port": _int,
    "interface": _str,
    "endpoint": _str,
    "static": _str,
    "max_message_size": _size,
    "relay_max_size": _size,
    "max_backlog": _size,
    "listen_backlog": _int,
    "ping_interval": _float,
    "ping_timeout": _float,
    "compression": _bool,
    "max_total_backlog": _size,
    "max_total_inbound": _size,
    "db": _str,
    "db_sync": _str,
    "history_size": _int,
    "join_history": _int,
    "max_text": _size,
    "rate": _float,
    "rate_burst": _int,
    "rate_flood": _int,
    "allowed_origins": _strs,
    "api_token": _str,
    "metrics_endpoint": _str,
    "log_format": _str,
    "shutdown_timeout": _float,
    "redis": _str,
    "cluster_ttl": _float,
    "handshake_timeout": _float,
    "max_pending": _int,
    "max_connections_per_ip": _int,
}
assert set(COERCE) == {f.name for f in fields(Settings)}, "every setting needs a coercion"


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

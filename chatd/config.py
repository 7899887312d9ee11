"""The daemon's settings: one immutable value, checked once before anything binds."""

from __future__ import annotations

import os
from dataclasses import dataclass

from chatd import limits

PAGE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")


class ConfigError(ValueError):
    """A setting is wrong; the message names it."""


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
    db: str = "chatd.sqlite3"
    db_sync: str = "normal"
    history_size: int = limits.HISTORY_SIZE
    join_history: int = limits.JOIN_HISTORY
    max_text: int = limits.MAX_TEXT
    rate: float = limits.RATE
    rate_burst: int = limits.RATE_BURST
    rate_flood: int = limits.RATE_FLOOD

    def check(self) -> None:
        """Raise ConfigError naming the first setting that is out of range."""
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be 0-65535, not {self.port}")
        if not self.interface:
            raise ConfigError("interface must not be empty")
        for name in (
            "max_message_size",
            "relay_max_size",
            "max_backlog",
            "max_total_backlog",
            "max_text",
        ):
            value = getattr(self, name)
            if not 1 <= value <= 2**31:
                raise ConfigError(f"{name} must be 1 to 2**31 bytes, not {value}")
        if not 1 <= self.listen_backlog <= 65535:
            raise ConfigError(f"listen_backlog must be 1-65535, not {self.listen_backlog}")
        if self.ping_interval < 0:
            raise ConfigError(f"ping_interval must be >= 0, not {self.ping_interval}")
        if self.ping_timeout <= 0:
            raise ConfigError(f"ping_timeout must be > 0, not {self.ping_timeout}")
        if not self.db:
            raise ConfigError("db must be a file path or :memory:")
        if self.db_sync not in ("normal", "full"):
            raise ConfigError(f"db_sync must be normal or full, not {self.db_sync!r}")
        if not 0 <= self.history_size <= 10_000_000:
            raise ConfigError(f"history_size must be 0 to 10000000, not {self.history_size}")
        if not 0 <= self.join_history <= 10_000:
            raise ConfigError(f"join_history must be 0 to 10000, not {self.join_history}")
        if not self.rate > 0:
            raise ConfigError(f"rate must be > 0, not {self.rate}")
        if self.rate_burst < 1 or self.rate_flood < 0:
            raise ConfigError("rate_burst must be >= 1 and rate_flood >= 0")
        if not os.path.isfile(os.path.join(self.static, "index.html")):
            raise ConfigError(f"static: {self.static!r} has no index.html")

    def endpoint_description(self) -> str:
        """The strports description to listen on: --endpoint, else tcp on port/interface."""
        if self.endpoint:
            return self.endpoint
        interface = self.interface.replace(":", "\\:")  # IPv6 literals
        return f"tcp:{self.port}:interface={interface}:backlog={self.listen_backlog}"

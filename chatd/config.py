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

    def check(self) -> None:
        """Raise ConfigError naming the first setting that is out of range."""
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be 0-65535, not {self.port}")
        if not self.interface:
            raise ConfigError("interface must not be empty")
        for name in ("max_message_size", "relay_max_size", "max_backlog"):
            value = getattr(self, name)
            if not 1 <= value <= 2**31:
                raise ConfigError(f"{name} must be 1 to 2**31 bytes, not {value}")
        if not 1 <= self.listen_backlog <= 65535:
            raise ConfigError(f"listen_backlog must be 1-65535, not {self.listen_backlog}")
        if self.ping_interval < 0:
            raise ConfigError(f"ping_interval must be >= 0, not {self.ping_interval}")
        if self.ping_timeout <= 0:
            raise ConfigError(f"ping_timeout must be > 0, not {self.ping_timeout}")
        if not os.path.isfile(os.path.join(self.static, "index.html")):
            raise ConfigError(f"static: {self.static!r} has no index.html")

    def endpoint_description(self) -> str:
        """The strports description to listen on: --endpoint, else tcp on port/interface."""
        if self.endpoint:
            return self.endpoint
        interface = self.interface.replace(":", "\\:")  # IPv6 literals
        return f"tcp:{self.port}:interface={interface}:backlog={self.listen_backlog}"

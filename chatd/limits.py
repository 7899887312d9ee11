"""Every limit chatd enforces, and the close code a client gets past it.

Kept in one place so the docs (README, "Limits and close codes") and the code
cannot drift: each constant here is named in that table.
"""

from __future__ import annotations

import re

KiB = 1024
MiB = 1024 * KiB

# Defaults; each is an option of the daemon (see chatd.config.Settings).
MAX_MESSAGE_SIZE = 64 * KiB  # chat on "/": one message, after reassembly
RELAY_MAX_SIZE = 16 * MiB  # relay rooms: one message, after reassembly
MAX_BACKLOG = 4 * MiB  # unsent bytes queued for a client that has stopped reading
LISTEN_BACKLOG = 1024  # the kernel's accept queue (Twisted's default is 50)
PING_INTERVAL = 30.0  # seconds between server pings; 0 turns them off
PING_TIMEOUT = 20.0  # seconds to wait for the pong before dropping
OPEN_HANDSHAKE_TIMEOUT = 10.0  # seconds for a client to finish the upgrade
CLOSE_HANDSHAKE_TIMEOUT = 5.0  # seconds to wait for the close reply

# RFC 6455 section 7.4.1 close codes that chatd sends itself.
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_UNSUPPORTED_DATA = 1003  # binary data on the text chat
CLOSE_INVALID_PAYLOAD = 1007  # text that is not UTF-8
CLOSE_POLICY_VIOLATION = 1008  # a client that stopped reading (slow consumer)
CLOSE_MESSAGE_TOO_BIG = 1009
CLOSE_TRY_AGAIN_LATER = 1013

# Room names: what fits in one URL path segment without escaping, so that
# "/relay/<room>" needs no decoding and a name reads the same everywhere.
ROOM_NAME_MAX = 64
_ROOM_RE = re.compile(rf"[A-Za-z0-9._~:@+-]{{1,{ROOM_NAME_MAX}}}\Z")


def valid_room_name(name: str) -> bool:
    """True for 1-64 characters of ``A-Z a-z 0-9 . _ ~ : @ + -``, not all dots.

    "." and ".." are refused because URL normalisation (browsers, proxies)
    would turn "/relay/.." into another path.
    """
    return _ROOM_RE.match(name) is not None and name.strip(".") != ""

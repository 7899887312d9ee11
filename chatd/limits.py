"""Every limit chatd enforces, and the close code a client gets past it.

Kept in one place, so each value is written once in the code. The README
("Limits and close codes", and the options table for those that are
options) and docs/PROTOCOL.md give them to users; only the options table is
checked against the code (tests/test_settings.py, through chatd.config), so
a change here is copied into the other two by hand.
"""

from __future__ import annotations

import re
import unicodedata

KiB = 1024
MiB = 1024 * KiB

# Defaults; each is an option of the daemon (see chatd.config.Settings).
MAX_MESSAGE_SIZE = 64 * KiB  # chat on "/": one message, after reassembly
RELAY_MAX_SIZE = 16 * MiB  # relay rooms: one message, after reassembly
MAX_BACKLOG = 4 * MiB  # unsent bytes queued for a client that has stopped reading
LISTEN_BACKLOG = 1024  # the kernel's accept queue (Twisted's default is 50)
PING_INTERVAL = 30.0  # seconds between server pings; 0 turns them off
PING_TIMEOUT = 20.0  # seconds to wait for the pong before dropping
OPEN_HANDSHAKE_TIMEOUT = 10.0  # seconds for a request head (and the upgrade) to arrive whole
MAX_PENDING = 1024  # connections waiting for a request head, over all clients
MAX_CONNECTIONS_PER_IP = 0  # connections from one address (0: no cap)
MAX_HEAD_SIZE = 16 * KiB  # a request line and its headers
MAX_HEADERS = 100  # header lines in one request
CLOSE_HANDSHAKE_TIMEOUT = 5.0  # seconds to wait for the close reply
MAX_TOTAL_BACKLOG = 256 * MiB  # unsent bytes over all slow clients: past it, overloaded
# Data frames in one message (a fragmented message): MAX_MESSAGE_FRAMES, plus
# one for every FRAGMENT_BYTES of its data; past it, close 1009. A flood of
# empty (or one-byte) continuation frames would otherwise keep a core busy,
# while a big message cut into small fragments (64 bytes: Autobahn|Testsuite
# 9.3.1 sends 4 MiB so, 65,536 frames) is still taken.
MAX_MESSAGE_FRAMES = 1024
FRAGMENT_BYTES = 64
# Bytes of messages being received (partly arrived, or inflated from a few
# compressed bytes) over all clients: past it, close 1013. A client sending
# the start of a big compressed message and never its end would otherwise
# hold a thousand times what it sent.
MAX_TOTAL_INBOUND = 128 * MiB
# Pings a client may send: PING_RATE a second on average, PING_BURST at once;
# pings past that get no pong, and PING_FLOOD more close the connection (1008).
PING_RATE = 10.0
PING_BURST = 100
PING_FLOOD = 100

# Chat (protocol chatd.v1 and the plain chat on "/").
MAX_TEXT = 16 * KiB  # bytes of UTF-8 in one chat message (v1: error "too_long")
HISTORY_SIZE = 1000  # messages kept per room; "since" can recover this many
JOIN_HISTORY = 50  # messages sent with "joined" when the client gives no "since"
# Seconds a token user's presence outlives its last connection in a room: a
# reconnect within it (a network switch, a reload) shows no leave and join.
PRESENCE_DEBOUNCE = 5.0
# Seconds a cluster node waits for another node to hand a resumed session over
# (a node that is gone never answers: the client then joins afresh).
RESUME_ASK_TIMEOUT = 3.0
# Seconds a send's idempotency key (v1 "cid", the push API's Idempotency-Key) is
# remembered: a retry within them gets the first send's message back, once stored.
DEDUPE_WINDOW = 600.0
# "typing": at most one is passed on per this many seconds from a connection and
# room; receivers show it for TYPING_TIMEOUT seconds unless another comes.
TYPING_INTERVAL = 1.0
TYPING_TIMEOUT = 5.0
# A read marker that moves is told to the room's members while it has at most
# this many on the node (beyond, to the reader's own connections only: a big
# room's members do not need each other's markers, at O(members) each).
READ_RECEIPTS_MAX_MEMBERS = 50
MAX_ROOMS_PER_CONNECTION = 16
# SSE (GET /sse/<room>, chatd.sse): a ": ping" comment to each stream every this
# many seconds (proxies drop idle responses), and the "retry:" a stream tells
# EventSource to wait before it reconnects.
SSE_HEARTBEAT = 15.0
SSE_RETRY = 2.0
# chatd.v1 frames that arrive while a join is being answered wait for it, up
# to this many; one more closes the connection with 1008.
MAX_WAITING_REQUESTS = 64
# A cluster node silent (no heartbeat) this long is dead: others remove its
# members and tell their rooms. Heartbeats go every CLUSTER_TTL / 4.
CLUSTER_TTL = 10.0
RATE = 20.0  # chat messages per second a connection may send, on average
RATE_BURST = 60  # ... and at once
RATE_FLOOD = 60  # messages refused for rate in a row before close 1008
NICK_MAX = 32

# RFC 6455 section 7.4.1 close codes that chatd's own code sends (Autobahn
# sends 1002, a protocol error, and 1007, text that is not UTF-8, itself).
CLOSE_GOING_AWAY = 1001
CLOSE_UNSUPPORTED_DATA = 1003  # binary data on the text chat
CLOSE_POLICY_VIOLATION = 1008  # a client that stopped reading (slow consumer)
CLOSE_MESSAGE_TOO_BIG = 1009
CLOSE_TRY_AGAIN_LATER = 1013  # slow consumer while the server as a whole is overloaded
CLOSE_RESUMED = 4000  # a newer connection showed this session's resume secret
CLOSE_UNAUTHORIZED = 4001  # no valid token (bad, expired, or none where one is needed)
CLOSE_FORBIDDEN = 4003  # the token does not give the right (relay publish, plain post)

# Room names: what fits in one URL path segment without escaping, so that
# "/relay/<room>" needs no decoding and a name reads the same everywhere.
ROOM_NAME_MAX = 64
ROOM_CHARS = "A-Z a-z 0-9 . _ ~ : @ + , -"  # as the docs and error messages write them
ROOM_NAME_RULE = f"a room name is 1-{ROOM_NAME_MAX} characters of {ROOM_CHARS}, not all dots"
_ROOM_RE = re.compile(rf"[A-Za-z0-9._~:@+,-]{{1,{ROOM_NAME_MAX}}}\Z")


def valid_room_name(name: str) -> bool:
    """True for 1-64 characters of ``A-Z a-z 0-9 . _ ~ : @ + , -``, not all dots.

    "." and ".." are refused because URL normalisation (browsers, proxies)
    would turn "/relay/.." into another path.
    """
    return _ROOM_RE.match(name) is not None and name.strip(".") != ""


_NICK_EXTRA = set("_-.")


def _fold(text: str) -> str:
    """NFKC, then case folding (then NFKC again, as case folding can undo it)."""
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())


# Letters that look alike in common fonts, folded onto one (a small part of
# Unicode's confusables.txt, for the scripts users mix up most): Cyrillic and
# Greek letters that look Latin, and I l 1, O 0.
_SKELETON = str.maketrans(
    dict(
        zip(
            # Cyrillic
            "\u0430\u0501\u0435\u04bb\u0456\u0458\u04cf\u043a\u043c\u043d\u043e\u0440"
            "\u051b\u0441\u0455\u0442\u0443\u0445\u051d\u0432"
            # Greek
            "\u03b1\u03b5\u03b7\u03b9\u03ba\u03bc\u03bf\u03c1\u03c4\u03c7\u03b6\u03f2"
            # Latin and digits
            "i1\u0131\u01c00",
            "adehljlkmhopqcstyxwbaehlkmoptxzcllllo",
            strict=True,
        )
    )
)


def nick_key(nick: str) -> str:
    """What nicks are compared by: two nicks with one key are one name.

    NFKC (fullwidth, ligatures, compatibility forms) and case folding, then
    look-alike letters mapped onto one (Cyrillic and Latin a, I and l and 1,
    O and 0, "rn" and "m"...). Used wherever nicks meet: uniqueness within a room
    (here and on a cluster) and the reserved names.
    """
    return _fold(nick).translate(_SKELETON).replace("rn", "m")


# Plain clients' names, ID<digits>, and what passes for one: any case or
# width, digits of any script, look-alikes of I and D, anything after the
# digits ("ID1234." shows as "ID1234.: text"), _ - . anywhere.
_NO_PUNCTUATION = str.maketrans(dict.fromkeys("_-."))
_I_LIKE = "Il1ıǀΙІӀᏆⵏꓲᛁⲒ"
_D_LIKE = "DᎠᗞꓓⅮ"
_RESERVED_NICK = re.compile(
    r"(?:{})(?:{})\d".format(
        "|".join(sorted({re.escape(_fold(c)) for c in _I_LIKE})),
        "|".join(sorted({re.escape(_fold(c)) for c in _D_LIKE})),
    )
)

# Scripts that UTS #39's "highly restrictive" level lets one name mix.
_MIXABLE = (
    frozenset(("LATIN", "HAN", "HIRAGANA", "KATAKANA")),
    frozenset(("LATIN", "HAN", "BOPOMOFO")),
    frozenset(("LATIN", "HAN", "HANGUL")),
)
_SCRIPT_ALIASES = {"CJK": "HAN", "IDEOGRAPHIC": "HAN", "KATAKANA-HIRAGANA": "KATAKANA"}


def _script(letter: str) -> str:
    """A letter's script, from the first word of its Unicode name (LATIN, CYRILLIC...)."""
    word = unicodedata.name(letter, "?").split(" ", 1)[0]
    return _SCRIPT_ALIASES.get(word, word)


def mixes_scripts(nick: str) -> bool:
    """True if the letters of ``nick`` (after NFKC) come from scripts no language mixes.

    One script, or Latin with Han and kana (Japanese), Bopomofo (Chinese)
    or Hangul (Korean); digits from one numbering system.
    """
    text = unicodedata.normalize("NFKC", nick)
    scripts = {_script(c) for c in text if c.isalpha()}
    if len(scripts) > 1 and not any(scripts <= ok for ok in _MIXABLE):
        return True
    zeros = {
        ord(c) - unicodedata.decimal(c) for c in text if unicodedata.decimal(c, None) is not None
    }
    return len(zeros) > 1


def nick_problem(nick: object) -> str | None:
    """Why ``nick`` is not acceptable, or None if it is.

    1-32 characters, letters (any script), digits and ``_ - .``, letters of
    scripts that one language writes together (``mixes_scripts``);
    ``ID<digits>`` is reserved for plain clients, whose sender name it is, in
    any case, width or look-alike (``id1234``, fullwidth letters, ``lD1234``),
    and so is anything that starts like it (``ID1234.``, ``I.D-1234x``).
    """
    if not isinstance(nick, str) or not 1 <= len(nick) <= NICK_MAX:
        return f"a nick is 1-{NICK_MAX} characters"
    if not all(c.isalnum() or c in _NICK_EXTRA for c in nick):
        return "a nick has only letters, digits and _ - ."
    if mixes_scripts(nick):
        return "a nick does not mix scripts (such as Latin and Cyrillic letters)"
    if _RESERVED_NICK.match(_fold(nick).translate(_NO_PUNCTUATION)):
        return "nicks ID<digits> are reserved for plain clients"
    return None


class TokenBucket:
    """Per-connection rate limit: ``rate``/s on average, ``burst`` at once.

    Each message takes a token. Past the burst a message is refused (the
    client gets an error) and the bucket goes further into debt; ``flood``
    refusals of debt mean a sustained flood, and the connection is closed.
    Sans-I/O: the caller passes the time.
    """

    __slots__ = ("burst", "flood", "rate", "stamp", "tokens")

    OK, LIMITED, FLOOD = 0, 1, 2

    def __init__(self, rate: float, burst: int, flood: int, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.flood = flood
        self.tokens = float(burst)
        self.stamp = now

    def take(self, now: float) -> int:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= 1
        if self.tokens >= 0:
            return self.OK
        if self.tokens >= -self.flood:
            return self.LIMITED
        return self.FLOOD

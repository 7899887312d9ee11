"""Who a client is and what it may do: signed connection tokens (JWT) and room rights.

A back end that knows its users signs a token for each (``python -m
chatd.token`` makes one for development); chatd checks it and never calls
back. docs/AUTH.md is the user's guide; this module is the whole check,
with no I/O (tests drive it with a fixed ``now``).

**Modes** (``--auth``): ``none`` (anyone, under any free nick: chatd
before tokens, the default), ``token`` (every chat and relay client shows a
valid token), ``optional`` (clients without one get the rights that
``anonymous_rooms`` grants).

**Tokens** are checked by PyJWT, never by hand. The algorithm follows from
the key, never from the token: an HS256 secret (at least 32 bytes) accepts
only HS256; a PEM public key only its own family (RS256, ES256, EdDSA). So
``alg: none`` and the classic key confusion (an HS256 token "signed" with
the server's public RSA key as the secret) are refused. ``exp`` and ``sub``
are required, ``nbf``/``iat`` honoured, ``aud``/``iss`` checked when
configured, with 60 s of leeway for clocks; a token over 8 KiB is refused
before it is parsed.

**Rights** are per room name or per prefix pattern ending in ``*``:
``{"lobby": "rw", "team-*": "r"}``. ``r``: join, history, presence; ``rw``:
also send. An exact name wins over patterns, a longer pattern over a
shorter one. Relay rooms have their own table (``relay`` claim): ``r``
receive, ``rw`` also publish.

What it costs: one signature check per connection (about 20 us for HS256,
50 us for RS256 on the benchmark machine) and a dict lookup (plus a scan of
the patterns, usually a handful) per join or send.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

MODES = ("none", "token", "optional")
LEEWAY = 60.0  # seconds of clock difference forgiven on exp, nbf, iat
MAX_TOKEN = 8 * 1024  # bytes; a longer token is refused unparsed
MIN_SECRET = 32  # bytes of an HS256 secret
EXPIRY_GRACE = 25.0  # seconds a connection outlives its token's exp without a refresh
NAME_MAX = 64  # characters of a display name


class AuthError(Exception):
    """A token was refused; ``reason`` is one word for clients and logs (never the token)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class KeyError_(ValueError):  # noqa: N801 (not the builtin KeyError)
    """The configured key cannot be used (the message is for the operator)."""


def _pattern_problem(name: object, right: object) -> str | None:
    if not isinstance(name, str) or not 0 < len(name) <= 65:
        return f"room pattern {name!r} is not a room name or a prefix ending in *"
    if "*" in name[:-1]:
        return f"room pattern {name!r}: * only at the end"
    if right not in ("r", "rw"):
        return f"room pattern {name!r}: the right is 'r' or 'rw', not {right!r}"
    return None


@dataclass(frozen=True, slots=True)
class Rights:
    """Rights by room: exact names, then prefix patterns (longest first)."""

    exact: Mapping[str, str] = field(default_factory=dict)
    prefixes: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, table: object) -> Rights:
        """From a claim or the config: ``{"lobby": "r", "team-*": "rw"}``; ValueError."""
        if table is None:
            return NO_RIGHTS
        if not isinstance(table, dict):
            raise ValueError("rights are an object of room name or pattern to 'r' or 'rw'")
        exact: dict[str, str] = {}
        prefixes: list[tuple[str, str]] = []
        for name, right in table.items():
            problem = _pattern_problem(name, right)
            if problem:
                raise ValueError(problem)
            if name.endswith("*"):
                prefixes.append((name[:-1], right))
            else:
                exact[name] = right
        prefixes.sort(key=lambda p: -len(p[0]))
        return cls(exact, tuple(prefixes))

    @classmethod
    def from_text(cls, text: str) -> Rights:
        """The command line's form: ``lobby=r,team-*=rw``."""
        table: dict[str, str] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, eq, right = part.partition("=")
            if not eq:
                raise ValueError(f"{part!r} is not room=r or room=rw")
            table[name.strip()] = right.strip()
        return cls.parse(table)

    def right(self, room: str) -> str:
        """``""`` (none), ``"r"`` or ``"rw"``."""
        found = self.exact.get(room)
        if found is not None:
            return found
        for prefix, right in self.prefixes:
            if room.startswith(prefix):
                return right
        return ""

    def can_read(self, room: str) -> bool:
        return self.right(room) != ""

    def can_write(self, room: str) -> bool:
        return self.right(room) == "rw"


def reserved(room: str) -> bool:
    """Personal rooms (``@<sub>``) and direct messages (``dm:<a>,<b>``) are decided by
    the user's ``sub`` alone, never by a rights table or pattern."""
    return room.startswith(("@", "dm:"))


def own_right(sub: str, room: str) -> str:
    """What ``sub`` may do in a reserved room: read its own ``@<sub>`` (the back end
    posts there through the push API), read and write ``dm:<a>,<b>`` when it is
    ``a`` or ``b`` and the two are sorted and different (any other spelling of the
    pair is no room at all)."""
    if room[:1] == "@":
        return "r" if room[1:] == sub else ""
    a, comma, b = room[3:].partition(",")
    if comma and a < b and "," not in b and sub in (a, b):
        return "rw"
    return ""


def dm_room(a: str, b: str) -> str:
    """The one spelling of the direct-message room of users ``a`` and ``b``."""
    first, second = sorted((a, b))
    return f"dm:{first},{second}"


NO_RIGHTS = Rights()
ALL_RIGHTS = Rights({}, (("", "rw"),))  # mode none: anyone may do anything


@dataclass(frozen=True, slots=True)
class Identity:
    """A verified token's holder (``sub``) and what it may do, until ``exp``."""

    sub: str
    name: str
    exp: float  # seconds since the epoch
    rooms: Rights
    relay: Rights

    def chat_right(self, room: str) -> str:
        """``""``, ``"r"`` or ``"rw"`` in chat room ``room``."""
        if reserved(room):
            return own_right(self.sub, room)
        return self.rooms.right(room)


def _load_key(key: str) -> tuple[Any, list[str]]:
    """The verification key and the only algorithms it allows."""
    text = key.strip()
    if text.startswith("-----BEGIN"):
        if "PRIVATE KEY" in text:
            raise KeyError_("jwt_key is a private key: give chatd the public key only")
        try:
            public = load_pem_public_key(text.encode())
        except ValueError as e:
            raise KeyError_(f"jwt_key is not a PEM public key chatd can read: {e}") from None
        if isinstance(public, rsa.RSAPublicKey):
            if public.key_size < 2048:
                raise KeyError_(f"jwt_key: an RSA key of {public.key_size} bits; at least 2048")
            return public, ["RS256"]
        if isinstance(public, ec.EllipticCurvePublicKey):
            if not isinstance(public.curve, ec.SECP256R1):
                raise KeyError_("jwt_key: an EC key must be on P-256 (ES256)")
            return public, ["ES256"]
        if isinstance(public, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
            return public, ["EdDSA"]
        raise KeyError_("jwt_key: RSA, P-256 or Ed25519 public keys only")
    secret = text.encode()
    if len(secret) < MIN_SECRET:
        raise KeyError_(
            f"jwt_key: an HS256 secret of at least {MIN_SECRET} bytes, not {len(secret)}"
        )
    return secret, ["HS256"]


def read_key(value: str) -> str:
    """``jwt_key`` as configured: a PEM file's path (read here) or the secret itself."""
    if value.startswith(("/", "./", "../")) or value.endswith(".pem"):
        try:
            with open(value, encoding="ascii") as f:
                return f.read()
        except OSError as e:
            raise KeyError_(f"jwt_key: cannot read {value}: {e.strerror}") from None
    return value


class Verifier:
    """Checks tokens against one key (and the audience and issuer, when set)."""

    def __init__(self, key: str, audience: str | None = None, issuer: str | None = None) -> None:
        self.key, self.algorithms = _load_key(key)
        self.audience, self.issuer = audience, issuer

    def verify(self, token: object, now: float | None = None) -> Identity:
        """The token's Identity; AuthError saying why not."""
        if not isinstance(token, str) or not token:
            raise AuthError("missing", "no token")
        if len(token) > MAX_TOKEN:
            raise AuthError("too_large", f"a token is at most {MAX_TOKEN} bytes")
        options: dict[str, Any] = {"require": ["exp", "sub"]}
        if self.audience is None:
            options["verify_aud"] = False
        try:
            claims = self._decode_at(token, options, time.time() if now is None else now)
        except jwt.ExpiredSignatureError:
            raise AuthError("expired", "the token has expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthError("not_yet_valid", "the token is not valid yet") from None
        except jwt.InvalidAudienceError:
            raise AuthError("bad_audience", "the token is for another audience") from None
        except jwt.InvalidIssuerError:
            raise AuthError("bad_issuer", "the token is from another issuer") from None
        except jwt.MissingRequiredClaimError as e:
            raise AuthError("missing_claim", f"the token has no {e.claim!r}") from None
        except jwt.InvalidAlgorithmError:
            raise AuthError("bad_algorithm", "the token's algorithm is not the key's") from None
        except jwt.InvalidSignatureError:
            raise AuthError("bad_signature", "the token's signature is wrong") from None
        except jwt.InvalidTokenError as e:
            raise AuthError("malformed", f"not a token chatd accepts: {e}") from None
        return identity(claims)

    def _decode_at(self, token: str, options: dict[str, Any], now: float) -> dict[str, Any]:
        # PyJWT reads the clock itself: check the signature, then the times at ``now``.
        claims: dict[str, Any] = jwt.decode(
            token,
            self.key,
            algorithms=self.algorithms,
            audience=self.audience,
            issuer=self.issuer,
            options={  # type: ignore[arg-type]  # (a TypedDict in PyJWT's stubs)
                **options,
                "verify_exp": False,
                "verify_nbf": False,
                "verify_iat": False,
            },
        )
        exp = claims.get("exp")
        if not isinstance(exp, int | float) or isinstance(exp, bool):
            raise jwt.InvalidTokenError("exp is not a number")
        if exp < now - LEEWAY:
            raise jwt.ExpiredSignatureError("expired")
        nbf = claims.get("nbf")
        if nbf is not None:
            if not isinstance(nbf, int | float) or isinstance(nbf, bool):
                raise jwt.InvalidTokenError("nbf is not a number")
            if nbf > now + LEEWAY:
                raise jwt.ImmatureSignatureError("nbf")
        return claims


def identity(claims: Mapping[str, Any]) -> Identity:
    """The Identity of verified claims; AuthError for claims of the wrong shape."""
    sub = claims.get("sub")
    if not isinstance(sub, str) or not 0 < len(sub) <= 128 or not sub.isprintable():
        raise AuthError("bad_claim", "'sub' is 1-128 printable characters")
    name = claims.get("name", sub)
    if not isinstance(name, str) or not 0 < len(name) <= NAME_MAX or not name.isprintable():
        raise AuthError("bad_claim", f"'name' is 1-{NAME_MAX} printable characters")
    exp = claims["exp"]
    if not isinstance(exp, int | float) or isinstance(exp, bool):
        raise AuthError("bad_claim", "'exp' is a number")
    try:
        rooms = Rights.parse(claims.get("rooms"))
        relay = Rights.parse(claims.get("relay"))
    except ValueError as e:
        raise AuthError("bad_claim", str(e)) from None
    return Identity(sub, name, float(exp), rooms, relay)


@dataclass(frozen=True, slots=True)
class Policy:
    """The configured mode: who may connect and, without a token, with which rights."""

    mode: str = "none"
    verifier: Verifier | None = None
    anonymous: Rights = NO_RIGHTS  # mode optional: what a client without a token may do

    @property
    def required(self) -> bool:
        return self.mode == "token"

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    def anonymous_rights(self) -> Rights:
        """What a client without a token may do, in chat and relay rooms alike
        (mode none: everything)."""
        return ALL_RIGHTS if self.mode == "none" else self.anonymous

    def chat_right(self, identity: Identity | None, room: str) -> str:
        """What a client may do in chat room ``room``: its token's right, or without
        one the anonymous right (never in another's personal or direct rooms)."""
        if identity is not None:
            return identity.chat_right(room)
        if self.mode != "none" and reserved(room):
            return ""
        return self.anonymous_rights().right(room)

    def verify(self, token: object, now: float | None = None) -> Identity:
        if self.verifier is None:
            raise AuthError("disabled", "this server does not take tokens")
        return self.verifier.verify(token, time.time() if now is None else now)


NO_AUTH = Policy()


def bearer(value: bytes | str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header value, if that is one."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()

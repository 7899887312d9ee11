"""Print a connection token for development and the docs: ``python -m chatd.token``.

    python -m chatd.token --sub alice --name Alice --rooms 'lobby=rw,team-*=r' --ttl 1h

Signs with the HS256 secret in ``--key``, ``CHATD_JWT_KEY`` or the
``jwt_key`` of ``--config`` (the same secret the daemon checks with), or
with ``--private-key`` (a PEM RSA, P-256 or Ed25519 private key whose
public half is the daemon's ``jwt_key``). A real deployment's back end
signs its own tokens with any JWT library (docs/AUTH.md shows PyJWT).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from chatd.auth import MIN_SECRET, Rights

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> int:
    """``90``, ``90s``, ``15m``, ``1h``, ``7d`` -> seconds."""
    m = re.fullmatch(r"(\d+)([smhd]?)", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 90s, 15m, 1h or 7d")
    return int(m.group(1)) * _UNITS[m.group(2) or "s"]


def rights(text: str) -> dict[str, str]:
    try:
        parsed = Rights.from_text(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    table = dict(parsed.exact)
    table.update({f"{prefix}*": right for prefix, right in parsed.prefixes})
    return table


def _signing_key(args: argparse.Namespace) -> tuple[Any, str, dict[str, Any]]:
    """The key, its algorithm, and the claims the daemon's config asks for (aud, iss)."""
    claims: dict[str, Any] = {}
    secret = args.key or os.environ.get("CHATD_JWT_KEY")
    if args.config:
        from chatd.config import from_mapping, load_file

        settings = from_mapping(load_file(args.config), f"config {args.config}: ")
        secret = secret or settings.jwt_key
        if settings.jwt_audience:
            claims["aud"] = settings.jwt_audience
        if settings.jwt_issuer:
            claims["iss"] = settings.jwt_issuer
    if args.private_key:
        with open(args.private_key, "rb") as f:
            key = load_pem_private_key(f.read(), password=None)
        if isinstance(key, rsa.RSAPrivateKey):
            return key, "RS256", claims
        if isinstance(key, ec.EllipticCurvePrivateKey):
            return key, "ES256", claims
        if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
            return key, "EdDSA", claims
        raise SystemExit("chatd.token: error: RSA, P-256 or Ed25519 private keys only")
    if not secret or secret.startswith(("/", "./")) or secret.endswith(".pem"):
        raise SystemExit(
            "chatd.token: error: give the HS256 secret (--key or CHATD_JWT_KEY), "
            "or --private-key for a daemon configured with a public key"
        )
    if len(secret.encode()) < MIN_SECRET:
        raise SystemExit(f"chatd.token: error: an HS256 secret is at least {MIN_SECRET} bytes")
    return secret, "HS256", claims


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m chatd.token", description=__doc__.split("\n")[0])
    p.add_argument("--sub", required=True, help="the user id")
    p.add_argument("--name", help="the display name (default: the sub)")
    p.add_argument("--rooms", type=rights, default={}, help="chat rights: lobby=rw,team-*=r")
    p.add_argument("--relay", type=rights, default={}, help="relay rights: quotes=r,game-*=rw")
    p.add_argument("--ttl", type=duration, default=3600, help="lifetime: 90s, 15m, 1h, 7d")
    p.add_argument("--key", help="the HS256 secret (default: CHATD_JWT_KEY)")
    p.add_argument("--private-key", help="a PEM private key (RS256, ES256, EdDSA)")
    p.add_argument("--config", help="the daemon's TOML config: its jwt_key, audience, issuer")
    args = p.parse_args(argv)
    key, alg, claims = _signing_key(args)
    now = int(time.time())
    claims.update({"sub": args.sub, "iat": now, "exp": now + args.ttl})
    if args.name:
        claims["name"] = args.name
    if args.rooms:
        claims["rooms"] = args.rooms
    if args.relay:
        claims["relay"] = args.relay
    sys.stdout.write(jwt.encode(claims, key, algorithm=alg) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Identity and rights (chatd/auth.py), attacked: in process for the token checks and
the session's answers, against the real daemon for the upgrade, the close codes,
the relay and the logs.

The attacks: ``alg: none``; key confusion (an HS256 token whose "secret" is the
server's RSA public key); expired, not yet valid, wrong audience or issuer; a
tampered payload; missing ``sub`` or ``exp``; an oversized token; claims of the
wrong shape; a refresh with another user's token; a token in the query string
(it must never reach the log).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from rawhttp import exchange, handshake
from v1client import V1
from wsclient import TEXT, Client, HandshakeError

from chatd import auth
from chatd.auth import AuthError, Policy, Rights, Verifier

SECRET = "s3cret-" * 6  # 42 bytes: HS256 needs at least 32
REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def token(key: Any = SECRET, alg: str = "HS256", **claims: Any) -> str:
    body = {"sub": "alice", "exp": time.time() + 600, **claims}
    return jwt.encode({k: v for k, v in body.items() if v is not None}, key, algorithm=alg)


def reason(verifier: Verifier, t: object) -> str:
    with pytest.raises(AuthError) as e:
        verifier.verify(t)
    return e.value.reason


def wait_for(check: Any, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.02)


def pem_public(private: Any) -> str:
    return (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


# -- tokens, in process ---------------------------------------------------------------


def test_a_good_token_gives_its_identity_and_rights() -> None:
    v = Verifier(SECRET)
    i = v.verify(token(name="Alice", rooms={"lobby": "rw", "team-*": "r"}, relay={"q": "r"}))
    assert (i.sub, i.name) == ("alice", "Alice")
    assert i.rooms.right("lobby") == "rw" and i.rooms.right("team-x") == "r"
    assert i.rooms.right("other") == "" and i.relay.can_read("q") and not i.relay.can_write("q")
    assert v.verify(token()).name == "alice"  # the name defaults to the sub


def test_the_attacks_on_tokens_are_refused_each_with_its_reason() -> None:
    v = Verifier(SECRET)
    now = time.time()
    good = token()
    head, _, sig = good.split(".")
    forged = jwt.utils.base64url_encode(json.dumps({"sub": "admin", "exp": now + 600}).encode())
    cases = {
        "alg none": (
            jwt.encode({"sub": "a", "exp": now + 600}, None, algorithm="none"),
            "bad_algorithm",
        ),
        "HS384": (token(SECRET * 2, "HS384"), "bad_algorithm"),
        "another secret": (token("x" * 40), "bad_signature"),
        "tampered payload": (f"{head}.{forged.decode()}.{sig}", "bad_signature"),
        "expired": (token(exp=now - 120), "expired"),
        "not yet valid": (token(nbf=now + 600), "not_yet_valid"),
        "no sub": (token(sub=None), "missing_claim"),
        "no exp": (token(exp=None), "missing_claim"),
        "oversized": (token(pad="x" * 9000), "too_large"),
        "garbage": ("not.a.token", "malformed"),
        "empty": ("", "missing"),
        "not a string": (12, "missing"),
        "rooms not a table": (token(rooms="lobby"), "bad_claim"),
        "a bad right": (token(rooms={"lobby": "admin"}), "bad_claim"),
        "a * inside": (token(rooms={"a*b": "r"}), "bad_claim"),
        "sub not a string": (token(sub=42), "malformed"),
        "name too long": (token(name="n" * 65), "bad_claim"),
    }
    for what, (t, why) in cases.items():
        assert reason(v, t) == why, what
    # The leeway: a minute of clock difference is forgiven, not more.
    assert v.verify(token(exp=now - 30)).sub == "alice"
    assert v.verify(token(nbf=now + 30)).sub == "alice"


def test_audience_and_issuer_are_checked_when_configured() -> None:
    v = Verifier(SECRET, audience="chat.example", issuer="https://auth.example")
    ok = token(aud="chat.example", iss="https://auth.example")
    assert v.verify(ok).sub == "alice"
    assert reason(v, token(aud="other", iss="https://auth.example")) == "bad_audience"
    assert reason(v, token(aud="chat.example", iss="https://evil.example")) == "bad_issuer"
    assert reason(v, token(iss="https://auth.example")) in ("missing_claim", "bad_audience")


def test_public_keys_fix_the_algorithm_and_key_confusion_is_refused() -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ed_key = ed25519.Ed25519PrivateKey.generate()
    for private, alg in ((rsa_key, "RS256"), (ec_key, "ES256"), (ed_key, "EdDSA")):
        v = Verifier(pem_public(private))
        assert v.algorithms == [alg]
        assert v.verify(token(private, alg)).sub == "alice"
        assert reason(v, token(SECRET)) == "bad_algorithm"  # HS256 against a public key
    # The classic confusion: HS256 "signed" with the public PEM as the secret.
    public = pem_public(rsa_key)
    confused = jwt.api_jws.PyJWS().encode(
        json.dumps({"sub": "admin", "exp": time.time() + 600}).encode(),
        SECRET.encode(),
        algorithm="HS256",
    )
    v = Verifier(public)
    assert reason(v, confused) == "bad_algorithm"
    import hmac
    from hashlib import sha256

    h = jwt.utils.base64url_encode(b'{"alg":"HS256","typ":"JWT"}')
    p = jwt.utils.base64url_encode(json.dumps({"sub": "admin", "exp": time.time() + 600}).encode())
    mac = hmac.new(public.encode(), h + b"." + p, sha256).digest()
    handmade = b".".join([h, p, jwt.utils.base64url_encode(mac)]).decode()
    assert reason(v, handmade) == "bad_algorithm"


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("short", "at least 32 bytes"),
        ("-----BEGIN PRIVATE KEY-----\nabc\n-----END PRIVATE KEY-----", "private key"),
        ("-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----", "not a PEM"),
    ],
)
def test_unusable_keys_are_refused_saying_why(key: str, message: str) -> None:
    with pytest.raises(auth.KeyError_, match=message):
        Verifier(key)


def test_rights_exact_names_win_then_the_longest_prefix() -> None:
    r = Rights.from_text("team-*=r, team-ops-*=rw, team-ops-log=r, lobby=rw")
    assert [r.right(x) for x in ("team-a", "team-ops-x", "team-ops-log", "lobby", "lob")] == [
        "r",
        "rw",
        "r",
        "rw",
        "",
    ]
    assert Rights.from_text("*=r").right("anything") == "r"
    for bad in ("lobby", "lobby=x", "a*b=r"):
        with pytest.raises(ValueError):
            Rights.from_text(bad)


# -- the session's answers, in process ---------------------------------------------------


class Out:
    """The session's Output, recorded."""

    writable = True

    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []
        self.failed: list[tuple[int, str]] = []

    def send_payload(self, payload: bytes) -> None:
        self.frames.append(json.loads(payload))

    def send_pages(self, pages: Any) -> None:
        raise AssertionError("no paged history here")

    def fail(self, code: int, reason: str) -> None:
        self.failed.append((code, reason))


def session(mode: str = "token", anonymous: str = "", identity: Any = None) -> tuple[Any, Out]:
    from twisted.internet.testing import StringTransport

    from chatd.fanout import Link, Outbox
    from chatd.hub import InMemoryHub
    from chatd.session import ChatSession

    turns: list[Any] = []
    hub = InMemoryHub(call_soon=turns.append, outbox=Outbox(call_soon=turns.append))
    link = Link(StringTransport(), 1 << 20, lambda why: None)
    out = Out()
    policy = Policy(mode, Verifier(SECRET), Rights.from_text(anonymous))
    s = ChatSession(hub, link, out, 0.0, policy=policy, identity=identity)
    return s, out


def send(s: Any, **obj: Any) -> None:
    s.receive(json.dumps(obj).encode(), 0.0)


def test_hello_without_a_token_where_one_is_needed_is_unauthorized_and_closed() -> None:
    s, out = session()
    send(s, type="hello", nick="mallory", ref=1)
    assert out.frames[-1]["code"] == "unauthorized" and out.frames[-1]["ref"] == 1
    assert out.failed == [(4001, "unauthorized: missing")]
    s, out = session()
    send(s, type="hello", token=token(exp=time.time() - 3600))
    assert out.failed == [(4001, "unauthorized: expired")]


def test_hello_with_a_token_takes_the_name_from_it_not_from_the_client() -> None:
    s, out = session()
    send(s, type="hello", nick="admin", token=token(name="Alice", rooms={"lobby": "rw"}))
    welcome = out.frames[-1]
    assert (welcome["type"], welcome["nick"], welcome["user"]) == ("welcome", "Alice", "alice")
    assert out.failed == []


def test_rights_decide_join_and_send_and_the_connection_stays() -> None:
    s, out = session()
    send(s, type="hello", token=token(rooms={"lobby": "r", "team-*": "rw"}))
    send(s, type="join", room="secret", ref=1)
    assert out.frames[-1]["code"] == "forbidden"
    send(s, type="join", room="lobby", ref=2)
    assert out.frames[-1]["type"] == "joined"
    send(s, type="send", room="lobby", text="hi", ref=3)
    assert out.frames[-1]["code"] == "forbidden"
    send(s, type="join", room="team-a", ref=4)
    assert out.frames[-1]["type"] == "joined"
    assert out.failed == []


def test_one_user_may_join_from_several_connections_and_names_may_repeat(tokend) -> None:
    tabs = []
    for sub in ("alice", "alice", "bob"):
        c = V1(tokend.port)
        c.req("hello", token=token(sub=sub, name="Alice", rooms={"lobby": "rw"}))
        c.next("welcome")
        tabs.append(c)
        assert c.join("lobby")["type"] == "joined"  # never nick_taken
    # An anonymous guest in optional mode still cannot take a name in use: tested
    # in test_v1 (nick_taken) for mode none, whose rules anonymous clients keep.


def test_optional_mode_gives_anonymous_clients_the_anonymous_rights() -> None:
    s, out = session("optional", "lobby=r")
    send(s, type="hello", nick="guest")
    assert out.frames[-1]["type"] == "welcome" and "user" not in out.frames[-1]
    send(s, type="join", room="lobby")
    assert out.frames[-1]["type"] == "joined"
    send(s, type="send", room="lobby", text="hi")
    assert out.frames[-1]["code"] == "forbidden"
    send(s, type="join", room="team")
    assert out.frames[-1]["code"] == "forbidden"


def test_refresh_extends_the_deadline_only_for_the_same_user() -> None:
    s, out = session()
    first = time.time() + 100
    send(s, type="hello", token=token(exp=first))
    assert s.deadline() == pytest.approx(first + auth.EXPIRY_GRACE)
    s.check_expiry(first + auth.EXPIRY_GRACE - 1)
    assert out.failed == []
    later = time.time() + 1000
    send(s, type="refresh", token=token(exp=later), ref=5)
    assert out.frames[-1] == {"type": "refreshed", "exp": int(later), "ref": 5}
    s.check_expiry(first + auth.EXPIRY_GRACE + 1)
    assert out.failed == []
    s.check_expiry(later + auth.EXPIRY_GRACE)
    assert out.failed == [(4001, "unauthorized: the token expired")]
    s, out = session()
    send(s, type="hello", token=token())
    send(s, type="refresh", token=token(sub="mallory"))
    assert out.frames[-1]["code"] == "unauthorized"
    assert out.failed == [(4001, "unauthorized: another user's token")]


# -- against the real daemon ---------------------------------------------------------------


@pytest.fixture
def tokend(daemon):
    """A daemon in token mode (the key from the environment is tested in test_startup)."""
    return daemon("--ping-interval", "0", "--auth", "token", "--jwt-key", SECRET)


def test_upgrades_with_a_bad_token_or_none_get_401_with_a_json_body(tokend) -> None:
    expired = token(exp=time.time() - 3600)
    for path, extra in [
        (f"/?token={expired}", ("Sec-WebSocket-Protocol: chatd.v1",)),
        ("/", ()),  # the plain chat has no hello: no token, no upgrade
        ("/relay/q", ()),
        ("/relay/q", (f"Authorization: Bearer {token(SECRET[::-1])}",)),
    ]:
        got = exchange(tokend.port, handshake(path, *extra), 30)  # a refusal closes
        head, _, body = got.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 401"), (path, got)
        assert b"WWW-Authenticate: Bearer" in head
        answer = json.loads(body)
        assert answer["error"] == "unauthorized" and answer["reason"], answer
    # The page's request line, with a token in it, is in the access log: redacted.
    good = token()
    page = f"GET /?x=1&token={good} HTTP/1.1\r\nHost: h\r\n\r\n".encode()
    got = exchange(tokend.port, page, 30, head_only=True)
    assert got.startswith(b"HTTP/1.1 200")
    wait_for(lambda: "token=REDACTED" in tokend.log(), "the access log line")
    log = tokend.log()
    for secret in (expired, good, SECRET):
        assert secret not in log  # a token never reaches the log
    with urllib.request.urlopen(f"http://127.0.0.1:{tokend.port}/metrics", timeout=30) as r:
        metrics = r.read().decode()
    assert 'chatd_auth_refused_total{reason="expired"} 1.0' in metrics, metrics


def test_v1_hello_with_a_token_then_rights_and_4001_for_a_bad_one(tokend) -> None:
    c = V1(tokend.port)
    c.req("hello", token=token(name="Alice", rooms={"lobby": "rw", "news": "r"}))
    welcome = c.next("welcome")
    assert (welcome["nick"], welcome["user"]) == ("Alice", "alice")
    assert c.join("lobby")["members"] == ["Alice"]
    c.req("join", room="secret", ref=1)
    assert c.next("error")["code"] == "forbidden"
    c.join("news")
    c.say("news", "hi", ref=2)
    assert c.next("error")["code"] == "forbidden"
    c.say("lobby", "hi", ref=3)
    msg = c.next("message")
    assert (msg["from"], msg["text"]) == ("Alice", "hi")
    # A bad token in hello: unauthorized, then closed with 4001.
    bad = V1(tokend.port)
    bad.req("hello", token=token(exp=time.time() - 3600))
    assert bad.next("error")["code"] == "unauthorized"
    assert bad.expect_close() == 4001
    # A token on the upgrade (as a browser sends it) counts for hello.
    up = Client(
        tokend.port,
        f"/?token={token(sub='bob')}",
        headers={"Sec-WebSocket-Protocol": "chatd.v1"},
    )
    up.send_frame(TEXT, json.dumps({"type": "hello"}).encode())
    assert json.loads(up.recv_message()[1])["user"] == "bob"


def test_relay_rights_receive_only_and_publishing_closes_4003(tokend) -> None:
    reader = Client(
        tokend.port,
        "/relay/quotes",
        headers={"Authorization": f"Bearer {token(relay={'quotes': 'r'})}"},
    )
    writer = Client(tokend.port, f"/relay/quotes?token={token(relay={'quotes': 'rw'})}")
    writer.send(b"\x00tick")
    assert reader.recv_message()[1] == b"\x00tick"
    reader.send(b"not allowed")
    assert reader.expect_close() == 4003
    reader.sock.close()
    with pytest.raises(HandshakeError) as e:
        Client(tokend.port, f"/relay/other?token={token(relay={'quotes': 'rw'})}")
    assert e.value.status == 403
    assert writer.close() == 1000  # (left open, it would hold up the daemon's stop)


def test_optional_mode_lets_anonymous_clients_read_what_is_granted(daemon) -> None:
    d = daemon(
        "--ping-interval",
        "0",
        "--auth",
        "optional",
        "--jwt-key",
        SECRET,
        "--anonymous-rooms",
        "lobby=r",
    )
    guest = V1(d.port, "guest")
    guest.join("lobby")
    guest.say("lobby", "hi", ref=1)
    assert guest.next("error")["code"] == "forbidden"
    member = V1(d.port)
    member.req("hello", token=token(rooms={"lobby": "rw"}))
    member.next("welcome")
    member.join("lobby")
    member.say("lobby", "hello guests")
    assert guest.next("presence")["event"] == "join"
    assert guest.next("message")["text"] == "hello guests"
    plain = Client(d.port, "/")  # the plain chat: lobby is read-only for guests
    plain.send("x")
    assert plain.expect_close() == 4003


def test_the_token_command_makes_a_token_the_daemon_accepts(tokend) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "chatd.token",
            "--sub",
            "carol",
            "--rooms",
            "lobby=rw",
            "--ttl",
            "5m",
        ],
        capture_output=True,
        text=True,
        env={"CHATD_JWT_KEY": SECRET, "PATH": "/usr/bin:/bin"},
        cwd=REPO,
        timeout=60,
        check=True,
    )
    c = V1(tokend.port)
    c.req("hello", token=out.stdout.strip())
    assert c.next("welcome")["user"] == "carol"
    c.join("lobby")


def test_start_up_refuses_token_mode_without_a_usable_key(capfd, monkeypatch) -> None:
    """Found while the options are read (in process; that twistd makes such an error one
    line and exit 2, binding nothing, is tests/test_startup.py's)."""
    from test_startup import refused_in_process

    monkeypatch.delenv("CHATD_JWT_KEY", raising=False)
    for args, message in [
        (("--auth", "token"), "auth token needs jwt_key"),
        (("--auth", "token", "--jwt-key", "short"), "at least 32 bytes"),
        (("--anonymous-rooms", "lobby=admin"), "anonymous"),
    ]:
        line = refused_in_process(capfd, ["--port", "0", *args])
        assert message in line, line


def test_a_connection_is_closed_4001_once_its_token_is_past_exp_and_the_grace(tokend) -> None:
    # Within the leeway a token 50 s past exp is still accepted; its deadline (exp
    # plus 25 s) has passed already, so the daemon's timer closes it at once.
    c = V1(tokend.port)
    c.req("hello", token=token(exp=time.time() - 50))
    assert c.next("welcome")["user"] == "alice"
    assert c.expect_close() == 4001
    # A fresh token keeps its connection (refreshed before it runs out).
    ok = V1(tokend.port)
    ok.req("hello", token=token(exp=time.time() + 600))
    ok.next("welcome")
    ok.req("refresh", token=token(exp=time.time() + 1200), ref=1)
    assert ok.next("refreshed")["ref"] == 1


# -- personal rooms and direct messages ---------------------------------------------------


def test_personal_and_direct_rooms_are_decided_by_the_sub_alone() -> None:
    v = Verifier(SECRET)
    alice = v.verify(token(rooms={"*": "rw"}))  # even "everything" grants no one else's
    bob = v.verify(token(sub="bob"))
    assert (alice.chat_right("@alice"), bob.chat_right("@alice")) == ("r", "")
    assert alice.chat_right("@bob") == ""  # despite the * pattern
    assert alice.chat_right("dm:alice,bob") == bob.chat_right("dm:alice,bob") == "rw"
    assert alice.chat_right("dm:bob,alice") == ""  # the one spelling is sorted
    assert alice.chat_right("dm:alice,alice") == "" and alice.chat_right("dm:alice") == ""
    assert v.verify(token(sub="carol")).chat_right("dm:alice,bob") == ""
    assert auth.dm_room("bob", "alice") == "dm:alice,bob"
    guests = Policy("optional", v, Rights.from_text("*=rw"))
    assert guests.chat_right(None, "lobby") == "rw"
    assert guests.chat_right(None, "@alice") == guests.chat_right(None, "dm:a,b") == ""


def test_a_personal_room_gets_the_back_ends_pushes_and_a_dm_only_its_two_users(daemon) -> None:
    d = daemon(
        "--ping-interval",
        "0",
        "--auth",
        "token",
        "--jwt-key",
        SECRET,
        "--api-token",
        "an-api-token-for-the-back-end",
    )

    def user(sub: str) -> V1:
        c = V1(d.port)
        c.req("hello", token=token(sub=sub))
        c.next("welcome")
        return c

    alice, bob, carol = user("alice"), user("bob"), user("carol")
    alice.join("@alice")
    bob.req("join", room="@alice", ref=1)
    assert bob.next("error")["code"] == "forbidden"
    bob.req("history", room="@alice")  # nor read its history by id
    assert bob.next("error")["code"] == "forbidden"
    alice.say("@alice", "to myself", ref=2)
    assert alice.next("error")["code"] == "forbidden"  # the back end writes there
    req = urllib.request.Request(
        f"http://127.0.0.1:{d.port}/api/users/alice/messages",
        data=json.dumps({"text": "your order shipped", "from": "shop"}).encode(),
        headers={
            "Authorization": "Bearer an-api-token-for-the-back-end",
            "Content-Type": "application/json",
        },
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 201 and json.loads(r.read())["room"] == "@alice"
    msg = alice.next("message")
    assert (msg["room"], msg["from"], msg["text"]) == ("@alice", "shop", "your order shipped")
    # Stored like any message: a later join with since gets it.
    again = user("alice")
    joined = again.join("@alice", since=0)
    assert [m["text"] for m in joined["history"]] == ["your order shipped"]
    assert joined["members"] == ["alice"]  # her two tabs: one user, listed once
    # Direct messages: the sorted pair, its two users only.
    alice.join("dm:alice,bob")  # (her first tab got nothing of her second: this comes next)
    bob.join("dm:alice,bob")
    bob.say("dm:alice,bob", "hi alice")
    p = alice.next("presence")
    assert (p["room"], p["event"], p["user"], p["nick"]) == ("dm:alice,bob", "join", "bob", "bob")
    msg = alice.next("message")
    assert (msg["text"], msg["from"], msg["user"]) == ("hi alice", "bob", "bob")
    assert bob.next("message")["text"] == "hi alice"  # his own copy: the acknowledgement
    for c, room in ((carol, "dm:alice,bob"), (bob, "dm:bob,alice")):
        c.req("join", room=room)
        assert c.next("error")["code"] == "forbidden"


# -- the admin API ---------------------------------------------------------------------------

API_TOKEN = "an-api-token-for-the-back-end"


def api(port: int, method: str, path: str) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        method=method,
        headers={"Authorization": f"Bearer {API_TOKEN}"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def signed_in(port: int, sub: str, room: str = "lobby") -> V1:
    c = V1(port)
    c.req("hello", token=token(sub=sub, name=sub.title(), rooms={room: "rw"}))
    c.next("welcome")
    c.join(room)
    return c


def test_the_admin_api_lists_members_and_closes_a_users_connections(daemon) -> None:
    d = daemon(
        "--ping-interval", "0", "--auth", "token", "--jwt-key", SECRET, "--api-token", API_TOKEN
    )
    tab1, tab2, bob = (
        signed_in(d.port, "alice"),
        signed_in(d.port, "alice"),
        signed_in(d.port, "bob"),
    )
    status, body = api(d.port, "GET", "/api/rooms/lobby/members")
    assert status == 200 and sorted(body["members"]) == ["Alice", "Bob"]  # a user once
    assert api(d.port, "DELETE", "/api/users/alice/connections") == (202, {"user": "alice"})
    for tab in (tab1, tab2):
        assert tab.expect_close() == 4003  # (skipping the others' presence)
    bob.say("lobby", "still here")
    while (m := bob.next())["type"] != "message":
        assert m["type"] == "presence"
    assert m["text"] == "still here"
    assert api(d.port, "POST", "/api/users/alice/connections")[0] == 405
    assert api(d.port, "GET", "/api/rooms/a%20b/members")[0] == 400


def test_another_users_token_cannot_take_a_session_over(tokend) -> None:
    alice = V1(tokend.port)
    alice.req("hello", token=token(rooms={"lobby": "rw"}))
    secret = alice.next("welcome")["resume"]
    alice.join("lobby")
    mallory = V1(tokend.port)
    mallory.req("hello", token=token(sub="mallory"), resume=secret)
    assert mallory.next("welcome")["resumed"] is False
    alice.say("lobby", "still mine")
    assert alice.next("message")["text"] == "still mine"
    tab = V1(tokend.port)  # her own new connection may
    tab.req("hello", token=token(rooms={"lobby": "rw"}), resume=secret)
    assert tab.next("welcome")["rooms"] == ["lobby"]
    assert alice.expect_close() == 4000

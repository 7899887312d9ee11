"""The page on GET /: right types, 404s, nothing outside its directory.

In process, on the site ``twistd chatd`` would serve (tests/inproc.py): what
is served, and how, is the site's, not the process's; each request is sent
exactly as written (no client-side normalising of ``..``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pytest
from inproc import Site


@dataclass
class Answer:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    def getheader(self, name: str) -> str | None:
        return self.headers.get(name)


def get(site: Site, path: str) -> Answer:
    return Answer(*site.request("GET", path))


@pytest.fixture(scope="module")
def chatd() -> Site:
    return Site()


def test_index_is_the_v1_chat_page(chatd: Site) -> None:
    r = get(chatd, "/")
    assert r.status == 200
    assert r.getheader("Content-Type") == "text/html; charset=utf-8"
    body = r.body.decode()
    for needle in ('id="nick"', 'id="room"', 'id="members"', 'id="log"', 'src="chat.js"'):
        assert needle in body
    assert "http://" not in body and "https://" not in body  # no external assets


def test_plain_page_served_as_html(chatd: Site) -> None:
    r = get(chatd, "/plain.html")
    assert r.status == 200
    assert r.getheader("Content-Type") == "text/html; charset=utf-8"
    body = r.body.decode()
    for needle in ('id="host"', 'id="port"', "连接", "发送", 'id="log"', 'src="plain.js"'):
        assert needle in body
    assert "http://" not in body and "https://" not in body  # no external assets
    assert r.getheader("X-Content-Type-Options") == "nosniff"
    assert "default-src 'self'" in r.getheader("Content-Security-Policy")


@pytest.mark.parametrize(
    ("path", "ctype"),
    [
        ("/chat.js", "text/javascript; charset=utf-8"),
        ("/plain.js", "text/javascript; charset=utf-8"),
        ("/style.css", "text/css; charset=utf-8"),
        ("/chat.css", "text/css; charset=utf-8"),
    ],
)
def test_assets_content_types(chatd: Site, path: str, ctype: str) -> None:
    r = get(chatd, path)
    assert r.status == 200
    assert r.getheader("Content-Type") == ctype


@pytest.mark.parametrize(
    "path",
    [
        "/nope.html",
        "/../setup.py",
        "/..%2fsetup.py",
        "/%2e%2e/setup.py",
        "/static/../../setup.py",
        "/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "//etc/passwd",
    ],
)
def test_nothing_outside_the_page_directory(chatd: Site, path: str) -> None:
    r = get(chatd, path)
    assert r.status == 404, (path, r.status)


def test_no_directory_listing(tmp_path) -> None:
    (tmp_path / "index.html").write_text("<!doctype html><p>custom page</p>")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_text("a")
    outside = tmp_path.parent / f"{tmp_path.name}-secret.txt"
    outside.write_text("secret")
    os.symlink(outside, tmp_path / "link.txt")
    d = Site("--static", str(tmp_path))
    assert get(d, "/").body == b"<!doctype html><p>custom page</p>"
    assert get(d, "/sub/a.txt").status == 200
    assert get(d, "/sub/").status == 404
    assert get(d, "/link.txt").status == 404  # a symlink out of the directory


def test_head_and_unknown_method(chatd: Site) -> None:
    status, headers, body = chatd.request("HEAD", "/")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0
    assert chatd.request("POST", "/", b"x")[0] == 405  # the page is read-only
    assert chatd.request("DELETE", "/")[0] == 501  # twisted.web knows only GET, HEAD and POST


def test_the_page_is_never_framed_unless_an_origin_may_embed_it(chatd: Site) -> None:
    for path in ("/", "/chat.js", "/plain.html"):
        r = get(chatd, path)
        assert r.getheader("X-Frame-Options") == "DENY"
        assert r.getheader("Content-Security-Policy").endswith("; frame-ancestors 'none'")
    embedded = Site("--frame-ancestor", "https://app.example", "--frame-ancestor", "'self'")
    for path in ("/", "/chat.css"):
        r = get(embedded, path)
        assert r.getheader("X-Frame-Options") is None  # (it cannot name origins: CSP does)
        csp = r.getheader("Content-Security-Policy")
        assert csp.startswith("default-src 'self'; connect-src 'self' ws: wss:")
        assert csp.endswith("; frame-ancestors https://app.example 'self'")


def test_a_static_page_gets_its_own_content_security_policy(tmp_path) -> None:
    (tmp_path / "index.html").write_text("<!doctype html><img src='https://img.example/a.png'>")
    own = "default-src 'self'; img-src 'self' https://img.example"
    r = get(Site("--static", str(tmp_path), "--page-csp", own), "/")
    assert r.status == 200
    assert r.getheader("Content-Security-Policy") == own + "; frame-ancestors 'none'"
    assert r.getheader("X-Content-Type-Options") == "nosniff"

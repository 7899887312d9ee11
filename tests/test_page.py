"""The page on GET /: right types, 404s, nothing outside its directory."""

from __future__ import annotations

import http.client
import os

import pytest

from tools.daemon import Daemon


def get(d: Daemon, path: str, headers: dict[str, str] | None = None) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=5)
    conn.request("GET", path, headers=headers or {})  # sent as-is: no client-side normalising
    resp = conn.getresponse()
    resp.body = resp.read()  # type: ignore[attr-defined]
    conn.close()
    return resp


def test_index_is_the_v1_chat_page(chatd: Daemon) -> None:
    r = get(chatd, "/")
    assert r.status == 200
    assert r.getheader("Content-Type") == "text/html; charset=utf-8"
    body = r.body.decode()  # type: ignore[attr-defined]
    for needle in ('id="nick"', 'id="room"', 'id="members"', 'id="log"', 'src="chat.js"'):
        assert needle in body
    assert "http://" not in body and "https://" not in body  # no external assets


def test_plain_page_served_as_html(chatd: Daemon) -> None:
    r = get(chatd, "/plain.html")
    assert r.status == 200
    assert r.getheader("Content-Type") == "text/html; charset=utf-8"
    body = r.body.decode()  # type: ignore[attr-defined]
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
def test_assets_content_types(chatd: Daemon, path: str, ctype: str) -> None:
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
def test_nothing_outside_the_page_directory(chatd: Daemon, path: str) -> None:
    r = get(chatd, path)
    assert r.status == 404, (path, r.status)


def test_no_directory_listing(daemon, tmp_path) -> None:
    (tmp_path / "index.html").write_text("<!doctype html><p>custom page</p>")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_text("a")
    outside = tmp_path.parent / f"{tmp_path.name}-secret.txt"
    outside.write_text("secret")
    os.symlink(outside, tmp_path / "link.txt")
    d = daemon("--static", str(tmp_path))
    assert get(d, "/").body == b"<!doctype html><p>custom page</p>"  # type: ignore[attr-defined]
    assert get(d, "/sub/a.txt").status == 200
    assert get(d, "/sub/").status == 404
    assert get(d, "/link.txt").status == 404  # a symlink out of the directory


def test_head_and_unknown_method(chatd: Daemon) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", chatd.port, timeout=5)
    conn.request("HEAD", "/")
    r = conn.getresponse()
    assert r.status == 200 and r.read() == b""
    conn.request("POST", "/", body=b"x")
    r = conn.getresponse()
    r.read()
    assert r.status == 405  # the page is read-only
    conn.request("DELETE", "/")
    r = conn.getresponse()
    assert r.status == 501  # twisted.web knows only GET, HEAD and POST
    conn.close()

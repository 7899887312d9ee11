"""A single daemon's history epoch across restarts: the same database keeps
it, a deleted or replaced one shows a new one (real ``twistd -n chatd``)."""

from __future__ import annotations

import shutil
from pathlib import Path

from v1client import V1

from tools.daemon import Daemon


def post(d: Daemon, texts: list[str], **join: object) -> dict:
    """Join room r on ``d``, send ``texts``; the ``joined`` it got first."""
    c = V1(d.port, "ann")
    joined = c.join("r", **join)
    for t in texts:
        c.say("r", t)
        assert c.next("message")["text"] == t
    c.close()
    return joined


def test_epoch_survives_restarts_and_changes_with_the_database(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    with Daemon("--ping-interval", "0", cwd=str(run)) as d:
        first = post(d, ["one", "two", "three"])
        assert first["epoch"] is None and first["last_id"] == 0  # no message yet
        epoch = post(d, [])["epoch"]
        assert isinstance(epoch, str) and len(epoch) >= 11
    shutil.copytree(run, tmp_path / "backup")

    with Daemon("--ping-interval", "0", cwd=str(run)) as d:  # the same file
        again = post(d, [], since=1, epoch=epoch)
        assert again["epoch"] == epoch and again["last_id"] == 3 and "reset" not in again
        assert [m["text"] for m in again["history"]] == ["two", "three"]

    for f in run.glob("chatd.sqlite3*"):
        f.unlink()
    with Daemon("--ping-interval", "0", cwd=str(run)) as d:  # a new database
        gone = post(d, [], since=3, epoch=epoch)
        assert gone["epoch"] is None and gone["last_id"] == 0 and gone["reset"] is True
        texts = ["new one", "new two", "new three", "new four"]
        post(d, texts)
        stale = post(d, [], since=3, epoch=epoch)
        new_epoch = stale["epoch"]
        assert new_epoch not in (None, epoch) and stale["reset"] is True
        # Never "message 4 followed 3": the whole new history, marked reset.
        assert [m["text"] for m in stale["history"]] == texts

    for f in run.glob("chatd.sqlite3*"):
        f.unlink()
    for f in (tmp_path / "backup").glob("chatd.sqlite3*"):
        shutil.copy(f, run / f.name)  # the first database put back: its epoch, its ids
    with Daemon("--ping-interval", "0", cwd=str(run)) as d:
        assert post(d, [])["epoch"] == epoch != new_epoch


def test_epoch_field_is_checked(chatd: Daemon) -> None:
    c = V1(chatd.port, "zed")
    for bad in (7, "", "x" * 65, ["e"]):
        c.req("join", room="r", since=1, epoch=bad, ref="j")
        err = c.next("error")
        assert (err["code"], err["ref"]) == ("bad_field", "j"), err
    joined = c.join("r", since=1, epoch="x" * 64)  # any other string: not the room's
    assert joined["reset"] is True

"""Fixtures: a real chatd daemon on an ephemeral loopback port."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tools.daemon import Daemon


@pytest.fixture(scope="module")
def chatd() -> Iterator[Daemon]:
    """One daemon with default options, shared by a test module."""
    with Daemon("--ping-interval", "0") as d:
        yield d
    assert "Unhandled" not in d.log(), d.log()


@pytest.fixture
def daemon() -> Iterator[Callable[..., Daemon]]:
    """Start daemons with given options; each is stopped (by pid) after the test."""
    started: list[Daemon] = []

    def start(*args: str) -> Daemon:
        d = Daemon(*args)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()
    for d in started:
        assert "Unhandled" not in d.log(), d.log()

"""Fixtures: a real chatd daemon on an ephemeral loopback port."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator

import pytest

from tools.chromium import CHROMIUM, CHROMIUM_ARGS
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


@pytest.fixture(scope="session")
def browser() -> Iterator[object]:
    """Debian's Chromium, headless, driven by Playwright (never a downloaded browser)."""
    from playwright.sync_api import sync_playwright

    if not shutil.which(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()

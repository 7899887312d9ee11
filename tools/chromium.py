"""Debian's Chromium as the tests and benchmarks launch it (headless, through Playwright).

Without the background-networking flags Chromium tries hosts this machine cannot
reach, many at a time; the sandbox is off because the tests run as root.
"""

from __future__ import annotations

import os

CHROMIUM = os.environ.get("CHATD_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]

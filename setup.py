"""chatd: WebSocket chat and message push on Twisted and Autobahn.

``pip install .`` installs the package, its page (package data) and the
twistd plugin (``twisted/plugins/chatd_plugin.py``), so ``twistd chatd`` works.
"""

import re
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent


def version() -> str:
    """chatd.__version__, read without importing chatd (nor Twisted)."""
    text = (HERE / "chatd" / "__init__.py").read_text(encoding="utf-8")
    m = re.search(r'^__version__ = "([^"]+)"$', text, re.M)
    if m is None:
        raise RuntimeError("no __version__ in chatd/__init__.py")
    return m.group(1)


setup(
    name="chatd",
    version=version(),
    description="WebSocket chat and message-push daemon on Twisted and Autobahn",
    python_requires=">=3.11",
    packages=["chatd", "chatd.protocols", "twisted.plugins"],
    package_data={"chatd": ["static/*"], "twisted": ["plugins/chatd_plugin.py"]},
    install_requires=[
        "twisted[tls]>=24.7,<27",  # chatd.internals: checked up to 26.x
        "autobahn[twisted]>=24.4,<27",  # likewise
        "prometheus_client>=0.20",
        "txredisapi>=1.4.10",  # only used with --redis
        "hiredis>=2",  # txredisapi's C reply parser (chatd/redisconn.py says why)
        "PyJWT>=2.8",  # connection tokens (chatd/auth.py)
        "cryptography>=42",  # RS256, ES256 and EdDSA keys for PyJWT
        "treq>=24.9",  # webhooks' HTTP client (chatd/webhooks.py)
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-twisted>=1.14", "playwright>=1.45", "ruff>=0.5"],
    },
)

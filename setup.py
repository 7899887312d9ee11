"""chatd: WebSocket chat and message push on Twisted and Autobahn.

``pip install .`` installs the package, its page (package data) and the
twistd plugin (``twisted/plugins/chatd_plugin.py``), so ``twistd chatd`` works.

Nothing is written twice: the version is chatd.__version__ and the
dependencies are requirements.txt, both read here as text (no import of
chatd or Twisted at build time).
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


def requirements() -> list[str]:
    """requirements.txt's requirements, without comments."""
    lines = (HERE / "requirements.txt").read_text(encoding="utf-8").splitlines()
    reqs = [line.split("#", 1)[0].strip() for line in lines]
    return [r for r in reqs if r and not r.startswith("-")]


setup(
    name="chatd",
    version=version(),
    description="WebSocket chat and message-push daemon on Twisted and Autobahn",
    python_requires=">=3.11",
    packages=["chatd", "chatd.protocols", "twisted.plugins"],
    package_data={"chatd": ["static/*"], "twisted": ["plugins/chatd_plugin.py"]},
    install_requires=requirements(),
)

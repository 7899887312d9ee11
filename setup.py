"""chatd: WebSocket chat and message push on Twisted and Autobahn.

``pip install .`` installs the package, its page (package data) and the
twistd plugin (``twisted/plugins/chatd_plugin.py``), so ``twistd chatd`` works.
``python -m build`` makes the sdist (MANIFEST.in: the source release) and
the wheel (the package, page and plugin, the docs under share/doc/chatd);
tests/test_packaging.py builds both, runs ``twine check`` on them and the
wheel from a fresh venv.

Nothing is written twice: the version is chatd.__version__ and the
dependencies are requirements.txt, both read here as text (no import of
chatd or Twisted at build time).
"""

import re
from glob import glob
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
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    author="the chatd authors",
    license="MIT",
    license_files=["LICENSE"],
    keywords=["websocket", "chat", "push", "twisted", "autobahn", "twistd"],
    classifiers=[
        "Development Status :: 5 - Production/Stable",
        "Environment :: No Input/Output (Daemon)",
        "Framework :: Twisted",
        "Intended Audience :: Developers",
        "Intended Audience :: System Administrators",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Programming Language :: Python :: 3.11",
        "Topic :: Communications :: Chat",
        "Topic :: Internet :: WWW/HTTP :: HTTP Servers",
    ],
    python_requires=">=3.11",
    # twisted.plugins is a directory without __init__.py (Twisted's own
    # package owns that name): the wheel ships only chatd_plugin.py in it.
    packages=["chatd", "chatd.protocols", "twisted.plugins"],
    package_data={"chatd": ["static/*"], "twisted": ["plugins/chatd_plugin.py"]},
    # The documents, the example units and config: <venv or prefix>/share/doc/chatd/
    # (paths relative to this directory, where every build runs setup.py).
    data_files=[
        ("share/doc/chatd", ["README.md", "CHANGELOG.md", "LICENSE"]),
        ("share/doc/chatd/docs", sorted(glob("docs/*.md"))),
        ("share/doc/chatd/etc", ["etc/chatd.service", "etc/chatd.socket", "etc/chatd.toml"]),
    ],
    install_requires=requirements(),
    # chatd.client (docs/CLIENT.md): `pip install chatd[client]`; the daemon never imports it.
    extras_require={"client": ["websockets>=12"]},
)

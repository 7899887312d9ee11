"""The release: ``python -m build`` makes an sdist and a wheel that ``twine check``
accepts, and the wheel installs into a fresh venv and runs there.

Nothing is fetched. The build runs without isolation (setuptools and wheel
from this venv) on a copy of the tracked files, sdist first and the wheel
from the sdist, so a file the sdist forgets breaks the wheel. The fresh venv
gets the wheel with ``--no-index --no-deps`` and sees this venv's packages
(Twisted, Autobahn, ...) through a ``.pth`` file; this venv has no chatd of
its own, and the daemon runs under ``python -I`` (no PYTHONPATH, no working
directory on sys.path) in a scratch directory, so what answers is the
installed wheel, not the source tree.

(``pip install .`` from the tree: tests/test_plugin.py.)
"""

from __future__ import annotations

import http.client
import json
import shutil
import signal
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

import chatd
from tools.daemon import REPO, Daemon

pytestmark = pytest.mark.packaging

VERSION = chatd.__version__
# twistd as its console script runs it (the fresh venv has Twisted through
# the .pth file, not its scripts).
TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"


def sh(*argv: str | Path, cwd: Path | None = None, timeout: float = 120) -> str:
    r = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=timeout, cwd=cwd
    )
    assert r.returncode == 0, f"{argv}: exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r.stdout


def copy_source(dest: Path) -> None:
    """The files git tracks (or, outside a checkout, the tree without build output)."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True, timeout=30
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        skip = (".git", ".venv", ".cache", "build", "dist", "reports", "*.egg-info", "__pycache__")
        shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(*skip))
        return
    for name in filter(None, listed.decode().split("\0")):
        src = REPO / name
        if src.is_file():  # tracked but deleted in the work tree: not part of it
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> tuple[Path, Path]:
    """(sdist, wheel), built once for the module."""
    tmp = tmp_path_factory.mktemp("release")
    src, out = tmp / "src", tmp / "dist"
    copy_source(src)
    sh(sys.executable, "-m", "build", "--no-isolation", "--outdir", out, src)
    sdists, wheels = sorted(out.glob("*.tar.gz")), sorted(out.glob("*.whl"))
    assert [p.name for p in sdists] == [f"chatd-{VERSION}.tar.gz"], sdists
    assert [p.name for p in wheels] == [f"chatd-{VERSION}-py3-none-any.whl"], wheels
    return sdists[0], wheels[0]


def test_twine_check_accepts_both(dists) -> None:
    out = sh(sys.executable, "-m", "twine", "check", "--strict", *dists)
    assert out.count("PASSED") == 2, out


def test_the_wheel_holds_the_page_the_plugin_and_the_docs(dists) -> None:
    _, wheel = dists
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = z.read(f"chatd-{VERSION}.dist-info/METADATA").decode()
    for page in (REPO / "chatd" / "static").iterdir():
        assert f"chatd/static/{page.name}" in names, page.name
    assert "twisted/plugins/chatd_plugin.py" in names
    # Twisted owns twisted/ and twisted/plugins/: an __init__.py of ours would
    # replace its package on install.
    assert not {"twisted/__init__.py", "twisted/plugins/__init__.py"} & names
    info = f"chatd-{VERSION}.dist-info"
    assert f"{info}/licenses/LICENSE" in names
    data = f"chatd-{VERSION}.data/data/share/doc/chatd"
    for doc in ("README.md", "CHANGELOG.md", "LICENSE", "etc/chatd.service"):
        assert f"{data}/{doc}" in names, doc
    for doc in (REPO / "docs").glob("*.md"):
        assert f"{data}/docs/{doc.name}" in names, doc.name
    assert "Description-Content-Type: text/markdown" in meta
    assert "License: MIT" in meta and "Requires-Python: >=3.11" in meta
    runtime = (REPO / "requirements.txt").read_text().splitlines()
    wanted = [r.split("#")[0].strip() for r in runtime if r.split("#")[0].strip()]
    runtime_deps = [
        x for x in meta.splitlines() if x.startswith("Requires-Dist:") and "extra ==" not in x
    ]
    assert len(wanted) == len(runtime_deps), meta
    assert "Provides-Extra: client" in meta and 'websockets>=12; extra == "client"' in meta


def test_the_sdist_is_the_source_release(dists) -> None:
    sdist, _ = dists
    top = f"chatd-{VERSION}/"
    with tarfile.open(sdist) as tar:
        names = {n.removeprefix(top) for n in tar.getnames()}
    for name in (
        "LICENSE",
        "CHANGELOG.md",
        "README.md",
        "requirements.txt",
        "requirements-dev.txt",
        "Makefile",
        "docs/PROTOCOL.md",
        "chatd/static/index.html",
        "twisted/plugins/chatd_plugin.py",
        "tests/conftest.py",
        "tools/daemon.py",
    ):
        assert name in names, name
    assert "twisted/plugins/__init__.py" not in names


def test_the_wheel_installs_and_runs_in_a_fresh_venv(dists, tmp_path) -> None:
    _, wheel = dists
    venv = tmp_path / "venv"
    sh(sys.executable, "-m", "venv", "--without-pip", venv)
    py = venv / "bin" / "python"
    # pip from this venv installs into the fresh one: no index, nothing fetched.
    sh(
        sys.executable,
        "-m",
        "pip",
        "--python",
        py,
        "--isolated",  # no pip config or PIP_* variables: no index, no find-links
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--no-index",
        "--no-deps",
        "--no-cache-dir",
        wheel,
    )
    site = Path(
        sh(py, "-I", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))").strip()
    )
    deps = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    (site / "chatd-test-deps.pth").write_text("".join(f"{p}\n" for p in sorted(deps)))
    scratch = tmp_path / "scratch"
    scratch.mkdir()

    where = sh(py, "-I", "-c", "import chatd; print(chatd.__file__)", cwd=scratch)
    assert Path(where.strip()).is_relative_to(site), where
    assert (venv / "share" / "doc" / "chatd" / "LICENSE").is_file()

    twistd = [str(py), "-I", "-u", "-c", TWISTD]
    assert sh(*twistd, "chatd", "--version", cwd=scratch) == f"chatd {VERSION}\n"

    argv = [*twistd, "-n", "--pidfile=", "chatd", "--port", "0", "--db", ":memory:"]
    with Daemon(argv=argv, cwd=str(scratch), timeout=30) as d:
        conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=10)
        conn.request("GET", "/")
        page = conn.getresponse()
        body = page.read()
        assert page.status == 200, body
        assert body == (site / "chatd" / "static" / "index.html").read_bytes()
        conn.request("GET", "/healthz")
        health = conn.getresponse()
        assert health.status == 200
        assert json.loads(health.read())["version"] == VERSION
        conn.close()
        assert f"chatd {VERSION} web listening" in d.log()
        assert d.stop() in (0, -signal.SIGTERM)

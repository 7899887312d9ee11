"""Run the Autobahn|Testsuite fuzzing client against a real chatd relay room.

    python -m tools.conformance            # every case, 1.* to 13.*
    python -m tools.conformance 1.* 7.*    # a subset while iterating

Installs the testsuite (Python 2.7 only) into .cache/autobahntestsuite on
first use, starts chatd on a free loopback port, runs the cases from
etc/autobahn/fuzzingclient.json, keeps the HTML report in
reports/conformance/ and exits non-zero unless every case is OK,
NON-STRICT or INFORMATIONAL for both the behaviour and the close.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tools.daemon import REPO, Daemon

SUITE_VERSION = "25.10.1"
SUITE_DIR = REPO / ".cache" / "autobahntestsuite"
SPEC = REPO / "etc" / "autobahn" / "fuzzingclient.json"
REPORT = REPO / "reports" / "conformance"
GOOD = {"OK", "NON-STRICT", "INFORMATIONAL"}


def python2() -> str:
    """A Python 2.7 interpreter: $CHATD_PYTHON2, pyenv's 2.7.18, or python2.7."""
    candidates = [os.environ.get("CHATD_PYTHON2", "")]
    try:
        root = subprocess.run(["pyenv", "root"], capture_output=True, text=True, check=True)
        candidates.append(os.path.join(root.stdout.strip(), "versions", "2.7.18", "bin", "python"))
    except (OSError, subprocess.CalledProcessError):
        pass
    candidates += [os.path.expanduser("~/.pyenv/versions/2.7.18/bin/python")]
    candidates += [shutil.which("python2.7") or "", shutil.which("python2") or ""]
    for c in candidates:
        if c and os.path.exists(c):
            return c
    sys.exit("conformance: no Python 2.7 found (set CHATD_PYTHON2); the testsuite needs one")


def install_suite(py2: str) -> None:
    marker = SUITE_DIR / f".installed-{SUITE_VERSION}"
    if marker.exists():
        return
    print(f"conformance: installing autobahntestsuite {SUITE_VERSION} in {SUITE_DIR}", flush=True)
    shutil.rmtree(SUITE_DIR, ignore_errors=True)
    subprocess.run(
        [
            py2,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--target",
            str(SUITE_DIR),
            f"autobahntestsuite=={SUITE_VERSION}",
        ],
        check=True,
    )
    marker.touch()


def run(cases: list[str]) -> int:
    py2 = python2()
    install_suite(py2)
    spec = json.loads(SPEC.read_text())
    if cases:
        spec["cases"] = cases
    shutil.rmtree(REPORT, ignore_errors=True)
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    spec["outdir"] = str(REPORT)
    with Daemon() as daemon, tempfile.TemporaryDirectory() as tmp:
        url = spec["servers"][0]["url"]
        spec["servers"][0]["url"] = url.replace(":9001/", f":{daemon.port}/")
        spec_path = Path(tmp, "fuzzingclient.json")
        spec_path.write_text(json.dumps(spec, indent=2))
        boot = (
            "import site, sys; site.addsitedir(sys.argv[1]); "
            "from autobahntestsuite.wstest import run; "
            "sys.argv = ['wstest', '-m', 'fuzzingclient', '-s', sys.argv[2]]; sys.exit(run())"
        )
        print(f"conformance: wstest against {spec['servers'][0]['url']}", flush=True)
        subprocess.run(
            [py2, "-c", boot, str(SUITE_DIR), str(spec_path)],
            cwd=tmp,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            check=False,
        )
        alive = daemon.proc.poll() is None
        errors = [line for line in daemon.lines if "Unhandled" in line or "Traceback" in line]
    return report(alive, errors)


def report(alive: bool, errors: list[str]) -> int:
    index = REPORT / "index.json"
    if not index.exists():
        print("conformance: FAILED, the testsuite wrote no report")
        return 1
    results = json.loads(index.read_text())["chatd"]
    counts: collections.Counter[str] = collections.Counter()
    bad = []
    for case, r in sorted(results.items(), key=lambda kv: [int(x) for x in kv[0].split(".")]):
        counts[r["behavior"]] += 1
        if r["behavior"] not in GOOD or r["behaviorClose"] not in GOOD:
            bad.append(f"  {case}: {r['behavior']} / close {r['behaviorClose']}")
    summary = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    print(f"conformance: {len(results)} cases: {summary}")
    print(f"conformance: report in {REPORT / 'index.html'}")
    if bad:
        print("conformance: FAILED cases:\n" + "\n".join(bad))
    if not alive:
        print("conformance: FAILED, chatd died during the run")
    if errors:
        print("conformance: FAILED, chatd logged errors:\n  " + "\n  ".join(errors[:20]))
    return 1 if bad or not alive or errors or not results else 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))

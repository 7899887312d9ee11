"""Autobahn|Testsuite, every case (1.* to 13.*), against a relay room of the real daemon.

About 9 minutes, nearly all in the compression cases (12.*, 13.*). For a
subset while iterating: ``python -m tools.conformance '1.*' '5.*'``.
"""

from __future__ import annotations

import contextlib
import io

import pytest

from tools import conformance


@pytest.mark.conformance
@pytest.mark.timeout(1800)
def test_every_autobahn_case_ok_non_strict_or_informational(capsys) -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = conformance.run([])
    with capsys.disabled():  # the counts belong in the CI log
        print("\n" + out.getvalue().rstrip())
    assert status == 0, out.getvalue()

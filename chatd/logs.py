"""``--log-format json``: one JSON object per line, for journald and log pipelines.

Each line has ``time`` (ISO 8601, UTC), ``level``, ``namespace``, ``msg``
(the formatted text) and the event's own simple fields (peer, kind, code,
duration...). chatd never logs message text.
"""

from __future__ import annotations

import json
import time
from typing import IO, Any

from twisted.logger import ILogObserver, formatEvent
from zope.interface import implementer

_SIMPLE = (str, int, float, bool, type(None))


@implementer(ILogObserver)
class JsonLines:
    def __init__(self, out: IO[str]) -> None:
        self.out = out

    def __call__(self, event: dict[str, Any]) -> None:
        t = event.get("log_time", time.time())
        level = event.get("log_level")
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"
        record: dict[str, Any] = {
            "time": stamp,
            "level": getattr(level, "name", "info"),
            "namespace": event.get("log_namespace", event.get("system", "-")),
            "msg": formatEvent(event),
        }
        for key, value in event.items():
            if not key.startswith("log_") and key not in record and isinstance(value, _SIMPLE):
                record[key] = value
        failure = event.get("log_failure")
        if failure is not None:
            record["traceback"] = failure.getTraceback()
        self.out.write(json.dumps(record, default=str) + "\n")
        self.out.flush()

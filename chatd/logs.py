"""Logging: ``--log-format json``, and the cheap path of the per-connection lines.

``JsonLines``: one JSON object per line, for journald and log pipelines.
Each line has ``time`` (ISO 8601, UTC), ``level``, ``namespace``, ``msg``
(the formatted text) and the event's own simple fields (peer, kind, code,
duration...). chatd never logs message text.

``ConnectionLog``: every WebSocket connection logs a line when it opens and
one when it closes, so at thousands of handshakes a second logging is a
large share of the work. ``ConnectionLog.info`` builds the event that
``Logger.info`` would (same namespace, level, fields and text) with the
text already formatted, and hands it to the same observers; both the
twistd text observer and ``JsonLines`` then take the text as it is. Text
log lines also reuse their time stamp within a second (``_format_time``,
installed through ``chatd.internals``).
"""

from __future__ import annotations

import json
import time
from typing import IO, Any

from twisted.logger import (
    ILogObserver,
    Logger,
    LogLevel,
    formatEvent,
    formatTime,
    timeFormatRFC3339,
)
from twisted.python.threadable import isInIOThread
from zope.interface import implementer

from chatd.internals import patch_log_time

_SIMPLE = (str, int, float, bool, type(None))


def _event_text(event: dict[str, Any]) -> str:
    """The event's text: ``log_text`` when it carries it (ConnectionLog, and Twisted's
    legacy log.msg events, whose format is "{log_text}"), else its formatted format."""
    text = event.get("log_text")
    if isinstance(text, str):
        return text
    return formatEvent(event)


_last_time: list[Any] = [None, None, ""]  # second, time format, text


def _format_time(
    when: float | None, timeFormat: str | None = timeFormatRFC3339, default: str = "-"
) -> str:
    """twisted.logger.formatTime, computed once per second of log time.

    twistd's text log stamps every line with ``formatTime`` (to the second,
    with the local UTC offset), which builds a time zone and a datetime each
    time: about a fifth of what a log line costs. The text only changes
    from one second to the next, so it is kept; a format with sub-second
    fields is formatted every time.
    """
    if when is None or timeFormat is None or "%f" in timeFormat:
        return formatTime(when, timeFormat, default)
    second = int(when)
    last = _last_time
    if last[0] != second or last[1] != timeFormat:
        last[2] = formatTime(when, timeFormat, default)
        last[0], last[1] = second, timeFormat
    return last[2]


# twistd's text observer (twisted.logger.textFileLogObserver) looks
# formatTime up in twisted.logger._file on every line (chatd.internals, reach 5).
patch_log_time(_format_time)


class ConnectionLog:
    """``Logger.info`` for the lines of every connection, without the per-line overheads.

    ``info("open relay tcp4:...", kind=..., peer=...)`` emits the event
    ``Logger(namespace).info(...)`` would, with the text as its format
    (braces escaped, so formatting it looks up no field) and as
    ``log_text``, skipping Logger.emit's level check and a string.Formatter
    pass over a format with several fields.
    """

    def __init__(self, namespace: str) -> None:
        self.logger = Logger(namespace=namespace)
        self.namespace = namespace
        self.system = f"{namespace}#{LogLevel.info.name}"

    def info(self, text: str, **fields: Any) -> None:
        fields["log_logger"] = self.logger
        fields["log_level"] = LogLevel.info
        fields["log_namespace"] = self.namespace
        fields["log_source"] = None
        fields["log_system"] = self.system
        fields["log_format"] = text.replace("{", "{{").replace("}", "}}")
        fields["log_text"] = text
        fields["log_time"] = time.time()
        self.logger.observer(fields)


@implementer(ILogObserver)
class JsonLines:
    """One JSON object per line; the lines of one reactor turn go out in one write.

    At thousands of connections a second, a write (and a wake-up of the
    reader: journald, a pipe) per line costs more than making the line. So
    while the reactor runs, lines logged on its thread are joined and written
    at the end of the turn (and when it shuts down); before it runs, after
    it stops, and from other threads each line is written at once.
    """

    def __init__(self, out: IO[str], reactor: Any = None) -> None:
        self.out = out
        self._second = -1
        self._stamp = ""
        self._reactor = reactor
        self._pending: list[str] | None = None
        self._trigger = False

    def _batching_reactor(self) -> Any:
        reactor = self._reactor
        if reactor is None:
            from twisted.internet import reactor as installed

            reactor = self._reactor = installed
        if not reactor.running or not isInIOThread():
            return None
        if not self._trigger:
            self._trigger = True
            reactor.addSystemEventTrigger("after", "shutdown", self.flush)
        return reactor

    def _write(self, line: str) -> None:
        pending = self._pending
        if pending is not None and isInIOThread():
            pending.append(line)
            return
        reactor = self._batching_reactor()
        if reactor is None:
            self.out.write(line)
            self.out.flush()
            return
        self._pending = [line]
        reactor.callLater(0, self.flush)

    def flush(self) -> None:
        pending, self._pending = self._pending, None
        if pending:
            self.out.write("".join(pending))
            self.out.flush()

    def _time(self, t: float) -> str:
        second = int(t)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t))
        return f"{self._stamp}.{int(t % 1 * 1000):03d}Z"

    def __call__(self, event: dict[str, Any]) -> None:
        t = event.get("log_time")
        if t is None:
            t = time.time()
        level = event.get("log_level")
        record: dict[str, Any] = {
            "time": self._time(t),
            "level": getattr(level, "name", "info"),
            "namespace": event.get("log_namespace", event.get("system", "-")),
            "msg": _event_text(event),
        }
        for key, value in event.items():
            if not key.startswith("log_") and key not in record and isinstance(value, _SIMPLE):
                record[key] = value
        failure = event.get("log_failure")
        if failure is not None:
            record["traceback"] = failure.getTraceback()
        self._write(json.dumps(record, default=str) + "\n")

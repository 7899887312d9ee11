"""JSON that clients send (chatd.v1 frames, push API bodies), parsed strictly.

Python's ``json`` accepts more than RFC 8259 JSON and fails in more ways
than ``ValueError``. Here anything that is not plain JSON is one error,
``BadJSON``, with a sentence saying why:

- bytes that are not UTF-8 (``json.loads`` would guess UTF-16 or UTF-32);
- ``NaN``, ``Infinity`` and ``-Infinity`` (not JSON; Python accepts them);
- an object with a key twice (parsers disagree on which one wins);
- nesting deeper than Python's parser follows (it recurses, and raises
  RecursionError near 1000 levels: cheap to catch, as a frame is at most
  64 KiB and nothing in chatd walks a parsed value);
- numbers that are no number in Python: integers of more than 4300 digits
  (Python refuses to convert them), floats beyond its range (``1e400``).

Numbers come back as Python ints and floats, unbounded: range checks are the
caller's (chatd.v1 takes integers below 2**53).
"""

from __future__ import annotations

import json
import math
from typing import Any


class BadJSON(ValueError):
    """The input is not JSON that chatd takes; the message says why."""


def _refuse_constant(name: str) -> Any:
    raise BadJSON(f"{name} is not JSON")


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise BadJSON(f"the key {key[:64]!r} appears twice in one object")
            seen.add(key)
    return obj


def _float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise BadJSON(f"the number {text[:32]} is out of range")
    return value


_decode = json.JSONDecoder(
    object_pairs_hook=_object, parse_constant=_refuse_constant, parse_float=_float
).decode


def loads(data: bytes | str) -> Any:
    """The JSON value in ``data``; raises BadJSON for anything else."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError:
            raise BadJSON("not UTF-8") from None
    try:
        return _decode(data)
    except BadJSON:
        raise
    except json.JSONDecodeError as e:
        raise BadJSON(str(e)) from None
    except ValueError:  # int(): over sys.get_int_max_str_digits()
        raise BadJSON("a number has too many digits") from None
    except RecursionError:
        raise BadJSON("nested too deeply") from None

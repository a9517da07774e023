"""Bounded JSON: the one way rekam parses JSON that came from outside (MQTT, sticks, HTTP bodies).

`json.loads` alone has no size bound, recurses once per nesting level (a ``[[[[...`` payload ends in
`RecursionError`, often far from where it can be handled) and accepts ``NaN``/``Infinity``, which no
canonical form or database column can hold. `loads` checks size first, then nesting depth with a
linear scan that skips string contents, and only then parses, refusing the non-finite constants.
Every failure is a `ProtocolError` whose reason is ``too_large``, ``too_deep`` or ``not_json``.
"""

from __future__ import annotations

import json
import re
from typing import Any

from firmware.errors import ProtocolError

#: Nesting depth allowed by default: every rekam document is at most a handful of levels deep.
MAX_DEPTH = 32

# A JSON string (with escapes) or one bracket; strings are matched whole so brackets inside them do not count.
# The closing quote is optional and the quantifiers possessive: an unterminated string ends the scan in one
# match. With a required quote the engine restarted at every escaped ``\"`` of it (``"\"\"\"...``: 16 KiB
# took 2.3 s, quadratic); now it is linear.
_TOKENS = re.compile(r'"(?:[^"\\]++|\\.)*+"?|[\[\]{}]', re.DOTALL)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def depth(text: str) -> int:
    """Maximum bracket nesting of JSON text, ignoring brackets inside strings (linear, no recursion)."""
    d = deepest = 0
    for m in _TOKENS.finditer(text):
        c = m.group()
        if c in "[{":
            d += 1
            if d > deepest:
                deepest = d
        elif c in "]}":
            d -= 1
    return deepest


def loads(data: bytes | bytearray | memoryview | str, *, max_bytes: int, max_depth: int = MAX_DEPTH,
          what: str = "JSON") -> Any:
    """Parse JSON from outside, at most `max_bytes` long and `max_depth` deep; raises `ProtocolError`.

    `what` names the document in the error ("ack", "stick.json", "index line 12"...).
    """
    size = len(data.encode() if isinstance(data, str) else data)
    if size > max_bytes:
        raise ProtocolError("too_large", f"{what} is {size} bytes; the limit is {max_bytes}")
    try:
        text = data if isinstance(data, str) else bytes(data).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ProtocolError("not_json", f"{what} is not UTF-8 ({e.reason} at byte {e.start})") from None
    if (d := depth(text)) > max_depth:
        raise ProtocolError("too_deep", f"{what} is nested {d} levels deep; the limit is {max_depth}")
    try:
        return json.loads(text, parse_constant=_no_constants)
    except (ValueError, RecursionError) as e:
        raise ProtocolError("not_json", f"{what} is not valid JSON ({str(e)[:120]})") from None


def loads_object(data: bytes | bytearray | memoryview | str, *, max_bytes: int, max_depth: int = MAX_DEPTH,
                 what: str = "JSON") -> dict[str, Any]:
    """`loads`, and the document must be a JSON object."""
    obj = loads(data, max_bytes=max_bytes, max_depth=max_depth, what=what)
    if not isinstance(obj, dict):
        raise ProtocolError("malformed", f"{what} is not a JSON object")
    return obj

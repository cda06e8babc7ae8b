"""JSON from clients, parsed with bounds: nesting depth, and errors that say what was wrong.

``json.loads`` recurses once per level of nesting: 200 000 ``[`` in a request body reach
Python's recursion limit and raise ``RecursionError``, which is not a ``ValueError``.
:func:`loads_bounded` counts the nesting first (outside strings, stopping at the first level
over the limit) and raises :class:`~livediff.exceptions.ProtocolError` for every kind of bad
text, so callers have one exception to answer.
"""

from __future__ import annotations

import json
import re
from typing import Any

from livediff.exceptions import ProtocolError

MAX_DEPTH = 32  # control messages and offers are two or three levels deep
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def nesting_depth(text: str, limit: int) -> int:
    """The deepest nesting of ``text``'s arrays and objects, counted up to ``limit + 1``."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    depth = deepest = 0
    for char in brackets:
        if char in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    break
        else:
            depth -= 1
    return deepest


def loads_bounded(text: str | bytes, *, what: str, max_depth: int = MAX_DEPTH) -> Any:
    """Parse ``text`` as JSON; :class:`ProtocolError` ("<what> is not valid JSON: …") otherwise."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError(
                f"{what} is not UTF-8 text: {exc.reason} at byte {exc.start}"
            ) from None
    if nesting_depth(text, max_depth) > max_depth:
        raise ProtocolError(
            f"{what} is nested too deeply: at most {max_depth} levels", limit=max_depth
        )
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ProtocolError(f"{what} is not valid JSON: {exc}") from None
    except RecursionError:  # only if the depth count was fooled by malformed strings
        raise ProtocolError(f"{what} is nested too deeply") from None

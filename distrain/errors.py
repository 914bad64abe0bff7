"""User errors: bad input that the user must fix. The CLI turns them into exit 2 and one message.

Invariant: a message echoes a user's value through `shorten`, so its length is bounded whatever the
input (a YAML alias bomb, a megabyte-long override) and building it costs time in that bound.
"""

from __future__ import annotations

import reprlib
from typing import Any

# reprlib stops at these depths and widths, so even a shared, exponentially large structure is
# visited only a few dozen nodes deep and wide.
class _Repr(reprlib.Repr):
    def repr_int(self, x: int, level: int) -> str:
        # ~190 digits: past maxlong anyway, and str() of a huge int is slow or refused.
        if x.bit_length() > 640:
            return f"<a {x.bit_length()}-bit integer>"
        return super().repr_int(x, level)


_REPR = _Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict, _REPR.maxset = 3, 4, 4, 4, 4
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = 200, 200, 200


class UserError(Exception):
    """Bad config, data, checkpoint, path or environment; the message names the culprit and fix."""

    exit_code = 2


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    keep = max(limit - 3, 2)
    head = keep - keep // 3
    return text[:head] + "..." + text[len(text) - (keep - head):]


def shorten(value: Any, limit: int = 80) -> str:
    """``repr(value)`` for a message, at most ``limit`` characters (cut in the middle: '...')."""
    return _cut(_REPR.repr(value), limit)


def shorten_text(text: str, limit: int = 80) -> str:
    """A user's text (a path, an override) as written, unquoted, at most ``limit`` characters."""
    return _cut(str(text), limit)

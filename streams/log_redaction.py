"""Keep access tokens out of every log, aiohttp's own included.

aiohttp logs a request it cannot parse with the start of the offending line: a request line
or header over 8190 bytes is logged as ``Got more than 8190 bytes when reading: b'GET
/ws?token=…'``, and ``Authorization: Bearer …`` headers the same way. :class:`TokenRedaction`
is a logging filter that rewrites such records before any handler sees them: the configured
token wherever it appears, and the value of any ``token=`` query parameter or
``Authorization`` header. It is installed on the loggers of aiohttp and asyncio (a filter on a
logger sees the records made there) while the app runs.
"""

from __future__ import annotations

import logging
import re
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

REDACTED = "<redacted>"
LOGGERS = (
    "aiohttp.access",
    "aiohttp.client",
    "aiohttp.internal",
    "aiohttp.server",
    "aiohttp.web",
    "aiohttp.websocket",
    "asyncio",
)
_PATTERNS = (
    re.compile(r"(?i)(token=)[^&\s'\"\\]+"),
    re.compile(r"(?i)(authorization\s*[:=]\s*(?:bearer\s+|basic\s+)?)[^\s'\"\\,]+"),
    re.compile(r"(?i)(bearer\s+)[^\s'\"\\,]+"),
)


def redact(text: str, token: str | None = None) -> str:
    """``text`` with ``token`` and every token-looking value replaced by ``<redacted>``."""
    if token:
        text = text.replace(token, REDACTED)
    for pattern in _PATTERNS:
        text = pattern.sub(lambda m: m.group(1) + REDACTED, text)
    return text


class TokenRedaction(logging.Filter):
    """Rewrites a record (message, arguments, traceback) whose text holds a token."""

    def __init__(self, token: str | None) -> None:
        super().__init__()
        self._token = token

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a record that cannot format: leave it to the handler's own error path
            return True
        details = ""
        if record.exc_info:
            details = "\n" + "".join(traceback.format_exception(*record.exc_info)).rstrip()
        if record.stack_info:
            details += "\n" + record.stack_info
        clean = redact(message + details, self._token)
        if clean != message + details:
            record.msg, record.args = clean, None
            record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


@contextmanager
def tokens_redacted(token: str | None) -> Iterator[TokenRedaction]:
    """Install :class:`TokenRedaction` on :data:`LOGGERS` for the duration of the block."""
    redaction = TokenRedaction(token)
    loggers = [logging.getLogger(name) for name in LOGGERS]
    for logger in loggers:
        logger.addFilter(redaction)
    try:
        yield redaction
    finally:
        for logger in loggers:
            logger.removeFilter(redaction)

"""aiohttp's own log records for the control API, made safe to keep: a request aiohttp refuses is logged by
its kind, never by its bytes, because those bytes may hold the token.

aiohttp (3.14) reports a request its parser refuses on the server logger (`aiohttp.server` unless one is
given) as `logger.exception("Error handling request from %s", remote, exc_info=exc)` (debug level for a
first request with a bad method: port scanners, TLS on the plain port). The exception's message quotes what
it refused: `LineTooLong` the first 100 bytes of an over-long header, request line or header name ("Got more
than 8190 bytes when reading: b'Bearer <token>AAAA...'"), `InvalidHeader` the whole header value (a NUL in
it, or a header line the pure-Python parser cannot split), and the C parser's llhttp errors the whole line
the error is in ("Invalid header value char:\\n\\n  b'Authorization: Bearer <token>\\x01'"). Unconfigured,
Python's last-resort handler printed that, traceback and all, on stderr.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Iterable

from aiohttp.http_exceptions import HttpProcessingError
from loguru import logger

# The start of an aiohttp error message when it is aiohttp's own fixed words ("Invalid header value char",
# "Got more than 8190 bytes when reading", "Missing 'Host' header" is cut at the quote): no quote, so no
# repr of request bytes, and cut at the first colon, where quoted data would follow.
_FIXED_WORDS = re.compile(r"[A-Za-z0-9 ,.`-]{1,80}")


def http_logger(name: str, secrets: Iterable[str]) -> logging.Logger:
    """A logger for aiohttp's request handler (`AppRunner(..., logger=...)`) that sends its records to the
    service's log, refused requests by kind only and `secrets` blanked out of anything else.

    Not registered with `logging` and without a parent: nothing else can attach a handler to it, and its
    records never propagate to a root handler that would print them raw."""
    log = logging.Logger(name, logging.DEBUG)
    log.propagate = False
    log.addHandler(_ToServiceLog([s for s in secrets if s]))
    return log


def describe(error: BaseException) -> str:
    """The kind of a refused request, e.g. `LineTooLong (400): Got more than 8190 bytes when reading`."""
    kind = type(error).__name__
    code = getattr(error, "code", None)
    if isinstance(code, int) and code:
        kind += f" ({code})"
    message = getattr(error, "message", "")
    first = message.split(":", 1)[0].strip() if isinstance(message, str) else ""
    return f"{kind}: {first}" if _FIXED_WORDS.fullmatch(first) else kind


class _ToServiceLog(logging.Handler):
    def __init__(self, secrets: list[str]) -> None:
        super().__init__(logging.DEBUG)
        self.secrets = secrets

    def emit(self, record: logging.LogRecord) -> None:
        try:
            error = record.exc_info[1] if record.exc_info else None
            level = "DEBUG" if record.levelno <= logging.DEBUG else "WARNING"
            if isinstance(error, HttpProcessingError):
                # The client's mistake, not the service's: a warning naming the kind; the bytes stay out.
                remote = record.args[0] if isinstance(record.args, tuple) and len(record.args) == 1 else None
                logger.log(level, "control API: refused a malformed request from {}: {}",
                           self._scrub(str(remote or "an unknown address")), describe(error))
                return
            text = record.getMessage()
            if record.exc_info:  # an error in our own handler: its traceback is worth keeping
                text += "\n" + logging.Formatter().formatException(record.exc_info)
            logger.log("DEBUG" if record.levelno <= logging.DEBUG else record.levelname,
                       "control API (aiohttp): {}", self._scrub(text))
        except Exception:  # noqa: BLE001 - a log line must never break a request; say so without the record
            logger.error("control API: an aiohttp log record could not be written safely")

    def _scrub(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text

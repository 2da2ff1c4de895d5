"""Log lines that hold no mailbox token and no control character.

Every URL under ``/m/<email_token>/`` carries a token that opens a mailbox
(web.py), so an access log, an error log or a Referer header written as it
came would hand every mailbox to whoever reads the logs. Here such a path is
written ``/m/~<fingerprint>``: the first 8 hex digits of the token's SHA-256,
enough to follow one mailbox through a log, useless to open it. Control
characters become ``\\xNN``, so a request cannot forge or colour log lines.

``MaskingLogger`` is gunicorn's logger with that applied to its access and
error logs and to Flask's default log handler (which gunicorn's workers use
for "Exception on <path>" lines). ``deploy/gunicorn.conf.py`` names it, and
``make run`` starts gunicorn with that file.
"""
from __future__ import annotations

import hashlib
import logging
import re

from flask.logging import default_handler
from gunicorn import glogging

# "/m/<token>", also spelt with %2F for a slash, %6D for the m, or doubled slashes
# (werkzeug decodes and merges them before routing, so they reach the same view).
# The token runs to the next slash, query, fragment, space or quote; "~" starts
# an already masked one, so masking twice changes nothing.
TOKEN_PATH_RE = re.compile(r"((?:/|%2[fF])+(?:m|%6[dD])(?:/|%2[fF])+)(?!~)((?:[^/?#\s\"%]|%(?!2[fF]))+)")
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def fingerprint(token: str) -> str:
    """A short, one-way name for a token (8 hex digits of its SHA-256)."""
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()[:8]


def mask_tokens(text: str) -> str:
    """``text`` with every ``/m/<token>`` written ``/m/~<fingerprint>``."""
    return TOKEN_PATH_RE.sub(lambda m: f"{m.group(1)}~{fingerprint(m.group(2))}", text)


def escape_controls(text: str, keep: str = "") -> str:
    """C0 and C1 control characters and DEL as ``\\xNN`` (those in ``keep`` stay)."""
    return CONTROL_RE.sub(lambda m: m.group() if m.group() in keep else f"\\x{ord(m.group()):02x}", text)


def clean_line(text: str) -> str:
    """One log line as it may be written: tokens masked, controls escaped."""
    return escape_controls(mask_tokens(text))


class MaskingFilter(logging.Filter):
    """Rewrites each record's message (and traceback) in place, before any
    handler formats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: keep the template, lose nothing else
            message = str(record.msg)
        record.msg, record.args = clean_line(message), None
        if record.exc_info and not record.exc_text:
            # tracebacks keep their line breaks; the exception text may quote the path
            text = logging.Formatter().formatException(record.exc_info)
            record.exc_text = escape_controls(mask_tokens(text), keep="\n")
        return True


MASKING_FILTER = MaskingFilter()


def install(*targets: logging.Filterer) -> None:
    """Add the filter to loggers or handlers (once each)."""
    for target in targets:
        target.addFilter(MASKING_FILTER)


class MaskingLogger(glogging.Logger):
    """gunicorn's logger whose every line goes through ``MaskingFilter``: the
    access log (request line, Referer, any atom of a custom format), the error
    log, and the Flask app's own log lines."""

    def setup(self, cfg) -> None:
        super().setup(cfg)
        # on the loggers, not their handlers: a logconfig may add handlers of its own
        install(self.error_log, self.access_log, default_handler, logging.lastResort)
        install(*logging.getLogger().handlers)

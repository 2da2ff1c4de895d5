"""Control characters out of log lines and SMTP replies.

Whatever a sender or client writes (an address, a HELO name, a header) may
reach a log line or a reply. A CR, LF, NEL or LINE SEPARATOR in it would
start a new line that looks like one the program wrote (log forging,
reply smuggling); an ESC would drive the terminal that shows the log.
``escape`` turns every such character into a visible ``\\xNN`` /
``\\uNNNN`` escape, so one record stays one line and one reply line stays
one line.

``install()`` puts ``SafeLogFilter`` on every handler of the root logger
(and of any logger named), which covers the formatted message with its
arguments and the traceback text; ``flask smtpd`` calls it, and so should
any place that configures logging (the app factory: ``logsafe.install()``).
"""
from __future__ import annotations

import logging
import re
import traceback
from typing import Iterable

# C0 controls, DEL, C1 controls (NEL U+0085 among them), the Unicode line and
# paragraph separators (str.splitlines() and some viewers break lines there),
# and lone surrogates (a strict UTF-8 log file cannot encode them; the
# record would be lost).
UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
# The same, plus everything outside ASCII: for replies in a session that did
# not negotiate SMTPUTF8 (RFC 6531 3.7.4: reply text is ASCII then).
UNSAFE_ASCII = re.compile("[^\x20-\x7e]")
# Lines of a traceback are indented by this, so no line of an exception's
# message, however it is split, can look like a record of its own.
CONTINUATION = "  | "


def _escaped(match: re.Match) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(text: str, ascii_only: bool = False) -> str:
    """``text`` with every control character (and, with ``ascii_only``,
    every non-ASCII character) replaced by a ``\\xNN``/``\\uNNNN`` escape.
    Backslashes are left alone, so ordinary text stays readable; the point
    is that nothing in ``text`` can start a new line or drive a terminal."""
    return (UNSAFE_ASCII if ascii_only else UNSAFE).sub(_escaped, str(text))


def escape_block(text: str) -> str:
    """A multi-line block (a traceback, a stack): each of its lines escaped
    and indented with ``CONTINUATION``; the line breaks themselves kept."""
    return "\n".join(CONTINUATION + escape(line) for line in text.split("\n"))


class SafeLogFilter(logging.Filter):
    """A handler filter that rewrites each record once, before any formatter
    sees it: the message with its arguments merged and escaped, and the
    exception and stack text indented and escaped. It never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_logsafe", False):
            return True  # already rewritten for another handler
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: keep what there is, visibly
            message = f"{record.msg!r} % {record.args!r}"
        record.msg, record.args = escape(message), None
        if record.exc_info and record.exc_info[0] is not None:
            record.exc_text = escape_block("".join(traceback.format_exception(*record.exc_info)).rstrip("\n"))
        elif record.exc_text:
            record.exc_text = escape_block(record.exc_text)
        if record.stack_info:
            record.stack_info = escape_block(record.stack_info)
        record._logsafe = True
        return True


SAFE_FILTER = SafeLogFilter()


def install(logger_names: Iterable[str] = ()) -> None:
    """Put the filter on every handler of the root logger, of the loggers
    named in ``logger_names`` (e.g. ``"gunicorn.error"``, a Flask app's
    ``app.logger.name``) and on ``logging.lastResort``. Call it after the
    handlers exist; calling it again is harmless."""
    loggers = [logging.getLogger()] + [logging.getLogger(name) for name in logger_names]
    handlers = [handler for logger in loggers for handler in logger.handlers]
    if logging.lastResort is not None:
        handlers.append(logging.lastResort)
    for handler in handlers:
        if SAFE_FILTER not in handler.filters:
            handler.addFilter(SAFE_FILTER)

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
from collections.abc import Mapping
from typing import Optional

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


def _status(atoms: "LazyAtoms") -> str:
    status = atoms.resp.status
    return status.split(None, 1)[0] if isinstance(status, str) else status


# The atoms of gunicorn's default access log format, computed as its
# Logger.atoms computes them.
_PLAIN_ATOMS = {
    "h": lambda a: a.environ.get("REMOTE_ADDR", "-"),
    "l": lambda a: "-",
    "u": lambda a: a.logger._get_user(a.environ) or "-",
    "t": lambda a: a.logger.now(),
    "r": lambda a: "%s %s %s" % (a.environ["REQUEST_METHOD"], a.environ["RAW_URI"], a.environ["SERVER_PROTOCOL"]),
    "s": _status,
    "b": lambda a: getattr(a.resp, "sent", None) is not None and str(a.resp.sent) or "-",
    "f": lambda a: a.environ.get("HTTP_REFERER", "-"),
    "a": lambda a: a.environ.get("HTTP_USER_AGENT", "-"),
}


class LazyAtoms(Mapping):
    """gunicorn's access-log atoms, each made only when the format names it.

    gunicorn builds all ~20 atoms plus one per request header, response
    header and environ variable, then copies them into its ``SafeAtoms``,
    for every request: most of the access log's ~30 µs per line, a tenth of
    a kept answer's whole cost (bench/README, session 4). The atoms of the
    default format are made here directly; any other atom comes from
    gunicorn's own ``atoms`` and ``SafeAtoms`` (made once per line), so
    every format logs exactly what gunicorn would."""

    def __init__(self, parts: tuple) -> None:
        self.logger, self.resp, self.req, self.environ, self.request_time = parts
        self._all: Optional[dict] = None

    def _everything(self) -> dict:
        if self._all is None:
            made = glogging.Logger.atoms(self.logger, self.resp, self.req, self.environ, self.request_time)
            self._all = glogging.SafeAtoms(made)
        return self._all

    def __getitem__(self, key: str):
        make = _PLAIN_ATOMS.get(key)
        if make is None:
            return self._everything()[key]
        value = make(self)
        return value.replace('"', '\\"') if isinstance(value, str) else value  # as SafeAtoms does

    def __iter__(self):
        return iter(self._everything())

    def __len__(self) -> int:
        return len(self._everything())

    def __bool__(self) -> bool:
        # logging asks whether the mapping is empty before formatting with
        # it; answering by __len__ would make every atom.
        return True


class MaskingLogger(glogging.Logger):
    """gunicorn's logger whose every line goes through ``MaskingFilter``: the
    access log (request line, Referer, any atom of a custom format), the error
    log, and the Flask app's own log lines. Access-log atoms are made lazily
    (``LazyAtoms``)."""

    atoms_wrapper_class = LazyAtoms

    def atoms(self, resp, req, environ, request_time) -> tuple:
        """What ``LazyAtoms`` makes each atom from (gunicorn's ``access`` wraps it)."""
        return (self, resp, req, environ, request_time)

    def setup(self, cfg) -> None:
        super().setup(cfg)
        # on the loggers, not their handlers: a logconfig may add handlers of its own
        install(self.error_log, self.access_log, default_handler, logging.lastResort)
        install(*logging.getLogger().handlers)

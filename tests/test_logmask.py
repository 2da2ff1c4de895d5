"""logmask: what a log line keeps of a /m/<token> URL and of control characters
(the whole path through gunicorn is tests/adversarial/test_leaks.py)."""
from __future__ import annotations

import pytest

import logging

from logmask import MaskingFilter, clean_line, fingerprint, mask_tokens

TOKEN = "WzEsImFiYzEyMyJd.sig-_nature"


def test_every_spelling_of_a_token_path_is_masked():
    fp = fingerprint(TOKEN)
    lines = {
        f"GET /m/{TOKEN} HTTP/1.1": f"GET /m/~{fp} HTTP/1.1",
        f"/m/{TOKEN}/messages/3?partial=1": f"/m/~{fp}/messages/3?partial=1",
        f"//m//{TOKEN}/inbox.json": f"//m//~{fp}/inbox.json",
        f"/m%2F{TOKEN}/raw": f"/m%2F~{fp}/raw",
        f"/%6d/{TOKEN}": f"/%6d/~{fp}",
        f'"https://mail.example/m/{TOKEN}#x"': f'"https://mail.example/m/~{fp}#x"',
    }
    for line, expected in lines.items():
        assert mask_tokens(line) == expected, line
    assert mask_tokens(mask_tokens(f"/m/{TOKEN}")) == f"/m/~{fp}"  # masking twice changes nothing
    assert mask_tokens("/messages/1 /static/m.css /api/domains") == "/messages/1 /static/m.css /api/domains"


def test_control_characters_are_escaped():
    assert clean_line("GET /x\nforged line\x1b[31m\x85\x7f") == "GET /x\\x0aforged line\\x1b[31m\\x85\\x7f"


def test_filter_rewrites_message_and_traceback():
    try:
        raise ValueError(f"bad path /m/{TOKEN}\nline two")
    except ValueError:
        import sys
        record = logging.LogRecord("app", logging.ERROR, __file__, 1, "Exception on %s [%s]",
                                   (f"/m/{TOKEN}\n", "GET"), sys.exc_info())
    assert MaskingFilter().filter(record)
    text = logging.Formatter().format(record)
    assert TOKEN not in text and f"Exception on /m/~{fingerprint(TOKEN)}\\x0a [GET]" in text
    assert "\nline two" in text  # tracebacks keep their line breaks


@pytest.mark.parametrize("fmt", [
    None,  # gunicorn's default
    '%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s"',
    "served-by %(p)s %(s)s %(m)s %(U)s %(q)s %(H)s %(B)s %(T)s %(M)s %(L)s",
    '%({x-forwarded-for}i)s %({Content-Type}o)s %({remote_addr}e)s %({absent}i)s %(nope)s',
])
def test_lazy_access_atoms_log_what_gunicorn_logs(fmt):
    """The access log's atoms made lazily (logmask.LazyAtoms) give gunicorn's
    own line, for the default format and every kind of atom."""
    import datetime
    from gunicorn import glogging
    from gunicorn.config import Config
    from logmask import LazyAtoms, MaskingLogger
    cfg = Config()
    if fmt:
        cfg.set("access_log_format", fmt)
    logger = MaskingLogger(cfg)
    logger.now = lambda: "[30/Nov/2026:02:00:00 +0000]"  # one instant for both lines
    resp = type("Resp", (), {"status": "200 OK", "sent": 812, "headers": [("Content-Type", "application/json")]})
    req = type("Req", (), {"headers": [("X-FORWARDED-FOR", '1.2.3.4 "quoted"'), ("USER-AGENT", "wrk")]})
    environ = {"REMOTE_ADDR": "127.0.0.1", "REQUEST_METHOD": "GET", "RAW_URI": '/api.php/inbox/a"b@x.test?q=1',
               "SERVER_PROTOCOL": "HTTP/1.1", "PATH_INFO": "/api.php/inbox/a@x.test", "QUERY_STRING": "q=1",
               "HTTP_REFERER": "http://site.test/", "HTTP_USER_AGENT": "wrk", "HTTP_AUTHORIZATION": "Basic dTpw"}
    took = datetime.timedelta(seconds=1, microseconds=2345)
    lazy = cfg.access_log_format % LazyAtoms(logger.atoms(resp, req, environ, took))
    stock = cfg.access_log_format % glogging.SafeAtoms(glogging.Logger.atoms(logger, resp, req, environ, took))
    assert lazy == stock

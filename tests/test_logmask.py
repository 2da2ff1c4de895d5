"""logmask: what a log line keeps of a /m/<token> URL and of control characters
(the whole path through gunicorn is tests/adversarial/test_leaks.py)."""
from __future__ import annotations

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

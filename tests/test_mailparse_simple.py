"""``mailparse.parse_simple`` (a small single-part message of plain header
lines built without the feed parser) against ``parse_line_by_line`` (every
line through the stdlib's feed parser): wherever it answers, the same tree
(headers, payload, defects, every attribute) and the same ``parse_message``
fields; and it declines every shape the feed parser reads otherwise."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import mailparse
from test_mailparse_cut import fields, fixed_sample, sample_messages, serialized, tree  # tests/test_mailparse_cut.py

NAMES = ["From", "To", "Cc", "Subject", "Date", "Message-ID", "Reply-To", "X-Mailer", "MIME-Version",
         "subject", "FROM", "Received", "X-Odd_Name!~", "Content-Type", "Content-Transfer-Encoding",
         "Content-Disposition", "content-type", "Content-ID"]
VALUES = ["", " ", "plain", "  leading blanks", "trailing blanks  ", "\tafter a tab", "a: b: c",
          "Name <sender@example.org>", "sender@example.org, Other <o@example.net>", '"Quoted, Name" <q@x.example>',
          "=?utf-8?q?caf=C3=A9?=", "Mon, 30 Nov 2026 10:00:00 +0000", "30 Nov 2026 10:00:00 GMT",
          "Tue, 31 Feb 2026 25:61:00 +0560", "<1234.abcd@source.test>", "<not an id>", "(comment) x",
          "text/plain", "text/plain; charset=utf-8", 'text/html; charset="iso-8859-1"', "TEXT/PLAIN",
          "multipart/mixed; boundary=b1", "Multipart/Alternative; boundary=\"x\"", "message/rfc822",
          "message/delivery-status", "application/pdf; name=a.pdf", "garbage", "text", "base64",
          "quoted-printable", "7bit", "attachment; filename=a.txt", "inline", "1.0"]
BODIES = ["", "hello\r\n", "line one\r\nline two\r\n", "no final line break", "bare\nLF\nlines\n",
          "bare\rCR\r", "\r\n\r\nblank lines first\r\n", "--b1\r\nnot a part\r\n--b1--\r\n", "From here on\r\n",
          "vertical\x0btab and form\x0cfeed\x1c\r\n", "NUL\x00inside\r\n", "aGVsbG8gd29ybGQ=\r\n",
          "caf=C3=A9 =\r\nsoft break\r\n", "X" * 78 + "\r\n"]
BODY_BYTES = [b"8-bit \xc3\xa9t\xc3\xa9\r\n", b"latin \xe9\r\n", b"\x85 next line\r\n", b"\xff\xfe\r\n"]


@st.composite
def messages(draw) -> bytes:
    """Header lines drawn from NAMES x VALUES (now and then a line the simple
    path must refuse), an empty line, a body of drawn pieces."""
    lines = [f"{draw(st.sampled_from(NAMES))}:{draw(st.sampled_from(['', ' ', '  ', chr(9)]))}"
             f"{draw(st.sampled_from(VALUES))}" for _ in range(draw(st.integers(1, 8)))]
    odd = draw(st.sampled_from([None, "Subject : spaced name", ": no name", " folded continuation",
                                "From sender@example.org Mon Nov 30 10:00:00 2026", "No colon at all",
                                "Subject: caf\u00e9", "Subject: vertical\x0btab", "Subject: bare\nLF",
                                "Subject: bare\rCR", "X-Empty-Name-Next:"]))
    if odd is not None:
        lines.insert(draw(st.integers(0, len(lines))), odd)
    pieces = draw(st.lists(st.one_of(st.sampled_from(BODIES).map(str.encode), st.sampled_from(BODY_BYTES)),
                           max_size=6))
    head = "\r\n".join(lines).encode("utf-8")
    separator = draw(st.sampled_from([b"\r\n\r\n"] * 6 + [b"\r\n", b"\n\n", b"\r\n\n"]))
    return head + separator + b"".join(pieces)


def assert_same(raw: bytes) -> bool:
    """``parse_simple``'s tree and fields equal the feed parser's wherever it
    answers; True when it answered."""
    simple = mailparse.parse_simple(raw)
    if simple is None:
        return False
    reference = mailparse.parse_line_by_line(raw)
    assert tree(simple) == tree(reference), raw
    assert serialized(simple) == serialized(reference), raw
    assert simple.policy is reference.policy and simple.is_multipart() is False
    assert fields(lambda _raw: simple, raw) == fields(mailparse.parse_line_by_line, raw), raw
    return True


@given(messages())
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_generated_messages_parse_the_same(raw):
    assert_same(raw)


def test_the_simple_path_is_taken_by_plain_messages():
    """Not a path that silently never answers: generated messages with plain
    header lines and a text type take it (89 of this sample's 300). The
    sample is derandomized (hypothesis's fixed seed), so the count is the
    same on every run: the earlier random sample of 200 took it about 20 %
    of the time and its floor of 40 failed one CI run with 38."""
    taken = fixed_sample(messages(), 300, assert_same)
    assert sum(taken) >= 75, sum(taken)
    bench = (b"From: <sender@source.test>\r\nTo: <writer@example.com>\r\nDate: Mon, 30 Nov 2026 10:00:00 +0000\r\n"
             b"Message-Id: <1.2@source.test>\r\n\r\n" + b"X" * 78 + b"\r\n")
    assert assert_same(bench)  # what smtp-source sends


@pytest.mark.parametrize("raw", [
    b"\r\nSubject: x\r\n\r\nbody",  # no header block: the parser starts with the body
    b"Subject: x\r\nbody without an empty line",
    b"Subject: x\n\nLF line ends",
    b"Subject: x\r\n folded\r\n\r\nbody",
    b"Subject : x\r\n\r\nbody",
    b":x\r\n\r\nbody",
    b"From someone Mon Nov 30\r\nSubject: x\r\n\r\nbody",
    b"Subject: caf\xc3\xa9\r\n\r\nbody",
    b"Subject: a\x0bb\r\n\r\nbody",
    b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\npart\r\n--b--\r\n",
    b"Content-Type: message/rfc822\r\n\r\nSubject: inner\r\n\r\nbody",
    b"Subject: x\r\n\r\n" + b"x" * (16 << 10),  # the size from which long bodies are cut out instead
])
def test_shapes_the_feed_parser_reads_otherwise_are_declined(raw):
    assert mailparse.parse_simple(raw) is None


def test_sample_messages_parse_the_same():
    taken = {name: assert_same(raw) for name, raw in sample_messages().items()}
    assert any(taken.values())  # a few samples are this plain

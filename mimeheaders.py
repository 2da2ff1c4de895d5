"""The bounds of every parse, the regular expressions shared across it, and
the readers of header values: unfolding, charsets, MIME parameters (RFC 2045,
RFC 2231) by a linear scanner, the stdlib's header objects from a value cut
to a bound, and the plain header values written down without the stdlib's
parse tree (``plain_value``). Used by ``mailparse``, ``bodycuts`` and the
receiving code."""
from __future__ import annotations

import binascii
import codecs
import datetime
import re
import urllib.parse
from email import policy, utils
from typing import Optional

import pybase64

MAX_HEADER_CHARS = 16384  # of one header value; the stdlib parser takes ~0.1-0.3 s on 16 KiB at worst
# Of a Content-Type or Content-Disposition value, for its parameters (they are
# read for every part): a 255-character CJK file name in RFC 2231 form is 2.3 KiB.
MAX_MIME_HEADER_CHARS = 4096
# The stdlib parser costs ~0.1 ms per part and ~1 us per line, plus ~0.2 us per
# line and nesting level, and keeps every line of a part as a str object until
# the part ends. These bounds keep any 25 MiB message within seconds and
# ~100 MiB; a 25 MiB base64 attachment has 340,000 lines.
MAX_DEPTH = 20  # MIME nesting the parser follows; deeper parts stay one opaque leaf
MAX_PARSE_PARTS = 2000
MAX_PARSE_LINES = 400_000
# The parser gathers a line in an io.StringIO, which stores 4 bytes a
# character once read: parsing one 24 MB base64 line peaked at 119 MiB (46
# folded). Longer lines (RFC 5322 allows 998 characters) are folded for the
# parser with CRLF + space, which a header reads as folding, base64 ignores,
# and text shows as a line break.
MAX_LINE = 1 << 16
FOLD = b"\r\n "
MAX_SAME_HEADERS = 100  # values ``get_all`` returns
PARSE_CHUNK = 1 << 20
# Codecs whose decoding time is quadratic in the input (punycode: 40 KB took
# 1.6 s) and that no mail is written in: a "charset=punycode" label is ignored.
SLOW_CODECS = {"punycode", "idna"}

FOLDS = re.compile(r"\r\n|\r|\n")
COMMENT = re.compile(r"\([^()]*\)")
TRAILING_COMMENT = re.compile(r"\([^()]*\)\s*$")  # starts at "(": no rescans of blanks
# One "name=value;" section of a MIME header: a quoted value runs to its
# closing quote (backslash escapes), anything else to the next ";". Each match
# consumes its text and never backtracks, so ``findall`` is linear.
PARAMETER = re.compile(r'([^;=\s]*)\s*(?:=\s*("(?:[^"\\]|\\.)*+"?|[^;]*+))?[^;]*+;?\s*', re.S)
# RFC 2231 names: "name*" (encoded), "name*0" (a section), "name*0*" (an encoded section).
SECTION = re.compile(r"^([^*]+)\*(?:(\d{1,6})(\*)?)?$")
BACKSLASH = re.compile(r"\\(.)", re.S)
LINE_END = re.compile(rb"\r\n|\r|\n")


# --------------------------------------------------------------------------
# headers and MIME parameters

def unfold(value: str) -> str:
    """A header value without its line breaks (the folding whitespace stays)."""
    return FOLDS.sub("", value)


def safe_codec(charset: Optional[str]) -> Optional[str]:
    """The codec name of a charset label, or None when there is no such text
    codec or it is one of SLOW_CODECS."""
    try:
        info = codecs.lookup((charset or "").strip().strip('"'))
    except (LookupError, ValueError, TypeError):
        return None
    if not getattr(info, "_is_text_encoding", True) or info.name in SLOW_CODECS:
        return None
    return info.name


def decode_section_bytes(data: bytes, charset: str) -> str:
    codec = safe_codec(charset) or "utf-8"
    try:
        return data.decode(codec, "replace")
    except (UnicodeError, ValueError, TypeError):
        return data.decode("utf-8", "replace")


def unquote(value: str) -> str:
    """A parameter value without its quotes and backslash escapes."""
    value = value.strip()
    if value.startswith('"'):
        return BACKSLASH.sub(r"\1", value[1:-1] if len(value) > 1 and value.endswith('"') else value[1:])
    return TRAILING_COMMENT.sub("", value).rstrip()  # "us-ascii (Plain text)" (RFC 2045); "a(1).pdf" stays


def join_sections(sections: list[tuple[int, bool, str]]) -> str:
    """An RFC 2231 value from its sections: ordered, percent-decoded where
    encoded, in the charset the first section names."""
    sections.sort(key=lambda section: section[0])
    charset, chunks = "", []
    for index, (_, encoded, value) in enumerate(sections):
        if encoded and index == 0 and value.count("'") >= 2:
            charset, _language, value = value.split("'", 2)
        data = value.encode("utf-8", "surrogateescape")
        chunks.append(urllib.parse.unquote_to_bytes(data) if encoded else data)
    return decode_section_bytes(b"".join(chunks), charset)


def mime_parameters(text: str) -> dict[str, str]:
    """The parameters of a MIME header's ``text`` after its first ";", names in
    lower case. The first of two equal names wins; an RFC 2231 value wins
    over a plain one of the same name (mailers send both, the plain one as
    an ASCII fallback)."""
    plain: dict[str, str] = {}
    sections: dict[str, list] = {}
    for name, value in PARAMETER.findall(text.lstrip()):
        name = name.lower()
        section = SECTION.match(name) if "*" in name else None
        if section:
            encoded = section[2] is None or section[3] is not None
            sections.setdefault(section[1], []).append((int(section[2] or 0), encoded, unquote(value)))
        elif name and name not in plain:
            plain[name] = value
    plain = {name: unquote(value) for name, value in plain.items()}
    plain.update((name, join_sections(parts)) for name, parts in sections.items())
    return plain


def mime_header(value: Optional[str]) -> Optional[tuple[str, dict[str, str]]]:
    """(main value in lower case without comments or blanks, parameters) of a
    Content-Type or Content-Disposition value, read from its first
    MAX_MIME_HEADER_CHARS characters."""
    if value is None:
        return None
    main, rest = mime_split(value)
    return main, mime_parameters(rest)


def mime_split(value: str) -> tuple[str, str]:
    """(main value in lower case without comments or blanks, the text of its
    parameters) of a MIME header value's first MAX_MIME_HEADER_CHARS characters."""
    main, _, rest = unfold(value[:MAX_MIME_HEADER_CHARS]).partition(";")
    return "".join(COMMENT.sub("", main).split()).lower(), rest


def header_object(pol: policy.EmailPolicy, name: str, value: str):
    """The stdlib header object (policy.default) for a value already cut to a
    bound; an unstructured one when the stdlib parser fails on it (it raises
    RecursionError on 1,000 nested comments, for one)."""
    if name.lower() == "content-transfer-encoding":
        value = value.strip().split(None, 1)[0][:64] if value.strip() else ""  # only its first word counts
    try:
        return pol.header_fetch_parse(name, value)
    except Exception:
        pass
    try:
        return pol.header_factory["x-unstructured"](name, value)
    except Exception:
        return value


# --------------------------------------------------------------------------
# plain header values: the stdlib's answer without its parse tree

# Most mail names its sender ``Name <user@example.com>`` and its date and id
# in the usual forms. For such values the stdlib's header objects give back a
# string this module can write down directly; building them cost a third of
# the daemon's writer time per message (a token tree per header). Anything
# else (quotes, comments, encoded words, groups, non-ASCII) goes the stdlib
# way; tests/test_receiving_parse.py checks both ways agree on hundreds of
# generated values.
_ATOM = r"[A-Za-z0-9_'-]+"
_LOCAL = r"[A-Za-z0-9_+-]+(?:\.[A-Za-z0-9_+-]+)*"
_DOMAIN = r"[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+"
PLAIN_ADDRESS = re.compile(rf"(?:({_ATOM}(?: {_ATOM})*) +)?<({_LOCAL}@{_DOMAIN})>|({_LOCAL}@{_DOMAIN})")
PLAIN_ENVELOPE = re.compile(rf"<({_LOCAL}@{_DOMAIN})>(?=[ \t]|$)")  # MAIL FROM:/RCPT TO: argument
PLAIN_MSGID = re.compile(rf"<{_LOCAL}@{_LOCAL}>")
PLAIN_TEXT = re.compile(r"[\x21-\x7e]+(?: [\x21-\x7e]+)*")
ADDRESS_HEADERS = frozenset(("from", "to", "cc", "bcc", "reply-to", "sender"))


def plain_addresses(value: str) -> Optional[list[tuple[str, str]]]:
    """``[(display name, address)]`` of a comma-separated list of plain
    addresses (``a@b``, ``<a@b>``, ``Name <a@b>``), or None for anything else."""
    found = []
    for item in value.split(","):
        match = PLAIN_ADDRESS.fullmatch(item.strip(" \t"))
        if match is None:
            return None
        name, bracketed, bare = match.groups()
        found.append((name or "", bracketed or bare))
    return found


_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
# RFC 5322's date as ``email.utils.format_datetime`` writes it: two-digit
# day, four-digit year, seconds, a numeric zone.
CANONICAL_DATE = re.compile(rf"({'|'.join(_DAYS)}), ([0-9]{{2}}) ({'|'.join(_MONTHS)}) ([0-9]{{4}}) "
                            r"([0-9]{2}):([0-9]{2}):([0-9]{2}) [+-]([0-9]{2})([0-9]{2})")


def canonical_date(value: str) -> bool:
    """True when ``value`` is a date that ``format_datetime`` would write
    back unchanged after ``parsedate_to_datetime``: its shape, a real day of
    that month whose weekday it names, a real time, a zone under 24 hours
    with minutes under 60, and a year from 100 on (the stdlib reads a year
    under 100 as 19xx or 20xx)."""
    match = CANONICAL_DATE.fullmatch(value)
    if match is None:
        return False
    weekday, day, month, year, hour, minute, second, zone_hours, zone_minutes = match.groups()
    if int(year) < 100 or int(zone_hours) >= 24 or int(zone_minutes) >= 60:
        return False
    if int(hour) >= 24 or int(minute) >= 60 or int(second) >= 60:
        return False
    try:
        date = datetime.date(int(year), _MONTHS.index(month) + 1, int(day))
    except ValueError:  # 31 Feb, day 00
        return False
    return _DAYS[date.weekday()] == weekday


def plain_value(name: str, value: str) -> Optional[str]:
    """``str()`` of the stdlib's header object for a plain value of header
    ``name`` (lower case), or None when only the stdlib can tell."""
    if name in ADDRESS_HEADERS:
        found = plain_addresses(value)
        return None if found is None else ", ".join(f"{n} <{a}>" if n else a for n, a in found)
    if name == "date":
        if canonical_date(value):
            return value  # already what format_datetime writes (~1 us instead of ~8)
        try:
            return utils.format_datetime(utils.parsedate_to_datetime(value))
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    if name == "message-id":
        return value if PLAIN_MSGID.fullmatch(value) else None
    if name == "subject":  # unstructured: only encoded words would change it
        return value if "=?" not in value and PLAIN_TEXT.fullmatch(value) else None
    return None


# --------------------------------------------------------------------------
# transfer encodings

# The Content-Transfer-Encoding tokens ``decode_transfer`` decodes: a body in
# one of them decodes the same way from the same bytes wherever they are
# read, so an attachment can be kept as a span of its message's raw bytes.
SPAN_CODECS = frozenset({"base64", "quoted-printable", "7bit", "8bit", "binary", ""})


def decode_transfer(data: bytes, cte: str) -> Optional[bytes]:
    """``data`` (a leaf's body as received) decoded from the transfer
    encoding ``cte`` (one of SPAN_CODECS), or None when it is base64 that
    even ``decode_base64``'s leniency cannot read."""
    if cte == "base64":
        return decode_base64(data)
    if cte == "quoted-printable":
        return binascii.a2b_qp(data)
    return data


def decode_span(raw: bytes, span: tuple) -> Optional[bytes]:
    """The bytes a parse's ``(start, end, codec)`` span of the raw message
    ``raw`` decodes to (``decode_transfer``)."""
    start, end, codec = span
    return decode_transfer(raw[start:end], codec or "")


def decode_base64(data: bytes) -> Optional[bytes]:
    """Base64 with what is not base64 ignored and missing padding added, or
    None when even that fails (the stdlib then keeps what it can).

    Well-formed base64 (only line breaks besides the alphabet, padded right,
    nothing after the padding) is decoded by pybase64 with SIMD, ~8x faster
    than binascii, which was a quarter of the writer's time for a 100 KB
    attachment; for such input both give the same bytes (binascii skips the
    line breaks; tests/test_mailparse_cut.py compares them on generated
    input). Anything else goes binascii's lenient way, as before."""
    try:
        return pybase64.b64decode(data, validate=True, ignorechars=b"\r\n")
    except (binascii.Error, ValueError):
        pass
    for padding in (b"", b"=="):
        try:
            return binascii.a2b_base64(data + padding if padding else data)
        except (binascii.Error, ValueError):
            continue
    return None

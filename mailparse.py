"""Bounded reading of MIME messages with the standard library's parser.

``email`` with ``policy.default`` stores headers raw at parse time and parses
one each time it is read, with a parser whose time and memory grow
quadratically with the header's length. The parser itself reads every part's
Content-Type five times, and ``get_filename()`` & co. read their header again
on every call. Measured on the daemon: a 340 KB message whose file name was
20,000 RFC 2047 words took it to 3.4 GiB, a Content-Type with 60,000
parameters held it 43.5 s, and 10,000 plain parts 17 s.

So every header the parser and the receiving code read goes through one path
(``BoundedMessage``): each header of a part is looked up once, its value cut
to ``MAX_HEADER_CHARS``; MIME parameters (RFC 2045, RFC 2231) are split by a
linear scanner; results are kept on the part. The stdlib's header objects are
still built, once per header and part, from the cut value, for the headers
shown to people (From, Subject, ...). The structure the parser is shown is
bounded too (parts, nesting, lines), and HTML becomes text by a few linear
regular-expression passes over at most ``MAX_HTML_TEXT_CHARS``. Whatever lies
beyond a bound stays in the raw ``.eml``, which is always kept.

Long leaf bodies (a base64 attachment) are cut out before the parser and put
back into the tree it builds (``BodyCuts``), so their lines are not walked
one by one; the tree is the same as a line-by-line parse gives.
"""
from __future__ import annotations

import codecs
import datetime
import html
import itertools
import logging
import re
import secrets
import urllib.parse
import weakref
from email import errors, headerregistry, policy, utils
from email.feedparser import BytesFeedParser
from email.message import EmailMessage
from typing import Optional

log = logging.getLogger("tempmail.mail")

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
MAX_HTML_TEXT_CHARS = 1 << 20  # of HTML turned into body_text (a derived convenience field)
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
BLANKS = re.compile(rb"[ \t]*")


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


class BoundedMessage(EmailMessage):
    """The message class of every parse here (``policy.default`` otherwise).

    Each header it is asked for is looked up once, its first value cut to
    MAX_HEADER_CHARS, and what was read from it is kept (until the headers
    change). The MIME queries the stdlib parser and the receiving code make
    (content type, parameters, boundary, disposition, file name, charset)
    are answered by the linear ``mime_header``; ``get()`` builds the stdlib
    header object from the cut value, once per header. ``depth`` and
    ``opaque`` bound the nesting the parser follows."""

    depth = 0  # 0: the message itself; +1 per multipart or message/rfc822 level
    opaque = False  # deeper than MAX_DEPTH: one leaf, kept in the raw .eml only
    _key = None
    _count: Optional["PartCount"] = None

    def _table(self) -> dict:
        """What was read from the headers, valid while they stay the same."""
        key = (id(self._headers), len(self._headers))
        if self._key != key:
            self._key, self._cache = key, {"raw": {}, "mime": {}, "objects": {}}
        return self._cache

    def _changed(self) -> None:
        self._key = None

    def _first(self, key: str) -> Optional[tuple[str, str]]:
        """(name, value as received) of the first header named ``key`` (lower
        case). A scan per name asked for (a few per part), rather than a
        table of every name: 400,000 header fields would cost ~60 MiB."""
        raw = self._table()["raw"]
        if key not in raw:
            raw[key] = next(((k, v) for k, v in self._headers if k.lower() == key), None)
        return raw[key]

    def raw_value(self, name: str) -> Optional[str]:
        """The first ``name`` header as received, cut to MAX_HEADER_CHARS and unfolded."""
        found = self._first(name.lower())
        return None if found is None else unfold(found[1][:MAX_HEADER_CHARS])

    def mime(self, name: str) -> Optional[tuple[str, dict[str, str]]]:
        """(main value, parameters) of the first ``name`` header, or None."""
        cache = self._table()["mime"]
        key = name.lower()
        if key not in cache:
            cache[key] = mime_header(self.raw_value(key))
        return cache[key]

    def get(self, name: str, failobj=None):
        cache = self._table()
        key = name.lower()
        if key not in cache["objects"]:
            found = self._first(key)
            cache["objects"][key] = None if found is None else header_object(
                self.policy, found[0], unfold(found[1][:MAX_HEADER_CHARS]))
        value = cache["objects"][key]
        return failobj if value is None else value

    def get_all(self, name: str, failobj=None):
        key = name.lower()
        found = itertools.islice(((k, v) for k, v in self._headers if k.lower() == key), MAX_SAME_HEADERS)
        values = [header_object(self.policy, k, unfold(v[:MAX_HEADER_CHARS])) for k, v in found]
        return values or failobj

    def get_content_type(self) -> str:
        if self.opaque:
            return "application/octet-stream"
        value = self.mime("content-type")
        if value is None:
            return self.get_default_type()
        return value[0] if value[0].count("/") == 1 else "text/plain"  # RFC 2045 5.2

    def get_params(self, failobj=None, header: str = "content-type", unquote: bool = True):
        value = self.mime(header)
        return failobj if value is None else [(value[0], "")] + list(value[1].items())

    def get_param(self, param: str, failobj=None, header: str = "content-type", unquote: bool = True):
        value = self.mime(header)
        return failobj if value is None else value[1].get(param.lower(), failobj)

    def get_boundary(self, failobj=None):
        boundary = self.get_param("boundary")
        return failobj if boundary is None else boundary.rstrip()

    def get_filename(self, failobj=None):
        name = self.get_param("filename", None, "content-disposition")
        if name is None:
            name = self.get_param("name")
        return failobj if name is None else name.strip()

    @property
    def unfinished(self) -> bool:
        """The part the parse stopped in (MAX_PARSE_PARTS): it has no payload."""
        return self._payload is None

    def payload_bytes(self) -> bytes:
        """A leaf's payload as received, still transfer-encoded. The parser
        keeps it as ASCII with surrogate escapes; ``get_payload`` would first
        try to encode all of it as UTF-8 to look for them (a buffer of three
        bytes a character: 75 MiB for a 25 MiB body), and without ``decode``
        then decodes all of it."""
        payload = self._payload
        if isinstance(payload, str):
            try:
                return payload.encode("ascii", "surrogateescape")
            except UnicodeEncodeError:  # text set by a program, not by the parser
                return payload.encode("utf-8", "surrogateescape")
        return payload if isinstance(payload, bytes) else b""

    def get_content_disposition(self) -> Optional[str]:
        value = self.mime("content-disposition")
        return (value[0] or None) if value is not None else None

    def attach(self, payload) -> None:
        """The parser attaches every part but the root to its parent: count
        them (raising TooManyParts past MAX_PARSE_PARTS) and set their depth."""
        if isinstance(payload, BoundedMessage):
            if self._count is None:
                self._count = PartCount(self)
            self._count.add()
            payload._count, payload.depth = self._count, self.depth + 1
            payload.opaque = self.opaque or payload.depth > MAX_DEPTH
        super().attach(payload)

    # Appending a header changes the table's key (the list's length), and so
    # does anything that builds a new list; these two change it in place.
    def __delitem__(self, name) -> None:
        super().__delitem__(name)
        self._changed()

    def replace_header(self, _name, _value) -> None:
        super().replace_header(_name, _value)
        self._changed()


class TooManyParts(Exception):
    """Past MAX_PARSE_PARTS parts; ``root`` is the message as parsed so far."""

    def __init__(self, root: Optional[BoundedMessage]):
        super().__init__(f"more than {MAX_PARSE_PARTS} MIME parts")
        self.root = root


class PartCount:
    """The parts of one parse so far, shared by all of them (a weak reference
    to the root, so the tree holds no cycle and is freed as soon as dropped)."""

    def __init__(self, root: BoundedMessage):
        self.root, self.parts = weakref.ref(root), 0

    def add(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARSE_PARTS:
            raise TooManyParts(self.root())


class CachedHeaderRegistry(headerregistry.HeaderRegistry):
    """The stdlib's header registry, remembering the class it makes per header
    name: the stock one builds a new class with ``type()`` on every header
    it is asked for (~20 us each, a fifth of parsing a 2 KB message)."""

    def __init__(self) -> None:
        super().__init__()
        self._made: dict[str, type] = {}

    def __getitem__(self, name: str) -> type:
        name = name.lower()
        made = self._made.get(name)
        if made is None:
            made = super().__getitem__(name)
            if len(self._made) < 1024:  # a bounded table: senders choose header names
                self._made[name] = made
        return made


# The policy of every parse: policy.default, whose messages are BoundedMessages.
PARSE_POLICY = policy.default.clone(message_factory=BoundedMessage, header_factory=CachedHeaderRegistry())


# --------------------------------------------------------------------------
# the structure the parser is shown

def line_extent(raw: bytes, limit: int) -> int:
    """Offset just past the ``limit``-th line end of ``raw`` (CRLF, CR or LF,
    as the stdlib parser splits), or its length when it has fewer lines.
    Counting is done in C over 64 KiB windows; only the last one is walked."""
    if len(raw) <= limit:  # n bytes hold at most n line ends: nothing to count
        return len(raw)
    step = 1 << 16
    for start in range(0, len(raw), step):
        stop = min(start + step, len(raw))
        ends = raw.count(b"\n", start, stop) + raw.count(b"\r", start, stop) - raw.count(b"\r\n", start, stop)
        if ends < limit:
            limit -= ends
            continue
        for match in LINE_END.finditer(raw, start, stop):
            limit -= 1
            if limit <= 0:
                return match.end()
    return len(raw)


def fold_points(raw: bytes, end: int) -> list[int]:
    """Offsets in ``raw[:end]`` where a line has run MAX_LINE bytes without a
    line break. Each step searches (in C) a window of MAX_LINE bytes and then
    moves past its last line break or to its end, so ``raw`` is searched
    about twice."""
    points, pos = [], 0
    while end - pos > MAX_LINE:
        stop = pos + MAX_LINE
        last = max(raw.rfind(b"\n", pos, stop), raw.rfind(b"\r", pos, stop))
        if last < 0:
            points.append(stop)
        pos = stop if last < 0 else last + 1
    return points


def parser_input(raw: bytes, end: Optional[int] = None):
    """The slices of ``raw`` the parser is fed: its first MAX_PARSE_LINES
    lines (``end``, when the caller has it), in pieces of at most
    PARSE_CHUNK bytes, long lines folded."""
    end = parse_extent(raw) if end is None else end
    start = 0
    with memoryview(raw) as view:
        for stop in fold_points(raw, end) + [end]:
            for piece in range(start, stop, PARSE_CHUNK):
                yield bytes(view[piece:min(piece + PARSE_CHUNK, stop)])
            if stop < end:
                yield FOLD
            start = stop


def parse_extent(raw: bytes) -> int:
    """Offset of the end of the part of ``raw`` the parser is shown: its first
    MAX_PARSE_LINES lines."""
    end = line_extent(raw, MAX_PARSE_LINES)
    if end < len(raw):
        log.warning("message of %d bytes has more than %d lines: parsed up to byte %d, the rest is "
                    "in the raw .eml only", len(raw), MAX_PARSE_LINES, end)
    return end


def parse_pieces(pieces, size: int) -> BoundedMessage:
    """The stdlib's parse (``PARSE_POLICY``) of the concatenated ``pieces``
    (of a message of ``size`` bytes), up to its first MAX_PARSE_PARTS parts
    (the tree parsed so far when there are more; the last part may then be
    unfinished, with no payload). Fed in slices: ``parsebytes`` would first
    make a str copy of the whole message, which doubles the peak memory of
    a big one."""
    parser = BytesFeedParser(policy=PARSE_POLICY)
    try:
        for piece in pieces:
            parser.feed(piece)
        return parser.close()
    except TooManyParts as exc:
        if exc.root is None:
            raise
        log.warning("message of %d bytes has more than %d MIME parts: the rest is in the raw .eml only",
                    size, MAX_PARSE_PARTS)
        return exc.root


def parse_line_by_line(raw: bytes, end: Optional[int] = None) -> BoundedMessage:
    """``raw`` parsed by the stdlib from ``parser_input``: every line of it
    goes through the feed parser. The reference ``parse_bytes`` must agree
    with (tests/test_mailparse_cut.py), and its answer whenever a long body
    cannot be cut out provably."""
    return parse_pieces(parser_input(raw, end), len(raw))


def parse_bytes(raw: bytes) -> BoundedMessage:
    """``raw`` parsed as ``parse_line_by_line`` parses it, with its long leaf
    bodies cut out before the feed parser and put back into the tree it
    builds (``BodyCuts``); line by line when that cannot be proven exact.
    A small single-part message of plain header lines is built without the
    feed parser, as the parser would build it (``parse_simple``)."""
    simple = parse_simple(raw)
    if simple is not None:
        return simple
    end = parse_extent(raw)
    if fold_points(raw, end):  # a line the parser is shown folded: its bytes are not the input's
        return parse_line_by_line(raw, end)
    cuts = BodyCuts(raw, end)
    if not cuts.plan():
        return parse_line_by_line(raw, end)
    try:
        msg = parse_pieces(cuts.skeleton(), len(raw))
    except Exception:  # the line-by-line parse decides what such a message gives
        return parse_line_by_line(raw, end)
    if not cuts.restore(msg):
        log.info("message of %d bytes: a body cut out was not read as one, parsed line by line", len(raw))
        return parse_line_by_line(raw, end)
    return msg


# --------------------------------------------------------------------------
# small plain messages without the feed parser
#
# Most mail a temporary inbox gets is a few KB: header lines, an empty line,
# a text body. For that shape the feed parser's whole work (a generator trip
# and a readline per line, ~25 us for a 2 KB message, a fifth of parsing
# it) has a known result: each header line becomes (name, value) as
# ``policy.header_source_parse`` splits it, the rest of the message is the
# payload, there are no defects. Anything else is parsed as before.

# A header line the feed parser reads as one whole header: a name of the
# characters its ``headerRE`` allows (printable ASCII but ":"; at least one,
# so not "missing header name"; no space, so no "From " line), a colon, and
# a value of printable ASCII and tabs (no line break of any kind that
# ``str.splitlines`` knows, no 8-bit byte).
SIMPLE_HEADER = re.compile(r"[\x21-\x39\x3b-\x7e]+:[\t\x20-\x7e]*")


def parse_simple(raw: bytes) -> Optional[BoundedMessage]:
    """What ``parse_line_by_line`` gives for ``raw`` when it is a message
    smaller than CUT_MIN_MESSAGE whose header lines all end in CRLF and match
    SIMPLE_HEADER (no folding), followed by an empty line, and whose type is
    neither multipart nor message; None for anything else. Linear: a search
    for the empty line, one match per header line
    (tests/test_mailparse_simple.py compares it with the feed parser)."""
    # Shorter than every bound of what the parser is shown (n bytes hold at
    # most n lines, and no line longer than n bytes): it would be shown all.
    if len(raw) >= min(CUT_MIN_MESSAGE, MAX_PARSE_LINES, MAX_LINE):
        return None
    end = raw.find(b"\r\n\r\n")
    if end <= 0:
        return None
    head = raw[:end]
    if not head.isascii():
        return None
    msg = BoundedMessage(policy=PARSE_POLICY)
    for line in head.decode("ascii").split("\r\n"):
        if SIMPLE_HEADER.fullmatch(line) is None:  # also a bare CR or LF: a line the parser splits
            return None
        name, value = line.split(":", 1)
        msg.set_raw(name, value.lstrip(" \t"))  # as header_source_parse stores it
    if msg.get_content_maintype() in ("multipart", "message"):
        return None  # the parser would read parts or a nested message out of the body
    # The parser's payload: the rest of the input, decoded as it decodes bytes.
    msg.set_payload(raw[end + 4:].decode("ascii", "surrogateescape"))
    return msg


# --------------------------------------------------------------------------
# long bodies cut out before the parse
#
# The feed parser reads a message line by line: per line a readline, every
# boundary on its stack tried, a trip through its generators.
# That was half the writer's time for a 100 KB message with an attachment
# (~1,360 lines of base64). A leaf's body needs none of it: its payload is
# its lines joined. So a byte-level pass (``bytes.find``, linear) finds the
# long leaf bodies; the parser is shown the message with each one replaced
# by a marker line, and each marker is replaced in the tree it builds by the
# text it stands for. The parser still reads every header and every boundary
# line, so the tree is the stdlib's; the pass only has to guess well, since
# ``restore`` accepts a marker only where the parser provably read it as a
# whole body, and anything else is parsed line by line.

# A body of fewer lines costs the parser less than cutting it out (measured
# here: the parser spends 0.3-0.7 us a line, the walk ~10 us a part). Its
# lines are counted in C in its first CUT_SAMPLE bytes.
CUT_MIN_LINES = 16
CUT_SAMPLE = 4096
# Below this size a message is parsed line by line: the walk's fixed cost
# (~30 us for a multipart) is more than the lines it could save (measured:
# even at 10 KB, 130 us cut against 142 us line by line).
CUT_MIN_MESSAGE = 16 << 10
# What the walk may spend in Python before cuts pay for more: a line read at
# a "--" is one unit, as is a line passed for a "-" inside it, a part four;
# every four lines cut out earn one. Past it the walk stops (the rest is
# parsed line by line): thousands of tiny parts, deep nesting or lines full
# of hyphens cost the walk a few hundred units, not a share of the parse.
WALK_ALLOWANCE = 256
# The walk reads a part's header block only if it ends within this many
# bytes; a longer one (a header bomb) is left to the parser.
WALK_HEADER_BYTES = 1 << 16
# Unguessable by a sender: a marker is accepted only as what this process wrote.
MARKER = "\x00tempmail-body-" + secrets.token_hex(12) + "-"
# A line ending, then an empty line's: "\r\n" + "\r\n" holds "\n\r", and a "\r"
# not followed by "\n" ends a line by itself.
BLANK_LINE = re.compile(rb"\n[\r\n]|\r\r")
# A header block the feed parser reads whole: every line a header line by its
# ``headerRE`` (a name and a colon, a continuation, or a "From " line).
HEADER_LINES = re.compile(rb"(?:(?:From |[\x21-\x39\x3b-\x7e]*:|[\t ])[^\r\n]*(?:\r\n|\r|\n))*")


def boundary_matcher(boundary: str):
    """The feed parser's test of a line against ``boundary`` (the same
    pattern as ``email.feedparser``'s ``boundaryre``)."""
    return re.compile("(?P<sep>" + re.escape("--" + boundary) +
                      r")(?P<end>--)?(?P<ws>[ \t]*)(?P<linesep>\r\n|\r|\n)?$").match


def first_header(head: bytes, key: bytes) -> Optional[str]:
    """The value of the first ``key`` header (lower case) in the header block
    ``head``, as the parser stores it and ``BoundedMessage.raw_value`` cuts
    it (continuation lines joined, at most about MAX_HEADER_CHARS)."""
    low, at = head.lower(), 0
    while True:
        at = low.find(key + b":", at)
        if at < 0:
            return None
        if at == 0 or head[at - 1] in b"\r\n":
            break
        at += 1
    # The parser's value: blanks after the colon dropped, continuation lines
    # joined, the last line ending dropped. Lines are gathered only until
    # there are more than MAX_HEADER_CHARS characters: the rest is never read.
    start = BLANKS.match(head, at + len(key) + 1).end()
    stop = start
    while stop < len(head) and stop - start <= MAX_HEADER_CHARS + 2:
        ending = LINE_END.search(head, stop)
        stop = ending.end() if ending else len(head)
        if head[stop:stop + 1] not in (b" ", b"\t"):
            break
    value = head[start:stop].decode("ascii", "surrogateescape").rstrip("\r\n")
    return unfold(value[:MAX_HEADER_CHARS])


class BodyCuts:
    """The long leaf bodies of ``raw[:end]``, found by following its MIME
    structure at byte level the way the feed parser follows it; the parser's
    input with each replaced by a marker line; and the bodies put back."""

    def __init__(self, raw: bytes, end: int):
        self.raw, self.end = raw, end
        self.cuts: list[tuple[int, int, str]] = []  # (start, end, line ending of its last line)
        self.parts = 0
        self.budget = WALK_ALLOWANCE
        self._hits: dict[bytes, tuple[int, int]] = {}  # byte -> (where it was searched from, hit)

    # -- finding the bodies: a guess, checked by ``restore``
    def plan(self) -> bool:
        """Find the bodies worth cutting out; False when there is none."""
        if self.end >= CUT_MIN_MESSAGE:
            self.entity(0, (), 0, False)
        return bool(self.cuts)

    def spend(self, units: int) -> bool:
        """Count the walk's work; False once it has spent its allowance."""
        self.budget -= units
        return self.budget >= 0

    def dash_line(self, pos: int) -> Optional[int]:
        """Start of the first line at or after ``pos`` that begins with "--"
        (only such a line can be a boundary), or end; None once the walk has
        spent its allowance (then nothing may be cut). It looks for "-" (in
        C, by memchr; base64 has none) and, for a "-" inside a line, goes on
        from the next line, for one unit of the allowance."""
        raw, end = self.raw, self.end
        while pos < end:
            hit = self.next_byte(b"-", pos)
            if hit < 0:
                return end
            if (hit == 0 or raw[hit - 1] in b"\r\n") and raw.startswith(b"--", hit, end):
                return hit
            if not self.spend(1):
                return None
            pos = self.next_line(hit)
        return end

    def next_byte(self, byte: bytes, pos: int) -> int:
        """The first ``byte`` at or after ``pos``, or -1. The last answer is
        kept, so a walk forward searches each byte of the message about once."""
        start, hit = self._hits.get(byte, (end := self.end + 1, end))
        if not (start <= pos and (hit == -1 or pos <= hit)):
            hit = self.raw.find(byte, pos, self.end)
            self._hits[byte] = (pos, hit)
        return hit

    def next_line(self, pos: int) -> int:
        """Start of the line after the one holding ``pos``, or end."""
        ends = [hit for hit in (self.next_byte(b"\n", pos), self.next_byte(b"\r", pos)) if hit >= 0]
        if not ends:
            return self.end
        return min(ends) + (2 if self.raw.startswith(b"\r\n", min(ends)) else 1)

    def line(self, pos: int) -> tuple[str, int]:
        """The line starting at ``pos`` as the parser sees it, and the next line's start."""
        self.spend(1)
        ending = LINE_END.search(self.raw, pos, self.end)
        stop = ending.end() if ending else self.end
        return self.raw[pos:stop].decode("ascii", "surrogateescape"), stop

    def skip(self, pos: int, stack: tuple) -> int:
        """Start of the first line at or after ``pos`` that a boundary on
        ``stack`` matches (where the parser's input ends for a part), or end."""
        pos = self.dash_line(pos)
        while stack and pos is not None and pos < self.end and self.budget >= 0:
            text, after = self.line(pos)
            if any(match(text) for match in stack):
                return pos
            pos = self.dash_line(after)
        return self.end

    def header_end(self, pos: int) -> Optional[int]:
        """Start of the first empty line in the WALK_HEADER_BYTES from ``pos``
        (a line start), or None: a longer header block is left to the parser."""
        if pos < self.end and self.raw[pos] in b"\r\n":
            return pos
        found = BLANK_LINE.search(self.raw, pos, min(self.end, pos + WALK_HEADER_BYTES))
        return found.start() + 1 if found else None

    def whole_header(self, start: int, stop: int) -> bool:
        """Whether the parser reads ``[start, stop)`` as the header block: all
        header lines, and no "From " line last but first (which the parser
        pushes back into the body). Otherwise ``restore`` would refuse the
        cut, after a parse for nothing."""
        if HEADER_LINES.fullmatch(self.raw, start, stop) is None:
            return False
        last = max(self.raw.rfind(b"\n", start, stop - 1), self.raw.rfind(b"\r", start, stop - 2)) + 1
        return not (last > start and self.raw.startswith(b"From ", last, stop))

    def dash_line_in(self, start: int, stop: int) -> bool:
        """Whether a line in ``[start, stop)`` (``start`` a line start) begins with "--"."""
        raw = self.raw
        return (raw.startswith(b"--", start, stop) or raw.find(b"\n--", start, stop) >= 0
                or raw.find(b"\r--", start, stop) >= 0)

    def content_type(self, head: bytes, depth: int, digest: bool) -> tuple[str, Optional[str]]:
        """(content type, boundary) as ``BoundedMessage`` answers them."""
        if depth > MAX_DEPTH:
            return "application/octet-stream", None  # opaque
        value = first_header(head, b"content-type")
        if value is None:
            return ("message/rfc822" if digest else "text/plain"), None
        main, rest = mime_split(value)
        ctype = main if main.count("/") == 1 else "text/plain"
        if not ctype.startswith("multipart/"):
            return ctype, None  # (its parameters are read by the parse, not needed here)
        boundary = mime_parameters(rest).get("boundary")
        return ctype, (boundary.rstrip() if boundary is not None else None)

    def count_part(self) -> bool:
        """One more part attached; False past MAX_PARSE_PARTS, where the parse
        stops, or once the walk has spent its allowance."""
        self.parts += 1
        return self.spend(4) and self.parts <= MAX_PARSE_PARTS

    def entity(self, pos: int, stack: tuple, depth: int, digest: bool) -> int:
        """Walk the message or part whose headers start at ``pos``, inside
        multiparts whose boundaries are ``stack``; return where it ends."""
        blank = self.header_end(pos)
        if blank is None or self.dash_line_in(pos, blank) or not self.whole_header(pos, blank):
            return self.skip(pos, stack)  # no body the parser surely begins after the empty line
        body = blank + (2 if self.raw.startswith(b"\r\n", blank) else 1)
        ctype, boundary = self.content_type(self.raw[pos:blank], depth, digest)
        if ctype.startswith("multipart/") and boundary is not None:
            return self.multipart(body, stack, depth, ctype == "multipart/digest", boundary_matcher(boundary))
        if ctype == "message/delivery-status":  # blocks of headers: nothing to cut
            return self.skip(body, stack)
        if ctype.startswith("message/"):  # a message in the part: the parser reads it as one
            return self.entity(body, stack, depth + 1, False) if self.count_part() else self.end
        dash = self.dash_line(body)
        if dash is None:
            return self.end
        self.cut(body, dash)
        return self.skip(dash, stack)

    def multipart(self, pos: int, stack: tuple, depth: int, digest: bool, own) -> int:
        """Walk a multipart's body from ``pos``: preamble, parts, epilogue."""
        pos = self.dash_line(pos)
        while pos is not None and pos < self.end and self.budget >= 0:
            text, after = self.line(pos)
            if any(match(text) for match in stack):
                return pos  # an enclosing boundary ends this multipart too
            found = own(text)
            if found is None:
                pos = self.dash_line(after)
                continue
            if found["end"]:
                return self.skip(after, stack)  # the epilogue
            pos = after
            while self.raw.startswith(b"--", pos, self.end):  # repeated boundary lines
                text, after = self.line(pos)
                if own(text) is None or any(match(text) for match in stack):
                    break
                pos = after
            if not self.count_part():
                return self.end
            pos = self.entity(pos, stack + (own,), depth + 1, digest)
        return self.end

    def cut(self, start: int, stop: int) -> None:
        """Cut out the body ``[start, stop)`` if it has lines enough."""
        lines = self.lines_in(start, stop)
        if stop <= start or lines < CUT_MIN_LINES:
            return
        self.budget += lines // 4
        raw = self.raw
        ending = "\r\n" if raw.startswith(b"\r\n", stop - 2, stop) else raw[stop - 1:stop].decode("latin-1")
        self.cuts.append((start, stop, ending if ending in ("\r\n", "\r", "\n") else ""))

    def lines_in(self, start: int, stop: int) -> int:
        """About how many lines ``[start, stop)`` holds, from its first CUT_SAMPLE bytes."""
        sample = min(stop, start + CUT_SAMPLE)
        if sample <= start:
            return 0
        seen = max(self.raw.count(b"\n", start, sample), self.raw.count(b"\r", start, sample))
        return seen * (stop - start) // (sample - start)

    # -- the parser's input
    def marker(self, index: int) -> str:
        return f"{MARKER}{index}."

    def skeleton(self):
        """``raw[:end]`` with each body cut out replaced by one marker line
        (ending as the body's last line ends), in pieces of at most PARSE_CHUNK."""
        done = 0
        with memoryview(self.raw) as view:
            for index, (start, stop, ending) in enumerate(self.cuts + [(self.end, self.end, "")]):
                for piece in range(done, start, PARSE_CHUNK):
                    yield bytes(view[piece:min(piece + PARSE_CHUNK, start)])
                if start < self.end:
                    yield (self.marker(index) + ending).encode("ascii")
                done = stop

    # -- the bodies put back
    def restore(self, msg: BoundedMessage) -> bool:
        """Put each body cut out back where the parser read its marker;
        False when a marker is not where it proves the parser would have
        read the whole body as one (then nothing may be trusted).

        The proof: a marker counts only as the first line of a part's str
        payload, in a part whose header block ended at an empty line (no
        MissingHeaderBodySeparatorDefect). That empty line reached the
        header loop, so no delivery-status block (whose reader stops at
        empty lines) was open, and the only lines that end the body are the
        boundaries on the parser's stack, which all begin with "--". The
        body cut out has no line beginning with "--", so the loop that read
        the marker (a leaf's body, or a multipart without a usable boundary)
        would have read every line of it, appending each to the payload.
        The parser strips the last line ending of a part's payload before a
        boundary; it did so to the marker's line exactly when it does so to
        the body's last line."""
        found = [False] * len(self.cuts)
        todo = [msg]
        while todo:
            part = todo.pop()
            payload = part._payload
            if isinstance(payload, list):
                todo.extend(payload)
            elif isinstance(payload, str) and payload.startswith(MARKER):
                index = self.put_back(part, payload)
                if index is None or found[index]:
                    return False
                found[index] = True
        return all(found)

    def put_back(self, part: BoundedMessage, payload: str) -> Optional[int]:
        """Replace the marker at the start of ``part``'s payload by its body; its index, or None."""
        head, dot, _ = payload[len(MARKER):].partition(".")
        if not dot or not head.isdigit() or int(head) >= len(self.cuts):
            return None
        index = int(head)
        start, stop, ending = self.cuts[index]
        marker = self.marker(index)
        if any(isinstance(defect, errors.MissingHeaderBodySeparatorDefect) for defect in part.defects):
            return None
        with memoryview(self.raw) as view:
            if payload == marker:  # the whole payload, its line ending stripped (or at the end of input)
                part._payload = str(view[start:stop - len(ending)], "ascii", "surrogateescape")
            elif ending and payload.startswith(marker + ending):
                rest = payload[len(marker) + len(ending):]
                part._payload = str(view[start:stop], "ascii", "surrogateescape") + rest
            else:
                return None
        return index


# --------------------------------------------------------------------------
# HTML to text
#
# The stdlib's html.parser (and BeautifulSoup over it) takes quadratic time on
# tags that never close ("<a " repeated: 50 KB did not finish in minutes on
# Python 3.11.7), and html5ever (nh3) on deep nesting (50,000 "<div>" took
# 29 s). Text for display needs neither a tree nor exact HTML parsing, so it
# is made by regular expressions that never look back: a tag runs to the
# next ">" or "<", so each character is scanned a bounded number of times.

# What a reader never sees: comments, scripts, styles, the title.
HTML_HIDDEN = re.compile(r"<!--.*?(?:-->|\Z)|<(script|style|title|template)\b[^<>]*+>.*?(?:</\1\s*>|\Z)",
                         re.I | re.S)
HTML_PRE = re.compile(r"<pre\b[^<>]*+>(.*?)(?:</pre\s*>|\Z)", re.I | re.S)
# One pass over the tags (a tag runs to the next ">" or "<", as "<a <div>"
# does in a browser): a block leaves a marker, <br> a newline, a table cell a
# space, anything else (inline elements, declarations) nothing.
HTML_TAG = re.compile(r"<(?:/?([A-Za-z][A-Za-z0-9]*)|[!?])[^<>]*+>?")
PARAGRAPH_TAGS = ("p h1 h2 h3 h4 h5 h6 blockquote table ul ol dl hr address figure fieldset form").split()
LINE_TAGS = ("div li tr dt dd section article header footer nav aside main caption center details summary "
             "figcaption legend tbody thead tfoot body html").split()
FLOW_TAG_TEXT = {"br": "\n", "td": " ", "th": " ", **dict.fromkeys(PARAGRAPH_TAGS, "\x02"),
                 **dict.fromkeys(LINE_TAGS, "\x01")}
WHITESPACE = re.compile(r"[ \t\n\r\f\v]+")
SPACES = re.compile(r" {2,}")
SPACE_AT_BREAK = re.compile(r" ?\n ?")
# \x02 marks a paragraph break and \x01 a line break (removed from the input
# first): a run of them, with spaces between, becomes one break. A run starts
# at a marker (or the one space that can precede it), so no blank is rescanned.
BREAK_RUN = re.compile(r" ?[\x01\x02][ \x01\x02]*+")
EMPTY_LINES = re.compile(r"\n{3,}")
MARKERS = {1: None, 2: None}


def strip_tags(markup: str, replacements: dict[str, str]) -> str:
    """``markup`` without tags, each replaced by ``replacements[tag name]`` or "",
    and with its character references resolved."""
    text = HTML_TAG.sub(lambda tag: replacements.get((tag[1] or "").lower(), ""), markup)
    return html.unescape(text)


def flow_text(markup: str) -> str:
    """Text of HTML outside <pre>: whitespace collapses and inline elements
    (a, b, span, ...) flow; blocks leave markers, <br> a newline."""
    text = strip_tags(WHITESPACE.sub(" ", markup), FLOW_TAG_TEXT)
    return SPACE_AT_BREAK.sub("\n", SPACES.sub(" ", text))


def pre_text(markup: str) -> str:
    """Text of a <pre> block: its line breaks and spaces are kept."""
    return "\x02" + strip_tags(markup.replace("\r\n", "\n"), {"br": "\n"}) + "\x02"


def html_to_text(markup: str) -> str:
    """Readable text of an HTML body, for messages without a text part:
    inline elements flow as text, blocks break lines. Linear in the input,
    of which at most MAX_HTML_TEXT_CHARS characters are used."""
    cut = len(markup) > MAX_HTML_TEXT_CHARS
    if cut:
        markup = markup[:MAX_HTML_TEXT_CHARS]
        if markup.rfind("<") > markup.rfind(">"):
            markup = markup[:markup.rfind("<")]  # no half tag at the cut
    markup = HTML_HIDDEN.sub("", markup.translate(MARKERS))
    pieces = HTML_PRE.split(markup)  # outside, inside, outside, ... <pre>
    text = "".join(pre_text(piece) if index % 2 else flow_text(piece) for index, piece in enumerate(pieces))
    text = BREAK_RUN.sub(lambda run: "\n\n" if "\x02" in run[0] else "\n", text)
    text = EMPTY_LINES.sub("\n\n", text).strip()
    return text + "\n\n[…]" if cut else text

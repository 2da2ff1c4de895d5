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
linear scanner (``mimeheaders.mime_header``); results are kept on the part.
The stdlib's header objects are still built, once per header and part, from
the cut value, for the headers shown to people (From, Subject, ...). The
structure the parser is shown is bounded too (parts, nesting, lines).
Whatever lies beyond a bound stays in the raw ``.eml``, which is always kept.

Long leaf bodies (a base64 attachment) are cut out before the parser and put
back into the tree it builds (``bodycuts.BodyCuts``), so their lines are not
walked one by one; the tree is the same as a line-by-line parse gives.

The bounds, the shared regular expressions and the readers of header values
(with the plain values written down directly) are in ``mimeheaders``; HTML
becomes text, by a few linear regular-expression passes over at most
``MAX_HTML_TEXT_CHARS``, in ``htmltext``.
"""
from __future__ import annotations

import itertools
import logging
import re
import weakref
from email import headerregistry, policy
from email.feedparser import BytesFeedParser
from email.message import EmailMessage
from typing import Optional

from bodycuts import CUT_MIN_MESSAGE, BodyCuts
from mimeheaders import (FOLD, LINE_END, MAX_DEPTH, MAX_HEADER_CHARS, MAX_LINE, MAX_PARSE_LINES, MAX_PARSE_PARTS,
                         MAX_SAME_HEADERS, PARSE_CHUNK, header_object, mime_header, unfold)

log = logging.getLogger("tempmail.mail")


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
    # (start, end) of a leaf's payload in the raw message, when the parse put
    # it back there as those very bytes (bodycuts.BodyCuts.put_back); else None.
    source_span: Optional[tuple[int, int]] = None
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

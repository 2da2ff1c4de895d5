"""Long bodies cut out before the parse: the long leaf bodies of a message
found at byte level (``BodyCuts``), the parser shown the message with each
replaced by a marker line, and each body put back into the tree it builds."""
from __future__ import annotations

import re
import secrets
from email import errors
from typing import TYPE_CHECKING, Optional

from mimeheaders import (LINE_END, MAX_DEPTH, MAX_HEADER_CHARS, MAX_PARSE_PARTS, PARSE_CHUNK, mime_parameters,
                         mime_split, unfold)

if TYPE_CHECKING:
    from mailparse import BoundedMessage

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
BLANKS = re.compile(rb"[ \t]*")


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
                part.source_span = (start, stop - len(ending))  # its payload's bytes in the raw message
            elif ending and payload.startswith(marker + ending):
                rest = payload[len(marker) + len(ending):]
                part._payload = str(view[start:stop], "ascii", "surrogateescape") + rest
            else:
                return None
        return index

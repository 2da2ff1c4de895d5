"""The HTML reader of ``extract``: text lines and anchors of a message's HTML.

A forward-only scanner rather than ``html.parser`` (or BeautifulSoup on top of
it): on Python 3.11.7, ``html.parser`` takes 40 s for 256 KiB of ``<a<a<a...``
and nh3 39 s for 100,000 nested ``<div>`` (measured), while this scanner only
ever moves forward, so its cost is linear in the input. It is no browser: it
keeps what extraction needs (block-separated text, table cells apart, the
``href`` and text of each ``<a>``) and ignores the rest.
"""
from __future__ import annotations

import html as htmllib
import re
from dataclasses import dataclass, field

MAX_LINK_TEXT = 200

BLOCK_TAGS = frozenset(
    "address article aside blockquote br center dd div dl dt fieldset figure footer form h1 h2 h3 "
    "h4 h5 h6 header hr li main nav ol p pre section table tbody tfoot thead title tr ul".split())
CELL_TAGS = frozenset(("td", "th"))
SKIP_TAGS = frozenset(("script", "style", "template", "noscript", "svg"))
TAG_NAME = re.compile(r"<(/?)([A-Za-z][A-Za-z0-9:-]{0,40})")
ATTRIBUTE = re.compile(r"""([^\s=/>"']+)(?:\s*=\s*("[^"]*"|'[^']*'|[^\s>]+))?""")
MAX_TAG_ATTRS = 8_192  # characters of one tag whose attributes are read
SPACES = re.compile(r"\s+")
CONTEXT_CHARS = 200  # text kept on each side of an anchor, to classify "click here"


@dataclass
class Anchor:
    """An ``<a href>``: its URL (entities decoded), its text (or its image's alt)."""

    url: str
    text: str
    context: str = ""  # the text around it, for "click here" anchors


@dataclass
class Page:
    """What extraction reads of an HTML body."""

    lines: list[str] = field(default_factory=list)
    anchors: list[Anchor] = field(default_factory=list)
    # the same lines without the anchors' text, where written-out URLs are
    # looked for (an anchor's text may show its URL shortened with "...")
    outside: list[str] = field(default_factory=list)


class HtmlReader:
    """Turns HTML into text lines (one per block; table cells separated by a
    tab) and collects ``<a href>`` anchors with their text."""

    def __init__(self) -> None:
        self.page = Page()
        self.current: list[str] = []
        self.current_outside: list[str] = []
        self.current_len = 0  # characters in ``current``
        self.anchor: tuple[str, list[str], int] | None = None  # href, text parts, start in the line
        self.placed: list[tuple[Anchor, int, int]] = []  # anchors of the current line, with their span
        self.pre = 0

    def data(self, chunk: str) -> None:
        """Text between tags (entities decoded; whitespace collapsed outside <pre>)."""
        text = htmllib.unescape(chunk)
        if self.pre:
            parts = text.split("\n")
            for i, part in enumerate(parts):
                if i:
                    self.newline()
                self.add(part)
        else:
            self.add(SPACES.sub(" ", text))

    def add(self, text: str) -> None:
        """Add text to the current line (and to the open anchor's text)."""
        if text:
            self.current.append(text)
            self.current_len += len(text)
            if self.anchor is not None:
                self.anchor[1].append(text)
                self.current_outside.append(" ")
            else:
                self.current_outside.append(text)

    def newline(self) -> None:
        """End the current line (a block starts or ends)."""
        raw = "".join(self.current)
        for anchor, start, end in self.placed:
            around = raw[max(0, start - CONTEXT_CHARS):end + CONTEXT_CHARS]
            anchor.context = SPACES.sub(" ", around).strip()
        self.page.lines.append(SPACES.sub(" ", raw).strip())
        self.page.outside.append(SPACES.sub(" ", "".join(self.current_outside)).strip())
        self.current, self.current_outside, self.current_len, self.placed = [], [], 0, []
        if self.anchor is not None:  # an anchor holding blocks: its context starts on the new line
            self.anchor = (self.anchor[0], self.anchor[1], 0)

    def start(self, name: str, attrs: dict) -> None:
        """An opening tag: blocks break the line, cells add a tab, <a> opens an anchor."""
        if name in BLOCK_TAGS:
            self.newline()
            self.pre += name == "pre"
        elif name in CELL_TAGS:
            self.add_cell_break()
        if name == "a":
            self.close_anchor()
            href = attrs.get("href")
            if href is not None:
                self.anchor = (href, [], self.current_len)
        elif name == "img" and self.anchor is not None:
            self.anchor[1].append(" " + (attrs.get("alt") or attrs.get("title") or "") + " ")

    def end(self, name: str) -> None:
        """A closing tag."""
        if name == "a":
            self.close_anchor()
        elif name in BLOCK_TAGS:
            self.pre -= name == "pre" and self.pre > 0
            self.newline()
        elif name in CELL_TAGS:
            self.add_cell_break()

    def add_cell_break(self) -> None:
        self.current.append("\t")
        self.current_len += 1
        self.current_outside.append("\t")

    def close_anchor(self) -> None:
        """Record the open anchor, if any (an <a> also closes an unclosed one)."""
        if self.anchor is not None:
            href, parts, start = self.anchor
            text = SPACES.sub(" ", "".join(parts)).strip()[:MAX_LINK_TEXT]
            anchor = Anchor(htmllib.unescape(href), text)
            self.page.anchors.append(anchor)
            self.placed.append((anchor, start, self.current_len))
            self.anchor = None

    def finish(self) -> Page:
        """The page read so far (an unclosed anchor ends here)."""
        self.close_anchor()
        self.newline()
        return self.page


def read_html(html: str) -> Page:
    """Lines and anchors of ``html``. Every step moves ``pos`` forward, and
    the next ``>`` is searched for only when the last one found lies behind,
    so the scan is linear even in a document made only of ``<``."""
    reader = HtmlReader()
    pos, gt, size = 0, -1, len(html)
    while pos < size:
        lt = html.find("<", pos)
        if lt < 0:
            reader.data(html[pos:])
            break
        if lt > pos:
            reader.data(html[pos:lt])
        if gt < lt:
            gt = html.find(">", lt)
        if gt < 0:  # no tag can end any more: the rest is text
            reader.data(html[lt:])
            break
        pos = read_markup(html, lt, gt, reader)
    return reader.finish()


def read_markup(html: str, lt: int, gt: int, reader: HtmlReader) -> int:
    """Handle what starts at ``lt`` (a ``<``); returns where to go on."""
    if html.startswith("<!--", lt):
        end = html.find("-->", lt + 4)
        return len(html) if end < 0 else end + 3
    match = TAG_NAME.match(html, lt)
    if match is None:
        if html.startswith(("<!", "<?"), lt):  # doctype, CDATA, processing instruction
            return gt + 1
        reader.data("<")
        return lt + 1
    name = match.group(2).lower()
    if match.group(1):
        reader.end(name)
        return gt + 1
    reader.start(name, attributes(html[match.end():min(gt, match.end() + MAX_TAG_ATTRS)]))
    if name in SKIP_TAGS and not html[gt - 1] == "/":
        return skip_element(html, name, gt + 1)
    return gt + 1


def attributes(body: str) -> dict:
    """The attributes of one tag, names lower-cased, the first of each kept."""
    found: dict = {}
    for match in ATTRIBUTE.finditer(body):
        name, value = match.group(1).lower(), match.group(2) or ""
        if value[:1] in ("'", '"'):  # a quoted value, or one cut by a ">" inside its quotes
            value = value[1:-1] if len(value) > 1 and value[-1] == value[0] else value[1:]
        found.setdefault(name, value)
    return found


def skip_element(html: str, name: str, pos: int) -> int:
    """Skip the content of script, style...: past its closing tag, or to the end."""
    match = re.compile(rf"</{re.escape(name)}\s*>", re.I).search(html, pos)
    return len(html) if match is None else match.end()

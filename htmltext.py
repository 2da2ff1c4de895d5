"""HTML to text: readable text of an HTML body, for messages without a text
part (``html_to_text``), by a few linear regular-expression passes over at
most ``MAX_HTML_TEXT_CHARS`` characters."""
from __future__ import annotations

import html
import re

# The stdlib's html.parser (and BeautifulSoup over it) takes quadratic time on
# tags that never close ("<a " repeated: 50 KB did not finish in minutes on
# Python 3.11.7), and html5ever (nh3) on deep nesting (50,000 "<div>" took
# 29 s). Text for display needs neither a tree nor exact HTML parsing, so it
# is made by regular expressions that never look back: a tag runs to the
# next ">" or "<", so each character is scanned a bounded number of times.

MAX_HTML_TEXT_CHARS = 1 << 20  # of HTML turned into body_text (a derived convenience field)

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

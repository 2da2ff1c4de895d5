"""Making received HTML mail safe to show, and plain-text mail pleasant to read.

HTML mail is written by strangers and is treated as hostile: ``sanitize_html``
runs it through nh3 with a tag and attribute allow-list, rewrites ``cid:``
references to the message's own attachment URLs, drops remote images unless the
reader asked for them, and keeps only inline CSS that cannot load anything.
The result is shown inside a sandboxed iframe whose route sends its own strict
Content-Security-Policy (see web.py), so a sanitiser miss still cannot run
script or reach the network.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Optional
from urllib.parse import unquote

import nh3
from markupsafe import Markup, escape

# Formatting, lists and tables; no forms, media, frames, SVG, <style>, <link>.
MAIL_TAGS = (set(nh3.ALLOWED_TAGS) - {"area", "map"}) | {"font", "tfoot"}
_CELL = {"align", "valign", "width", "height", "bgcolor", "colspan", "rowspan", "nowrap"}
MAIL_ATTRIBUTES = {
    "*": {"style", "title", "dir", "lang", "align"},
    "a": {"href", "name"},
    "img": {"src", "alt", "width", "height", "border", "vspace", "hspace"},
    "table": {"width", "height", "border", "cellpadding", "cellspacing", "bgcolor", "role"},
    "td": _CELL, "th": _CELL | {"scope"}, "tr": {"valign", "bgcolor", "height"},
    "col": {"span", "width"}, "colgroup": {"span", "width"},
    "font": {"color", "face", "size"}, "ol": {"start", "type"}, "ul": {"type"},
    "div": {"width"}, "p": set(), "span": set(), "hr": {"width", "size", "noshade"},
}
# Whole elements (with their content) that must never reach the page as text.
DROP_WITH_CONTENT = {"script", "style", "title", "head", "noscript", "template",
                     "textarea", "select", "button", "object", "iframe", "svg", "math"}
URL_SCHEMES = {"http", "https", "mailto", "cid", "data", "tel"}

# CSS properties that cannot take a URL, an image or a script in any browser:
# enough to keep a newsletter's colours and spacing, nothing that fetches.
SAFE_CSS = {
    "color", "background-color", "font", "font-family", "font-size", "font-style",
    "font-weight", "font-variant", "line-height", "letter-spacing", "word-spacing",
    "text-align", "text-decoration", "text-transform", "text-indent", "vertical-align",
    "white-space", "word-break", "word-wrap", "overflow-wrap", "direction",
    "margin", "margin-top", "margin-right", "margin-bottom", "margin-left",
    "padding", "padding-top", "padding-right", "padding-bottom", "padding-left",
    "border", "border-top", "border-right", "border-bottom", "border-left",
    "border-color", "border-style", "border-width", "border-radius",
    "border-collapse", "border-spacing", "width", "max-width", "min-width",
    "height", "max-height", "min-height", "display", "table-layout", "float", "clear",
}
# Defence in depth: even an allowed property is dropped when its value could
# smuggle a fetch (url(), image-set) or hide one behind a CSS escape.
CSS_DANGER = re.compile(r"url\s*\(|image-set|expression|javascript:|@import|\\|/\*|<", re.I)
DATA_IMAGE = re.compile(r"^data:image/(png|gif|jpe?g|webp);base64,[a-z0-9+/=\s]+$", re.I)
REMOTE = re.compile(r"^(https?:)?//", re.I)

# Colours a ``background`` shorthand may carry: the only part of it kept (as
# ``background-color``), since its images, gradients and URLs are dropped.
NAMED_COLOURS = frozenset("""
aliceblue antiquewhite aqua aquamarine azure beige bisque black blanchedalmond blue blueviolet
brown burlywood cadetblue chartreuse chocolate coral cornflowerblue cornsilk crimson cyan
darkblue darkcyan darkgoldenrod darkgray darkgreen darkgrey darkkhaki darkmagenta
darkolivegreen darkorange darkorchid darkred darksalmon darkseagreen darkslateblue
darkslategray darkslategrey darkturquoise darkviolet deeppink deepskyblue dimgray dimgrey
dodgerblue firebrick floralwhite forestgreen fuchsia gainsboro ghostwhite gold goldenrod gray
green greenyellow grey honeydew hotpink indianred indigo ivory khaki lavender lavenderblush
lawngreen lemonchiffon lightblue lightcoral lightcyan lightgoldenrodyellow lightgray
lightgreen lightgrey lightpink lightsalmon lightseagreen lightskyblue lightslategray
lightslategrey lightsteelblue lightyellow lime limegreen linen magenta maroon
mediumaquamarine mediumblue mediumorchid mediumpurple mediumseagreen mediumslateblue
mediumspringgreen mediumturquoise mediumvioletred midnightblue mintcream mistyrose moccasin
navajowhite navy oldlace olive olivedrab orange orangered orchid palegoldenrod palegreen
paleturquoise palevioletred papayawhip peachpuff peru pink plum powderblue purple
rebeccapurple red rosybrown royalblue saddlebrown salmon sandybrown seagreen seashell sienna
silver skyblue slateblue slategray slategrey snow springgreen steelblue tan teal thistle
tomato turquoise violet wheat white whitesmoke yellow yellowgreen transparent
""".split())
COLOUR_VALUE = re.compile(r"#[0-9a-f]{3,8}|(?:rgba?|hsla?)\([0-9.,%\s/+-]{1,60}\)", re.I)
BACKGROUNDS = {"background", "background-color", "background-image"}


@dataclass
class SafeHtml:
    """Sanitised HTML and what was held back from it."""
    html: str
    blocked_images: int = 0
    cids: list = field(default_factory=list)


def colour_in(value: str) -> Optional[str]:
    """The first plain colour in a CSS value (a ``background`` shorthand, or
    the first stop of a gradient), or None."""
    for token in re.findall(r"#[0-9a-z]+|[a-z]+\([^()]{0,60}\)|[a-z-]+", value, re.I):
        if COLOUR_VALUE.fullmatch(token) or token.lower() in NAMED_COLOURS:
            return token
    return None


def clean_style(value: str) -> Optional[str]:
    """Keep only allow-listed, fetch-free declarations of a ``style`` attribute.

    The ``background`` shorthand may load an image, so only its colour survives,
    as ``background-color``. When a style sets a background but none of it
    could be kept, its text ``color`` goes too: a white button label whose
    blue background image was dropped would otherwise vanish on white."""
    kept, wanted_background = [], False
    for decl in value.split(";"):
        prop, sep, val = decl.partition(":")
        prop, val = prop.strip().lower(), val.strip()
        if not sep or not val:
            continue
        wanted_background |= prop in BACKGROUNDS
        if prop == "background":
            prop, val = "background-color", colour_in(val) or ""
        if prop in SAFE_CSS and val and not CSS_DANGER.search(val):
            kept.append((prop, val))
    if wanted_background and not any(prop == "background-color" for prop, _ in kept):
        kept = [(prop, val) for prop, val in kept if prop != "color"]
    return "; ".join(f"{prop}: {val}" for prop, val in kept) or None


def normal_cid(value: str) -> str:
    """A Content-ID as a ``cid:`` URL or a header names it, in one spelling:
    no angle brackets, %-escapes undone (RFC 2392), any case."""
    return unquote(value).strip().strip("<>").strip().lower()


CID_REF = re.compile(r"""cid:([^"'\s>)]+)""", re.I)


def referenced_cids(html: str) -> set[str]:
    """The Content-IDs an HTML body refers to (``src="cid:..."`` and the like)."""
    return {normal_cid(m.group(1)) for m in CID_REF.finditer(html or "")}


CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """Raw mail text for showing as-is: CRLF as newlines, every other control
    character (and bidi override) as U+FFFD, so none can reorder or hide text."""
    return CONTROL.sub("\ufffd", text.replace("\r\n", "\n"))


def sanitize_html(html: str, cid_url: Callable[[str], Optional[str]], allow_remote: bool) -> SafeHtml:
    """Sanitise one HTML mail body.

    ``cid_url(content_id)`` returns the URL of the message's attachment with that
    Content-ID (or None); ``allow_remote`` lets http(s) images through, which the
    reader turns on per message with "show remote images"."""
    result = SafeHtml("")

    def rewrite(element: str, attribute: str, value: str) -> Optional[str]:
        if attribute == "style":
            return clean_style(value)
        if attribute not in ("src", "href"):
            return value
        if value[:4].lower() == "cid:":
            result.cids.append(value[4:])
            return cid_url(value[4:].strip("<>"))
        if attribute == "href":
            # Only absolute links: a relative one would point into this site.
            return value if re.match(r"^(https?:|mailto:|tel:)", value, re.I) else None
        if DATA_IMAGE.match(value):
            return value
        if REMOTE.match(value):
            result.blocked_images += 0 if allow_remote else 1
            return value if allow_remote else None
        return None

    result.html = nh3.clean(
        bound_nesting(html or ""), tags=MAIL_TAGS, clean_content_tags=DROP_WITH_CONTENT,
        attributes=MAIL_ATTRIBUTES, attribute_filter=rewrite, url_schemes=URL_SCHEMES,
        link_rel="noopener noreferrer", set_tag_attribute_values={"a": {"target": "_blank"}},
        strip_comments=True)
    return result


MAX_NESTING = 200
TAG = re.compile(r"<(/?)([a-zA-Z][a-zA-Z0-9]{0,20})\b[^<>]*?(/?)>")
VOID = frozenset("area base br col embed hr img input link meta source track wbr".split())


def bound_nesting(html: str) -> str:
    """Drop element tags nested deeper than MAX_NESTING, in one linear pass:
    html5ever (nh3) takes time quadratic in the nesting depth (20,000 nested
    <div> cost 1.4 s, a 6 MiB body of them hours), and no real mail nests
    anywhere near this deep. Their text is kept."""
    depth = excess = 0
    out, last = [], 0
    for match in TAG.finditer(html):
        closing, name, self_closing = match.group(1), match.group(2).lower(), match.group(3)
        if name in VOID or self_closing:
            continue
        if not closing:
            if depth < MAX_NESTING:
                depth += 1
                continue
            excess += 1
        elif excess:
            excess -= 1
        else:
            depth = max(0, depth - 1)
            continue
        out.append(html[last:match.start()])
        last = match.end()
    out.append(html[last:])
    return "".join(out) if last else html


LINK = re.compile(r"\bhttps?://[^\s<>\"']+", re.I)


def linkify_text(text: str) -> Markup:
    """Escape plain text and turn its http(s) URLs into links that open in a new
    tab without a referrer: the verification link is why people use temp mail.
    URLs are found in the raw text and each piece is escaped on its own, so an
    entity such as ``&#34;`` can never end up inside a link."""
    text = text or ""
    out, pos = [], 0
    for match in LINK.finditer(text):
        url = match.group(0).rstrip(".,;:!?)]")
        out.append(escape(text[pos:match.start()]))
        out.append(Markup('<a href="{0}" target="_blank" rel="noopener noreferrer">{0}</a>').format(url))
        pos = match.start() + len(url)
    out.append(escape(text[pos:]))
    return Markup("").join(out)

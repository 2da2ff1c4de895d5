"""One-time codes and links of a message, for ``GET /api/messages/{id}/extract``.

Pure functions (no Flask, no database): ``extract(subject, text, html)`` gives
``{"codes": [...], "links": [{"url", "text", "kind"}]}``.

Codes are what a person would copy from a sign-up or sign-in mail: 4-8 digits
(also written ``482 913``, ``482-913`` or one digit per table cell) or a short
letter-and-digit token, accepted only when a code word (code, OTP, PIN,
verification... in English, Italian, Vietnamese and Turkish) stands close to
it. Numbers labelled as something else (order, invoice, phone, total, postal
code, promo code...) and numbers written like amounts, dates, times, phone
numbers or years are left out. The most likely code comes first.

Links are every http(s) ``<a href>`` of the HTML (with its text) and every
bare URL of the texts, in order of appearance, each classified as ``verify``,
``reset``, ``login``, ``unsubscribe`` or ``other`` from its text, its URL and,
for "click here" links, the sentence around it. Tracking redirects are
reported as they are: nothing is fetched.

Every input is capped, and every scan is linear in its input: the HTML is
read by ``extract_html`` (a forward-only scanner), words are looked up in the
tables of ``extract_words``, and every look around a candidate code is
bounded by MAX_GAP characters.
"""
from __future__ import annotations

import re
import unicodedata
from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from itertools import islice, takewhile
from urllib.parse import unquote, urlsplit

from extract_html import CONTEXT_CHARS, MAX_LINK_TEXT, Page, read_html
from extract_words import CODE, KIND_WORDS, PHRASES, PROMO, WORD, find_phrases, fold, phrase_at

MAX_SUBJECT = 2_000
MAX_TEXT = 256 * 1024
MAX_HTML = 512 * 1024
MAX_URL = 4_096
MAX_CODES = 10
MAX_LINKS = 200
MAX_SEEN_LINKS = 1_000  # anchors, and URLs written out in each part, looked at (real mail has far fewer)
# Codes sit near the top of a message; looking for them further costs more
# than links do (every word is looked up), so each part is searched this far.
MAX_CODE_TEXT = 64 * 1024

KIND_ORDER = ("unsubscribe", "reset", "verify", "login")


def extract(subject: str, text: str, html: str) -> dict:
    """The codes and links of one message (any argument may be empty)."""
    subject = normalize((subject or "")[:MAX_SUBJECT]).replace("\n", " ")
    text_lines = normalize((text or "")[:MAX_TEXT]).splitlines()
    page = read_html(normalize((html or "")[:MAX_HTML]))
    codes = find_codes([[subject], text_lines, page.lines])
    links = find_links(page, text_lines)
    return {"codes": codes, "links": links}


def normalize(value: str) -> str:
    """NFC (Vietnamese mail arrives composed and decomposed alike), no NULs."""
    return unicodedata.normalize("NFC", value).replace("\x00", "")


# --------------------------------------------------------------------------
# codes

URLS = re.compile(r"\b(?:https?://|www\.)[^\s<>\"']{1,%d}" % MAX_URL, re.I)
EMAILS = re.compile(r"[\w.+-]{1,64}@[\w-]{1,63}(?:\.[\w-]{1,63}){1,8}")
DIGIT_RUN = re.compile(r"(?<!\w)\d+(?:[ .,:/\-]\d+)*(?!\w)")
TOKEN = re.compile(r"(?<![\w\-])(?:[A-Za-z0-9]{3,6}-[A-Za-z0-9]{3,6}|[A-Za-z0-9]{4,12})(?![\w\-])")
NOT_BEFORE = re.compile(r"[+#$€£¥₺₫©№(*]\s?$")
UNIT = re.compile(r"\d+(?:st|nd|rd|th|am|pm|h|m|s|x|k|gb|mb|kb|px|ms)", re.I)
NOT_AFTER = re.compile(r"^\s?(?:%|€|₺|₫|\$|£|đ\b|tl\b|try\b|usd\b|eur\b|vnd\b|gbp\b|lira|euro|dollars?\b"
                       r"|đồng|km\b|kg\b|gb\b|mb\b|px\b|\))", re.I)
FILLER = re.compile(r"(?:[\s#:.\-–—|*=>»]|\b(?:no|nr|n|num|number|numero|số|is|è|là|numara\w*)\b)*", re.I)
SENTENCE_MARK = re.compile(r"[.!?;](?:\s+|$)")
STOP_CAPS = frozenset("""CODE CODES CODICE OTP PIN PASSCODE TOKEN VERIFY YOUR HERE THIS THAT WITH FROM BELOW
    ABOVE EMAIL MAIL LOGIN SIGN ENTER USE THE AND FOR NOT DONT WILL EXPIRES MINUTES ACCOUNT SECURITY
    VERIFICATION HTML HTTP HTTPS WWW KODU KOD SIFRE NULL NONE TODAY""".split())

# scores: what makes a candidate more likely the code
TIGHT, LOOSE = 4, 3
VETO = -1  # a decoy word labels the candidate
SUBJECT_BONUS = 1
BACK_WORDS, FORWARD_WORDS, TIGHT_WORDS, TIGHT_FORWARD = 16, 5, 2, 3
MAX_GAP = 300  # characters between a code word and a code, at most (bounds the work per candidate)
MAX_ALONE = 40  # a line this long or shorter may hold a code alone


@dataclass
class Candidate:
    """Something on a line shaped like a code, at line[start:end]."""

    code: str
    start: int
    end: int
    alnum: bool = False  # letters and digits: only right next to a code word
    capitals: bool = False  # capital letters only: only right after a code word
    year: bool = False  # 1900-2099: only right after a code word


@dataclass
class Label:
    """A code word, decoy word or offer word, at line[start:end]."""

    start: int
    end: int
    kind: str  # CODE, DECOY or PROMO

    @property
    def keyword(self) -> bool:
        """A code word (else a word saying the number is something else)."""
        return self.kind == CODE


def find_codes(sources: list[list[str]]) -> list[str]:
    """Codes found in ``sources`` (subject, text lines, HTML lines), most
    likely first, then in order of appearance; each code once. A string the
    message itself labels as something else anywhere ("promo code SAVE20" in
    the body, "code SAVE20" in the subject) is no code anywhere."""
    best: dict[str, tuple[int, int]] = {}
    vetoed: set[str] = set()
    order = 0
    for index, lines in enumerate(sources):
        bonus = SUBJECT_BONUS if index == 0 else 0
        for code, score in codes_in_lines(head(lines, MAX_CODE_TEXT)):
            if score == VETO:
                vetoed.add(code)
                continue
            order += 1
            old = best.get(code)
            if old is None or score + bonus > old[0]:
                best[code] = (score + bonus, old[1] if old else order)
    ranked = sorted(best.items(), key=lambda item: (-item[1][0], item[1][1]))
    return [code for code, _ in ranked if code not in vetoed][:MAX_CODES]


def head(lines: list[str], limit: int) -> list[str]:
    """The first ``limit`` characters of ``lines``, as lines."""
    out = []
    for line in lines:
        if limit <= 0:
            break
        out.append(line[:limit])
        limit -= len(line) + 1
    return out


def codes_in_lines(lines: list[str]):
    """(code, score) for each candidate of ``lines`` that a code word
    vouches for, (code, VETO) for each that a decoy word labels. A candidate
    alone on its line counts when one of the two non-empty lines above
    introduces a code ("Your verification code" / "482913")."""
    above: list[tuple[str, list[Label]]] = []  # the last non-empty lines, newest last
    for raw in lines:
        line = mask(raw)
        if not line.strip():
            continue
        labels = find_labels(line)
        starts, ends = [lab.start for lab in labels], [lab.end for lab in labels]
        blocker = -1  # end of the last code found: a code word before it vouched for that one
        for cand in find_candidates(line):
            score = judge(line, cand, labels, ends, blocker)
            if score is None and alone(line, cand) and not (cand.capitals or cand.year) and introduces(above):
                score = TIGHT
            if score not in (None, VETO) and promotion(line, cand, labels, starts):
                score = VETO  # "Use code WELCOME10 for 10% off"
            if score is not None:
                blocker = cand.end if score != VETO else blocker
                yield cand.code, score
        above = (above + [(line, labels)])[-2:]


def mask(line: str) -> str:
    """The line with URLs and e-mail addresses blanked (same length)."""
    line = URLS.sub(lambda m: " " * len(m.group()), line)
    return EMAILS.sub(lambda m: " " * len(m.group()), line)


def find_labels(line: str) -> list[Label]:
    """Code words and decoy words of a line, in order, none overlapping."""
    return [Label(start, end, kind) for start, end, kind in find_phrases(line, PHRASES)]


def find_candidates(line: str) -> list[Candidate]:
    """Digit runs shaped like a code, and letter-and-digit tokens."""
    found = [c for c in (digit_candidate(line, m) for m in DIGIT_RUN.finditer(line)) if c]
    for match in TOKEN.finditer(line):
        cand = token_candidate(match)
        if cand is not None:
            found.append(cand)
    return sorted(found, key=lambda c: c.start)


def digit_candidate(line: str, match: re.Match) -> Candidate | None:
    """A digit run that reads as a code: 4-8 digits, written whole or in equal
    groups (``482 913``, ``4 8 2 9 1 3``), given back without separators.
    Anything with a decimal point, a comma, a colon or a slash is an amount,
    a date, a time or an address; a currency, ``+``, ``#``, ``*`` or ``(``
    around it makes it a price, a phone, an order or a card number."""
    run = match.group()
    if any(ch in run for ch in ".,:/"):
        return None
    if NOT_BEFORE.search(line[max(0, match.start() - 3):match.start()]):
        return None
    if NOT_AFTER.match(line[match.end():match.end() + 8]):
        return None
    groups = re.split(r"[ \-]", run)
    digits = "".join(groups)
    if not 4 <= len(digits) <= 8:
        return None
    if len(groups) > 1 and len({len(g) for g in groups}) != 1:
        return None  # 555-0199, 02 1234 5678: phone numbers and references, not codes
    year = len(digits) == 4 and 1900 <= int(digits) <= 2099
    return Candidate(digits, match.start(), match.end(), year=year)


def token_candidate(match: re.Match) -> Candidate | None:
    """A token that may be a code: letters and digits mixed (not ``10th``,
    ``5GB``), or 5-8 capitals that are no common word. Digits alone are
    left to ``digit_candidate``."""
    token = match.group()
    has_digit = any(ch.isdigit() for ch in token)
    has_alpha = any(ch.isalpha() for ch in token)
    letters = token.replace("-", "")
    if has_digit and has_alpha:
        capitals = False
        if UNIT.fullmatch(token):
            return None
    elif has_alpha and letters.isupper() and 5 <= len(letters) <= 8 and token not in STOP_CAPS:
        capitals = True
    else:
        return None
    if "-" not in token and phrase_at([(0, len(token), fold(token))], 0, PHRASES) is not None:
        return None  # "KODUNUZ", "2FA": a label, not a code
    return Candidate(token, match.start(), match.end(), alnum=True, capitals=capitals)


def judge(line: str, cand: Candidate, labels: list[Label], ends: list[int], blocker: int) -> int | None:
    """The candidate's score when a code word stands close to it, else None
    (VETO when a decoy word right before it says what it is: "Order #",
    "Hotline:"). Decoy words further off are passed over ("OTP for
    transaction 2.500.000 VND: ..."); a code word before another candidate
    (at ``blocker``) vouches for that one, not this ("code 4821 at ... 02139")."""
    i = bisect_right(ends, cand.start)  # labels[:i] end before the candidate
    if i and not labels[i - 1].keyword:
        gap = line[labels[i - 1].end:cand.start]
        if len(gap) <= MAX_GAP and FILLER.fullmatch(gap):
            return VETO
    earlier = takewhile(lambda lab: lab.end > blocker, (labels[j] for j in range(i - 1, -1, -1)))
    back = keyword_distance(line, earlier, cand.start, True)
    if back is not None and back <= TIGHT_WORDS:
        return TIGHT
    if back is not None and back <= BACK_WORDS and not (cand.alnum or cand.year):
        return LOOSE
    if cand.capitals or cand.year:
        return None
    later = (labels[j] for j in range(i, len(labels)) if labels[j].start >= cand.end)
    ahead = keyword_distance(line, later, cand.end, False)
    if ahead is not None and ahead <= TIGHT_FORWARD:
        return TIGHT
    if ahead is not None and ahead <= FORWARD_WORDS:
        return LOOSE
    return None


def keyword_distance(line: str, labels, edge: int, backward: bool) -> int | None:
    """Words between the candidate's ``edge`` and the nearest code word in
    one direction within the same sentence, or None. Going forward, a decoy
    word right after the candidate ("4821 ile biten kart") ends the search."""
    for lab in labels:
        gap = line[lab.end:edge] if backward else line[edge:lab.start]
        if len(gap) > MAX_GAP or ends_sentence(gap if backward else line[edge - 1:lab.start]):
            return None
        if lab.keyword:
            return sum(1 for word in gap.split() if WORD.search(word))  # "2.500.000" is one word
        if not backward and FILLER.fullmatch(gap):
            return None
    return None


def promotion(line: str, cand: Candidate, labels: list[Label], starts: list[int]) -> bool:
    """Is the candidate in a sentence about an offer (a promotion word or a "%")?"""
    first, last = sentence_bounds(line, cand.start, cand.end)
    if "%" in line[first:last]:
        return True
    return any(labels[j].kind == PROMO for j in range(bisect_left(starts, first), bisect_left(starts, last)))


def sentence_bounds(line: str, start: int, end: int) -> tuple[int, int]:
    """Start and end of the sentence holding line[start:end], looked for at
    most MAX_GAP characters away."""
    first = max(0, start - MAX_GAP)
    for match in SENTENCE_MARK.finditer(line, first, start):
        if sentence_ends_at(line, match):
            first = match.end()
    last = min(len(line), end + MAX_GAP)
    for match in SENTENCE_MARK.finditer(line, end, last):
        if sentence_ends_at(line, match):
            return first, match.start()
    return first, last


def sentence_ends_at(text: str, match: re.Match) -> bool:
    """A full stop ends a sentence only before a capital or at the end, so
    "n. 2026-4481" or "tel. 06 ..." run on."""
    following = text[match.end():match.end() + 1]
    return match.group()[0] != "." or not following or following.isupper()


def ends_sentence(text: str) -> bool:
    """Does a sentence end inside ``text``?"""
    return any(sentence_ends_at(text, match) for match in SENTENCE_MARK.finditer(text))


def alone(line: str, cand: Candidate) -> bool:
    """Is the candidate the only thing on its (short) line, bar punctuation?"""
    if len(line.strip()) > MAX_ALONE:
        return False
    return not WORD.search(line[:cand.start] + line[cand.end:])


def introduces(above: list[tuple[str, list[Label]]]) -> bool:
    """Do the last two non-empty lines introduce a code: does one hold a code
    word, with the nearer one not a label of something else ("Order number:")?"""
    for line, labels in reversed(above):
        if labels and not labels[-1].keyword and len(line) - labels[-1].end <= MAX_GAP \
                and FILLER.fullmatch(line[labels[-1].end:]):
            return False
        if any(lab.keyword for lab in labels):
            return True
    return False


# --------------------------------------------------------------------------
# links

KIND_URL = {
    "unsubscribe": re.compile(r"unsub|opt-?out|/preferences|email-preferences|manage-subscription"
                              r"|disiscri|abonelik|huy-dang-ky", re.I),
    "reset": re.compile(r"reset|forgot|recover|password|passwd|sifre|parola|reimposta|dat-lai|doi-mat-khau"
                        r"|sifirla", re.I),
    "verify": re.compile(r"verif|confirm|activat|validat|dogrula|onayla|conferma|attiva|xac-nhan"
                         r"|xac-minh|kich-hoat", re.I),
    "login": re.compile(r"login|log-in|signin|sign-in|sign_in|magic|/auth/|\bsso\b|giris|accedi"
                        r"|dang-nhap|oturum", re.I),
}
GENERIC_TEXT = re.compile(r"""^\W*(?:click[ ]here|here|this[ ]link|link|tap[ ]here|press[ ]here|click
    |clicca[ ]qui|qui|questo[ ]link|premi[ ]qui|tocca[ ]qui
    |tại[ ]đây|đây|nhấn[ ]vào[ ]đây|bấm[ ]vào[ ]đây|nhấp[ ]vào[ ]đây|liên[ ]kết[ ]này
    |buraya[ ]tıklayın|buraya[ ]tıkla|tıklayın|buraya|bu[ ]bağlantı|bağlantı)\W*$""", re.I | re.X)
TRACKING_PARAMS = re.compile(r"(?:^|[?&])utm_[a-z]+=[^&#]*", re.I)
SENTENCE_END = re.compile(r"[.!?]\s")
HELP_PAGE = re.compile(r"^(?:help|support|docs|faq|kb|hotro|destek|assistenza)\."
                       r"|/(?:help|support|docs?|faqs?|articles|kb|hc|aiuto|assistenza|tro-giup|ho-tro"
                       r"|yardim|destek)(?:[/?#]|$)", re.I)
URL_TRAIL = ".,;:!?'\"*"
URL_BREAKS = re.compile(r"[\t\n\r]")
LOGIN_HOST = re.compile(r"^(?:login|signin|auth|sso)\.", re.I)
BARE_URL = re.compile(r"https?://[^\s<>\"'`{}|\\^\[\]]{1,%d}" % MAX_URL, re.I)


def find_links(page: Page, text_lines: list[str]) -> list[dict]:
    """Every http(s) link: HTML anchors, then URLs written out in the HTML's
    text (outside anchors) and in the text part; each URL once."""
    links: dict[str, dict] = {}
    for anchor in page.anchors[:MAX_SEEN_LINKS]:
        add_link(links, anchor.url, anchor.text, anchor.context)
    for lines in (page.outside, text_lines):
        for url, label, context in islice(bare_urls(lines), MAX_SEEN_LINKS):
            add_link(links, url, label, context, bare=True)
    return list(links.values())[:MAX_LINKS]


def add_link(links: dict, url: str, text: str, context: str, bare: bool = False) -> None:
    """Add a link, or give a known one a more specific kind or a text. A URL
    written out that starts a longer known one is that link shown shortened
    ("https://x/verify?token=ab..."), not a link of its own."""
    url = clean_url(url)
    if url is None or (url not in links and len(links) >= MAX_LINKS):
        return
    if bare and url not in links and any(known.startswith(url) for known in links):
        return
    kind = link_kind(url, text, context)
    old = links.get(url)
    if old is None:
        links[url] = {"url": url, "text": text, "kind": kind}
    else:
        if old["kind"] == "other" and kind != "other":
            old["kind"] = kind
        if not old["text"] and text:
            old["text"] = text


def clean_url(url: str) -> str | None:
    """The URL as a browser reads it (surrounding spaces and controls gone,
    tabs and line breaks inside removed, as the URL standard says), if it is
    a well-formed http(s) URL."""
    url = URL_BREAKS.sub("", url.strip("".join(map(chr, range(33)))))
    if len(url) > MAX_URL or not re.match(r"https?://", url, re.I):
        return None
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in url):
        return None
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    return url if parts.hostname else None


def bare_urls(lines: list[str]):
    """(url, label, context) for each http(s) URL written out in ``lines``:
    the label is the end of the sentence before it on its line; a URL alone
    on its line takes the line above (when that has no URL) as context."""
    previous = ""
    for line in lines:
        done = 0  # where the last URL of this line ended
        for match in BARE_URL.finditer(line):
            url = trim_url(match.group())
            before = line[max(done, match.start() - CONTEXT_CHARS):match.start()]
            label = last_sentence(before.rstrip()).strip(" \t:-–—>(")
            context = label if WORD.search(label) else previous
            done = match.end()
            yield url, label[:MAX_LINK_TEXT], context
        if line.strip():
            previous = "" if done else line[-CONTEXT_CHARS:]


def trim_url(url: str) -> str:
    """A URL written in prose without the punctuation that ends the sentence
    (and without a closing parenthesis it does not open)."""
    opened, closed = url.count("("), url.count(")")
    end = len(url)
    while end and (url[end - 1] in URL_TRAIL or (url[end - 1] == ")" and opened < closed)):
        closed -= url[end - 1] == ")"
        end -= 1
    return url[:end]


def last_sentence(text: str) -> str:
    """The last sentence of ``text`` (a final "?" or "." does not end it)."""
    ends = [m.end() for m in SENTENCE_END.finditer(text)]
    return text[ends[-1]:] if ends else text


def link_kind(url: str, text: str, context: str) -> str:
    """verify / reset / login / unsubscribe / other, from the link's own text,
    then its URL, then (for "click here" links) the sentence around it."""
    generic = not text or GENERIC_TEXT.match(text) or re.match(r"\W*(?:https?://|www\.)", text, re.I)
    kind = None if generic else words_kind(text)
    if kind is None:
        kind = url_kind(url)
    if kind is None and generic:
        kind = words_kind(context)
    return kind or "other"


def words_kind(text: str) -> str | None:
    """The kind the words of ``text`` name (the first of KIND_ORDER found)."""
    found = {kind for _start, _end, kind in find_phrases(text, KIND_WORDS)}
    return next((kind for kind in KIND_ORDER if kind in found), None)


def url_kind(url: str) -> str | None:
    """The kind the URL's path and query name (tracking redirects often carry
    the target URL encoded in their query), ``utm_`` parameters left out, or
    a sign-in host (login.example.com); none for help and documentation pages."""
    parts = urlsplit(url)
    target = TRACKING_PARAMS.sub("", unquote(f"{parts.path}?{parts.query}#{parts.fragment}"))
    host = parts.hostname or ""
    if HELP_PAGE.search(host + target):
        return None  # an article about verification is no verification link
    for kind in KIND_ORDER:
        if KIND_URL[kind].search(target):
            return kind
    return "login" if LOGIN_HOST.match(host) else None

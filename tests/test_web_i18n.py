"""The web pages in English, Italian, Vietnamese and Turkish (Flask-Babel):
every string of the pages has a translation, the committed .mo files match
their .po sources, each page comes out free of English in each language, no
visible string escapes gettext, and the language is negotiated, switched and
remembered, while both JSON APIs keep the seeds' English."""
from __future__ import annotations

import gettext
import re
from pathlib import Path

import pytest
from babel.messages.catalog import Catalog
from babel.messages.extract import extract_from_dir, extract_from_file
from babel.messages.frontend import parse_mapping_cfg
from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po
from bs4 import BeautifulSoup

import mailhandler
from models import Mailbox, db

ROOT = Path(__file__).resolve().parent.parent
TRANSLATIONS = ROOT / "translations"
LANGS = ("it", "vi", "tr")
# The modules and templates `make messages` extracts from (Makefile I18N_SOURCES).
SOURCES = ("accounts.py", "apidocs.py", "languages.py", "web.py", "templates")
TOKEN_RE = re.compile(r'name="csrf_token" value="([^"]+)"')
ADDRESS_RE = re.compile(r'id="address"[^>]*value="([^"]+)"')
PLACEHOLDER = re.compile(r"%\(\w+\)[sd]")
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16
PASSWORD = "correct horse 42"


def extracted() -> dict:
    """Every msgid of the pages, found by Babel's own extractor as `make messages` runs it."""
    with open(ROOT / "babel.cfg", encoding="utf-8") as fh:
        method_map, options_map = parse_mapping_cfg(fh)
    found = {}
    for source in SOURCES:
        path = ROOT / source
        if path.is_dir():
            for filename, lineno, message, _comments, _context in extract_from_dir(str(path), method_map, options_map):
                found[message if isinstance(message, str) else tuple(message)] = f"{source}/{filename}:{lineno}"
        else:
            for lineno, message, _comments, _context in extract_from_file("python", str(path)):
                found[message if isinstance(message, str) else tuple(message)] = f"{source}:{lineno}"
    return found


def catalogue(lang: str):
    with open(TRANSLATIONS / lang / "LC_MESSAGES" / "messages.po", "rb") as fh:
        return read_po(fh, locale=lang)


# --------------------------------------------------------------------------
# the catalogues

def test_extraction_finds_the_pages_strings():
    found = extracted()
    for text in ("Your temporary e-mail address", "Sign up", "Headers and source", "Wrong e-mail address or password.",
                 "Too many addresses were created from your network. Try again later."):
        assert text in found, text
    assert len(found) > 120


@pytest.mark.parametrize("lang", LANGS)
def test_every_string_has_a_translation(lang):
    """A string added to a page but not translated fails here, naming it."""
    cat = catalogue(lang)
    problems = []
    for msgid, where in extracted().items():
        key = msgid[0] if isinstance(msgid, tuple) else msgid
        msg = cat.get(key)
        if msg is None:
            problems.append(f"missing: {key!r} ({where})")
            continue
        strings = msg.string if isinstance(msg.string, tuple) else (msg.string,)
        if msg.fuzzy or not all(s.strip() for s in strings) or len(strings) != (cat.num_plurals if msg.pluralizable else 1):
            problems.append(f"untranslated or fuzzy: {key!r}")
        for text in strings:  # the same placeholders, so formatting cannot fail
            if set(PLACEHOLDER.findall(text)) != set(PLACEHOLDER.findall(key)) and not msg.pluralizable:
                problems.append(f"placeholders differ: {key!r} -> {text!r}")
    assert problems == []


@pytest.mark.parametrize("lang", LANGS)
def test_committed_mo_files_match_their_po(lang):
    """The .mo files are committed (no compile step on a fresh machine);
    they must say what the .po says: `make compile-messages` after an edit."""
    cat = catalogue(lang)
    with open(TRANSLATIONS / lang / "LC_MESSAGES" / "messages.mo", "rb") as fh:
        compiled = gettext.GNUTranslations(fh)
    for msg in cat:
        if not msg.id:
            continue
        if msg.pluralizable:
            for n, text in zip((1, 2, 5), (msg.string * 3)[:3] if len(msg.string) == 1 else msg.string):
                assert compiled.ngettext(msg.id[0], msg.id[1], n) in msg.string
        else:
            assert compiled.gettext(msg.id) == msg.string, msg.id


# --------------------------------------------------------------------------
# every page, every language

def csrf(client, path="/") -> str:
    return TOKEN_RE.search(client.get(path).get_data(as_text=True)).group(1)


def deliver(app, address: str, subject: str, html: str = "", attachments=()) -> int:
    with app.app_context():
        box = Mailbox.find_live(address)
        msg = mailhandler.store_message(box, {"from_email": "qwx@zz.example", "from_name": "Qwx Zzy",
                                         "subject": subject, "body_text": "Zzq zzq", "body_html": html},
                                   b"Subject: " + subject.encode() + b"\r\n\r\nZzq zzq", attachments)
        db.session.commit()
        return msg.id


def visible(html: str, only: str | None = None) -> str:
    """What a person sees or hears of a page: text, plus the attributes that
    are shown or read out, plus the words the live script takes from the page."""
    soup = BeautifulSoup(html, "html.parser")
    if only:
        soup = soup.select_one(only)
    for code in soup.select("pre, code, script, option, time.when"):
        code.decompose()
    parts = [soup.get_text(" ")]
    for tag in soup.find_all(True):
        for name, value in tag.attrs.items():
            if name in ("title", "placeholder", "aria-label", "alt", "data-confirm") or (
                    name.startswith("data-") and tag.get("id") == "ui-text"):
                parts.append(str(value))
    return " ".join(parts)


def sign_in(client, email: str) -> None:
    resp = client.post("/signin", data={"csrf_token": csrf(client, "/signin"), "email": email,
                                        "password": PASSWORD})
    assert resp.status_code in (302, 303), resp.status_code


def sign_up(client, email: str) -> None:
    client.post("/signup", data={"csrf_token": csrf(client, "/signup"), "email": email,
                                 "password": PASSWORD, "confirm": PASSWORD})
    sign_in(client, email)


def page_set(app, client) -> dict:
    """One rendering of every page (and of a flash message), for one client."""
    address = ADDRESS_RE.search(client.get("/").get_data(as_text=True)).group(1)
    text_id = deliver(app, address, "Zzq text", attachments=[
        {"filename": "zz.bin", "data": b"z" * 157, "content_type": "application/octet-stream"}])
    html_id = deliver(app, address, "Zzq html", html='<p>Zzq <img src="https://t.example/p.gif"></p>')
    with app.app_context():
        token = Mailbox.find_live(address).email_token()
    pages = {"inbox": client.get("/").get_data(as_text=True),
             "reader-html": client.get(f"/web/messages/{html_id}").get_data(as_text=True),
             "reader-text": client.get(f"/web/messages/{text_id}").get_data(as_text=True),
             "reader-source": client.get(f"/web/messages/{text_id}?view=source").get_data(as_text=True),
             "token-inbox": client.get(f"/m/{token}").get_data(as_text=True),
             "gone": client.get("/m/nonsense").get_data(as_text=True),
             "signup": client.get("/signup").get_data(as_text=True),
             "signin": client.get("/signin").get_data(as_text=True)}
    pages["flash-error"] = client.post("/web/address", data={"csrf_token": csrf(client), "username": "x",
                                                              "domain": "example.com"},
                                       follow_redirects=True).get_data(as_text=True)
    pages["stale-form"] = client.post("/web/address/new", data={"csrf_token": "stale"}).get_data(as_text=True)
    pages["signup-errors"] = client.post("/signup", data={"csrf_token": csrf(client, "/signup"),
                                                          "email": "bad", "password": "a", "confirm": "b"}
                                         ).get_data(as_text=True)
    client.post("/signup", data={"csrf_token": csrf(client, "/signup"), "email": "i18n@example.org",
                                 "password": PASSWORD, "confirm": PASSWORD})
    pages["signed-up"] = client.get("/signin").get_data(as_text=True)  # with its flash
    pages["signin-wrong"] = client.post("/signin", data={"csrf_token": csrf(client, "/signin"),
                                                         "email": "i18n@example.org", "password": "nope"}
                                        ).get_data(as_text=True)
    sign_in(client, "i18n@example.org")
    pages["account"] = client.get("/account").get_data(as_text=True)
    pages["password-errors"] = client.post("/account/password", data={
        "csrf_token": csrf(client, "/account"), "current_password": "nope", "new_password": "x",
        "confirm": "y"}).get_data(as_text=True)
    sign_in(client, "i18n@example.org")  # a wrong current password ends nothing; this is for safety
    pages["account-new-key"] = client.post("/account/key", data={"csrf_token": csrf(client, "/account")}
                                           ).get_data(as_text=True)
    pages["docs-header"] = client.get("/docs").get_data(as_text=True)
    return pages


def english_left(text: str, lang: str) -> list[str]:
    """The page strings (English msgids) that still show in ``text``: each
    literal run of a msgid between its placeholders, as whole words."""
    cat = catalogue(lang)
    left = []
    for msg in cat:
        if not msg.id:
            continue
        source = msg.id[0] if msg.pluralizable else msg.id
        target = msg.string[0] if msg.pluralizable else msg.string
        if target == source:  # the same in both ("HTML"; Italian "Password")
            continue
        for run in PLACEHOLDER.split(re.sub(r"<[^>]+>", " ", source)):
            run = " ".join(run.split()).strip(" .:?!()")
            if len(run) >= 3 and re.search(rf"(?<!\w){re.escape(run)}(?!\w)", " ".join(text.split())):
                if run not in " ".join(target.split()):
                    left.append(run)
    return left


@pytest.mark.parametrize("lang", LANGS)
def test_each_page_is_free_of_english(app, lang):
    client = app.test_client()
    client.get(f"/?lang={lang}")  # the switcher's choice, remembered from here on
    pages = page_set(app, client)
    for name, html in pages.items():
        assert f'<html lang="{lang}">' in html, name
        only = "header.site-header" if name == "docs-header" else None
        assert english_left(visible(html, only), lang) == [], name


def test_english_pages_show_the_english_strings(app):
    """The same check, turned round: the English pages do contain the msgids,
    so a page that stopped rendering cannot make the test above pass."""
    pages = page_set(app, app.test_client())
    text = visible(pages["inbox"])
    assert "Your temporary e-mail address" in text and "Search subject or sender" in text
    assert english_left(visible(pages["inbox"]), "it")


def pseudo_catalogue(directory: Path) -> None:
    """An Italian catalogue whose every translation is its msgid in ⟦brackets⟧."""
    source = catalogue("it")
    pseudo = Catalog(locale="it")
    for msg in source:
        if not msg.id:
            continue
        if msg.pluralizable:
            forms = (f"⟦{msg.id[0]}⟧",) + (f"⟦{msg.id[1]}⟧",) * (pseudo.num_plurals - 1)
            pseudo.add(msg.id, forms, flags=("python-format",))
        else:
            pseudo.add(msg.id, f"⟦{msg.id}⟧")
    target = directory / "it" / "LC_MESSAGES"
    target.mkdir(parents=True)
    with open(target / "messages.mo", "wb") as fh:
        write_mo(fh, pseudo)


def test_no_visible_string_escapes_gettext(app_factory, tmp_path):
    """Render every page with a pseudo-translation that brackets each
    translated string: whatever is left outside brackets must be data (the
    address, the mail, numbers), never a sentence the catalogue missed."""
    pseudo_catalogue(tmp_path / "pseudo")
    app = app_factory(BABEL_TRANSLATION_DIRECTORIES=str(tmp_path / "pseudo"))
    client = app.test_client()
    client.get("/?lang=it")
    pages = page_set(app, client)
    address = ADDRESS_RE.search(pages["inbox"]).group(1)
    data = [address, address.split("@")[0], "example.com", "tempmail.test", "TempMail", "Qwx Zzy",
            "qwx@zz.example", "Zzq html", "Zzq text", "Zzq zzq", "Zzq", "zz.bin", "i18n@example.org",
            "English", "Italiano", "Tiếng Việt", "Türkçe", "Free", "UTC", "message-\\d+.eml"]
    for name, html in pages.items():
        text = visible(html, "header.site-header" if name == "docs-header" else None)
        while "⟦" in text:  # innermost first: "⟦lives ⟦24 h⟧ from now⟧"
            text, count = re.subn(r"⟦[^⟦⟧]*⟧", " ", text)
            assert count, (name, text)
        text = re.sub("|".join(re.escape(d) if not d.endswith(".eml") else d for d in data), " ", text)
        text = re.sub(r"\d[\d.,:\-]*( (B|KB|MB))?", " ", text)
        assert re.sub(r"[\s·@<>←→…()+%–/—:-]+", "", text) == "", (name, " ".join(text.split()))


# --------------------------------------------------------------------------
# choosing the language

def lang_of(resp) -> str:
    return re.search(r'<html lang="([^"]+)"', resp.get_data(as_text=True)).group(1)


@pytest.mark.parametrize("header, expected", [
    ("it-IT,it;q=0.9,en;q=0.5", "it"), ("vi", "vi"), ("de-DE,tr;q=0.8,en;q=0.3", "tr"),
    ("fr-FR,de;q=0.9", "en"), ("", "en")])
def test_accept_language_picks_the_page_language(client, header, expected):
    resp = client.get("/signin", headers={"Accept-Language": header})
    assert lang_of(resp) == expected
    assert resp.headers["Content-Language"] == expected
    assert {"Accept-Language", "Cookie"} <= set(resp.vary)


def test_the_choice_is_remembered_and_can_be_forgotten(client):
    chosen = client.get("/signin?lang=tr", headers={"Accept-Language": "it"})
    assert lang_of(chosen) == "tr"
    cookie = chosen.headers["Set-Cookie"]
    assert cookie.startswith("lang=tr;") and "HttpOnly" in cookie and "SameSite=Lax" in cookie
    for path in ("/", "/signup", "/docs"):  # every page, the docs too, follows the choice
        assert lang_of(client.get(path, headers={"Accept-Language": "it"})) == "tr", path
    assert "Gelen kutusu" in client.get("/docs").get_data(as_text=True)  # the docs' header
    forgot = client.get("/signin?lang=auto", headers={"Accept-Language": "it"})
    assert lang_of(forgot) == "it" and "lang=;" in forgot.headers["Set-Cookie"]
    assert lang_of(client.get("/signin", headers={"Accept-Language": "vi"})) == "vi"


def test_the_switcher_is_on_every_page_and_keeps_the_place(app, client):
    for path in ("/", "/signin", "/signup", "/docs", "/m/nonsense"):
        html = client.get(path).get_data(as_text=True)
        menu = BeautifulSoup(html, "html.parser").select_one("details.lang-menu")
        assert menu is not None, path
        links = {a["hreflang"]: a["href"] for a in menu.select("a")}
        assert set(links) == {"en", "it", "vi", "tr"}, path
        assert all(href.startswith(path + "?") and href.endswith(f"lang={code}")
                   for code, href in links.items()), path
    html = client.get("/?q=zz&page=2").get_data(as_text=True)
    assert 'href="/?q=zz&amp;page=2&amp;lang=it"' in html
    # a page answering a POST has no GET to come back to: the switcher goes home
    sign_up(client, "s@example.org")
    key_page = client.post("/account/key", data={"csrf_token": csrf(client, "/account")}).get_data(as_text=True)
    assert 'href="/?lang=vi"' in key_page


def test_the_apis_stay_english(client):
    italian = {"Accept-Language": "it", "Cookie": "lang=it"}
    bad = client.get("/api.php/generate?username=a", headers=italian)
    assert bad.json["error"] == "Invalid username. Use 3-20 alphanumeric characters only."
    assert client.get("/api/domains", headers=italian).json["message"].startswith("Unauthenticated. Send")
    assert "Content-Language" not in bad.headers


def test_page_json_answers_follow_the_language(app, client):
    client.get("/?lang=it")
    address = ADDRESS_RE.search(client.get("/").get_data(as_text=True)).group(1)
    msg_id = deliver(app, address, "Zz")
    resp = client.post(f"/web/messages/{msg_id}/delete",
                       headers={"X-CSRFToken": csrf(client), "Accept": "application/json"})
    assert resp.json == {"ok": True, "message": "Messaggio eliminato."}

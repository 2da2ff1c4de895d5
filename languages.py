"""The language of the web pages: Flask-Babel, four gettext catalogues, a
switcher on every page, ``Accept-Language`` negotiation, the choice remembered.

Which language a page is in, first match wins:

1. ``?lang=it`` on any page: an explicit choice, remembered in the ``lang``
   cookie for a year (the switcher's links are exactly this). An unsupported
   value (``?lang=auto``) forgets the choice and goes back to step 3.
2. the ``lang`` cookie of an earlier choice;
3. the best match of the browser's ``Accept-Language`` (``it-IT`` finds ``it``);
4. English.

The JSON APIs never follow any of this: their wire format (the seeds) is
English, so a request to them always gets ``en`` whatever it asks for.

The catalogues are ``translations/<lang>/LC_MESSAGES/messages.po``; the
compiled ``.mo`` files are committed next to them, so a fresh checkout needs
no build step (``make messages`` re-extracts, ``make compile-messages``
recompiles, and tests/test_web_i18n.py fails when a ``.mo`` is stale).
"""
from __future__ import annotations

from typing import Optional
from urllib.parse import urlencode

from flask import Flask, current_app, has_request_context, request
from flask_babel import Babel, get_locale
from werkzeug.exceptions import HTTPException

LANGS = ("en", "it", "vi", "tr")
NAMES = {"en": "English", "it": "Italiano", "vi": "Tiếng Việt", "tr": "Türkçe"}
DEFAULT = "en"
COOKIE = "lang"
COOKIE_AGE = 365 * 24 * 3600
# Blueprints whose answers are machine-read and keep the seeds' English.
API_BLUEPRINTS = {"legacy", "legacy_php", "api_v1"}


def asked_language() -> Optional[str]:
    """The language named by ``?lang=`` on this request, "" when the value is
    not one we have (forget the choice), None when there is no such parameter."""
    if "lang" not in request.args:
        return None
    wanted = request.args.get("lang", "").strip().lower()
    return wanted if wanted in LANGS else ""


def select_locale() -> str:
    """Flask-Babel's locale selector (see the module docstring for the order)."""
    if not has_request_context():  # the CLI: its messages are English
        return DEFAULT
    if request.blueprint in API_BLUEPRINTS or request.path.startswith("/api/"):
        return DEFAULT
    asked = asked_language()
    if asked:
        return asked
    remembered = request.cookies.get(COOKIE, "")
    if asked is None and remembered in LANGS:
        return remembered
    return request.accept_languages.best_match(LANGS) or DEFAULT


def current() -> str:
    """The language code of this request's pages ("en" outside a request)."""
    locale = get_locale()
    return locale.language if locale is not None else DEFAULT


def switch_url(code: str) -> str:
    """This page again in ``code``: the same path and query with ``lang`` set.
    A page that answered a POST has no GET of its own to come back to, so the
    switcher then leads to the site's home page."""
    path = request.path
    if request.method != "GET":
        try:
            current_app.url_map.bind("").match(path, method="GET")
        except HTTPException:
            path = "/"
        args = {}
    else:
        args = {k: v for k, v in request.args.items(multi=True) if k != "lang"}
    return path + "?" + urlencode(list(args.items()) + [("lang", code)])


def remember_choice(resp):
    """Store (or forget) an explicit ``?lang=`` choice; tell caches that the
    page's language depends on the request."""
    if request.blueprint in API_BLUEPRINTS or request.path.startswith(("/api/", "/static/")):
        return resp
    asked = asked_language()
    if asked:
        resp.set_cookie(COOKIE, asked, max_age=COOKIE_AGE, samesite="Lax", httponly=True,
                        secure=request.is_secure)
    elif asked == "" and COOKIE in request.cookies:
        resp.delete_cookie(COOKIE, samesite="Lax", httponly=True, secure=request.is_secure)
    if resp.mimetype == "text/html":
        resp.headers.setdefault("Content-Language", current())
        resp.vary.add("Accept-Language")
        resp.vary.add("Cookie")
    return resp


def template_context() -> dict:
    """``lang`` for ``<html lang>`` and the switcher's entries on every page."""
    if not has_request_context():
        return {}
    lang = current()
    return {"lang": lang,
            "languages": [{"code": code, "name": NAMES[code], "url": switch_url(code),
                           "current": code == lang} for code in LANGS]}


def init_app(app: Flask) -> None:
    """One Babel per application, so each app keeps its own catalogue cache."""
    Babel(app, locale_selector=select_locale, default_locale=DEFAULT,
          default_translation_directories="translations")
    app.context_processor(template_context)
    app.after_request(remember_choice)

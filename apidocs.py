"""The bundled API documentation: ``/docs`` in four languages and ``/openapi.json``.

The page structure lives in one template (``templates/docs/index.html``); the
words live in one JSON catalogue per language (``i18n/<lang>.json``); the facts
(routes, parameters, JSON examples, error bodies) live in ``docs_content`` and
the OpenAPI document in ``openapi``, so the page and the machine-readable
description are built from the same server and cannot drift apart silently.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from flask import Blueprint, Flask, jsonify, make_response, render_template, request

import docs_content
import languages
import openapi
from models import Domain, cfg

bp = Blueprint("apidocs", __name__)

I18N_DIR = Path(__file__).resolve().parent / "i18n"
LANGS = ("en", "it", "vi", "tr")
DEFAULT_LANG = "en"


@lru_cache(maxsize=None)
def catalogue(lang: str) -> dict:
    """The translated strings of ``lang`` (read once per process)."""
    with open(I18N_DIR / f"{lang}.json", encoding="utf-8") as fh:
        return json.load(fh)


def pick_language() -> str:
    """The page's language as every page picks it (languages.py: ``?lang=``,
    the remembered choice, ``Accept-Language``, English), so the site header
    (gettext) and the documentation (these catalogues) always agree."""
    lang = languages.current()
    return lang if lang in LANGS else DEFAULT_LANG


def group_digits(number: int, lang: str) -> str:
    """``50000`` as a reader of ``lang`` writes it (50,000 / 50.000)."""
    text = f"{number:,}"
    return text if lang == "en" else text.replace(",", ".")


def site_base() -> str:
    """This server's own origin as the client reached it, without a trailing slash."""
    return request.host_url.rstrip("/")


def plan_rows(lang: str) -> list[dict]:
    """The configured plans, for the quota table."""
    rows = []
    for name, plan in (cfg("plans") or {}).items():
        rows.append({"name": name, "quota": group_digits(int(plan.get("monthly_quota") or 0), lang),
                     "types": ", ".join(plan.get("domain_types") or ["free"]),
                     "lifetime": group_digits(int(plan.get("mailbox_lifetime_seconds") or 600), lang)})
    return rows


def webhook_timing(lang: str) -> dict:
    """The configured webhook deadline and retry schedule, as the docs state them."""
    conf = cfg("webhooks")
    def number(value: float) -> str:
        text = f"{value:g}"
        return text if lang == "en" else text.replace(".", ",")
    return {"timeout": number(float(conf["timeout_seconds"])), "first": number(float(conf["retry_base_seconds"])),
            "hours": number(round(float(conf["retry_for_seconds"]) / 3600, 1))}


@bp.get("/docs")
def docs_page():
    lang = pick_language()
    base = site_base()
    free = Domain.active_names(("free",)) or ["example.com"]
    content = docs_content.build(base, free[0])
    html = render_template(
        "docs/index.html", lang=lang, t=catalogue(lang), langs=[(c, catalogue(c)["lang_name"]) for c in LANGS],
        base=base, legacy=content["legacy"], user=content["user"], codes=content["codes"],
        user_base=base + "/api", legacy_base=base + "/api.php", plans=plan_rows(lang),
        timezone=cfg("timezone") or "UTC", site_name=cfg("site_name") or "TempMail",
        reserved=cfg("reserved_usernames") or [], webhook=content["webhook"], webhook_timing=webhook_timing(lang))
    resp = make_response(html)
    # The same URL answers in several languages: caches must key on the header.
    resp.headers["Content-Language"] = lang
    resp.vary.add("Accept-Language")
    return resp


@bp.get("/openapi.json")
def openapi_document():
    free = Domain.active_names(("free",)) or ["example.com"]
    resp = jsonify(openapi.document(site_base(), free[0], cfg("site_name") or "TempMail"))
    resp.headers["Access-Control-Allow-Origin"] = "*"  # for Swagger UIs hosted elsewhere
    return resp


def fill(text: str, **values) -> str:
    """Put ``values`` into the ``{name}`` placeholders of a catalogue string.
    Only the names given are replaced, so literal braces such as ``{id}`` in
    a route stay as they are (``str.format`` would choke on them)."""
    for name, value in values.items():
        text = text.replace("{" + name + "}", str(value))
    return text


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)
    app.add_template_filter(fill, "fill")

"""The bundled documentation (/docs): four languages, negotiation, every route
of both APIs, and samples that point at the server that rendered them."""
from __future__ import annotations

import html
import json
import re
from pathlib import Path


import apidocs

ROOT = Path(__file__).resolve().parent.parent
LANGS = ("en", "it", "vi", "tr")
# A sentence of each catalogue that only that language has, to tell pages apart.
MARKERS = {"en": "Quotas and rate-limit headers", "it": "Quote e intestazioni di limite",
           "vi": "Hạn ngạch và tiêu đề giới hạn", "tr": "Kotalar ve hız sınırı başlıkları"}


def page(client, url: str, **headers) -> str:
    resp = client.get(url, headers=headers)
    assert resp.status_code == 200
    return resp.get_data(as_text=True)


def html_lang(text: str) -> str:
    return re.search(r'<html lang="([^"]+)"', text).group(1)


def test_catalogues_have_the_same_keys_and_no_empty_strings():
    english = json.loads((ROOT / "i18n" / "en.json").read_text(encoding="utf-8"))
    for lang in LANGS:
        catalogue = json.loads((ROOT / "i18n" / f"{lang}.json").read_text(encoding="utf-8"))
        assert set(catalogue) == set(english), lang
        assert all(isinstance(v, str) and v.strip() for v in catalogue.values()), lang
        for key, text in catalogue.items():  # placeholders survive translation
            assert set(re.findall(r"\{\w+\}", text)) == set(re.findall(r"\{\w+\}", english[key])), (lang, key)
        if lang != "en":  # a translation, not a copy
            same = [k for k in english if catalogue[k] == english[k] and len(english[k]) > 25]
            assert not same, (lang, same)


def test_docs_in_each_language(client):
    for lang in LANGS:
        check_language_page(client, lang)


def check_language_page(client, lang: str) -> None:
    resp = client.get(f"/docs?lang={lang}")
    text = resp.get_data(as_text=True)
    assert resp.status_code == 200 and resp.headers["Content-Language"] == lang
    assert "Accept-Language" in resp.headers["Vary"]
    assert html_lang(text) == lang
    assert MARKERS[lang] in text
    assert all(MARKERS[other] not in text for other in LANGS if other != lang)
    strings = apidocs.catalogue(lang)
    for key in ("title", "auth_title", "codes_title", "d_user_switch", "p_owned_email"):
        assert strings[key] in html.unescape(text), key
    # the switch offers every language, the current one marked
    for code in LANGS:
        assert f'href="?lang={code}"' in text
    assert re.search(rf'href="\?lang={lang}"[^>]*aria-current="page"', text)


NEGOTIATION = [("it-IT,it;q=0.9,en;q=0.5", "it"), ("vi", "vi"), ("de-DE,tr;q=0.8,en;q=0.3", "tr"),
               ("fr-FR,de;q=0.9", "en"), ("", "en")]


def test_accept_language_negotiation(client):
    for header, expected in NEGOTIATION:
        assert html_lang(page(client, "/docs", **{"Accept-Language": header})) == expected, header


def test_lang_parameter_beats_accept_language(client):
    assert html_lang(page(client, "/docs?lang=vi", **{"Accept-Language": "tr"})) == "vi"
    assert html_lang(page(client, "/docs?lang=xx", **{"Accept-Language": "tr"})) == "tr"


def test_samples_use_this_servers_base_url(client):
    for lang in LANGS:
        check_samples(client, lang)


def check_samples(client, lang: str) -> None:
    text = html.unescape(client.get(f"/docs?lang={lang}", base_url="https://mail.example.net:8443")
                         .get_data(as_text=True))
    base = "https://mail.example.net:8443"
    assert "yourdomain.com" not in text and "tempmailg.com" not in text
    # one sample of each kind for the User API ...
    assert f"--url '{base}/api/emails'" in text
    assert f"fetch('{base}/api/emails', {{" in text
    assert f"requests.post('{base}/api/emails', headers=headers, timeout=30)" in text
    assert f"curl_init('{base}/api/emails');" in text
    # ... and for api.php, with no key
    assert f"--url '{base}/api.php/generate?username=johnsmith'" in text
    assert f"requests.get('{base}/api.php/stats', headers=headers, timeout=30)" in text
    assert f"{base}/api" in text and f"{base}/api.php" in text
    assert "Authorization: Bearer YOUR_USER_API_KEY" in text
    # examples name the configured domain, so they can be pasted as they are
    assert "demo123@example.com" in text


def documented_routes(text: str) -> set[tuple[str, str]]:
    found = re.findall(r'<span class="method method-\w+">(\w+)</span>\s*<code class="route">([^<]+)</code>', text)
    return {(method, path) for method, path in found}


def flask_path(rule) -> str:
    return re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule.rule)


def test_every_api_route_is_documented(app, client):
    text = html.unescape(page(client, "/docs"))
    documented = documented_routes(text)
    served = set()
    for rule in app.url_map.iter_rules():
        # attachments are documented at /uploads/..., the form file_path gives
        if rule.endpoint == "legacy_php.attachment_file":
            continue
        if rule.endpoint.startswith(("api_v1.", "legacy_php.")) or rule.endpoint == "legacy.attachment_file":
            for method in rule.methods - {"HEAD", "OPTIONS"}:
                served.add((method, flask_path(rule)))
    # the documentation names path parameters after what they hold
    aliases = {"{raw_id}": "{id}", "{public_id}": "{id}", "{att_id}": "{id}", "{name}": "{filename}"}
    normalised = set()
    for method, path in served:
        for old, new in aliases.items():
            if not (path.startswith("/api/") and old == "{name}"):
                path = path.replace(old, new)
        normalised.add((method, path))
    assert normalised <= documented, normalised - documented
    for status in ("401", "403", "404", "405", "422", "429"):
        assert f'id="code-{status}"' in text
    for header in ("X-RateLimit-Limit", "X-RateLimit-Used", "X-RateLimit-Remaining", "X-RateLimit-Reset"):
        assert header in text


def test_docs_show_the_configured_plans(app_factory):
    plans = {"free": {"monthly_quota": 1234, "domain_types": ["free"], "mailbox_lifetime_seconds": 300},
             "gold": {"monthly_quota": 2000000, "domain_types": ["free", "premium"],
                      "mailbox_lifetime_seconds": 7200}}
    client = app_factory({"plans": plans}).test_client()
    assert "<td>gold</td><td>2,000,000</td>" in page(client, "/docs?lang=en")
    assert "<td>gold</td><td>2.000.000</td>" in page(client, "/docs?lang=it")


def test_docs_have_no_inline_script_or_remote_asset(client):
    text = page(client, "/docs")
    assert not re.search(r"<script(?![^>]*\bsrc=)", text)
    assert not re.search(r"\son[a-z]+=", text)
    absolute = re.findall(r'(?:src|href)="((?:https?:)?//[^"]*)"', text)
    assert all(url.startswith("http://localhost/") for url in absolute), absolute  # own origin only
    assert client.get("/static/docs.js").status_code == 200
    assert client.get("/static/docs.css").status_code == 200

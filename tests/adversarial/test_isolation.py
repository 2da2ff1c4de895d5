"""Isolation: user A's key never reads, changes or learns of user B's
mailboxes, messages or attachments (foreign answers exactly like missing);
session cookies are HttpOnly, SameSite and Secure over HTTPS; every form
needs its CSRF token; an ``email_token`` cannot be forged or moved to
another mailbox. Runs on SQLite and PostgreSQL."""
from __future__ import annotations

import re

import pytest
from itsdangerous import URLSafeSerializer

import mailhandler
from models import ApiKey, Mailbox, Message, User, db

from .helpers import build_message, record


def make_user(app, email: str) -> str:
    with app.app_context():
        user = User.create(email, password="correct horse battery")
        _, raw = ApiKey.issue(user)
        db.session.commit()
        return raw


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"], indirect=True)
def test_user_api_keys_see_only_their_own(app, backend):
    client = app.test_client()
    key_a, key_b = make_user(app, "a@users.test"), make_user(app, "b@users.test")
    as_a, as_b = ({"Authorization": f"Bearer {k}"} for k in (key_a, key_b))
    box_a = client.post("/api/emails", headers=as_a).get_json()["data"]["email"]
    box_b = client.post("/api/emails", headers=as_b).get_json()["data"]["email"]
    with app.app_context():
        (msg,) = mailhandler.deliver(build_message(1, box_b, [("secret.txt", b"B's secret")]), [box_b])
        foreign_id = msg.public_id
    missing_id = "Z" * 46
    user_b, _, domain_b = box_b.partition("@")
    probes = [("GET", "/api/messages?email={box}"), ("DELETE", "/api/emails/{box}"),
              ("POST", "/api/emails/{box}/renamed123/example.com"), ("GET", "/api/messages/{msg}"),
              ("DELETE", "/api/messages/{msg}"), ("GET", "/api/messages/{msg}/attachments/secret.txt")]
    compared = 0
    for method, template in probes:
        foreign = client.open(template.format(box=box_b, msg=foreign_id), method=method, headers=as_a)
        missing = client.open(template.format(box=f"nobody1@{domain_b}", msg=missing_id), method=method,
                              headers=as_a)
        assert foreign.status_code == missing.status_code == 404, (method, template)
        assert foreign.get_json() == missing.get_json()
        compared += 1
    listing = client.get(f"/api/messages?email={box_a}", headers=as_a).get_json()
    assert listing["messages"] == []
    mine = client.get(f"/api/messages?email={box_b}", headers=as_b).get_json()["messages"]
    assert [m["id"] for m in mine] == [foreign_id]
    assert client.get(f"/api/messages/{foreign_id}/attachments/secret.txt", headers=as_b).data == b"B's secret"
    with app.app_context():
        assert Mailbox.find_live(box_b).user_id is not None and db.session.get(Message, msg.id) is not None
    record("isolation", f"{backend}: {compared} User API probes with A's key on B's mailbox/message/"
           f"attachment answer 404 with the body of a missing one; B's data intact")


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"], indirect=True)
def test_email_token_cannot_be_forged_or_moved(app, backend):
    client = app.test_client()
    with app.app_context():
        from models import Domain
        domain = Domain.by_name("example.com")
        box_a = Mailbox.create("tokena", domain, 86400)
        box_b = Mailbox.create("tokenb", domain, 86400)
        token_a = box_a.email_token()
        (msg_b,) = mailhandler.deliver(build_message(2, box_b.address), [box_b.address])
        forged = URLSafeSerializer("not the secret", salt="mailbox-token").dumps([box_b.id, box_b.token])
        guessed = URLSafeSerializer(app.config["SECRET_KEY"], salt="mailbox-token").dumps([box_b.id, "0" * 16])
        msg_b_id = msg_b.id
    assert client.get(f"/m/{token_a}").status_code == 200
    tampered = token_a[:-2] + ("AA" if not token_a.endswith("AA") else "BB")
    refused = [client.get(f"/m/{t}").status_code for t in (tampered, forged, guessed)]
    moved = client.get(f"/m/{token_a}/messages/{msg_b_id}").status_code
    with app.app_context():
        Mailbox.find_live("tokena@example.com").delete()
        db.session.commit()
        Mailbox.create("tokena", Domain.by_name("example.com"), 86400)
    reused = client.get(f"/m/{token_a}").status_code
    record("isolation", f"{backend}: email_token tampered/forged/guessed -> {refused}, A's token on B's "
           f"message -> {moved}, old token after the address was re-created -> {reused}")
    assert refused == [404, 404, 404] and moved == 404 and reused == 404


def session_cookie(resp) -> str:
    return next(h for h in resp.headers.getlist("Set-Cookie") if h.startswith("session="))


def test_session_cookie_flags(app_factory):
    plain = app_factory().test_client().get("/")
    https = app_factory().test_client().get("/", base_url="https://localhost")
    proxied = app_factory({"behind_proxy": True}).test_client().get(
        "/", headers={"X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.9"})
    flags = {name: session_cookie(resp) for name, resp in (("http", plain), ("https", https),
                                                            ("proxy", proxied))}
    for cookie in flags.values():
        assert "HttpOnly" in cookie and "SameSite=Lax" in cookie
    assert "Secure" not in flags["http"]  # a plain-HTTP dev server must still work
    assert "Secure" in flags["https"] and "Secure" in flags["proxy"]
    record("isolation", "session cookie: HttpOnly + SameSite=Lax always, Secure over HTTPS and behind "
           "a proxy that says X-Forwarded-Proto: https")


def test_every_form_needs_its_csrf_token(app_factory):
    app = app_factory(WTF_CSRF_ENABLED=True)
    client = app.test_client()
    client.get("/")  # a session with a mailbox
    forms = sorted({rule.rule for rule in app.url_map.iter_rules() if "POST" in (rule.methods or ())
                    and not rule.rule.startswith(("/api/", "/api.php", "/<"))})
    refused = {}
    for rule in forms:
        url = re.sub(r"<(?:int:)?(\w+)>", "1", rule)
        refused[rule] = client.post(url, data={"username": "x", "email": "a@b.test", "password": "p"}).status_code
    record("isolation", f"CSRF: {len(forms)} form endpoints without a token -> "
           f"{sorted(set(refused.values()))} ({', '.join(forms)})")
    assert len(forms) >= 6
    assert set(refused.values()) == {400}
